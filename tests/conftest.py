"""Shared fixtures: small real photographs, written as files in several layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from neaudit.data import builtin_dataset
from neaudit.imageio import write_png

VIT = "timm:vit_small_patch16_224?img_size=64&num_classes=10"
RESNET = "timm:resnet50?num_classes=10"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


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


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime, to prove nothing changed."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}
