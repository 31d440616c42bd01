"""The dataset every job reads: items (a protected image, optionally its clean original and
a label), class names and the ``neaudit.json`` sidecar. Nothing is decoded up front:
:meth:`ImageDataset.batches` streams fixed-size batches, so memory does not grow with the
dataset. The loaders for each layout are in :mod:`neaudit.data`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neaudit.errors import DataError
from neaudit.imageio import (
    IMAGE_SUFFIXES,
    JPEG_SUFFIXES,
    as_read,
    image_size,
    read_jpegs_on,
    read_pixels,
    to_float,
    to_grid,
)


@dataclass
class Batch:
    """One streamed batch. Images are float32 NCHW in [0, 1] (uint8 on the grid from
    :meth:`ImageDataset.batches` with ``on_grid``)."""

    index: torch.Tensor
    protected: torch.Tensor
    original: torch.Tensor | None
    labels: torch.Tensor | None
    names: list[str]
    unread: dict[str, list[str]] = field(default_factory=dict)
    """Names of the items whose protected file shows what reading left out, by what
    (:data:`neaudit.imageio.UNREAD`)."""

    def pin_memory(self) -> Batch:
        """The batch with its tensors in pinned memory. A DataLoader's ``pin_memory`` calls
        this; without it, it hands a dataclass back as it came, in pageable memory."""
        return replace(self, **{name: value.pin_memory() for name, value in vars(self).items()
                                if isinstance(value, torch.Tensor)})


@dataclass
class ImageDataset:
    """Items of a protected dataset; images are decoded only when a batch is requested.

    ``protected``/``original`` hold either file paths, as strings (a million ``Path`` objects
    took ten seconds to build and a gigabyte to hold), or one in-memory array (from ``.npz``).
    """

    names: list[str]
    protected: list[str] | np.ndarray
    original: list[str] | np.ndarray | None = None
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    sidecar: dict | None = None
    source: Path | None = None
    resize: tuple[int, int] | None = None
    decode_device: torch.device | None = None  # a CUDA device: JPEG shards decode with nvJPEG
    outside_files: int = 0  # input files outside the dataset's folder (--allow-outside)
    image_shape: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.names) == 0:
            raise DataError(f"{self.source}: no images found. Fix: point to a folder with "
                            f"{', '.join(IMAGE_SUFFIXES)} files, an .npz or a manifest.")
        if self.labels is not None:
            if len(self.labels) and int(self.labels.min()) < 0:
                bad = int(np.flatnonzero(self.labels < 0)[0])
                raise DataError(f"{self.source}: label {int(self.labels[bad])} of item "
                                f"'{self.names[bad]}' is negative. Fix: labels are class indices "
                                "0, 1, 2, … (or class names in a manifest).")
            if len(self.labels) != len(self.names):
                raise DataError(f"{self.source}: {len(self.labels)} labels for "
                                f"{len(self.names)} images. Fix: give one label per image.")
            if self.class_names is not None and len(self.labels):
                bad = np.flatnonzero(self.labels >= len(self.class_names))
                if bad.size:
                    raise DataError(
                        f"{self.source}: label {int(self.labels[bad[0]])} of item "
                        f"'{self.names[bad[0]]}' is outside the {len(self.class_names)} class "
                        "names. Fix: make class_names cover every label.")
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 1):
            raise DataError(f"resize {tuple(self.resize)}: a size needs a positive height and "
                            "width. Fix: give e.g. --resize 224 or --resize 224x224.")
        self.image_shape = self.resize or self._first_shape()

    def __len__(self) -> int:
        return len(self.names)

    def spread(self, count: int) -> ImageDataset:
        """``count`` items evenly spaced over the dataset (all of it if it holds no more), as a
        dataset of their own. Items are in name order, so a class-folder dataset is grouped by
        class: its first ``count`` items would be its first classes only, and every figure
        would describe them alone."""
        if count >= len(self):
            return self
        rows = evenly_spaced(len(self), count)

        def pick(items):
            if items is None or isinstance(items, np.ndarray):
                return None if items is None else items[rows]
            return [items[i] for i in rows]

        return replace(self, names=pick(self.names), protected=pick(self.protected),
                       original=pick(self.original), labels=pick(self.labels))

    def input_roots(self) -> list[Path]:
        """The files and folders this dataset reads: what no output may overlap."""
        if self.source is None or str(self.source).startswith("builtin:"):
            return []
        folders = {os.path.dirname(path) for items in (self.protected, self.original)
                   if isinstance(items, list) for path in items}
        return sorted({self.source, *map(Path, folders)})

    @property
    def has_originals(self) -> bool:
        return self.original is not None

    @property
    def num_classes(self) -> int | None:
        if self.class_names is not None:
            return len(self.class_names)
        return None if self.labels is None else int(self.labels.max()) + 1

    def _first_shape(self) -> tuple[int, int]:
        if isinstance(self.protected, np.ndarray):
            return tuple(to_float(self.protected[:1]).shape[-2:])
        return image_size(self.protected[0])

    def batches(self, batch_size: int = 64, start: int = 0, stop: int | None = None,
                on_grid: bool = False) -> Iterator[Batch]:
        """Stream items ``[start, stop)`` in batches of ``batch_size``; with ``on_grid``,
        images come as uint8 NCHW, rounded to the grid (:func:`neaudit.imageio.to_grid`)."""
        stop = len(self) if stop is None else min(stop, len(self))
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            index = torch.arange(lo, hi)
            protected, unread = self._load(self.protected, lo, hi, "protected", on_grid)
            original = (self._load(self.original, lo, hi, "original", on_grid)[0]
                        if self.original is not None else None)
            labels = (torch.tensor(self.labels[lo:hi], dtype=torch.long)
                      if self.labels is not None else None)
            names = self.names[lo:hi]
            yield Batch(index, protected, original, labels, names,
                        {what: [names[i] for i in rows] for what, rows in unread.items()})

    def _load(self, items: list[str] | np.ndarray, lo: int, hi: int, kind: str,
              on_grid: bool = False) -> tuple[torch.Tensor, dict[str, list[int]]]:
        """Items ``[lo, hi)`` as a batch, and which of them (rows) show what reading left
        out (:func:`read_images`)."""
        if isinstance(items, np.ndarray):
            images = to_float(items[lo:hi])
            _check_values(images, f"{self.source} ({kind}[{lo}:{hi}])")
            images = self._fit(images, [f"{kind}[{i}]" for i in range(lo, hi)])
            return (to_grid(images) if on_grid else images), {}
        paths = items[lo:hi]
        if self.decode_device is not None and self.decode_device.type == "cuda" and all(
                os.path.splitext(p)[1].lower() in JPEG_SUFFIXES for p in paths):
            images = [to_grid(i) if on_grid else i
                      for i in read_jpegs_on(paths, self.decode_device)]
            return self._fit(images, paths), {}
        return read_images(paths, self.image_shape, on_grid, self._fit_one)

    def _fit(self, images: Sequence[torch.Tensor] | torch.Tensor, labels: Sequence[str]
             ) -> torch.Tensor:
        """:meth:`_fit_one` on every image, stacked."""
        return torch.stack([self._fit_one(image, label)
                            for image, label in zip(images, labels, strict=True)])

    def _fit_one(self, image: torch.Tensor, label: str) -> torch.Tensor:
        """Apply the resize policy, or insist that the image has the dataset's size."""
        if tuple(image.shape[-2:]) == tuple(self.image_shape):
            return image
        if self.resize is None:
            raise DataError(
                f"{label}: size {tuple(image.shape[-2:])} differs from "
                f"{tuple(self.image_shape)} of the first image. Fix: pass a resize "
                "policy (--resize H[xW]) or give images of one size.")
        grid = image.dtype == torch.uint8
        # each step in place on a tensor the step before made (to_grid clamps): a 500×375
        # photo in 1.4 instead of 2.0 ms, the same values
        image = F.interpolate(image[None].float().div_(255.0) if grid else image[None],
                              size=self.resize, mode="bilinear", antialias=True,
                              align_corners=False)[0]
        return to_grid(image) if grid else image.clamp_(0, 1)


