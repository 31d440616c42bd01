"""Overlap the three stages of a files-to-files job: decoding the next batches (reader
processes: decoding holds the GIL for part of each image), device work on the current one
(the caller), and encoding and writing the previous ones (writer processes by default; see
:data:`WRITER_PROCESSES`).

Batches travel from the readers as uint8 where the job works on the uint8 grid anyway
(``protect``): a quarter of the bytes through shared and pinned memory.
"""

from __future__ import annotations

import functools
import itertools
import math
import mmap
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from neaudit.dataset import Batch, share_decoding
from neaudit.errors import NeauditError, Refused, unless_refused
from neaudit.imageio import write_png


def default_readers() -> int:
    """Reader processes: a quarter of the cores (each decodes with threads of its own)."""
    return max(1, (os.cpu_count() or 2) // 4)


def default_writers() -> int:
    """Writers: the cores left beside the readers and the one feeding the device."""
    return max(1, (os.cpu_count() or 2) - default_readers() - 1)


class SpanReader(torch.utils.data.Dataset):
    """Item spans ``[start, stop)`` of a dataset as one batch each, so that a DataLoader can
    read them ahead in worker processes; with ``on_grid``, images come rounded to the uint8
    grid as uint8 tensors (:func:`on_device`). An unreadable input comes back
    :class:`neaudit.errors.Refused` (:func:`span_batches` raises it)."""

    def __init__(self, dataset, spans: Sequence[tuple[int, int]], on_grid: bool = False
                 ) -> None:
        self.dataset, self.spans, self.on_grid = dataset, list(spans), on_grid

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, index: int) -> Batch | Refused:
        start, stop = self.spans[index]
        try:
            return next(self.dataset.batches(stop - start, start, stop, on_grid=self.on_grid))
        except NeauditError as exc:
            return Refused(exc)


_LEVELS = torch.arange(256, dtype=torch.float32) / 255.0
"""The 256 values of the uint8 grid as float32, divided once on the CPU."""


