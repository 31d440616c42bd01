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
3. an ``.npz`` with ``protected`` (uint8 0–255 or float in [0, 1]; N,H,W,3 or N,3,H,W), optional
   ``original``, ``labels`` and ``class_names``;
4. a ``.csv`` or ``.parquet`` manifest with ``path``, optional ``original_path`` and ``label``
   (paths relative to the manifest's folder).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from neaudit.arguments import checked
from neaudit.dataset import Batch, ImageDataset  # noqa: F401  (re-exported)
from neaudit.device import free_memory_short_of
from neaudit.errors import DataError
from neaudit.imageio import (
    IMAGE_SUFFIXES,
    to_float,
)
from neaudit.paths import Resolver, inside

SIDECAR = "neaudit.json"
PROTECTED_DIR = "protected"
ORIGINAL_DIR = "original"
RELEASE_NPZ = "protected.npz"
HASHES = "hashes.sha256"
PROGRESS_DIR = ".neaudit-progress"
"""Where a ``protect`` run keeps its checkpoint until it ends (:mod:`neaudit.progress`)."""
"""What ``neaudit protect --format npz`` writes beside its sidecar, instead of image folders."""


@checked
def load_dataset(path: str | Path, originals: str | Path | None = None,
                 resize: tuple[int, int] | None = None, allow_outside: bool = False
                 ) -> ImageDataset:
    """Load a protected dataset from a folder, ``.npz`` or manifest (see module docstring).

    Input files that resolve outside the dataset's folder (manifest rows with absolute or
    ``..`` paths, symlinks out of a folder) are refused unless ``allow_outside``; then they
    are counted in ``outside_files`` (see :mod:`neaudit.paths`)."""
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
            return _load_manifest(path, resize, allow_outside)
        raise DataError(f"{path}: unsupported file type '{suffix}'. Fix: give a folder of "
                        "images, an .npz, or a .csv/.parquet manifest.")
    for folder in (path, path.parent):
        if (folder / PROGRESS_DIR).is_dir():
            raise DataError(f"{folder}: a protect run writing here stopped before its end "
                            f"({PROGRESS_DIR}/ is there): its images are not all written and "
                            f"it has no {SIDECAR} yet. Fix: run the same protect command again "
                            f"to finish it, or delete {folder / PROGRESS_DIR} to use the files "
                            "as they are.")
    if (path / RELEASE_NPZ).is_file() and (read_sidecar(path) or {}).get("format") == "npz":
        return _load_npz(path / RELEASE_NPZ, resize)  # a release protect wrote as arrays
    return _load_folder(path, Path(originals) if originals else None, resize, allow_outside)


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


SIDECAR_TYPES: dict[str, tuple[type, ...]] = {
    "authorized": (str,), "method": (str,), "format": (str,), "content_digest": (str,),
    "params": (dict,), "class_names": (list,),
}
"""The fields of ``neaudit.json`` that an audit reads, with their JSON types (each may also
be null or absent: sidecars of older versions lack some)."""

PARAMS_TYPES: dict[str, tuple[type, ...]] = {
    "psnr": (int, float), "psnr_is_nominal": (bool,), "rank": (int,), "seed": (int,),
    "key_source": (str,), "key_bits": (int,), "noise_salt": (str,),
}
"""The same for its ``params``."""


def read_sidecar(folder: Path) -> dict | None:
    """The ``neaudit.json`` of a release, checked: it is an input like the images, so a field
    of the wrong type is refused here, by name, rather than met deep inside an audit."""
    for candidate in (folder / SIDECAR, folder.parent / SIDECAR):
        if candidate.is_file():
            try:
                sidecar = json.loads(candidate.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{candidate}: not valid JSON ({exc}). Fix: restore the "
                                "sidecar written by `neaudit protect` or delete it.") from exc
            _check_types(candidate, "", sidecar, SIDECAR_TYPES)
            _check_types(candidate, "params.", sidecar.get("params") or {}, PARAMS_TYPES)
            return sidecar
    return None


_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               dict: "an object", list: "an array"}


