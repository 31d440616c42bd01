"""``neaudit demo``: a real audit, offline, in minutes on a laptop CPU.

Protects the test split of scikit-learn's digits (the 1,797 bundled scans, 32×32 RGB) for the
shipped ``demo:patch_cnn``, attacks the NEs with a suite against the five other shipped
models (all trained by the project, each ≥ 95% test accuracy), and renders the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neaudit import demo_zoo
from neaudit.arguments import checked
from neaudit.auditing import AuditResult, audit
from neaudit.dataset import ImageDataset
from neaudit.policy import Policy
from neaudit.protection import protect
from neaudit.reporting import ReportResult, render_report

QUICK_IMAGES = 120
DEMO_KEY = 0


def digits_test_set(count: int | None = None) -> ImageDataset:
    images, labels = demo_zoo.digits("test")
    if count is not None:
        order = np.random.default_rng(0).permutation(len(images))[:count]
        images, labels = images[np.sort(order)], labels[np.sort(order)]
    return ImageDataset(names=[f"{i:04d}" for i in range(len(images))], protected=images,
                        labels=labels, class_names=[str(d) for d in range(10)],
                        source=Path("builtin:digits-test"))


@dataclass
class DemoResult:
    """What ``demo`` returns: the audit and its report."""

    audit: AuditResult
    report: ReportResult


@checked
def demo(out: str | Path = "reports/demo", quick: bool = False, psnr: float = 20.0,
         quiet: bool = False, policy: str | Path | None = None,
         suite: str | None = None) -> DemoResult:
    """Protect, audit and report; ``quick`` uses 120 images and the smoke suite."""
    out = Path(out)
    checked = Policy.load(policy)
    dataset = digits_test_set(QUICK_IMAGES if quick else None)
    # a fixed key, so that the demo repeats its figures; a release draws a secret one
    protect(dataset, demo_zoo.AUTHORIZED, out / "data", psnr=psnr, save_originals=True,
            key=DEMO_KEY, quiet=quiet)
    others = [f"demo:{name}" for name in demo_zoo.ARCHITECTURES
              if f"demo:{name}" != demo_zoo.AUTHORIZED]
    result = audit(out / "data", others, suite=suite or ("smoke" if quick else "standard"),
                   out=out / "audit", score="accuracy", quiet=quiet,
                   command=f"neaudit demo --out {out}{' --quick' if quick else ''}")
    return DemoResult(result, render_report(result.out, checked))