def on_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A uint8 batch from an ``on_grid`` reader as float [0, 1] on ``device``: exactly
    :func:`neaudit.imageio.quantize` of what was read, on every device. The CPU divides
    (IEEE division is exact to the ulp); elsewhere the levels are looked up: CUDA divides by a
    scalar as a multiplication by its reciprocal, one ulp away from the CPU's division for
    some levels, and a different input is a different NE."""
    if device.type == "cpu":
        return images.to(torch.float32).div_(255.0)
    return _levels_on(device)[images.to(device, non_blocking=True).long()]


@functools.lru_cache(maxsize=4)
def _levels_on(device: torch.device) -> torch.Tensor:
    """:data:`_LEVELS` on ``device``, copied there once (not once per batch)."""
    return _LEVELS.to(device)


def span_batches(dataset, spans: Sequence[tuple[int, int]], workers: int,
                 pin_memory: bool = False, on_grid: bool = False) -> Iterator[Batch]:
    """The spans' batches in order, read ahead in ``workers`` processes that share the cores
    for decoding (pinned memory for a CUDA device, so copies to it do not block). An
    unreadable input raises its own one-line error here, as reading in-process would."""
    loader = torch.utils.data.DataLoader(
        SpanReader(dataset, spans, on_grid), batch_size=None, pin_memory=pin_memory,
        num_workers=workers, worker_init_fn=functools.partial(share_decoding, max(1, workers)))
    for batch in loader:
        yield unless_refused(batch)


def batch_spans(count: int, batch_size: int, done: np.ndarray | None = None
                ) -> list[tuple[int, int]]:
    """``[start, stop)`` spans of at most ``batch_size`` items covering every item not marked in
    ``done`` (a boolean mask), each run of such items cut into batches from its start."""
    todo = np.ones(count, bool) if done is None else ~done
    edges = np.flatnonzero(np.diff(np.concatenate([[False], todo, [False]]).astype(np.int8)))
    return [(lo, min(lo + batch_size, stop)) for start, stop in zip(edges[::2], edges[1::2],
                                                                     strict=True)
            for lo in range(int(start), int(stop), batch_size)]


def read_ahead(dataset, batch_size: int, workers: int | None = None,
               pin_memory: bool = False, on_grid: bool = False,
               done: np.ndarray | None = None) -> Iterator:
    """The dataset's batches in order (those of the items not marked in ``done``), read ahead
    in ``workers`` processes (default: :func:`default_readers`)."""
    yield from span_batches(dataset, batch_spans(len(dataset), batch_size, done),
                            default_readers() if workers is None else workers,
                            pin_memory, on_grid)


WRITER_PROCESSES = True
"""Writers are processes, fed through a shared ring buffer (:class:`PngWriter`). Threads
encode as fast (libpng releases the GIL), but the Python around each file takes the GIL from
the thread that feeds the device: on a 16-core H200 machine, ``protect`` with writer threads
ran at a quarter of the PNG floor while its profile showed the device thread waiting."""

CHUNK_BYTES = 4 << 20
"""Image bytes per writer task at most (16 images of 224×224; fewer of larger ones)."""

_RINGS: dict[int, mmap.mmap] = {}
"""The shared buffers of the open process writers, by token. Each is mapped before its
writer's processes fork, so they inherit it: a task names a slot in it instead of carrying
pixels. (Passing each chunk as a shared tensor instead cost a file-descriptor hand-over
through the parent for every task, served by one thread: on an H200's 16 cores eleven writer
processes wrote stored PNGs at 1,392 img/s, below what one thread writes.)"""

_tokens = itertools.count()


def _write_pngs(paths: Sequence[str | Path], images: np.ndarray, compression: str
                ) -> list[tuple[str | Path, str]]:
    return [(path, write_png(Path(path), image, compression))
            for path, image in zip(paths, images, strict=True)]


def _write_from_ring(token: int, offset: int, shape: tuple[int, ...],
                     paths: Sequence[str | Path], compression: str
                     ) -> list[tuple[str | Path, str]]:
    images = np.frombuffer(_RINGS[token], np.uint8, math.prod(shape), offset).reshape(shape)
    return _write_pngs(paths, images, compression)


class PngWriter:
    """Encodes and writes PNGs in ``workers`` processes (or threads), with ``compression``
    (:data:`neaudit.imageio.PNG_COMPRESSIONS`). Processes read their images from a ring of
    ``pending`` slots of up to ``chunk`` images, mapped before they fork; a write waits for
    a free slot, so memory stays bounded. Leaving the ``with`` block waits for every file and
    re-raises the first error (a full disk, say). ``digests`` maps each written path, as
    given (paths as strings keep ``pathlib`` off the caller's thread), to the SHA-256 of its
    bytes."""

    def __init__(self, workers: int | None = None, chunk: int = 16, pending: int | None = None,
                 processes: bool | None = None, compression: str = "none") -> None:
        self.processes = WRITER_PROCESSES if processes is None else processes
        self.workers = workers or default_writers()
        self.pending = pending or 2 * self.workers
        self.chunk, self.compression = chunk, compression
        self.pool: ProcessPoolExecutor | ThreadPoolExecutor | None = (
            None if self.processes else ThreadPoolExecutor(self.workers))
        self.token: int | None = None
        self.slot_bytes, self.free = 0, list(range(self.pending))
        # each write's future with the ring slot it holds, or a callback (:meth:`then`)
        self.futures: deque[tuple[Future, int | None] | Callable[[], None]] = deque()
        self.digests: dict[str | Path, str] = {}
        self.stopping: threading.Thread | None = None  # the pool's shutdown (:meth:`close`)

    def _start_processes(self, image_bytes: int) -> None:
        """The ring, sized by the first images, then the pool: its processes fork at the
        first task, after the ring exists."""
        self.chunk = max(1, min(self.chunk, CHUNK_BYTES // max(1, image_bytes)))
        self.slot_bytes = self.chunk * image_bytes
        self.token = next(_tokens)
        _RINGS[self.token] = mmap.mmap(-1, self.pending * self.slot_bytes)
        self.pool = ProcessPoolExecutor(self.workers,
                                        mp_context=multiprocessing.get_context("fork"))

    def write(self, paths: Sequence[str | Path], images: np.ndarray) -> None:
        """Write ``images`` (N, H, W, 3 uint8, any strides) to ``paths``."""
        if self.pool is None and len(images):
            self._start_processes(images[0].nbytes)
        for lo in range(0, len(paths), self.chunk):
            names, part = paths[lo:lo + self.chunk], images[lo:lo + self.chunk]
            while len(self.futures) >= self.pending:
                self._collect()
            if self.processes and part.nbytes <= self.slot_bytes:
                slot = self.free.pop()
                offset = slot * self.slot_bytes
                np.copyto(np.frombuffer(_RINGS[self.token], np.uint8, part.nbytes,
                                        offset).reshape(part.shape), part)  # the one copy
                self.futures.append((self.pool.submit(
                    _write_from_ring, self.token, offset, part.shape, names, self.compression),
                    slot))
            else:  # threads, or images larger than the first ones: the pixels travel along
                self.futures.append((self.pool.submit(_write_pngs, names, part,
                                                      self.compression), None))

    def then(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on this thread) once every file written so far is on disk and
        hashed in :attr:`digests`; never, if one of them failed."""
        self.futures.append(callback)

    def _collect(self) -> None:
        entry = self.futures.popleft()
        if callable(entry):
            entry()
            return
        future, slot = entry
        try:
            self.digests.update(future.result())
        finally:
            if slot is not None:
                self.free.append(slot)

    def close(self) -> None:
        """No more writes: wait for every file (and the callbacks after them, so that a
        checkpoint is not held back), then let the workers end on a thread of their own while
        the caller does its last work; leaving the ``with`` block waits for them (on a 16-core
        H200 machine the pool's shutdown took 2.1 s at the end of ``protect``)."""
        while self.futures:
            self._collect()
        if self.pool is not None and self.stopping is None:
            self.stopping = threading.Thread(target=self.pool.shutdown, name="png-writers")
            self.stopping.start()

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self.close()
        finally:
            if self.stopping is not None:
                self.stopping.join()
            elif self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
            if self.token is not None:
                _RINGS.pop(self.token).close()
