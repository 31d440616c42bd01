"""Protected datasets: folders, paired originals, ``.npz`` arrays and CSV/Parquet manifests.

A dataset is a list of items (protected image, optional clean original, optional label) plus
class names and the ``neaudit.json`` sidecar when one exists. Nothing is decoded up front:
:meth:`ImageDataset.batches` streams fixed-size batches, so memory does not grow with the
dataset. Nothing is ever written into the input folder.

Accepted layouts (``load_dataset(path)``):

1. a folder of images, flat or ImageFolder (class sub-folders give labels and class names);
2. a dataset root written by ``neaudit protect``: ``protected/``, optional ``original/`` and
   ``neaudit.json``; or a folder of images with a sibling ``original/`` tree (or
   ``originals=DIR``) holding the clean images under the same relative paths;
3. an ``.npz`` with ``protected`` (N,H,W,3 uint8 or N,3,H,W float in [0,1]), optional
   ``original``, ``labels`` and ``class_names``;
4. a ``.csv`` or ``.parquet`` manifest with ``path``, optional ``original_path`` and ``label``
   (paths relative to the manifest's folder).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from neaudit.errors import DataError
from neaudit.imageio import (
    IMAGE_SUFFIXES,
    JPEG_SUFFIXES,
    image_size,
    read_image,
    read_jpegs_on,
    to_float,
)

SIDECAR = "neaudit.json"
PROTECTED_DIR = "protected"
ORIGINAL_DIR = "original"


@dataclass
class Batch:
    """One streamed batch. Images are float32 NCHW in [0, 1]."""

    index: torch.Tensor
    protected: torch.Tensor
    original: torch.Tensor | None
    labels: torch.Tensor | None
    names: list[str]


@dataclass
class ImageDataset:
    """Items of a protected dataset; images are decoded only when a batch is requested.

    ``protected``/``original`` hold either file paths or one in-memory array (from ``.npz``).
    """

    names: list[str]
    protected: list[Path] | np.ndarray
    original: list[Path] | np.ndarray | None = None
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    sidecar: dict | None = None
    source: Path | None = None
    resize: tuple[int, int] | None = None
    decode_device: torch.device | None = None  # a CUDA device: JPEG shards decode with nvJPEG
    image_shape: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.names) == 0:
            raise DataError(f"{self.source}: no images found. Fix: point to a folder with "
                            f"{', '.join(IMAGE_SUFFIXES)} files, an .npz or a manifest.")
        if self.labels is not None:
            if len(self.labels) != len(self.names):
                raise DataError(f"{self.source}: {len(self.labels)} labels for "
                                f"{len(self.names)} images. Fix: give one label per image.")
            if self.class_names is not None and len(self.labels):
                bad = np.flatnonzero((self.labels < 0) | (self.labels >= len(self.class_names)))
                if bad.size:
                    raise DataError(
                        f"{self.source}: label {int(self.labels[bad[0]])} of item "
                        f"'{self.names[bad[0]]}' is outside the {len(self.class_names)} class "
                        "names. Fix: make class_names cover every label.")
        self.image_shape = self.resize or self._first_shape()

    def __len__(self) -> int:
        return len(self.names)

    def head(self, count: int) -> ImageDataset:
        """The first ``count`` items as a dataset of their own."""
        def cut(items):
            return None if items is None else items[:count]

        return replace(self, names=self.names[:count], protected=cut(self.protected),
                       original=cut(self.original), labels=cut(self.labels))

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

    def batches(self, batch_size: int = 64, start: int = 0, stop: int | None = None
                ) -> Iterator[Batch]:
        """Stream items ``[start, stop)`` in batches of ``batch_size``."""
        stop = len(self) if stop is None else min(stop, len(self))
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            index = torch.arange(lo, hi)
            protected = self._load(self.protected, lo, hi, "protected")
            original = (self._load(self.original, lo, hi, "original")
                        if self.original is not None else None)
            labels = (torch.as_tensor(self.labels[lo:hi], dtype=torch.long)
                      if self.labels is not None else None)
            yield Batch(index, protected, original, labels, self.names[lo:hi])

    def _load(self, items: list[Path] | np.ndarray, lo: int, hi: int, kind: str) -> torch.Tensor:
        if isinstance(items, np.ndarray):
            images = to_float(items[lo:hi])
            _check_values(images, f"{self.source} ({kind}[{lo}:{hi}])")
            return self._fit(images, [f"{kind}[{i}]" for i in range(lo, hi)])
        paths = items[lo:hi]
        if self.decode_device is not None and self.decode_device.type == "cuda" and all(
                p.suffix.lower() in JPEG_SUFFIXES for p in paths):
            images = read_jpegs_on(paths, self.decode_device)
        else:
            images = [read_image(p) for p in paths]
        return self._fit(images, [str(p) for p in paths])

    def _fit(self, images: Sequence[torch.Tensor] | torch.Tensor, labels: list[str]
             ) -> torch.Tensor:
        """Apply the resize policy, or insist that every image has the dataset's size."""
        out = []
        for image, label in zip(images, labels, strict=True):
            if tuple(image.shape[-2:]) != tuple(self.image_shape):
                if self.resize is None:
                    raise DataError(
                        f"{label}: size {tuple(image.shape[-2:])} differs from "
                        f"{tuple(self.image_shape)} of the first image. Fix: pass a resize "
                        "policy (--resize H[xW]) or give images of one size.")
                image = F.interpolate(image[None], size=self.resize, mode="bilinear",
                                      antialias=True, align_corners=False)[0].clamp(0, 1)
            out.append(image)
        return torch.stack(out)


