"""Release policies: thresholds checked against the results table, giving PASS or FAIL.

A policy is TOML. Top-level keys apply to every attack; a ``[family.NAME]`` table overrides
them for one attack family (``preprocess``, ``purify``, ``adaptive``, ``reconstruct``,
``learning``; another name is refused, so a misspelt one cannot judge nothing)::

    min_authorized_retention = 0.95   # authorized utility retention on the unattacked NEs
    max_leakage = 0.5                 # worst unauthorized inference leakage (L0–L3)
    max_learning_leakage = 0.5        # worst gain from training on the NEs (learning attacks)
    max_leakage_above_chance = 0.4
    min_suppression_ratio = 2.0       # authorized score / best unauthorized score
    min_psnr = 28.0                   # measured PSNR of the NEs as released
    levels = ["L0", "L1", "L2", "L3"] # threat levels the verdict must cover (else a flag)
    fail_on = ["degenerate_model"]    # validity flags that fail the verdict

    [family.preprocess]
    min_authorized_retention = 0.9    # authorized retention under every preprocessing step

Every criterion uses the point estimate; its 95% interval is reported next to it. Verdicts
are computed from the table only.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from neaudit.errors import NeauditError
from neaudit.flags import FLAG_NAMES, Flag, evaluate_flags
from neaudit.vocabulary import AUTHORIZED, CLEAN, FAMILIES, NONE, THREAT_LEVELS, UNAUTHORIZED

DEFAULT_POLICY = Path(__file__).parent / "reporting" / "default_policy.toml"
KEYS = ("min_authorized_retention", "max_leakage", "max_leakage_above_chance",
        "max_learning_leakage", "min_suppression_ratio", "min_psnr")
LIST_KEYS = ("fail_on", "levels")
NEVER_NEGATIVE = {"min_authorized_retention": 0.95, "max_leakage": 0.5,
                  "min_suppression_ratio": 2.0, "min_psnr": 28.0}
"""Thresholds on figures that cannot be negative (ratios of scores, PSNR), with an example
value; leakage above chance and learning leakage can be."""
EXCLUDED_ATTACKS = (CLEAN,)
EXCLUDED_FAMILIES = ("test",)
POLICY_FAMILIES = tuple(f for f in FAMILIES if f not in EXCLUDED_FAMILIES)
"""The attack families a ``[family.NAME]`` table can name."""


@dataclass(frozen=True)
class Criterion:
    """One checked threshold: what was required, what was measured, and where."""

    name: str
    scope: str
    threshold: float
    observed: float
    ci_low: float
    ci_high: float
    passed: bool
    where: str

    @property
    def title(self) -> str:
        return self.name if self.scope == "all" else f"{self.name} [{self.scope}]"


@dataclass(frozen=True)
class Policy:
    name: str
    rules: dict[str, float]
    families: dict[str, dict[str, float]]
    fail_on: tuple[str, ...] = ()
    levels: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: str | Path | None = None) -> Policy:
        """Read and check a policy (the packaged default when ``path`` is None): every key
        known, every threshold a finite number, every list of known names."""
        path = Path(path) if path else DEFAULT_POLICY
        if not path.is_file():
            problem = "is not a regular file" if path.exists() else "does not exist"
            raise NeauditError(f"policy file {path} {problem}. Fix: give the path of a "
                               "policy TOML, or leave --policy out for the default.")
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise NeauditError(f"{path}: not valid TOML ({exc}). Fix: correct it there.") from exc
        families = raw.pop("family", {})
        raw.pop("description", None)
        name = raw.pop("name", path.stem)
        if not isinstance(name, str):
            raise NeauditError(f"{path}: name = {name!r} is not a string. Fix: e.g. "
                               f"name = \"{path.stem}\".")
        lists = {key: _names(path, key, raw.pop(key, []), allowed)
                 for key, allowed in (("fail_on", FLAG_NAMES), ("levels", THREAT_LEVELS))}
        rules = _thresholds(path, raw, "")
        if not isinstance(families, dict) or not all(isinstance(r, dict)
                                                     for r in families.values()):
            raise NeauditError(f"{path}: 'family' must hold [family.NAME] tables.")
        unknown = sorted(set(families) - set(POLICY_FAMILIES))
        if unknown:  # a misspelt family would judge nothing, silently
            raise NeauditError(f"{path}: unknown attack famil{'ies' if len(unknown) > 1 else 'y'}"
                               f" {', '.join(unknown)}. Valid: [family.NAME] with NAME one of "
                               f"{', '.join(POLICY_FAMILIES)}.")
        per_family = {f: _thresholds(path, r, f"[family.{f}] ") for f, r in families.items()}
        if not rules and not any(per_family.values()):
            raise NeauditError(f"{path}: no threshold, and a policy without one can never pass. "
                               f"Fix: set at least one of {', '.join(KEYS)}.")
        return cls(name, rules, per_family, lists["fail_on"], lists["levels"])

    def evaluate(self, table: pd.DataFrame, summary: dict) -> list[Criterion]:
        criteria = [c for key, value in self.rules.items()
                    if (c := _check(key, value, table, summary, None)) is not None]
        for family, rules in self.families.items():
            for key, value in rules.items():
                criterion = _check(key, value, table, summary, family)
                if criterion is not None:
                    criteria.append(criterion)
        return criteria


    def judge(self, table: pd.DataFrame, summary: dict) -> Judgement:
        """The criteria, the validity flags and the verdict for one run's table."""
        criteria = self.evaluate(table, summary)
        flags = evaluate_flags(table, summary, self, criteria)
        return Judgement(criteria, flags, verdict(criteria, flags))