def _check_types(path: Path, prefix: str, fields: object,
                 types: dict[str, tuple[type, ...]]) -> None:
    """Refuse ``fields`` unless it is a JSON object whose listed fields have their types."""
    if not isinstance(fields, dict):
        raise DataError(f"{path}: {prefix.rstrip('.') or 'the sidecar'} is "
                        f"{json.dumps(fields)[:40]}, not an object. Fix: restore the sidecar "
                        "written by `neaudit protect` or delete it.")
    for name, allowed in types.items():
        value = fields.get(name)
        if value is not None and (not isinstance(value, allowed) or (
                isinstance(value, bool) and bool not in allowed)):
            raise DataError(f"{path}: '{prefix}{name}' is {json.dumps(value)[:40]}, not "
                            f"{' or '.join(_JSON_NAMES[t] for t in allowed)}. Fix: restore the "
                            "sidecar written by `neaudit protect` or delete it.")


def _list_images(folder: Path, exclude: set[str] = frozenset()) -> tuple[list[str], int]:
    """Image files under ``folder`` (symlinks followed, each real folder visited once, in
    name order), as strings sorted as paths, and how many of them resolve outside it. Listed with
    ``os.scandir``, whose entries know their type: a plain file costs no system call (this
    took 21 µs a file with a ``stat`` or two each, half a minute for ImageNet)."""
    root = folder.resolve()
    found: list[str] = []
    outside, seen, pending = 0, set(), [str(folder)]
    while pending:
        here = pending.pop()
        real = os.path.realpath(here)
        if real in seen:
            continue
        seen.add(real)
        real_outside = not Path(real).is_relative_to(root)
        try:
            with os.scandir(here) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as exc:
            raise DataError(f"{here}: cannot list this folder ({exc.strerror}). Fix: make it "
                            "readable, or move it out of the dataset.") from exc
        folders = []
        for entry in entries:
            if entry.is_dir():  # links to folders too, as os.walk(followlinks=True)
                if here != str(folder) or entry.name not in exclude:
                    folders.append(entry.path)
                continue
            name = entry.name
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                continue
            link = entry.is_symlink()
            if link and not os.path.exists(entry.path):
                raise DataError(f"{entry.path}: a link to a file that does not exist "
                                f"({os.readlink(entry.path)}). Fix: restore its target or "
                                "remove the link.")
            if not entry.is_file():
                raise _not_regular(entry.path, link)
            if real_outside or (link and not inside(entry.path, root)):
                outside += 1
            found.append(entry.path)
        pending.extend(reversed(folders))  # the first name is visited first
    # the order of the Paths themselves (part by part: NUL sorts before any character a
    # name can hold)
    found.sort(key=lambda path: path.replace(os.sep, "\0"))
    return found, outside


