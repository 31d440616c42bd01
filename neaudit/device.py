"""Device selection shared by the protect job and the audit engine."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import threading
from collections.abc import Iterator

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


PRECISIONS = ("auto", "bf16", "fp32")
"""What ``--precision`` takes: the number format of the zoo's forward passes in an audit."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """``bf16`` or ``fp32``, as given, or for ``auto`` bf16 where ``device`` computes it
    natively (:func:`native_bf16`) and fp32 elsewhere, where bf16 would be emulated and slower.
    The forwards give top-1 predictions, which bf16 moves on the rare image the model is
    unsure of; the run records the precision it used."""
    if precision not in PRECISIONS:
        raise NeauditError(f"--precision {precision}: not a precision neaudit runs forwards in. "
                           f"Fix: use {', '.join(PRECISIONS)}.")
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` has bf16 matrix units: a CUDA GPU of compute capability 8 or later
    (Ampere, Hopper…), or a CPU with AMX or AVX-512 BF16. On this project's 2-core Xeon (AMX),
    bf16 autocast with channels-last ran ResNet-50 at 51 against 13 img/s in fp32, ConvNeXt-T
    40 against 17, ViT-S/16 79 against 24."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and (torch.cpu._is_amx_tile_supported()
                                     or torch.cpu._is_avx512_bf16_supported())


def forward_precision(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context the zoo's forwards run under for a resolved ``precision``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
"""glibc's ``mallopt`` parameters (``malloc.h``) that :func:`retained_heap` sets."""
GLIBC_TRIM_THRESHOLD, GLIBC_MMAP_MAX = 128 * 1024, 65536
"""glibc's defaults for them, set again when the last job ends."""
_heap_lock = threading.Lock()
_heap_jobs = 0  # jobs inside retained_heap (protect, audit, the demo's two), in any thread


@contextlib.contextmanager
def retained_heap() -> Iterator[None]:
    """Keep the host memory a job frees for its next batch, and hand it back when the job ends.

    glibc serves every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB)
    with a fresh mapping and unmaps it when freed. A forward pass frees and reallocates its
    activations, so it page-faults through all of them again every batch. On 2 cores one
    bf16 forward of ResNet-50, ConvNeXt-T and ViT-S/16 on 64 images took 4.2 s, 2.7 s of it
    in the kernel, for 1.6 million page faults. With mmap and trimming off it took 2.6–2.8 s,
    with no faults; an audit with those models peaked at 3.4 GB instead of 2.7, the same at
    64 and 256 images. That is what jemalloc or tcmalloc preloaded would do, without asking
    users to preload them. Glibc only; elsewhere nothing changes."""
    global _heap_jobs
    libc = _glibc()
    with _heap_lock:
        _heap_jobs += 1
        if libc is not None and _heap_jobs == 1:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        with _heap_lock:
            _heap_jobs -= 1
            if libc is not None and _heap_jobs == 0:
                libc.mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD)
                libc.malloc_trim(0)  # what the job held goes back to the system


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (whose ``mallopt`` this module knows)."""
    if "CS_GNU_LIBC_VERSION" not in os.confstr_names:
        return None
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (OSError, ValueError):
        return None
    return ctypes.CDLL(None) if version.startswith("glibc") else None


MEMINFO = "/proc/meminfo"
CGROUP_MEMORY = (
    # cgroup v2: limit, usage, statistics, and the reclaimable page cache's key in them
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current",
     "/sys/fs/cgroup/memory.stat", "inactive_file"),
    # cgroup v1
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)
"""Where a container's memory limit shows (Linux): a pod or job with a limit sees the whole
node's memory in ``/proc/meminfo``, and is killed at its limit."""


def available_memory() -> int | None:
    """Bytes of host memory free for a new allocation: Linux's ``MemAvailable``, or less
    where the process's cgroup sets a lower limit (its limit less its usage, the page cache it
    could reclaim counted free); None where the system says neither."""
    free = [room for room in (_meminfo_available(), _cgroup_room()) if room is not None]
    return min(free) if free else None


def free_memory_short_of(need: int) -> int | None:
    """The free memory (:func:`available_memory`) where it is less than ``need`` bytes, for a
    refusal to name; None where enough is free, or where the system does not say."""
    free = available_memory()
    return free if free is not None and need > free else None


def _meminfo_available() -> int | None:
    try:
        with open(MEMINFO) as meminfo:
            return next((int(line.split()[1]) * 1024 for line in meminfo
                         if line.startswith("MemAvailable:")), None)
    except (OSError, ValueError, IndexError):
        return None


def _cgroup_room() -> int | None:
    for limit_file, usage_file, stat_file, reclaimable in CGROUP_MEMORY:
        try:
            with open(limit_file) as handle:
                limit = handle.read().strip()
            if limit == "max" or int(limit) >= 1 << 60:  # no limit set
                return None
            with open(usage_file) as handle:
                usage = int(handle.read())
            with open(stat_file) as handle:
                cache = next((int(line.split()[1]) for line in handle
                              if line.split()[0] == reclaimable), 0)
        except (OSError, ValueError, IndexError):
            continue
        return max(0, int(limit) - usage + cache)
    return None


def chunks(images: torch.Tensor) -> list[slice]:
    """Slices covering a batch: :data:`CPU_CHUNK_VALUES` at a time on a CPU, the whole batch
    on an accelerator (where a larger batch is what keeps it busy); one slice at least."""
    count = len(images)
    per_image = images[0].numel() if count else 1
    step = max(1, CPU_CHUNK_VALUES // per_image) if images.device.type == "cpu" else count
    return [slice(lo, lo + step) for lo in range(0, count, step)] or [slice(0, 0)]