@dataclass(frozen=True)
class Judgement:
    """A policy applied to a run: what the report, the terminal, JUnit and diff all show."""

    criteria: list[Criterion]
    flags: list[Flag]
    verdict: str


def verdict(criteria: Sequence[Criterion], flags: Sequence[Flag] = ()) -> str:
    """The one verdict rule: PASS when at least one criterion was evaluated, every criterion
    passed and no validity flag that the policy fails on fired; FAIL otherwise."""
    passed = bool(criteria) and all(c.passed for c in criteria)
    return "PASS" if passed and not any(f.failing for f in flags) else "FAIL"


def _thresholds(path: Path, rules: dict, where: str) -> dict[str, float]:
    unknown = sorted(set(rules) - set(KEYS))
    if unknown:
        raise NeauditError(f"{path}: {where}unknown key(s) {', '.join(unknown)}. Valid keys: "
                           f"{', '.join(KEYS + LIST_KEYS)}, and [family.NAME] tables.")
    for key, value in rules.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value):
            raise NeauditError(f"{path}: {where}{key} = {value!r} is not a finite number. Fix: "
                               f"e.g. {key} = 0.5.")
        if value < 0 and key in NEVER_NEGATIVE:  # it could never fail, or never pass
            raise NeauditError(f"{path}: {where}{key} = {value!r}, but the figure it bounds is "
                               f"never negative. Fix: e.g. {key} = {NEVER_NEGATIVE[key]}.")
    return {key: float(value) for key, value in rules.items()}


def _names(path: Path, key: str, value: object, allowed) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise NeauditError(f"{path}: {key} must be a list of names, e.g. {key} = "
                           f"[\"{next(iter(allowed))}\"].")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise NeauditError(f"{path}: {key} names unknown value(s) {', '.join(unknown)}. Valid: "
                           f"{', '.join(allowed)}.")
    return tuple(value)


def _check(key: str, threshold: float, table: pd.DataFrame, summary: dict,
           family: str | None) -> Criterion | None:
    scope = family or "all"
    rows = table[~table.attack.isin(EXCLUDED_ATTACKS) & ~table.family.isin(EXCLUDED_FAMILIES)]
    if family is not None:
        rows = rows[rows.family == family]
    if key == "min_suppression_ratio":
        if family is not None or "suppression_ratio" not in summary:
            return None
        observed = float(summary["suppression_ratio"])
        return Criterion(key, scope, threshold, observed, math.nan, math.nan,
                         observed >= threshold, "unattacked NEs")
    if key == "min_authorized_retention":
        chosen = rows[(rows.metric == "utility_retention") & (rows.role == AUTHORIZED)]
        if family is None:
            chosen = chosen[chosen.attack == NONE]
        return _extreme(key, scope, threshold, chosen, lowest=True)
    if key == "min_psnr":
        chosen = rows[(rows.metric == "psnr") & (rows.attack == NONE)]
        criterion = _extreme(key, scope, threshold, chosen.head(1), lowest=True)
        return criterion and replace(criterion, where="the released NEs (no attack)")
    metric = {"max_leakage": "leakage", "max_leakage_above_chance": "leakage_above_chance",
              "max_learning_leakage": "learning_leakage"}[key]
    chosen = rows[(rows.metric == metric) & (rows.role == UNAUTHORIZED)]
    return _extreme(key, scope, threshold, chosen, lowest=False)


def _extreme(key: str, scope: str, threshold: float, rows: pd.DataFrame, lowest: bool
             ) -> Criterion | None:
    rows = rows.dropna(subset="value")
    if rows.empty:
        return None
    row = rows.loc[rows.value.idxmin() if lowest else rows.value.idxmax()]
    observed = float(row.value)
    passed = observed >= threshold if lowest else observed <= threshold
    where = f"{row.model} under {row.attack}"
    return Criterion(key, scope, threshold, observed, float(row.ci_low), float(row.ci_high),
                     passed, where)