def _refuse_special(path: str) -> None:
    """Refuse a path that is no regular file yet exists and is no folder (a pipe, a socket, a
    device, or a link to one): the caller found it where a file should be."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise _not_regular(path, os.path.islink(path))


def _not_regular(path: str, link: bool) -> DataError:
    """An image name on a pipe, socket or device: reading it could block, or never end."""
    return DataError(f"{path}: {'a link to ' if link else ''}a pipe, socket or device, not an "
                     "image file; reading it could wait or read forever. Fix: remove it from "
                     "the dataset, or put the image file in its place.")


def _outside_refused(where: Path, count: int, example: str) -> DataError:
    return DataError(f"{where}: {count} input file(s) lie outside the dataset's folder (through "
                     f"a symlink, an absolute or a '..' path), e.g. {example}. Fix: copy them "
                     "into the folder, or pass --allow-outside to read them (recorded in the "
                     "run's provenance).")


def _load_folder(path: Path, originals: Path | None, resize, allow_outside: bool
                 ) -> ImageDataset:
    root = path
    if (path / PROTECTED_DIR).is_dir():
        images_dir = path / PROTECTED_DIR
        default_originals = path / ORIGINAL_DIR
    else:
        images_dir = path
        default_originals = path.parent / ORIGINAL_DIR
    if originals is None and default_originals.is_dir() and default_originals != images_dir:
        originals = default_originals
    found, outside = _list_images(images_dir, {ORIGINAL_DIR} if images_dir == root else set())
    if not found:
        raise DataError(f"{images_dir}: no images found (looked for "
                        f"{', '.join(IMAGE_SUFFIXES)}). Fix: point to the folder that holds "
                        "the protected images.")
    # relative names as strings: pathlib cost more than the file system here
    prefix = os.path.join(str(images_dir), "")
    rel = [f[len(prefix):].replace(os.sep, "/") for f in found]
    labels, class_names = _labels_from_layout(rel)
    original_files = None
    if originals is not None:
        listed = [os.path.join(str(originals), r) for r in rel]
        missing = [p for p in listed if not os.path.isfile(p)]
        for original in missing:
            _refuse_special(original)
        if missing:
            raise DataError(
                f"{originals}: {len(missing)} protected image(s) have no original under the "
                f"same relative path, e.g. {missing[0]}. Fix: mirror the protected tree in the "
                "originals folder, or drop --originals.")
        resolver = Resolver()
        outside += sum(not resolver.inside(p, originals) for p in listed)
        original_files = listed
    if outside and not allow_outside:
        example = next((f for f in found if not inside(f, images_dir)), str(originals))
        raise _outside_refused(root, outside, example)
    return ImageDataset(names=rel, protected=found,
                        original=original_files, labels=labels, class_names=class_names,
                        sidecar=read_sidecar(root), source=root, resize=resize,
                        outside_files=outside)


def _labels_from_layout(rel: list[str]) -> tuple[np.ndarray | None, list[str] | None]:
    """Class labels from ``class/file`` names (relative, '/'-separated); none for a flat
    folder."""
    parts = [r.split("/") for r in rel]
    depths = {len(p) for p in parts}
    if depths == {1}:
        return None, None
    if depths != {2}:
        raise DataError("mixed folder layout: some images sit at the top level and some in "
                        "sub-folders. Fix: use a flat folder, or one sub-folder per class.")
    class_names = sorted({p[0] for p in parts})
    lookup = {name: i for i, name in enumerate(class_names)}
    return np.array([lookup[p[0]] for p in parts], dtype=np.int64), class_names


def _unreadable_npz(path: Path, exc: Exception) -> DataError:
    return DataError(f"{path}: cannot read this .npz ({exc}). Fix: save it with numpy.savez "
                     "without object arrays.")


def _load_npz(path: Path, resize) -> ImageDataset:
    try:
        with zipfile.ZipFile(path) as archive:  # the sizes its directory declares, unread
            stored = sum(member.file_size for member in archive.infolist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise _unreadable_npz(path, exc) from exc
    free = free_memory_short_of(stored)
    if free is not None:  # a few MB of zeros can unpack to gigabytes
        raise DataError(f"{path}: its arrays unpack to {stored / 2**30:.1f} GiB, read whole, "
                        f"and this machine has {free / 2**30:.1f} GiB free. Fix: give the "
                        "images as files (a folder or a manifest), which stream.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise _unreadable_npz(path, exc) from exc
    if "protected" not in arrays:
        raise DataError(f"{path}: no 'protected' array (found {sorted(arrays)}). "
                        "Fix: name the protected images array 'protected'.")
    protected = arrays["protected"]
    if protected.ndim != 4 or 3 not in (protected.shape[1], protected.shape[-1]):
        raise DataError(f"{path}: 'protected' has shape {protected.shape}; expected "
                        "(N,H,W,3) or (N,3,H,W) RGB images.")
    for name in ("protected", "original"):
        kind = arrays[name].dtype if name in arrays else None
        if kind is not None and kind != np.uint8 and kind.kind != "f":  # no scale to guess
            raise DataError(f"{path}: '{name}' holds {kind} values. Fix: store uint8 images "
                            "(0–255) or floats in [0, 1].")
    original = arrays["original"] if "original" in arrays else None
    if original is not None and original.shape != protected.shape:
        raise DataError(f"{path}: 'original' shape {original.shape} differs from 'protected' "
                        f"{protected.shape}. Fix: store one original per protected image.")
    labels, class_names = None, None
    if "labels" in arrays:
        if arrays["labels"].ndim != 1:
            raise DataError(f"{path}: 'labels' has shape {arrays['labels'].shape}. Fix: store "
                            "one label per image, as a 1-D array.")
        labels, class_names = _labels(path, pd.Series(arrays["labels"]), "item")
    if "class_names" in arrays:
        if class_names is not None:
            raise DataError(f"{path}: 'labels' holds names ({class_names[0]!r}, …) and "
                            "'class_names' is given too. Fix: store class indices in 'labels', "
                            "or drop 'class_names'.")
        class_names = [str(c) for c in arrays["class_names"]]
    return ImageDataset(names=[f"{i}" for i in range(len(protected))], protected=protected,
                        original=original, labels=labels, class_names=class_names,
                        sidecar=read_sidecar(path.parent / path.stem), source=path,
                        resize=resize)


MANIFEST_ROW_BYTES = 100
"""The least memory a manifest row takes once loaded: two Python strings (its file's path and
its item name), about 50 bytes each before a character."""


def _load_manifest(path: Path, resize, allow_outside: bool) -> ImageDataset:
    parquet = path.suffix.lower() == ".parquet"
    if parquet:  # dictionary-encoded, 30 KB can declare ten million rows
        _check_manifest_rows(path)
    try:
        table = pd.read_parquet(path) if parquet else pd.read_csv(path)
    except Exception as exc:  # pandas raises many types for a malformed file
        raise DataError(f"{path}: cannot read this manifest ({exc}). Fix: give a CSV or "
                        "Parquet table with a 'path' column.") from exc
    if "path" not in table.columns:
        raise DataError(f"{path}: no 'path' column (found {list(table.columns)}). Fix: add a "
                        "'path' column, with optional 'original_path' and 'label'.")
    if table.empty:
        raise DataError(f"{path}: the manifest lists no images. Fix: add rows.")
    files, names, outside = _manifest_files(path, table["path"], "path")
    original = None
    if "original_path" in table.columns:
        original, _, outside_originals = _manifest_files(path, table["original_path"],
                                                         "original_path")
        outside += outside_originals
    if outside and not allow_outside:
        example = next(f for f in files + (original or []) if not inside(f, path.parent))
        raise _outside_refused(path, outside, example)
    labels, class_names = (_labels(path, table["label"], "row") if "label" in table.columns
                           else (None, None))
    return ImageDataset(names=names, protected=files, original=original, labels=labels,
                        class_names=class_names, sidecar=read_sidecar(path.parent), source=path,
                        resize=resize, outside_files=outside)


def _check_manifest_rows(path: Path) -> None:
    """Refuse a Parquet manifest whose rows, by its footer, cannot fit in the free memory."""
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # pyarrow raises several types for a malformed file
        raise DataError(f"{path}: cannot read this manifest ({exc}). Fix: give a CSV or "
                        "Parquet table with a 'path' column.") from exc
    free = free_memory_short_of(rows * MANIFEST_ROW_BYTES)
    if free is not None:
        raise DataError(f"{path}: lists {rows:,} rows, more than {free / 2**30:.1f} GiB of free "
                        f"memory can hold ({MANIFEST_ROW_BYTES} bytes a row at the least). Fix: "
                        "split the manifest, or give the images as a folder.")


def _manifest_files(manifest: Path, column: pd.Series, name: str
                    ) -> tuple[list[str], list[str], int]:
    """The listed files (relative to the manifest's folder), their item names (the path
    inside that folder, or ``_outside/<row>-<file name>`` for a file outside it) and how many
    lie outside."""
    base, resolve = str(manifest.parent), Resolver()
    real_base = resolve.real(base)
    files, names, outside = [], [], 0
    for row, text in enumerate(column.astype(str)):
        file = os.path.join(base, text)  # strings: pathlib cost more than the system calls
        if not os.path.isfile(file):
            _refuse_special(file)
            raise DataError(f"{manifest}: row {row} '{name}' {text} is not a file. Fix: paths "
                            "are relative to the manifest's folder.")
        if resolve.inside(file, base):
            names.append(os.path.relpath(resolve.real(file), real_base).replace(os.sep, "/"))
        else:
            outside += 1
            names.append(f"_outside/{row:06d}-{os.path.basename(file)}")
        files.append(file)
    return files, names, outside


def _labels(source: Path, column: pd.Series, where: str) -> tuple[np.ndarray, list[str] | None]:
    """Class indices and, where the values are names, the class names. Whole numbers are
    indices as they are; any other values (names, fractions) are class names, numbered in
    sorted order, so no label is rounded or cut."""
    if column.isna().any():
        raise DataError(f"{source}: empty label in {where} {int(column.isna().idxmax())}. "
                        "Fix: label every item, or drop the labels.")
    whole = (pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
             and (column % 1 == 0).all() and (column.abs() < 2**53).all())
    if not whole:
        class_names = sorted(column.astype(str).unique())
        lookup = {n: i for i, n in enumerate(class_names)}
        return np.array([lookup[v] for v in column.astype(str)], dtype=np.int64), class_names
    return column.to_numpy(np.int64), None
