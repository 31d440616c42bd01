"""neaudit: audit non-transferable examples before release."""

__version__ = "0.1.0"

from neaudit.data import ImageDataset, load_dataset  # noqa: E402
from neaudit.engine import AuditResult, audit  # noqa: E402
from neaudit.protection import ProtectResult, protect  # noqa: E402
from neaudit.reporting import ReportResult  # noqa: E402
from neaudit.reporting import render_report as report  # noqa: E402
from neaudit.stem import FirstLayer, first_layer  # noqa: E402
from neaudit.zoo import PRESETS, ImageClassifier, create_model, wrap  # noqa: E402

__all__ = [
    "AuditResult", "FirstLayer", "ImageClassifier", "ImageDataset", "PRESETS", "ProtectResult",
    "ReportResult", "audit", "create_model", "first_layer", "load_dataset", "protect", "report",
    "wrap",
]
