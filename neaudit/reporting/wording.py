"""The verdict in one plain sentence, for the reader who reads nothing else: what decided it,
how large it is, with its interval, and what the policy allows."""

from __future__ import annotations

from collections.abc import Sequence

from neaudit.flags import Flag
from neaudit.policy import Criterion

PRIORITY = ("max_leakage", "max_leakage_above_chance", "max_learning_leakage",
            "min_authorized_retention", "min_suppression_ratio", "min_psnr")
"""Which failed criterion the sentence leads with: the protection's own failure first."""


def _percent(value: float) -> str:
    return "–" if value != value else f"{value:.0%}"


def _interval(c: Criterion) -> str:
    if c.ci_low != c.ci_low:
        return ""
    return f" (95% interval {_percent(c.ci_low)}–{_percent(c.ci_high)})"


SENTENCES = {
    "max_leakage": "under {attack}, the unauthorized model {model} recovers {value} of its "
                   "clean {metric}{interval}; the policy allows at most {threshold}",
    "max_leakage_above_chance": "under {attack}, the unauthorized model {model} gets {value} "
                                "of the way from chance back to its clean {metric}{interval}; "
                                "the policy allows at most {threshold}",
    "max_learning_leakage": "training on the released images, {model} gains {value} of what "
                            "training on the originals gains{interval}; the policy allows at "
                            "most {threshold}",
    "min_authorized_retention": "the authorized model keeps only {value} of its clean "
                                "{metric} ({where}){interval}; the policy requires {threshold}",
    "min_suppression_ratio": "on the released images the authorized model scores only "
                             "{observed:.2f}× the best other model; the policy requires "
                             "{limit:g}×",
    "min_psnr": "the released images measure {observed:.1f} dB PSNR; the policy requires at "
                "least {limit:g} dB",
}
"""What a failed criterion means, in words; {value}, {interval} and {threshold} are
percentages."""


def _failure(c: Criterion, metric: str) -> str:
    model, _, attack = c.where.partition(" under ")
    return SENTENCES[c.name].format(
        model=model, attack=attack, where=c.where, metric=metric, observed=c.observed,
        limit=c.threshold, value=_percent(c.observed), interval=_interval(c),
        threshold=_percent(c.threshold))


def verdict_sentence(criteria: Sequence[Criterion], flags: Sequence[Flag], verdict: str,
                     policy: str, metric: str) -> str:
    """One sentence a compliance reader understands, leading with what decided the verdict."""
    if not criteria:
        return "No verdict: no criterion of the policy could be evaluated on these results."
    if verdict == "PASS":
        return (f"Release allowed under policy '{policy}': all {len(criteria)} of its criteria "
                "are met, at the threat levels that were run.")
    failed = sorted((c for c in criteria if not c.passed),
                    key=lambda c: PRIORITY.index(c.name) if c.name in PRIORITY else len(PRIORITY))
    if not failed:
        names = ", ".join(f.name for f in flags if f.failing)
        return ("Do not release: the evaluation failed a validity check the policy treats as "
                f"fatal ({names}).")
    more = len(failed) - 1
    tail = f" ({more} more criteri{'on fails' if more == 1 else 'a fail'})" if more else ""
    return f"Do not release: {_failure(failed[0], metric)}{tail}."
