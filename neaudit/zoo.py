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
user's Hugging Face hub cache or torch hub cache (:func:`neaudit.builders.cached_weights`), and
a missing file is an error that says how to provide it. The classifier wrapper and the spec
parser are in :mod:`neaudit.models`, one builder per scheme in :mod:`neaudit.builders`.
"""
from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path

from neaudit.builders import BUILDERS, RUNS_CODE  # noqa: F401  (RUNS_CODE: public)
from neaudit.errors import ModelSpecError
from neaudit.models import (  # noqa: F401  (the zoo's public names)
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageClassifier,
    ModelSpec,
    check_model,
    wrap,
)
from neaudit.presets import PRESETS
from neaudit.seeding import seeded


def create_model(spec: str | ModelSpec | ImageClassifier,
                 class_names: Sequence[str] | None = None) -> ImageClassifier:
    """The one door into the zoo: resolve a spec string into an eval-mode classifier."""
    if isinstance(spec, ImageClassifier):
        return spec.eval()
    parsed = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    # Random-init weights are seeded from the spec text, so one spec names one network in
    # every process (protect and audit see the same random-init model).
    try:
        model = seeded(lambda: BUILDERS[parsed.scheme](parsed, class_names), "model",
                       parsed.text)
        return model.eval().requires_grad_(False)
    except ModelSpecError:
        raise
    except Exception as exc:  # the spec's options or the user's own code
        raise ModelSpecError(f"'{parsed.text}': the model could not be built "
                             f"({type(exc).__name__}: {str(exc)[:300]}). Fix: check the spec's "
                             "options and its code.") from exc

def resolve_zoo(zoo: str | Sequence[str]) -> list[str]:
    """Preset name, zoo file (``.toml``), comma-separated specs, or a list of specs → a list
    of spec strings (``NAME=SPEC`` where a name is given)."""
    if isinstance(zoo, str):
        if zoo in PRESETS:
            return list(PRESETS[zoo])
        if zoo.endswith(".toml"):
            return [f"{m['name']}={m['spec']}" if m.get("name") else m["spec"]
                    for m in load_zoo_file(zoo)]
        return [s for s in (part.strip() for part in zoo.split(",")) if s]
    return list(zoo)


ZOO_KEYS = {"name", "spec", "role"}


def load_zoo_file(path: str | Path) -> list[dict[str, str]]:
    """A reviewed list of named models, so that long specs live in one file::

        [[model]]
        name = "resnet44"
        spec = "python:/models/akresnet.py:resnet44?weights=/w/resnet44.pt&input_size=32"
        role = "authorized"          # optional: the audit's default authorized model
    """
    path = Path(path)
    if not path.is_file():  # a pipe would be waited on for ever
        problem = "is not a regular file" if path.exists() else "does not exist"
        raise ModelSpecError(f"zoo file {path} {problem}. Fix: check the path, or name a "
                             "preset (neaudit zoo list).")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ModelSpecError(f"{path}: not valid TOML ({exc}). Fix: correct it there.") from exc
    models = raw.get("model")
    if not isinstance(models, list) or not models or set(raw) - {"model", "description"}:
        raise ModelSpecError(f"{path}: a zoo file holds [[model]] tables (name, spec, role). "
                             "Fix: list at least one model.")
    for model in models:
        unknown = sorted(set(model) - ZOO_KEYS)
        if unknown or not isinstance(model.get("spec"), str) or model.get("role") not in (
                None, "authorized", "unauthorized"):
            extra = f" (unknown key(s) {', '.join(unknown)})" if unknown else ""
            raise ModelSpecError(f"{path}: model {model.get('name', '?')!r} needs a 'spec' "
                                 "string, an optional 'name' and a role of authorized or "
                                 f"unauthorized{extra}.")
    return models


def zoo_authorized(zoo: str | Sequence[str]) -> str | None:
    """The model a zoo file marks ``role = "authorized"``, if any."""
    if isinstance(zoo, str) and zoo.endswith(".toml"):
        marked = [m for m in load_zoo_file(zoo) if m.get("role") == "authorized"]
        if len(marked) > 1:
            raise ModelSpecError(f"{zoo}: {len(marked)} models are marked authorized. Fix: mark "
                                 "one.")
        if marked:
            return f"{marked[0]['name']}={marked[0]['spec']}" if marked[0].get("name") else (
                marked[0]["spec"])
    return None
