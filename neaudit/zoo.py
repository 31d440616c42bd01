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

from collections.abc import Sequence

from neaudit.builders import BUILDERS
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
    """Preset name, comma-separated specs, or a list of specs → a list of spec strings."""
    if isinstance(zoo, str):
        if zoo in PRESETS:
            return list(PRESETS[zoo])
        return [s for s in (part.strip() for part in zoo.split(",")) if s]
    return list(zoo)
