"""What a release holds on disk and how it is laid out: the output names of its images (one
per item, never two alike, never a path out of its folder), its folders checked for links out
of ``--out``, the files an earlier run left there, and its ``.npz``, ``hashes.sha256`` and
``neaudit.json``."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np

from neaudit._version import __version__
from neaudit.data import HASHES, ORIGINAL_DIR, PROTECTED_DIR, RELEASE_NPZ, SIDECAR
from neaudit.dataset import ImageDataset
from neaudit.errors import NeauditError
from neaudit.imageio import atomic_write, sha256_file
from neaudit.paths import OutputTree, safe_component, safe_relative
from neaudit.zoo import ImageClassifier


def output_names(dataset: ImageDataset) -> list[str]:
    """Each item's PNG path under ``protected/`` (relative, POSIX), from its sanitized relative
    name; flat inputs with labels get class folders, so labels survive. Two items mapping to
    one file (``a.jpg`` and ``a.png``, or names differing only in case) are refused before
    any work."""
    labels = dataset.labels if dataset.labels is not None else [None] * len(dataset)
    folders: dict[int, str] = {}
    names, seen = [], {}
    for name, label in zip(dataset.names, labels, strict=True):
        path = _png_name(safe_relative(name, "item name"))
        if label is not None and "/" not in path:
            folder = folders.get(label)
            if folder is None:
                folder = folders[label] = safe_component(
                    dataset.class_names[label] if dataset.class_names else str(label),
                    "class name")
            path = f"{folder}/{path}"
        key = path.casefold()
        if key in seen:
            raise NeauditError(f"{dataset.source}: items '{seen[key]}' and '{name}' would both "
                               f"be written as {path}. Fix: rename one of them.")
        seen[key] = name
        names.append(path)
    return names


def _png_name(relative: str) -> str:
    """``relative`` with its file's suffix replaced by ``.png``, by ``pathlib``'s rule: the
    suffix starts at the last dot that neither begins nor ends the name."""
    folder, slash, file = relative.rpartition("/")
    dot = file.rfind(".")
    stem = file[:dot] if 0 < dot < len(file) - 1 else file
    return f"{folder}{slash}{stem}.png"


def output_trees(out: Path, names: list[str], save_originals: bool
                  ) -> dict[str, OutputTree]:
    """The folders this run writes (``original/`` only with ``save_originals``), every file's
    folder checked before any work: for symlinks leading out of ``out``
    (:class:`neaudit.paths.OutputTree`), and for a file where a folder goes."""
    kinds = (PROTECTED_DIR, ORIGINAL_DIR) if save_originals else (PROTECTED_DIR,)
    trees = {kind: OutputTree(out / kind, out) for kind in kinds}
    seen: set[str] = {os.fspath(out)}
    for tree in trees.values():
        for folder in sorted({os.path.dirname(tree.path(name)) for name in names}):
            while folder not in seen:  # the folder and its parents up to out, each once
                seen.add(folder)
                if os.path.lexists(folder) and not os.path.isdir(folder):
                    raise NeauditError(f"{folder} is a file where protect writes a folder of "
                                       "images. Fix: move it, or choose another --out.")
                folder = os.path.dirname(folder)
    return trees


def write_npz(out: Path, dataset: ImageDataset, protected: np.ndarray,
               original: np.ndarray | None) -> None:
    arrays = {"protected": protected}
    if original is not None:
        arrays["original"] = original
    if dataset.labels is not None:
        arrays["labels"] = dataset.labels
    if dataset.class_names is not None:
        arrays["class_names"] = np.array(dataset.class_names)

    def write(handle: io.BufferedWriter) -> None:
        np.savez_compressed(handle, **arrays)

    atomic_write(out / RELEASE_NPZ, write)


def write_sidecar(out: Path, dataset: ImageDataset, model: ImageClassifier, method: str,
             params: dict, summary: dict, names: list[str], digests: list[str],
             unread: dict[str, dict]) -> dict:
    """``hashes.sha256`` of exactly the files this run wrote (PNGs hashed by their writers
    as they wrote them), and ``neaudit.json``."""
    if names:
        lines = [f"{digest}  {PROTECTED_DIR}/{name}"
                 for digest, name in zip(digests, names, strict=True)]
    else:
        npz = out / RELEASE_NPZ
        lines = [f"{sha256_file(npz)}  {npz.relative_to(out).as_posix()}"]
    hashes = "\n".join(lines) + "\n"
    atomic_write(out / HASHES, lambda h: h.write(hashes.encode()))
    sidecar = {
        "neaudit_version": __version__,
        "authorized": model.name,
        "method": method,
        "params": params,
        "count": len(dataset),
        "format": "png" if names else "npz",
        "outside_files": dataset.outside_files,
        "class_names": dataset.class_names,
        "content_digest": hashlib.sha256(hashes.encode()).hexdigest(),
        "fidelity": summary,
        "unread": unread,
    }
    text = json.dumps(sidecar, indent=2, allow_nan=True)
    atomic_write(out / SIDECAR, lambda h: h.write(text.encode()))
    return sidecar


def existing_outputs(out: Path, folders: list[str], planned: set[str]
                     ) -> tuple[set[str], list[str]]:
    """The planned files already under ``out``'s image ``folders`` (``planned`` and the result
    as ``out/folder/relative`` paths), and the temporary files a killed run's writers left
    beside planned ones (:func:`neaudit.imageio.atomic_write`), for the run to remove once it
    starts; refused if any other file is there: it would be mixed into the release (and into
    its hashes). Walked on strings: a re-run's folder may hold a million files; links to
    folders are not followed and dangling links are no files."""
    present, leftovers = set(), []
    for folder in folders:
        root, extra = os.path.join(out, folder), []
        for parent, _, files in os.walk(root):
            for file in files:
                path = os.path.join(parent, file)
                target = os.path.join(parent, _leftover(file) or file)
                if target != path and target in planned:
                    leftovers.append(path)
                elif not os.path.isfile(path):
                    continue
                elif path in planned:
                    present.add(path)
                else:
                    extra.append(path)
        if extra:
            raise NeauditError(f"{out}: {folder}/ already holds {len(extra)} file(s) this run "
                               f"would not write, e.g. {min(extra)}. Fix: choose a new --out "
                               "folder, or delete the old one.")
    return present, leftovers


def _leftover(file: str) -> str | None:
    """The file a temporary file of :func:`neaudit.imageio.atomic_write` was to become."""
    match = re.fullmatch(r"\.(.+)\.[A-Za-z0-9_]{8}\.tmp", file)
    return match.group(1) if match else None

