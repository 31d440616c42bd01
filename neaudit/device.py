"""Device selection shared by the protect job and the audit engine."""

from __future__ import annotations

import re

import torch

from neaudit.errors import NeauditError

DEVICE_FORMS = "auto, cpu, cuda or cuda:N"

CPU_CHUNK_VALUES = 8 * 3 * 224 * 224
"""Values a CPU works on at once in elementwise-heavy steps (recoding, fidelity, SSIM), eight
224×224 RGB images: their temporaries then stay in cache. On 2 cores, side by side (ViT-B/16
stem, 224×224 photo crops), recoding took 5.6–6.3 ms an image in chunks of 8 against 7.7–8.0
ms in batches of 64, and SSIM 3.8–4.3 against 8.7–9.1 ms."""


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


def available_memory() -> int | None:
    """Bytes of host memory free for a new allocation (Linux's ``MemAvailable``); None where
    the system does not say."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def chunks(images: torch.Tensor) -> list[slice]:
    """Slices covering a batch: :data:`CPU_CHUNK_VALUES` at a time on a CPU, the whole batch
    on an accelerator (where a larger batch is what keeps it busy); one slice at least."""
    count = len(images)
    per_image = images[0].numel() if count else 1
    step = max(1, CPU_CHUNK_VALUES // per_image) if images.device.type == "cpu" else count
    return [slice(lo, lo + step) for lo in range(0, count, step)] or [slice(0, 0)]
