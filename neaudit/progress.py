"""The checkpoint of a ``protect`` run that writes PNGs, so that a killed run resumes.

``OUT/.neaudit-progress/`` holds the run's settings (``identity.json``) and one ``.npz``
record per batch whose files are all written: its span of items, their fidelity rows and
PNG digests, the items the fidelity preview sampled in it (as uint8 images: the model runs on
them later, in batches collected across the job's) and what reading left out of them. A
record is written only after its batch's files, so a record on disk means they are complete.
Re-running the same command skips the recorded batches whose files are still there, and the
finished run removes the folder.

A secret key is never written here. A run with a given key checks that a resumed one uses the
same (by a tag derived from it); a run whose key was drawn at random draws a new one for the
images still to write, so each image's noise stays a secret no file holds, unless the run
stores its key in its sidecar anyway (``--store-key``): then the drawn key is kept here, and
the release holds one key's noise, the key its sidecar names. Everything is
plain JSON or ``.npz`` read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from neaudit.data import PROGRESS_DIR
from neaudit.errors import NeauditError
from neaudit.imageio import UNREAD, atomic_write
from neaudit.paths import OutputTree
from neaudit.seeding import derive_key

IDENTITY = "identity.json"
KEPT_KEY = "stored-key"
_RECORD = re.compile(r"batch-(\d{12})\.npz")
_DIGEST = re.compile(r"[0-9a-f]{64}")


def key_tag(key: int) -> str:
    """What the checkpoint records of a given key: a 256-bit tag derived from it, which tells
    whether a resumed run uses the same key without telling the key."""
    return f"{derive_key(key, 'neaudit-resume'):064x}"


@dataclass
class BatchRecord:
    """One written batch: items ``start``..``stop - 1``."""

    start: int
    stop: int
    fidelity: pd.DataFrame
    digests: list[str]
    preview_index: np.ndarray  # int64 item numbers the preview sampled in this batch
    preview_images: np.ndarray  # uint8 (k, roles, 3, H, W): clean, protected, noisy
    preview_floats: np.ndarray | None  # float32 (k, 3, H, W): the reference float output
    unread: dict[str, list[str]]

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {"span": np.array([self.start, self.stop], np.int64),
                  "fidelity_columns": np.array(list(self.fidelity.columns), dtype=str),
                  "digests": np.array(self.digests, dtype="<U64"),
                  "preview_index": self.preview_index.astype(np.int64),
                  "preview_images": self.preview_images,
                  "unread_kinds": np.array(list(self.unread), dtype=str)}
        for column in self.fidelity.columns:
            arrays[f"fidelity.{column}"] = self.fidelity[column].to_numpy()
        for what, names in self.unread.items():
            arrays[f"unread.{what}"] = np.array(names, dtype=str)
        if self.preview_floats is not None:
            arrays["preview_floats"] = self.preview_floats
        return arrays


class Progress:
    """The checkpoint folder of one run under ``out``, refused when it holds another run's
    (other data or settings), before any work; written from :meth:`begin` on."""

    def __init__(self, out: Path, identity: dict, key_to_keep: int | None = None) -> None:
        """``key_to_keep``: a drawn key the finished run will store in its sidecar, kept here
        for a resumed run to use (:attr:`key`: that key, or the stopped run's)."""
        self.folder = Path(OutputTree(out / PROGRESS_DIR, out).folder())
        text = json.dumps(identity, indent=2, sort_keys=True)
        path, key_path = self.folder / IDENTITY, self.folder / KEPT_KEY
        self.key = key_to_keep
        if path.is_file():
            try:
                earlier = json.loads(path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError):
                earlier = None
            if not isinstance(earlier, dict):
                raise self._damaged(path, "not a settings file")
            differ = sorted(k for k in identity.keys() | earlier.keys()
                            if identity.get(k) != earlier.get(k))
            if differ:
                raise NeauditError(
                    f"{out} holds a protect run stopped before its end with other settings "
                    f"({', '.join(differ)} differ). Fix: run the same command to resume it, or "
                    f"delete {self.folder} (or choose another --out) to start over.")
            if key_to_keep is not None:
                self.key = _kept_key(key_path)
                if self.key is None:
                    raise self._damaged(key_path, "no key")
        self.identity, self._text = identity, text

    def begin(self) -> None:
        """Write the run's settings (and key to keep) where a new run starts, once it has
        passed its checks: a refused run leaves ``out`` as it found it."""
        path = self.folder / IDENTITY
        if path.is_file():
            return
        if self.key is not None:
            atomic_write(self.folder / KEPT_KEY, lambda h: h.write(str(self.key).encode()))
        atomic_write(path, lambda h: h.write(self._text.encode()))  # last: the run's start

    def records(self, names: list[str], image_shape: tuple[int, ...], columns: list[str],
                sampled: np.ndarray, written: set[str], folders: list[OutputTree]
                ) -> list[BatchRecord]:
        """The recorded batches, in item order, whose files are all still in ``written``
        (``out/folder/relative`` paths), each checked against the run it claims to be of:
        its items (``names``), their ``image_shape`` (3, H, W), the fidelity ``columns``
        (with ``psnr_float``, the preview keeps float outputs too) and the items the preview
        samples (``sampled``, ascending)."""
        kept, covered = [], np.zeros(len(names), bool)
        for file in sorted(os.listdir(self.folder)) if self.folder.is_dir() else []:
            if not _RECORD.fullmatch(file):
                continue
            record = self._load(self.folder / file, len(names), image_shape, columns, sampled)
            files = [tree.path(name) for tree in folders
                     for name in names[record.start:record.stop]]
            if covered[record.start:record.stop].any() or not written.issuperset(files):
                continue  # a file deleted since: the batch is written again
            covered[record.start:record.stop] = True
            kept.append(record)
        return kept

    def save(self, record: BatchRecord) -> None:
        arrays = record.arrays()
        atomic_write(self.folder / f"batch-{record.start:012d}.npz",
                     lambda handle: np.savez(handle, **arrays))

    def finish(self) -> None:
        """Remove the checkpoint: the run's own outputs now say it is complete."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _load(self, path: Path, count: int, image_shape: tuple[int, ...], columns: list[str],
              sampled: np.ndarray) -> BatchRecord:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
            return _record(arrays, count, image_shape, columns, sampled)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise self._damaged(path, str(exc).split("\n")[0]) from None

    def _damaged(self, path: Path, why: str) -> NeauditError:
        return NeauditError(f"{path} is not a record this run can resume from ({why}). Fix: "
                            f"delete {self.folder} (or choose another --out) to start over.")


def _record(arrays: dict[str, np.ndarray], count: int, image_shape: tuple[int, ...],
            columns: list[str], sampled: np.ndarray) -> BatchRecord:
    """A record from its arrays, refused (``ValueError``) unless each has the shape, type and
    names this run's would."""
    start, stop = (int(v) for v in _typed(arrays["span"], "i", (2,)))
    if not 0 <= start < stop <= count:
        raise ValueError(f"items {start}..{stop} outside the dataset's {count}")
    size = stop - start
    if _typed(arrays["fidelity_columns"], "U").tolist() != columns:
        raise ValueError("other fidelity columns than this run measures")
    fidelity = pd.DataFrame({c: _typed(arrays[f"fidelity.{c}"], "f", (size,)) for c in columns})
    digests = [str(d) for d in _typed(arrays["digests"], "U", (size,))]
    if not all(_DIGEST.fullmatch(d) for d in digests):
        raise ValueError("a digest is not SHA-256 hex")
    index = _typed(arrays["preview_index"], "i")
    if not np.array_equal(index, sampled[(sampled >= start) & (sampled < stop)]):
        raise ValueError("other preview items than this run samples in the batch")
    images = _typed(arrays["preview_images"], "u")
    if images.dtype != np.uint8 or images.shape != (len(index), 3, *image_shape):
        raise ValueError(f"preview images of shape {images.shape}")
    floats = arrays.get("preview_floats") if "psnr_float" in columns else None
    if "psnr_float" in columns and (floats is None or _typed(floats, "f").shape != (
            len(index), *image_shape)):
        raise ValueError("no preview floats of the preview images' shape")
    kinds = _typed(arrays["unread_kinds"], "U").tolist()
    if not set(kinds) <= set(UNREAD):
        raise ValueError(f"unknown kinds of unread input {kinds}")
    unread = {what: [str(n) for n in _typed(arrays[f"unread.{what}"], "U")] for what in kinds}
    return BatchRecord(start, stop, fidelity, digests, index.astype(np.int64), images,
                       floats, unread)


def _kept_key(path: Path) -> int | None:
    if not path.is_file():  # missing, or a pipe that would be waited on
        return None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if re.fullmatch(r"-?\d{1,80}", text) else None


def _typed(array: np.ndarray, kind: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if array.dtype.kind != kind or (shape is not None and array.shape != shape):
        raise ValueError(f"an array of {array.dtype} {array.shape}")
    return array
