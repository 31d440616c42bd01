"""The attack registry: every attack, of every kind, is registered once with its family,
threat level and parameters, and suites, the planner and the worker know it by name.

Two kinds of attack:

* ``batch``: a pure function ``fn(images, ctx, **params) -> images`` on float NCHW batches in
  [0, 1]; it must return a batch of the same shape in [0, 1], be batched (no per-image Python
  loops where torch/Kornia can do the batch), and draw randomness only from ``ctx.generator``
  (or from seeds derived from ``ctx.seed``). It runs once per shard.
* ``dataset``: ``fn(ctx, **params) -> record`` with a :class:`DatasetContext`; it needs the
  whole dataset at once (learning attacks train on it) and runs as one task. Its record holds
  per-model counts that :mod:`neaudit.results` turns into rows.

``clean`` and ``none`` (:mod:`neaudit.vocabulary`) are not attacks but the two reference
conditions every audit measures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from neaudit.errors import NeauditError
from neaudit.vocabulary import CLEAN, FAMILIES, NONE, THREAT_LEVELS  # noqa: F401 (re-exported)

BATCH, DATASET = "batch", "dataset"


@dataclass
class AttackContext:
    """What a batch attack may use besides the images.

    ``seed`` is the audit's seed, for attacks that derive their own streams (training a
    denoiser); ``reference`` holds clean in-distribution images the attacker owns (L2);
    ``originals`` the clean originals of the current batch, for oracle attacks in tests only.
    """

    generator: torch.Generator
    seed: int = 0
    device: torch.device = torch.device("cpu")
    reference: torch.Tensor | None = None
    originals: torch.Tensor | None = None
    cache_dir: Path | None = None
    extras: dict = field(default_factory=dict)


@dataclass
class DatasetContext:
    """What a dataset attack may use: every item (``gather(indices)`` returns the protected
    images, their clean originals and labels), the zoo, the audit's seed, and the number
    format its zoo's forwards run in (``bf16`` or ``fp32``:
    :func:`neaudit.device.resolve_precision`), which the learning attacks extract features
    and fine-tune in."""

    gather: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    labels: np.ndarray
    num_classes: int
    models: dict
    authorized: str
    seed: int
    precision: str = "fp32"


AttackFn = Callable[..., object]


@dataclass(frozen=True)
class Param:
    """One attack parameter: its default (whose type is the parameter's type: int, float or
    a list of floats), an inclusive range and optionally the only values allowed; or, with
    ``path``, a local folder (default ``""``: none), which must exist and, when ``holds`` is
    given, contain one of those files (checked when a suite loads, before any work)."""

    default: object
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    path: bool = False
    holds: tuple[str, ...] = ()

    def check(self, value: object) -> object:
        """``value`` as the parameter's type; raises ValueError saying what is wrong."""
        if self.path:
            if not isinstance(value, str):
                raise ValueError("must be a folder path (a string)")
            if value and not Path(value).is_dir():
                raise ValueError("names no folder")
            if value and self.holds and not any((Path(value) / f).is_file() for f in self.holds):
                raise ValueError(f"holds none of {', '.join(self.holds)}")
            return value
        if isinstance(self.default, list):
            if not isinstance(value, list | tuple) or not value:
                raise ValueError("must be a non-empty list of numbers")
            return [self._number(v, float) for v in value]
        return self._number(value, type(self.default))

    def _number(self, value: object, kind: type) -> int | float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be {'an integer' if kind is int else 'a number'}")
        if kind is int and value != int(value):
            raise ValueError("must be an integer")
        value = kind(value)
        if not math.isfinite(value):
            raise ValueError("must be finite")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(map(str, self.choices))}")
        if (self.low is not None and value < self.low) or (
                self.high is not None and value > self.high):
            raise ValueError(f"must lie in [{self.low:g}, {self.high:g}]")
        return value

    def describe(self) -> str:
        """What the parameter accepts, as the object of "give" in a fix."""
        if self.path:
            return "a path to a local folder" + (f" holding {' or '.join(self.holds)}"
                                                 if self.holds else "")
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        kind = ("a list of numbers" if isinstance(self.default, list) else
                "an integer" if isinstance(self.default, int) else "a number")
        return f"{kind} in [{self.low:g}, {self.high:g}]"


def odd_kernel(default: int) -> Param:
    """A filter window: odd sizes from 3 to 31."""
    return Param(default, 3, 31, tuple(range(3, 32, 2)))


@dataclass(frozen=True)
class Attack:
    name: str
    family: str
    threat: str
    fn: AttackFn
    params: dict[str, Param]
    kind: str = BATCH

    @property
    def defaults(self) -> dict[str, object]:
        return {name: param.default for name, param in self.params.items()}

    def check_params(self, params: dict[str, object]) -> dict[str, object]:
        """The given parameters, typed and range-checked; raises NeauditError naming the
        attack, the parameter and what it accepts."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise NeauditError(
                f"attack '{self.name}' has no parameter {', '.join(map(repr, unknown))}. "
                f"Valid parameters: {', '.join(self.params) or '(none)'}.")
        checked = {}
        for name, value in params.items():
            try:
                checked[name] = self.params[name].check(value)
            except ValueError as exc:
                raise NeauditError(
                    f"attack '{self.name}': {name} = {value!r} {exc}. Fix: give "
                    f"{self.params[name].describe()} (default {self.params[name].default}).",
                ) from None
        return checked

    def __call__(self, images: torch.Tensor, ctx: AttackContext, **params) -> torch.Tensor:
        """Attack one batch (``batch`` kind)."""
        if self.kind != BATCH:
            raise TypeError(f"{self.name} attacks a whole dataset: use run_on_dataset")
        return self.fn(images, ctx, **{**self.defaults, **self.check_params(params)}).clamp(0, 1)

    def run_on_dataset(self, ctx: DatasetContext, **params) -> dict:
        """Attack the whole dataset (``dataset`` kind) and return its task record."""
        if self.kind != DATASET:
            raise TypeError(f"{self.name} attacks one batch at a time: call it on images")
        return self.fn(ctx, **{**self.defaults, **self.check_params(params)})


ATTACKS: dict[str, Attack] = {}


def register_attack(name: str, family: str, threat: str, params: dict[str, Param],
                    kind: str = BATCH) -> Callable[[AttackFn], AttackFn]:
    """Register ``fn`` under ``name`` with its parameters' schema; the same function may be
    registered under several names (e.g. JPEG as a preprocessing step and as a
    purification)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    if threat not in THREAT_LEVELS:
        raise ValueError(f"threat must be one of {tuple(THREAT_LEVELS)}")
    if kind not in (BATCH, DATASET):
        raise ValueError(f"kind must be {BATCH} or {DATASET}")

    def decorate(fn: AttackFn) -> AttackFn:
        ATTACKS[name] = Attack(name, family, threat, fn, dict(params), kind)
        return fn

    return decorate


def get_attack(name: str) -> Attack:
    if name not in ATTACKS:
        raise NeauditError(f"unknown attack '{name}'. Valid attacks: {', '.join(sorted(ATTACKS))}.")
    return ATTACKS[name]
