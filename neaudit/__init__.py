"""neaudit: audit non-transferable examples before release.

The public API, one function per CLI command (each returns plain objects)::

    neaudit.protect(...)  -> ProtectResult   # neaudit protect
    neaudit.audit(...)    -> AuditResult     # neaudit audit (the measurements)
    neaudit.report(...)   -> ReportResult    # neaudit report (verdict, HTML, JUnit)
    neaudit.diff(...)     -> DiffResult      # neaudit diff
    neaudit.demo.demo(...) -> DemoResult     # neaudit demo

Names are imported on first use, so ``import neaudit`` (and ``neaudit --help``) stays cheap.
"""

from __future__ import annotations

import importlib

from neaudit._version import __version__

_EXPORTS = {
    "AuditResult": "neaudit.auditing", "audit": "neaudit.auditing",
    "ImageDataset": "neaudit.data", "load_dataset": "neaudit.data",
    "ProtectResult": "neaudit.protection", "protect": "neaudit.protection",
    "ReportResult": "neaudit.reporting", "report": "neaudit.reporting",
    "DiffResult": "neaudit.reporting.diff", "diff": "neaudit.reporting.diff",
    "FirstLayer": "neaudit.stem", "first_layer": "neaudit.stem",
    "PRESETS": "neaudit.zoo", "ImageClassifier": "neaudit.zoo",
    "create_model": "neaudit.zoo", "wrap": "neaudit.zoo",
}
_RENAMED = {"report": "render_report", "diff": "diff_runs"}
_SUBMODULES = ("demo",)
"""Modules reached as attributes (``neaudit.demo.demo(...)``) without importing them first."""

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> object:
    if name in _SUBMODULES:
        return importlib.import_module(f"neaudit.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'neaudit' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    return getattr(module, _RENAMED.get(name, name))
