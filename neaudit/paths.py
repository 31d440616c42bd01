"""Path rules that keep inputs safe: nothing is written outside ``--out``, nothing into an
input, whatever a manifest, a label or a symlink says.

* Output names are relative POSIX paths built from sanitized parts (:func:`safe_relative`);
  an absolute path, ``..``, an empty part or a backslash is refused, and every output path is
  checked once more after resolving symlinks (:func:`inside`).
* ``--out`` may neither equal, lie inside, nor contain an input (:func:`refuse_overlap`).
* Inputs that resolve outside their dataset's folder (a manifest row with an absolute or
  ``..`` path, a symlink out of the folder) are read only with ``--allow-outside``; the
  count is recorded in ``neaudit.json`` and ``run.json``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from neaudit.errors import NeauditError


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` lies in ``root`` once both are resolved (symlinks followed); for many
    files, keep one :class:`Resolver`."""
    return Resolver().inside(path, root)


class Resolver:
    """``Path.resolve`` for many files at one ``realpath`` per folder: a file that is not a
    symlink resolves to its folder's real path and its own name (resolving each of a
    million files one by one took minutes). Symlinked files are resolved in full. Works on
    strings inside: ``pathlib`` costs more than the system calls here."""

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}

    def __call__(self, path: str | os.PathLike) -> Path:
        return Path(self.real(path))

    def real(self, path: str | os.PathLike) -> str:
        """The resolved path, as a string."""
        path = os.fspath(path)
        if os.path.islink(path):
            return os.path.realpath(path)
        folder, name = os.path.split(path)
        return os.path.join(self._folder(folder), name)

    def inside(self, path: str | os.PathLike, root: str | os.PathLike) -> bool:
        """Whether ``path`` lies in ``root`` once both are resolved."""
        real, top = self.real(path), self._folder(os.fspath(root))
        return real == top or real.startswith(top.rstrip(os.sep) + os.sep)

    def _folder(self, folder: str) -> str:
        real = self._folders.get(folder)
        if real is None:
            real = self._folders[folder] = os.path.realpath(folder)
        return real


def safe_relative(name: str, what: str) -> PurePosixPath:
    """``name`` as a relative path that cannot leave the folder it is joined to."""
    path = PurePosixPath(name)
    bad = ("\\" in name or "\x00" in name or path.is_absolute() or not path.parts
           or any(part in ("", ".", "..") for part in path.parts))
    if bad:
        raise NeauditError(f"{what} '{name}' is not a plain relative path (absolute, '..', "
                           "empty or with a backslash). Fix: name items by paths inside the "
                           "dataset's folder.")
    return path


def safe_component(name: str, what: str) -> str:
    """``name`` as a single path component (a class folder)."""
    if len(safe_relative(name, what).parts) != 1:
        raise NeauditError(f"{what} '{name}' contains a '/'. Fix: use class names without "
                           "path separators.")
    return name


def output_path(root: Path, relative: PurePosixPath) -> Path:
    """``root / relative``, refused if a symlink in ``root`` would lead the write elsewhere
    (each folder is resolved once per process: resolving is slow on some file systems)."""
    target = root / relative
    parent = target.parent
    while not parent.exists() and parent != root:
        parent = parent.parent
    if not _leads_inside(parent, root):
        raise NeauditError(f"{target}: a symlink under {root} leads outside it; neaudit never "
                           "writes outside --out. Fix: remove the link or choose a new --out.")
    return target


@functools.lru_cache(maxsize=4096)
def _leads_inside(folder: Path, root: Path) -> bool:
    return inside(folder, root)


def refuse_overlap(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output folder that is a file, or equals, lies inside or contains an input."""
    if out.exists() and not out.is_dir():
        raise NeauditError(f"--out {out} is a file, not a folder. Fix: give a folder path.")
    target = out.resolve()
    for source in inputs:
        resolved = source.resolve()
        if target == resolved or target.is_relative_to(resolved) or resolved.is_relative_to(
                target):
            raise NeauditError(f"{out}: the output overlaps the input {source}; neaudit never "
                               "writes into its inputs, nor holds them in its output. Fix: "
                               "choose a separate --out folder.")
