"""Overlap the three stages of a files-to-files job: decoding the next batches (reader
processes), device work on the current one (the caller), and encoding and writing the
previous ones (writer processes). Processes rather than threads: decoding and encoding hold
the GIL for part of each image, and threads doing it starve the thread that feeds the device.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from neaudit.imageio import write_png


def default_readers() -> int:
    """Reader processes: a quarter of the cores (each decodes with threads of its own)."""
    return max(1, (os.cpu_count() or 2) // 4)


def default_writers() -> int:
    """Writer processes: the cores left beside the readers and the one feeding the device."""
    return max(1, (os.cpu_count() or 2) - default_readers() - 1)


class SpanReader(torch.utils.data.Dataset):
    """Item spans ``[start, stop)`` of a dataset as one batch each, so that a DataLoader can
    read them ahead in worker processes."""

    def __init__(self, dataset, spans: Sequence[tuple[int, int]]) -> None:
        self.dataset, self.spans = dataset, list(spans)

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, index: int):
        start, stop = self.spans[index]
        return next(self.dataset.batches(stop - start, start, stop))


def read_ahead(dataset, batch_size: int, workers: int | None = None,
               pin_memory: bool = False) -> Iterator:
    """The dataset's batches in order, read ahead in ``workers`` processes (pinned memory
    for a CUDA device, so copies to it do not block)."""
    spans = [(lo, min(lo + batch_size, len(dataset))) for lo in range(0, len(dataset),
                                                                       batch_size)]
    loader = torch.utils.data.DataLoader(
        SpanReader(dataset, spans), batch_size=None, pin_memory=pin_memory,
        num_workers=default_readers() if workers is None else workers)
    yield from loader


def _write_pngs(paths: Sequence[Path], images: np.ndarray) -> None:
    for path, image in zip(paths, images, strict=True):
        write_png(path, image)


class PngWriter:
    """Encodes and writes PNGs in ``workers`` processes, ``chunk`` images per message (one
    message per image costs more than the encoding); at most ``pending`` chunks are in
    flight, so memory stays bounded. Leaving the ``with`` block waits for every file and
    re-raises the first error (a full disk, say)."""

    def __init__(self, workers: int | None = None, chunk: int = 16, pending: int = 64) -> None:
        self.pool = ProcessPoolExecutor(workers or default_writers(),
                                        mp_context=multiprocessing.get_context("fork"))
        self.chunk, self.pending = chunk, pending
        self.futures: deque[Future] = deque()

    def write(self, paths: Sequence[Path], images: np.ndarray) -> None:
        """Write ``images`` (N, H, W, 3 uint8) to ``paths``."""
        for lo in range(0, len(paths), self.chunk):
            while len(self.futures) >= self.pending:
                self.futures.popleft().result()
            self.futures.append(self.pool.submit(_write_pngs, paths[lo:lo + self.chunk],
                                                 images[lo:lo + self.chunk]))

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            while self.futures:
                self.futures.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
