"""Attack library: one registry (:mod:`neaudit.attacks.registry`), attacks by family, suites."""

from neaudit.attacks import (  # noqa: F401  (registers)
    adaptive,
    learning,
    preprocess,
    purify,
    reconstruct,
)
from neaudit.attacks.registry import (
    ATTACKS,
    BATCH,
    CLEAN,
    DATASET,
    NONE,
    THREAT_LEVELS,
    Attack,
    AttackContext,
    DatasetContext,
    Param,
    get_attack,
    register_attack,
)
from neaudit.attacks.suites import SuiteEntry, load_suite

__all__ = ["ATTACKS", "BATCH", "CLEAN", "DATASET", "NONE", "THREAT_LEVELS", "Attack",
           "AttackContext", "DatasetContext", "Param", "SuiteEntry", "get_attack", "load_suite",
           "register_attack"]
