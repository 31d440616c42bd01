"""Overlap the three stages of a files-to-files job: decoding the next batch (a reader
thread), device work on the current one (the caller), and encoding and writing the previous
ones (a pool of writer threads). Pillow's decoders and the PNG encoder release the GIL, so
threads give real parallelism without copying images between processes.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from neaudit.imageio import write_png

T = TypeVar("T")


def default_writers() -> int:
    """Writer threads: every core but the one driving the device."""
    return max(1, (os.cpu_count() or 2) - 1)


def read_ahead(items: Iterable[T]) -> Iterator[T]:
    """``items``, with the next one produced in a background thread while the caller works
    on the current one."""
    iterator = iter(items)
    with ThreadPoolExecutor(1, thread_name_prefix="neaudit-read") as reader:
        upcoming = reader.submit(next, iterator, None)
        while True:
            item = upcoming.result()
            if item is None:
                return
            upcoming = reader.submit(next, iterator, None)
            yield item


class PngWriter:
    """Writes PNGs in ``workers`` threads; at most ``pending`` files are in flight, so memory
    stays bounded. Leaving the ``with`` block waits for every file and re-raises the first
    error (a full disk, say)."""

    def __init__(self, workers: int | None = None, pending: int = 512) -> None:
        self.pool = ThreadPoolExecutor(workers or default_writers(),
                                       thread_name_prefix="neaudit-write")
        self.pending = pending
        self.futures: deque[Future] = deque()

    def write(self, path: Path, image: np.ndarray) -> None:
        while len(self.futures) >= self.pending:
            self.futures.popleft().result()
        self.futures.append(self.pool.submit(write_png, path, image))

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            while self.futures:
                self.futures.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
