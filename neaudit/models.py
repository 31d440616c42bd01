"""Classifiers on [0, 1] images, and model specs: what every other module sees of a model.

An :class:`ImageClassifier` owns its preprocessing (resize to ``input_size`` when set, then
per-channel normalization); a :class:`ModelSpec` is a parsed spec string
``scheme:target?key=value&...`` (see :mod:`neaudit.zoo`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
from urllib.parse import parse_qsl

import torch
import torch.nn as nn
import torch.nn.functional as F

from neaudit.errors import ModelSpecError
from neaudit.presets import PRESETS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCHEMES = ("timm", "open_clip", "torchscript", "python", "demo")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec string: ``scheme:target?key=value&...``."""

    scheme: str
    target: str
    options: dict[str, str]
    text: str

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        scheme, sep, rest = text.partition(":")
        if not sep or scheme not in SCHEMES:
            raise ModelSpecError(
                f"unknown model spec '{text}'. Fix: start it with one of "
                f"{', '.join(s + ':' for s in SCHEMES)} (e.g. timm:resnet18?pretrained=false), "
                f"or use a preset: {', '.join(PRESETS)}.")
        target, _, query = rest.partition("?")
        if not target:
            raise ModelSpecError(f"model spec '{text}' names no model after '{scheme}:'.")
        return cls(scheme, target, dict(parse_qsl(query, keep_blank_values=True)), text)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.options.get(key)
        return default if value is None else value.lower() in ("1", "true", "yes")

class ImageClassifier(nn.Module):
    """A classifier on [0, 1] RGB NCHW images that owns its resize and normalization."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float],
                 input_size: tuple[int, int] | None, name: str,
                 interpolation: str = "bilinear") -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.input_size = input_size
        self.name = name
        self.interpolation = "bicubic" if interpolation == "bicubic" else "bilinear"
        self.random_init = False  # set by a builder that knows no weights were loaded

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images → the normalized tensor the network's first layer sees."""
        if self.input_size is not None and tuple(images.shape[-2:]) != tuple(self.input_size):
            images = F.interpolate(images, size=self.input_size, mode=self.interpolation,
                                   antialias=True, align_corners=False)
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(images))

def check_model(model: ImageClassifier, images: torch.Tensor) -> int:
    """Run ``model`` on a few dataset images: refuse one that raises, or that does not return
    finite (N, classes) logits, before any work relies on it. Returns its class count."""
    try:
        with torch.inference_mode():
            logits = model(images.to(model.mean.device))
    except Exception as exc:  # the user's model code
        raise ModelSpecError(f"'{model.name}': the forward pass on {tuple(images.shape)} images "
                             f"fails ({type(exc).__name__}: {str(exc)[:300]}). Fix: check the "
                             "spec's input_size and the model's code.") from exc
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != len(
            images) or logits.shape[1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise ModelSpecError(f"'{model.name}': returns {shape} for {len(images)} images; "
                             "neaudit needs (images, classes) logits with 2 or more classes.")
    if not torch.isfinite(logits).all():
        raise ModelSpecError(f"'{model.name}': returns NaN or infinite logits on the dataset's "
                             "images. Fix: check its weights and normalization.")
    return int(logits.shape[1])

def wrap(net: nn.Module, mean: Sequence[float] = IMAGENET_MEAN,
         std: Sequence[float] = IMAGENET_STD, input_size: tuple[int, int] | None = None,
         name: str = "custom") -> ImageClassifier:
    """Give any ``nn.Module`` classifier its preprocessing (the Python-API door for models)."""
    return ImageClassifier(net, mean, std, input_size, name).eval().requires_grad_(False)

def size_option(spec: ModelSpec, key: str = "input_size") -> tuple[int, int] | None:
    value = spec.options.get(key)
    if value is None:
        return None
    try:
        parts = [int(v) for v in value.replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2, 3) or min(parts) < 1:
        raise ModelSpecError(f"'{spec.text}': {key}={value} is not a size. Fix: give one or two "
                             f"positive integers, e.g. {key}=224 or {key}=224x224.")
    return (parts[-2], parts[-1]) if len(parts) > 1 else (parts[0], parts[0])


def floats_option(spec: ModelSpec, key: str, default: Sequence[float]) -> tuple[float, ...]:
    value = spec.options.get(key)
    if value is None:
        return tuple(default)
    try:
        numbers = tuple(float(v) for v in value.split(","))
    except ValueError:
        numbers = ()
    if len(numbers) != 3 or not all(math.isfinite(v) for v in numbers) or (
            key == "std" and min(numbers) <= 0):
        raise ModelSpecError(f"'{spec.text}': {key}={value} is not three per-channel numbers"
                             f"{' above 0' if key == 'std' else ''}. Fix: e.g. "
                             f"{key}=0.5,0.5,0.5.")
    return numbers


_NAMED = re.compile(rf"^([A-Za-z0-9_.+-]+)=((?:{'|'.join(SCHEMES)}):.*)$", re.S)


def split_name(text: str) -> tuple[str | None, str]:
    """``NAME=SPEC`` → (NAME, SPEC); a plain spec → (None, spec)."""
    match = _NAMED.match(text.strip())
    return (match.group(1), match.group(2)) if match else (None, text.strip())


def short_name(spec: str) -> str:
    """What people read for a spec: the timm architecture, the open_clip architecture and
    tag, a ``python:`` factory's name, a TorchScript file's stem; demo models keep theirs."""
    scheme, _, rest = spec.partition(":")
    target, _, query = rest.partition("?")
    if scheme == "timm":
        return target.split(".")[0]
    if scheme == "open_clip":
        tag = dict(parse_qsl(query)).get("pretrained")
        return f"{target}/{tag}" if tag else target
    if scheme == "python":
        return target.rpartition(":")[2] or target
    if scheme == "torchscript":
        return PurePath(target).stem
    return spec


def display_names(texts: Sequence[str]) -> dict[str, str]:
    """Spec → display name for a zoo: given names (``NAME=SPEC``) kept, others shortened,
    made unique with ``-2``, ``-3``… where two would read alike. Keys are the plain specs."""
    parsed = [split_name(text) for text in texts]
    taken = {name for name, _ in parsed if name}
    names: dict[str, str] = {}
    for given, spec in parsed:
        if spec in names:
            continue
        name = given or short_name(spec)
        if not given:
            base, count = name, 1
            while name in taken:
                count += 1
                name = f"{base}-{count}"
        taken.add(name)
        names[spec] = name
    return names
