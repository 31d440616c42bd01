"""Shared fixtures: small real photographs, written as files in several layouts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from neaudit.data import builtin_dataset
from neaudit.imageio import sha256_file, write_png


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _repeatable_keys():
    """``protect`` draws a secret noise key from the OS for every run without ``key``; in the
    tests such runs get key 0, so that their figures repeat whatever the order or selection
    of tests (tests/test_protect.py checks the OS draw itself)."""
    from types import SimpleNamespace

    from neaudit import protection

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(protection, "secrets", SimpleNamespace(randbits=lambda bits: 0))
        yield


@pytest.fixture(autouse=True, scope="session")
def _random_init_models_built_once():
    """Each random-init timm spec is built once per test session and copied after.

    Its weights are a pure function of the spec text (:func:`neaudit.zoo.create_model` seeds
    the build from it), so a copy is the model a fresh build would give; building one runs
    timm's initializers on the CPU's serial generator, which took 40 s of the 400 s run.
    Models with weights from files are built every time (a test may rewrite the file).
    """
    import copy

    from neaudit.builders import BUILDERS

    build = BUILDERS["timm"]
    built: dict[str, torch.nn.Module] = {}

    def build_once(spec, class_names):
        if spec.text not in built:
            model = build(spec, class_names)
            if not model.random_init:
                return model
            built[spec.text] = model
        return copy.deepcopy(built[spec.text])

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(BUILDERS, "timm", build_once)
        yield


@pytest.fixture(scope="session")
def photos() -> np.ndarray:
    """32 real 64×64 RGB crops (uint8 NHWC) from scikit-learn's bundled photographs."""
    return builtin_dataset("samples").protected


@pytest.fixture
def image_folder(tmp_path: Path, photos: np.ndarray) -> Path:
    """ImageFolder layout (two classes) with a sibling ``original/`` tree."""
    root = tmp_path / "release"
    for i, image in enumerate(photos[:12]):
        cls = "china" if i % 2 == 0 else "flower"
        write_png(root / "protected" / cls / f"{i:02d}.png", image)
        write_png(root / "original" / cls / f"{i:02d}.png", image[::-1].copy())
    return root


@pytest.fixture(scope="session")
def vit_spec() -> str:
    """A random-init ViT-S/16 at 64×64: a patch stem with a real null space."""
    return "timm:vit_small_patch16_224?img_size=64&num_classes=10"


@pytest.fixture(scope="session")
def resnet_spec() -> str:
    """A random-init ResNet-50: an overlapping 7×7/2 stem."""
    return "timm:resnet50?num_classes=10"


def _tree_state(folder: Path) -> dict[str, str]:
    return {str(p): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def snapshot() -> Callable[[Path], dict[str, str]]:
    """Every file under a folder with its SHA-256, to prove nothing changed."""
    return _tree_state