def _check_values(images: torch.Tensor, where: str) -> None:
    if not torch.isfinite(images).all():
        raise DataError(f"{where}: contains NaN or infinite values. Fix: clean the array.")
    if images.min() < 0 or images.max() > 1:
        raise DataError(f"{where}: float values outside [0, 1]. Fix: store uint8 images "
                        "(N,H,W,3) or floats scaled to [0, 1].")
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"{where}: expected images shaped (N,H,W,3) or (N,3,H,W), got "
                        f"{tuple(images.shape)}. Fix: store RGB image arrays.")


def load_dataset(path: str | Path, originals: str | Path | None = None,
                 resize: tuple[int, int] | None = None) -> ImageDataset:
    """Load a protected dataset from a folder, ``.npz`` or manifest (see module docstring)."""
    if isinstance(path, str) and path.startswith("builtin:"):
        return builtin_dataset(path.removeprefix("builtin:"))
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder. Fix: check the path.")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return _load_npz(path, resize)
        if suffix in (".csv", ".parquet"):
            return _load_manifest(path, resize)
        raise DataError(f"{path}: unsupported file type '{suffix}'. Fix: give a folder of "
                        "images, an .npz, or a .csv/.parquet manifest.")
    return _load_folder(path, Path(originals) if originals else None, resize)


def builtin_dataset(name: str, count: int = 32, size: int = 64) -> ImageDataset:
    """Small real-photo datasets that ship inside installed packages (no download).

    ``samples``: ``count`` deterministic ``size``×``size`` crops of scikit-learn's two bundled
    photographs (a temple and a flower), labelled by source photo.
    """
    if name != "samples":
        raise DataError(f"unknown built-in dataset 'builtin:{name}'. Fix: use builtin:samples.")
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    crops, labels = [], []
    for i in range(count):
        photo = photos[i % 2]
        side = int(rng.integers(min(size, 200), min(3 * size, 420)))
        top = int(rng.integers(0, photo.shape[0] - side))
        left = int(rng.integers(0, photo.shape[1] - side))
        crop = to_float(photo[None, top:top + side, left:left + side])
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
        crops.append(crop)
        labels.append(i % 2)
    images = torch.round(torch.cat(crops).clamp(0, 1) * 255).to(torch.uint8)
    return ImageDataset(names=[f"{i:03d}" for i in range(count)],
                        protected=images.permute(0, 2, 3, 1).numpy(),
                        labels=np.array(labels, dtype=np.int64),
                        class_names=["china", "flower"], source=Path(f"builtin:{name}"))


def read_sidecar(folder: Path) -> dict | None:
    for candidate in (folder / SIDECAR, folder.parent / SIDECAR):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError as exc:
                raise DataError(f"{candidate}: not valid JSON ({exc}). Fix: restore the "
                                "sidecar written by `neaudit protect` or delete it.") from exc
    return None


def _list_images(folder: Path, exclude: set[str] = frozenset()) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        and not p.name.startswith(".")
        and not (set(p.relative_to(folder).parts[:1]) & exclude)
    )


