"""Errors that users see: each names the offending file or value and the fix."""


class NeauditError(ValueError):
    """Base class for input and usage errors (CLI exit code 2)."""


class DataError(NeauditError):
    """A dataset cannot be read as given."""


class ModelSpecError(NeauditError):
    """A model spec cannot be resolved into a model."""