_decode_threads = max(1, os.cpu_count() or 1)
"""Threads decoding one batch's files (the decoders release the GIL): every core in the main
process; a reader process gets its share (:func:`share_decoding`)."""


_pool: ThreadPoolExecutor | None = None


def _decoders() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_decode_threads, thread_name_prefix="neaudit-decode")
    return _pool


def _forget_pool() -> None:
    """A forked child (a DataLoader worker) has none of its parent's threads: it starts its
    own pool instead of waiting on the parent's forever."""
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def share_decoding(processes: int, _worker_id: int = 0) -> None:
    """In one of ``processes`` reader processes: decode with this process's share of the
    cores (four readers with a thread per core each ran 64 threads on a 16-core machine,
    beside the writers)."""
    global _decode_threads
    _decode_threads = max(1, (os.cpu_count() or 1) // processes)
    _forget_pool()


def read_images(paths: Sequence[str | Path], size: tuple[int, int], on_grid: bool,
                fit: Callable[[torch.Tensor, str], torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, list[int]]]:
    """Decode files in parallel threads (one file is read in the caller) into one
    (N, 3, *size) batch: uint8 with ``on_grid``, float in [0, 1] otherwise; and the rows
    whose file shows what reading leaves out, by what (:data:`neaudit.imageio.UNREAD`).

    An image of another size goes through ``fit`` (image, path: it resizes or refuses)
    first, in its thread: resizing a 500×375 photo to 224×224 takes longer than decoding it,
    and a reader that resized in one thread after its decoding threads read ImageNet-sized
    JPEGs at a third of their decoding rate. Each image is written straight into the batch,
    which a reader process allocates in shared memory: a copy, a reorder and a stack an image
    fewer, and no copy into shared memory when the batch is handed over (that copy alone took
    0.14–0.22 ms an image on 2 cores). The batch is a normal tensor even when the caller reads
    under ``torch.inference_mode()``: the decoding threads, outside that mode, write into it.
    """
    with torch.inference_mode(False):
        batch = _batch_buffer((len(paths), 3, *size),
                              torch.uint8 if on_grid else torch.float32)

    def read(index: int) -> tuple[str, ...]:
        path = paths[index]
        pixels, unread = read_pixels(path)
        if tuple(pixels.shape[-2:]) != tuple(size):
            pixels = fit(as_read(pixels, on_grid), str(path))
        as_read(pixels, on_grid, into=batch[index])
        return unread

    rows = (map if len(paths) < 2 else _decoders().map)(read, range(len(paths)))
    unread: dict[str, list[int]] = {}
    for row, left_out in enumerate(rows):
        for what in left_out:
            unread.setdefault(what, []).append(row)
    return batch, unread


def evenly_spaced(total: int, count: int) -> np.ndarray:
    """``count`` of ``total`` item indices, evenly spaced and increasing (all of them when
    ``count`` ≥ ``total``): the one way neaudit samples a dataset, since items in name order
    are grouped by class."""
    count = min(count, total)
    return np.arange(count) * total // count


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty batch; in a DataLoader worker, in shared memory, as torch's own
    ``default_collate`` allocates its batches there, so that handing it to the parent
    process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _check_values(images: torch.Tensor, where: str) -> None:
    if not torch.isfinite(images).all():
        raise DataError(f"{where}: contains NaN or infinite values. Fix: clean the array.")
    if images.min() < 0 or images.max() > 1:
        raise DataError(f"{where}: float values outside [0, 1]. Fix: store uint8 images "
                        "(N,H,W,3) or floats scaled to [0, 1].")
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"{where}: expected images shaped (N,H,W,3) or (N,3,H,W), got "
                        f"{tuple(images.shape)}. Fix: store RGB image arrays.")
