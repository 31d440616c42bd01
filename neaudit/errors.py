"""What users see of a failure: errors that name the offending file or value and the fix, and
text from inputs made safe to print."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


class NeauditError(ValueError):
    """Base class for input and usage errors (CLI exit code 2)."""


class DataError(NeauditError):
    """A dataset cannot be read as given."""


class ModelSpecError(NeauditError):
    """A model spec cannot be resolved into a model."""


@dataclass(frozen=True)
class Refused:
    """A :class:`NeauditError` met in another process (a reader, a Ray actor), handed back as
    a value. Raised there, a DataLoader or Ray would re-raise it here with the remote
    traceback as its message, in place of the one line that names the input and the fix."""

    error: NeauditError


def unless_refused(value: T | Refused) -> T:
    """``value`` as it came back from another process; a :class:`Refused` raises its error."""
    if isinstance(value, Refused):
        raise value.error
    return value


def printable(text: str) -> str:
    """``text`` with every character that is not printable (but line breaks) written as its
    Python escape: names from an input (files, classes) can hold escape sequences a terminal
    would obey, or characters a JUnit file cannot hold (control characters, the lone
    surrogates of a file name that is not UTF-8)."""
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)


def utf8(text: str) -> bytes:
    """``text`` as UTF-8 for a file (a report, a traceback); a lone surrogate (a file name that
    is not UTF-8) is written as its Python escape instead of failing the write."""
    return text.encode("utf-8", "backslashreplace")
