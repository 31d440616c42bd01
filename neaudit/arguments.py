"""Argument types of the Python API, checked at the call against the function's annotations,
so that ``neaudit.protect(..., psnr="30")`` is refused in one line naming the argument, as the
CLI refuses ``--psnr abc``, instead of failing deep inside with a message about something else.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import os
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from neaudit.errors import NeauditError

F = TypeVar("F", bound=Callable[..., Any])


class ArgumentTypeError(NeauditError, TypeError):
    """An argument of the Python API has the wrong type (a ``TypeError`` as Python raises, and
    a :class:`NeauditError`, one line with its fix)."""


def checked(function: F) -> F:
    """``function`` with its arguments checked against its annotations at each call. Plain
    classes, ``X | None`` unions, ``float`` (an int is a number too), ``Path`` (any path-like)
    and sequences of one type are checked; what the annotations cannot say is let through."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        hints = _hints(function)
        for name, value in signature.bind(*args, **kwargs).arguments.items():
            hint = hints.get(name)
            if hint is not None and not _matches(value, hint):
                wanted = _describe(hint)
                raise ArgumentTypeError(
                    f"{function.__module__}.{function.__name__}: {name}={_shown(value)} is "
                    f"{type(value).__name__}, not {wanted}. Fix: pass {wanted}.")
        return function(*args, **kwargs)

    return typing.cast(F, call)


@functools.cache
def _hints(function: Callable[..., Any]) -> dict[str, Any]:
    """The function's annotations, resolved once (none where one names what its module cannot
    resolve at run time)."""
    try:
        return typing.get_type_hints(function)
    except NameError:
        return {}


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is os.PathLike or (isinstance(hint, type) and issubclass(hint, os.PathLike)):
        return isinstance(value, os.PathLike)
    if origin is tuple and args and args[-1] is not Ellipsis:  # a fixed length: (H, W)
        return (isinstance(value, collections.abc.Sequence) and len(value) == len(args)
                and all(_matches(item, arg) for item, arg in zip(value, args, strict=True)))
    if origin in (collections.abc.Sequence, list, tuple):
        return (isinstance(value, collections.abc.Sequence) and not isinstance(value, str)
                and all(_matches(item, args[0]) for item in value))
    if isinstance(hint, type) and origin is None:
        try:
            return isinstance(value, hint)
        except TypeError:  # a protocol: what it needs is checked where it is used
            return True
    return True  # Any, callables, mappings: not checked here


_WORDS = {float: "a number", int: "an integer", str: "a string", bool: "True or False",
          type(None): "None"}
_PLURALS = {float: "numbers", int: "integers", str: "strings"}


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(arg) for arg in typing.get_args(hint)))
    if hint in _WORDS:
        return _WORDS[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a pair of {_PLURALS.get(args[0], 'values')}" if len(args) == 2 else (
            f"{len(args)} values")
    if origin in (collections.abc.Sequence, list, tuple):
        return f"a list of {_PLURALS.get(args[0], 'values')}"
    if isinstance(hint, type) and issubclass(hint, os.PathLike):
        return "a path"
    name = getattr(hint, "__name__", str(hint))
    return f"{'an' if name[:1] in 'AEIOUaeiou' else 'a'} {name}"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."
