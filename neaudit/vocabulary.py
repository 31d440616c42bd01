"""The names every layer shares, defined once: the two reference conditions, attack families
and threat levels, model roles and the score-ratio metric names.

Kept free of heavy imports so that the results table, the policy and the report can use
them without loading the attack library.
"""

from __future__ import annotations

CLEAN, NONE = "clean", "none"
"""Not attacks but the reference conditions every audit measures: the clean originals and the
NEs as released."""

FAMILIES = ("preprocess", "purify", "adaptive", "reconstruct", "learning", "test")

THREAT_LEVELS = {
    "L0": "preprocessing an ordinary pipeline applies",
    "L1": "protected data only",
    "L2": "plus clean in-distribution data",
    "L3": "plus a zoo of public models",
    "learning": "labels, and training on the protected data",
}

AUTHORIZED, UNAUTHORIZED = "authorized", "unauthorized"


def ratio_metric(role: str) -> str:
    """The name of a model's score ratio: ``utility_retention`` for the authorized model,
    ``leakage`` for every other."""
    return "utility_retention" if role == AUTHORIZED else "leakage"
