"""One builder per spec scheme: timm, open_clip (zero-shot over the class names),
TorchScript, a Python factory, and the shipped demo models. Weights never come from the
network: ``pretrained=true`` resolves to a file already in the local hub caches."""

from __future__ import annotations

import importlib.util
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from neaudit.errors import ModelSpecError
from neaudit.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageClassifier,
    ModelSpec,
    floats_option,
    size_option,
)

CLIP_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a rendering of a {}.",
)

class ZeroShotCLIP(nn.Module):
    """open_clip image tower + text embeddings of the class names → cosine logits."""

    def __init__(self, clip_model: nn.Module, text_features: torch.Tensor) -> None:
        super().__init__()
        self.clip_model = clip_model
        self.register_buffer("text_features", text_features)

    def forward(self, normalized_images: torch.Tensor) -> torch.Tensor:
        features = F.normalize(self.clip_model.encode_image(normalized_images), dim=-1)
        return 100.0 * features @ self.text_features.T

def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights from a local ``.safetensors`` or ``.pt/.pth`` file, as data only."""
    path = Path(path)
    if not path.is_file():
        raise ModelSpecError(f"weights file {path} does not exist. Fix: give the path of a "
                             ".safetensors or .pth state dict.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # objects beyond tensors: code, as far as we know
        raise ModelSpecError(f"{path}: holds Python objects besides tensors, which neaudit does "
                             "not unpickle (loading them can run code). Fix: save a state dict "
                             "of tensors (torch.save(model.state_dict(), …) or .safetensors) "
                             "where the model was trained.") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def _apply_weights(net: nn.Module, spec: ModelSpec) -> None:
    if "weights" in spec.options:
        try:
            net.load_state_dict(load_state_dict(spec.options["weights"]))
        except RuntimeError as exc:
            raise ModelSpecError(f"{spec.options['weights']}: weights do not fit "
                                 f"'{spec.text}' ({' '.join(str(exc).split())[:300]}). Fix: "
                                 "give the architecture and options (num_classes, img_size) "
                                 "the weights were trained with.") from exc


def cached_weights(hub_id: str | None, url: str | None, filenames: Sequence[str]) -> str | None:
    """Path of pretrained weights already on disk (hub cache, then torch hub), else None."""
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo = hub_id.rstrip("/")
        for filename in filenames:
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str):
                return found
    if url:
        local = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if local.is_file():
            return str(local)
    return None


_TIMM_RESERVED = {"pretrained", "weights", "mean", "std", "input_size"}
_TIMM_COUNTS = {"num_classes", "img_size", "in_chans"}


def _build_timm(spec: ModelSpec, class_names: Sequence[str] | None) -> ImageClassifier:
    import timm

    kwargs: dict = {}
    for key, value in spec.options.items():
        if key in _TIMM_RESERVED:
            continue
        if key in _TIMM_COUNTS and not (value.isdigit() and int(value) >= 1):
            raise ModelSpecError(f"'{spec.text}': {key}={value} must be a positive integer. "
                                 f"Fix: e.g. {key}=10.")
        kwargs[key] = int(value) if value.lstrip("-").isdigit() else value
    if spec.target.split(".")[0] not in timm.list_models():
        raise ModelSpecError(f"timm has no model '{spec.target}'. Fix: pick a name from "
                             "timm.list_models().")
    if spec.flag("pretrained") and "weights" not in spec.options:
        cfg = timm.models.get_pretrained_cfg(spec.target)
        cfg = cfg.to_dict() if cfg is not None else {}
        local = cfg.get("file") or cached_weights(
            cfg.get("hf_hub_id"), cfg.get("url"), ("model.safetensors", "pytorch_model.bin"))
        if local is None:
            raise _missing_weights(spec, "not in the hub cache")
        kwargs["pretrained_cfg_overlay"] = {"file": local}
        net = timm.create_model(spec.target, pretrained=True, **kwargs)
    else:
        net = timm.create_model(spec.target, pretrained=False, **kwargs)
    _apply_weights(net, spec)
    cfg = net.pretrained_cfg
    size = size_option(spec) or size_option(spec, "img_size") or tuple(cfg["input_size"][-2:])
    model = ImageClassifier(
        net,
        floats_option(spec, "mean", cfg.get("mean", IMAGENET_MEAN)),
        floats_option(spec, "std", cfg.get("std", IMAGENET_STD)),
        size, spec.text, cfg.get("interpolation", "bilinear"),
    )
    model.random_init = not spec.flag("pretrained") and "weights" not in spec.options
    return model


def _missing_weights(spec: ModelSpec, reason: str) -> ModelSpecError:
    return ModelSpecError(
        f"cannot load pretrained weights for '{spec.text}' ({reason}). neaudit never "
        "downloads: fill the hub cache beforehand on a machine with network (e.g. "
        "`huggingface-cli download <repo>`, then copy HF_HOME), or pass a local file with "
        "?weights=/path/file.safetensors (timm) or ?pretrained=/path/file.bin (open_clip), or "
        "use ?pretrained=false for a random-init model.")


def _build_open_clip(spec: ModelSpec, class_names: Sequence[str] | None) -> ImageClassifier:
    import open_clip

    if not class_names:
        raise ModelSpecError(f"'{spec.text}' is a zero-shot classifier and needs class names. "
                             "Fix: use an ImageFolder layout or give class_names.")
    if spec.target not in open_clip.list_models():
        raise ModelSpecError(f"open_clip has no architecture '{spec.target}'. Fix: pick one "
                             "from open_clip.list_models().")
    tag = spec.options.get("pretrained") or None
    if tag is not None and not Path(tag).is_file():
        cfg = open_clip.get_pretrained_cfg(spec.target, tag)
        if not cfg:
            raise ModelSpecError(f"open_clip has no pretrained tag '{tag}' for {spec.target}. "
                                 "Fix: see open_clip.list_pretrained().")
        tag = cached_weights(cfg.get("hf_hub"), cfg.get("url"),
                             ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
        if tag is None:
            raise _missing_weights(spec, "not in the hub cache")
    model = open_clip.create_model(spec.target, pretrained=tag)
    model.eval()
    tokenizer = open_clip.get_tokenizer(spec.target)
    with torch.no_grad():
        embeddings = []
        for name in class_names:
            tokens = tokenizer([t.format(name.replace("_", " ")) for t in CLIP_TEMPLATES])
            text = F.normalize(model.encode_text(tokens), dim=-1).mean(0)
            embeddings.append(F.normalize(text, dim=-1))
    cfg = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return ImageClassifier(
        ZeroShotCLIP(model, torch.stack(embeddings)),
        floats_option(spec, "mean", cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        floats_option(spec, "std", cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        size_option(spec) or size, spec.text, cfg.get("interpolation", "bicubic"),
    )


def _build_torchscript(spec: ModelSpec, class_names: Sequence[str] | None) -> ImageClassifier:
    path = Path(spec.target)
    if not path.is_file():
        raise ModelSpecError(f"TorchScript file {path} does not exist. Fix: give the path of a "
                             "file saved with torch.jit.save.")
    net = torch.jit.load(str(path), map_location="cpu")
    return ImageClassifier(net, floats_option(spec, "mean", IMAGENET_MEAN),
                           floats_option(spec, "std", IMAGENET_STD), size_option(spec),
                           spec.text)


def _build_python(spec: ModelSpec, class_names: Sequence[str] | None) -> ImageClassifier:
    file, _, factory = spec.target.rpartition(":")
    if not file or not factory:
        raise ModelSpecError(f"'{spec.text}': expected python:<file.py>:<factory>.")
    path = Path(file)
    if not path.is_file():
        raise ModelSpecError(f"Python model file {path} does not exist. Fix: give the path of "
                             "the .py file that defines the factory.")
    module_spec = importlib.util.spec_from_file_location(f"neaudit_user_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    make: Callable[[], nn.Module] | None = getattr(module, factory, None)
    if not callable(make):
        raise ModelSpecError(f"{path} defines no function '{factory}'. Fix: name a function "
                             "the file defines, after the last ':'.")
    try:
        net = make()
    except TypeError as exc:
        raise ModelSpecError(f"'{spec.text}': {factory}() cannot be called without arguments "
                             f"({exc}). Fix: give a factory that takes none.") from exc
    if not isinstance(net, nn.Module):
        raise ModelSpecError(f"'{spec.text}': {factory}() returned a {type(net).__name__}, not "
                             "a torch.nn.Module. Fix: return the model itself.")
    _apply_weights(net, spec)
    return ImageClassifier(net, floats_option(spec, "mean", IMAGENET_MEAN),
                           floats_option(spec, "std", IMAGENET_STD), size_option(spec),
                           spec.text)


def _build_demo(spec: ModelSpec, class_names: Sequence[str] | None) -> ImageClassifier:
    from neaudit import demo_zoo

    if spec.target not in demo_zoo.ARCHITECTURES:
        raise ModelSpecError(f"no demo model '{spec.target}'. Fix: use one of "
                             f"{', '.join('demo:' + n for n in demo_zoo.ARCHITECTURES)}.")
    weights = spec.options.get("weights")
    net = demo_zoo.build(spec.target, Path(weights) if weights else None)
    return ImageClassifier(net, demo_zoo.MEAN, demo_zoo.STD, (demo_zoo.SIZE, demo_zoo.SIZE),
                           spec.text)


RUNS_CODE = frozenset({"torchscript", "python"})
"""Schemes whose specs load code from a file (a TorchScript program, a Python module): built
where the user names them, never where an input does (a release's ``neaudit.json``)."""

BUILDERS: dict[str, Callable[[ModelSpec, Sequence[str] | None], ImageClassifier]] = {
    "timm": _build_timm,
    "open_clip": _build_open_clip,
    "torchscript": _build_torchscript,
    "python": _build_python,
    "demo": _build_demo,
}
