"""Errors that users see: each names the offending file or value and the fix."""

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
