"""Path rules that keep inputs safe: nothing is written outside ``--out``, nothing into an
input, whatever a manifest, a label or a symlink says.

* Output names are relative POSIX paths built from sanitized parts (:func:`safe_relative`);
  an absolute path, ``..``, an empty part or a backslash is refused, and every output path is
  checked once more after resolving symlinks (:class:`OutputTree`).
* ``--out`` may neither equal, lie inside, nor contain an input (:func:`refuse_overlap`).
* Inputs that resolve outside their dataset's folder (a manifest row with an absolute or
  ``..`` path, a symlink out of the folder) are read only with ``--allow-outside``; the
  count is recorded in ``neaudit.json`` and ``run.json``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

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


def safe_relative(name: str, what: str) -> str:
    """``name`` as a relative POSIX path that cannot leave the folder it is joined to, with
    empty and ``.`` parts dropped (as ``pathlib`` reads ``./a//b``: ``a/b``)."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ("\\" in name or name.startswith("/") or not parts or ".." in parts
            or any(ord(c) < 32 or c == "\x7f" or "\ud800" <= c <= "\udfff" for c in name)):
        raise NeauditError(f"{what} {name!r} is not a plain relative path (absolute, '..', "
                           "empty, with a backslash, a control character such as a line break, "
                           "or bytes that are not UTF-8: no line of hashes.sha256 could hold "
                           "it). Fix: rename it, inside the dataset's folder.")
    return "/".join(parts)


def safe_component(name: str, what: str) -> str:
    """``name`` as a single path component (a class folder)."""
    component = safe_relative(name, what)
    if "/" in component:
        raise NeauditError(f"{what} '{name}' contains a '/'. Fix: use class names without "
                           "path separators.")
    return component


class OutputTree:
    """Output paths under ``root`` (a folder of ``out``, or ``out`` itself) for relative names
    from :func:`safe_relative`, each refused if a symlink would lead the write out of ``out``,
    ``root`` itself included. A folder is checked once, at its first file (its first existing
    ancestor resolved, when the folder is still to be made): a release's million files cost a
    dictionary lookup each, not a ``stat``."""

    def __init__(self, root: str | os.PathLike, out: str | os.PathLike) -> None:
        self.root, self.out = os.fspath(root), os.fspath(out)
        self._checked: set[str] = set()

    def path(self, relative: str) -> str:
        """``root/relative`` as a string (a writer's key for the file)."""
        target = f"{self.root}/{relative}"
        self._check(target.rpartition("/")[0])
        return target

    def folder(self, relative: str = "") -> str:
        """``root/relative`` as a folder to write into, checked like a file's folder."""
        folder = f"{self.root}/{relative}" if relative else self.root
        self._check(folder)
        return folder

    def _check(self, folder: str) -> None:
        if folder in self._checked:
            return
        existing = folder
        while not os.path.lexists(existing) and existing != self.out:
            existing = os.path.dirname(existing)
        if not inside(existing, self.out):
            raise NeauditError(f"{folder}: a symlink under {self.out} leads outside it; "
                               "neaudit never writes outside --out. Fix: remove the link or "
                               "choose a new --out.")
        self._checked.add(folder)


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
