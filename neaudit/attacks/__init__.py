"""Attack library: one registry (:mod:`neaudit.attacks.registry`), attacks by family, suites."""

from neaudit.attacks import adaptive, preprocess, purify  # noqa: F401  (registers the attacks)
from neaudit.attacks.registry import (
    ATTACKS,
    THREAT_LEVELS,
    Attack,
    AttackContext,
    get_attack,
    register_attack,
)
from neaudit.attacks.suites import SuiteEntry, load_suite

__all__ = ["ATTACKS", "THREAT_LEVELS", "Attack", "AttackContext", "SuiteEntry", "get_attack",
           "load_suite", "register_attack"]
