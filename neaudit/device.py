"""Device selection shared by the protect job and the audit engine."""

from __future__ import annotations

import re

import torch

from neaudit.errors import NeauditError

DEVICE_FORMS = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA where available), ``cpu``, ``cuda`` or ``cuda:N``, checked here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if match is None:
        raise NeauditError(f"--device {device}: not a device neaudit runs on. Fix: use "
                           f"{DEVICE_FORMS}.")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise NeauditError(f"--device {device}: CUDA is not available here. Fix: use cpu "
                               "or auto.")
        if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
            raise NeauditError(f"--device {device}: this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s). Fix: use cuda:0 …")
    return torch.device(device)