def _load_folder(path: Path, originals: Path | None, resize) -> ImageDataset:
    root = path
    if (path / PROTECTED_DIR).is_dir():
        images_dir = path / PROTECTED_DIR
        default_originals = path / ORIGINAL_DIR
    else:
        images_dir = path
        default_originals = path.parent / ORIGINAL_DIR
    if originals is None and default_originals.is_dir() and default_originals != images_dir:
        originals = default_originals
    files = _list_images(images_dir, exclude={ORIGINAL_DIR} if images_dir == root else set())
    if not files:
        raise DataError(f"{images_dir}: no images found (looked for "
                        f"{', '.join(IMAGE_SUFFIXES)}). Fix: point to the folder that holds "
                        "the protected images.")
    rel = [f.relative_to(images_dir) for f in files]
    labels, class_names = _labels_from_layout(rel)
    original_files = None
    if originals is not None:
        original_files = [originals / r for r in rel]
        missing = [str(p) for p in original_files if not p.is_file()]
        if missing:
            raise DataError(
                f"{originals}: {len(missing)} protected image(s) have no original under the "
                f"same relative path, e.g. {missing[0]}. Fix: mirror the protected tree in the "
                "originals folder, or drop --originals.")
    return ImageDataset(names=[r.as_posix() for r in rel], protected=files,
                        original=original_files, labels=labels, class_names=class_names,
                        sidecar=read_sidecar(root), source=root, resize=resize)


def _labels_from_layout(rel: list[Path]) -> tuple[np.ndarray | None, list[str] | None]:
    depths = {len(r.parts) for r in rel}
    if depths == {1}:
        return None, None
    if depths != {2}:
        raise DataError("mixed folder layout: some images sit at the top level and some in "
                        "sub-folders. Fix: use a flat folder, or one sub-folder per class.")
    class_names = sorted({r.parts[0] for r in rel})
    lookup = {name: i for i, name in enumerate(class_names)}
    return np.array([lookup[r.parts[0]] for r in rel], dtype=np.int64), class_names


def _load_npz(path: Path, resize) -> ImageDataset:
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read this .npz ({exc}). Fix: save it with "
                        "numpy.savez without object arrays.") from exc
    if "protected" not in arrays:
        raise DataError(f"{path}: no 'protected' array (found {sorted(arrays.files)}). "
                        "Fix: name the protected images array 'protected'.")
    protected = arrays["protected"]
    if protected.ndim != 4 or 3 not in (protected.shape[1], protected.shape[-1]):
        raise DataError(f"{path}: 'protected' has shape {protected.shape}; expected "
                        "(N,H,W,3) uint8 or (N,3,H,W) float in [0,1].")
    original = arrays["original"] if "original" in arrays else None
    if original is not None and original.shape != protected.shape:
        raise DataError(f"{path}: 'original' shape {original.shape} differs from 'protected' "
                        f"{protected.shape}. Fix: store one original per protected image.")
    labels = arrays["labels"].astype(np.int64) if "labels" in arrays else None
    class_names = [str(c) for c in arrays["class_names"]] if "class_names" in arrays else None
    return ImageDataset(names=[f"{i}" for i in range(len(protected))], protected=protected,
                        original=original, labels=labels, class_names=class_names,
                        sidecar=read_sidecar(path.parent / path.stem), source=path,
                        resize=resize)


def _load_manifest(path: Path, resize) -> ImageDataset:
    try:
        table = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    except Exception as exc:  # pandas raises many types for a malformed file
        raise DataError(f"{path}: cannot read this manifest ({exc}).") from exc
    if "path" not in table.columns:
        raise DataError(f"{path}: no 'path' column (found {list(table.columns)}). Fix: add a "
                        "'path' column, with optional 'original_path' and 'label'.")
    base = path.parent
    files = [base / p for p in table["path"].astype(str)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{path}: {len(missing)} listed file(s) do not exist, e.g. "
                        f"{missing[0]}. Fix: paths are relative to the manifest's folder.")
    original = None
    if "original_path" in table.columns:
        original = [base / p for p in table["original_path"].astype(str)]
        missing = [str(f) for f in original if not f.is_file()]
        if missing:
            raise DataError(f"{path}: {len(missing)} original(s) do not exist, e.g. "
                            f"{missing[0]}. Fix: correct 'original_path'.")
    labels = class_names = None
    if "label" in table.columns:
        column = table["label"]
        if column.isna().any():
            raise DataError(f"{path}: empty 'label' in row {int(column.isna().idxmax())}. "
                            "Fix: label every row, or drop the column.")
        if pd.api.types.is_integer_dtype(column):
            labels = column.to_numpy(np.int64)
        else:
            class_names = sorted(column.astype(str).unique())
            lookup = {n: i for i, n in enumerate(class_names)}
            labels = np.array([lookup[v] for v in column.astype(str)], dtype=np.int64)
    return ImageDataset(names=table["path"].astype(str).tolist(), protected=files,
                        original=original, labels=labels, class_names=class_names,
                        sidecar=read_sidecar(path.parent), source=path, resize=resize)
