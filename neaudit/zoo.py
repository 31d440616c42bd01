"""The model zoo: spec strings → classifiers that take [0, 1] images.

Specs use each ecosystem's own names, with URL-query options::

    timm:resnet50?pretrained=true
    timm:vit_small_patch16_224?pretrained=false&num_classes=10&img_size=64
    timm:resnet18?num_classes=10&weights=/path/to/weights.safetensors
    open_clip:ViT-B-32?pretrained=openai            (zero-shot over the class names)
    torchscript:/path/model.pt?mean=0.5,0.5,0.5&std=0.5,0.5,0.5&input_size=32
    python:/path/models.py:make_net?weights=/path/state_dict.pt&input_size=32
    demo:patch_cnn                                  (the trained digits zoo shipped with neaudit)

Every :class:`ImageClassifier` owns its preprocessing (resize to ``input_size`` when set,
then per-channel normalization), read from timm's ``pretrained_cfg`` or open_clip's
transforms, and overridable with ``mean=``, ``std=``, ``input_size=``.

Weights never come from the network: ``pretrained=true`` resolves to a file already in the
user's Hugging Face hub cache or torch hub cache (:func:`cached_weights`), and a missing file is
an error that says how to provide it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import torch
import torch.nn as nn
import torch.nn.functional as F

from neaudit.errors import ModelSpecError
from neaudit.presets import PRESETS
from neaudit.seeding import seeded

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CLIP_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a rendering of a {}.",
)


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
        if not sep or scheme not in BUILDERS:
            raise ModelSpecError(
                f"unknown model spec '{text}'. Fix: start it with one of "
                f"{', '.join(s + ':' for s in BUILDERS)} (e.g. timm:resnet18?pretrained=false), "
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

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images → the normalized tensor the network's first layer sees."""
        if self.input_size is not None and tuple(images.shape[-2:]) != tuple(self.input_size):
            images = F.interpolate(images, size=self.input_size, mode=self.interpolation,
                                   antialias=True, align_corners=False)
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(images))


class ZeroShotCLIP(nn.Module):
    """open_clip image tower + text embeddings of the class names → cosine logits."""

    def __init__(self, clip_model: nn.Module, text_features: torch.Tensor) -> None:
        super().__init__()
        self.clip_model = clip_model
        self.register_buffer("text_features", text_features)

    def forward(self, normalized_images: torch.Tensor) -> torch.Tensor:
        features = F.normalize(self.clip_model.encode_image(normalized_images), dim=-1)
        return 100.0 * features @ self.text_features.T


def create_model(spec: str | ModelSpec | ImageClassifier,
                 class_names: Sequence[str] | None = None) -> ImageClassifier:
    """The one door into the zoo: resolve a spec string into an eval-mode classifier."""
    if isinstance(spec, ImageClassifier):
        return spec.eval()
    parsed = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    # Random-init weights are seeded from the spec text, so one spec names one network in
    # every process (protect and audit see the same random-init model).
    model = seeded(lambda: BUILDERS[parsed.scheme](parsed, class_names), "model", parsed.text)
    return model.eval().requires_grad_(False)


def wrap(net: nn.Module, mean: Sequence[float] = IMAGENET_MEAN,
         std: Sequence[float] = IMAGENET_STD, input_size: tuple[int, int] | None = None,
         name: str = "custom") -> ImageClassifier:
    """Give any ``nn.Module`` classifier its preprocessing (the Python-API door for models)."""
    return ImageClassifier(net, mean, std, input_size, name).eval().requires_grad_(False)


def resolve_zoo(zoo: str | Sequence[str]) -> list[str]:
    """Preset name, comma-separated specs, or a list of specs → a list of spec strings."""
    if isinstance(zoo, str):
        if zoo in PRESETS:
            return list(PRESETS[zoo])
        return [s for s in (part.strip() for part in zoo.split(",")) if s]
    return list(zoo)


def _size_option(spec: ModelSpec, key: str = "input_size") -> tuple[int, int] | None:
    value = spec.options.get(key)
    if value is None:
        return None
    parts = [int(v) for v in value.replace("x", ",").split(",")]
    return (parts[-2], parts[-1]) if len(parts) > 1 else (parts[0], parts[0])


def _floats_option(spec: ModelSpec, key: str, default: Sequence[float]) -> tuple[float, ...]:
    value = spec.options.get(key)
    return tuple(default) if value is None else tuple(float(v) for v in value.split(","))


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights from a local ``.safetensors`` or ``.pt/.pth`` file, as data only."""
    path = Path(path)
    if not path.is_file():
        raise ModelSpecError(f"weights file {path} does not exist. Fix: give the path of a "
                             ".safetensors or .pth state dict.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def _apply_weights(net: nn.Module, spec: ModelSpec) -> None:
    if "weights" in spec.options:
        try:
            net.load_state_dict(load_state_dict(spec.options["weights"]))
        except RuntimeError as exc:
            raise ModelSpecError(f"{spec.options['weights']}: weights do not fit "
                                 f"'{spec.text}' ({str(exc)[:300]}).") from exc


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


def _build_timm(spec: ModelSpec, class_names: Sequence[str] | None) -> ImageClassifier:
    import timm

    kwargs: dict = {}
    for key, value in spec.options.items():
        if key in _TIMM_RESERVED:
            continue
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
    size = _size_option(spec) or _size_option(spec, "img_size") or tuple(cfg["input_size"][-2:])
    return ImageClassifier(
        net,
        _floats_option(spec, "mean", cfg.get("mean", IMAGENET_MEAN)),
        _floats_option(spec, "std", cfg.get("std", IMAGENET_STD)),
        size, spec.text, cfg.get("interpolation", "bilinear"),
    )


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
        _floats_option(spec, "mean", cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        _floats_option(spec, "std", cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        _size_option(spec) or size, spec.text, cfg.get("interpolation", "bicubic"),
    )


def _build_torchscript(spec: ModelSpec, class_names: Sequence[str] | None) -> ImageClassifier:
    path = Path(spec.target)
    if not path.is_file():
        raise ModelSpecError(f"TorchScript file {path} does not exist.")
    net = torch.jit.load(str(path), map_location="cpu")
    return ImageClassifier(net, _floats_option(spec, "mean", IMAGENET_MEAN),
                           _floats_option(spec, "std", IMAGENET_STD), _size_option(spec),
                           spec.text)


def _build_python(spec: ModelSpec, class_names: Sequence[str] | None) -> ImageClassifier:
    file, _, factory = spec.target.rpartition(":")
    if not file or not factory:
        raise ModelSpecError(f"'{spec.text}': expected python:<file.py>:<factory>.")
    path = Path(file)
    if not path.is_file():
        raise ModelSpecError(f"Python model file {path} does not exist.")
    module_spec = importlib.util.spec_from_file_location(f"neaudit_user_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    make: Callable[[], nn.Module] | None = getattr(module, factory, None)
    if make is None:
        raise ModelSpecError(f"{path} defines no '{factory}'.")
    net = make()
    _apply_weights(net, spec)
    return ImageClassifier(net, _floats_option(spec, "mean", IMAGENET_MEAN),
                           _floats_option(spec, "std", IMAGENET_STD), _size_option(spec),
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


BUILDERS: dict[str, Callable[[ModelSpec, Sequence[str] | None], ImageClassifier]] = {
    "timm": _build_timm,
    "open_clip": _build_open_clip,
    "torchscript": _build_torchscript,
    "python": _build_python,
    "demo": _build_demo,
}
