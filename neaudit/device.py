"""Device selection shared by the protect job and the audit engine."""

from __future__ import annotations

import torch

from neaudit.errors import NeauditError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NeauditError(f"--device {device}: CUDA is not available here. Fix: use cpu or auto.")
    return torch.device(device)
