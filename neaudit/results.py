"""From task records to the tidy results table and the per-model summary.

Metrics (names are stable; docs/method.md §4):

* ``accuracy`` (labels) or ``agreement`` (top-1 equals the model's own prediction on the clean
  original): proportion with a 95% Wilson interval.
* ``utility_retention`` (authorized) and ``leakage`` (unauthorized): score on protected (and
  attacked) data / score on the clean originals. The interval divides the Wilson bounds by the
  clean score (the clean score is treated as fixed).
* ``leakage_above_chance``: (score − chance) / (clean − chance). With labels chance = 1 /
  classes; for label-free agreement it is Σ p_c², p the model's clean prediction frequencies
  (the agreement of a guess that only knows the model's output distribution).
* ``psnr``, ``ssim``: attacked protected image against its clean original, mean with a
  normal 95% interval; repeated on every model's rows so that each row is self-contained.
* Suppression ratio (summary): authorized score / best unauthorized score.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pandas as pd

from neaudit.metrics import (
    Z95,
    above_chance,
    score_ratio,
    slc_auc,
    suppression_ratio,
    wilson_interval,
)
from neaudit.vocabulary import AUTHORIZED, CLEAN, NONE, THREAT_LEVELS, UNAUTHORIZED, ratio_metric

COLUMNS = ["model", "spec", "role", "attack", "family", "threat", "params", "metric", "value",
           "ci_low", "ci_high", "n"]


def build_table(records: list[dict], roles: dict[str, str], score_metric: str,
                num_classes: int | None, names: dict[str, str] | None = None) -> pd.DataFrame:
    """The tidy table: one row per (model, attack, metric). ``roles`` is keyed by spec;
    ``names`` gives each spec's display name (the ``model`` column; the spec itself is in
    ``spec``)."""
    names = names or {}
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    images: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0, 0])
    meta: dict[str, tuple[str, str, str]] = {}
    histograms: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    learned: list[dict] = []
    for record in records:
        if "baseline" in record or "curve" in record:
            learned.append(record)
            continue
        for model, hist in record.get("histograms", {}).items():
            for cls, count in hist.items():
                histograms[model][cls] += count
        attack = record["attack"]
        meta[attack] = (record["family"], record["threat"], record["params"])
        for model, (correct, n) in record["models"].items():
            counts[model, attack][0] += correct
            counts[model, attack][1] += n
        if record.get("n_images"):
            acc = images[attack]
            acc[0] += record["psnr_sum"]
            acc[1] += record["psnr_sq_sum"]
            acc[2] += record["ssim_sum"]
            acc[3] += record["ssim_sq_sum"]
            acc[4] += record["n_images"]
    rows = []
    for (model, attack), (correct, n) in sorted(counts.items()):
        family, threat, params = meta[attack]
        base = dict(model=names.get(model, model), spec=model, role=roles[model],
                    attack=attack, family=family, threat=threat, params=params)
        clean_correct, clean_n = counts.get((model, CLEAN), (0, 0))
        clean = clean_correct / clean_n if attack != CLEAN and clean_n else None
        chance = _chance(score_metric, num_classes, histograms.get(model))
        rows += score_rows(base, score_metric, (correct, n), clean, chance)
        if attack in images and images[attack][4]:
            rows += _image_rows(base, images[attack])
    for record in learned:
        rows += _learning_rows(record, roles, names)
    return pd.DataFrame(rows, columns=COLUMNS)


def score_rows(base: dict, score_metric: str, counts: tuple[int, int], clean: float | None,
               chance: float | None) -> list[dict]:
    """The rows of one (model, attack): its score with a Wilson interval and, where the clean
    score is known, utility retention or leakage, and leakage above chance."""
    correct, n = counts
    score = correct / n if n else math.nan
    low, high = wilson_interval(correct, n)
    rows = [{**base, "metric": score_metric, "value": score, "ci_low": low, "ci_high": high,
             "n": n}]
    if clean is None:
        return rows
    rows.append({**base, "metric": ratio_metric(base["role"]),
                 "value": score_ratio(score, clean), "ci_low": score_ratio(low, clean),
                 "ci_high": score_ratio(high, clean), "n": n})
    if chance is not None and base["role"] == UNAUTHORIZED:
        rows.append({**base, "metric": "leakage_above_chance",
                     "value": above_chance(score, clean, chance),
                     "ci_low": above_chance(low, clean, chance),
                     "ci_high": above_chance(high, clean, chance), "n": n})
    return rows


def _image_rows(base: dict, sums: list[float]) -> list[dict]:
    """PSNR and SSIM means with a normal 95% interval, from per-image sums and squares."""
    rows = []
    m = sums[4]
    for metric, (total, squares) in (("psnr", sums[0:2]), ("ssim", sums[2:4])):
        mean = total / m
        half = Z95 * math.sqrt(max(squares / m - mean * mean, 0.0)) / math.sqrt(m)
        rows.append({**base, "metric": metric, "value": mean, "ci_low": mean - half,
                     "ci_high": mean + half, "n": m})
    return rows


def _learning_rows(record: dict, roles: dict[str, str], names: dict[str, str]) -> list[dict]:
    """Rows of a learning attack: accuracy and learning leakage = (score on NEs − start) /
    (score on clean − start), per probe or per fine-tuning fraction, and SLC-AUC."""
    rows: list[dict] = []

    def add(model: str, attack: str, params: str, counts, baseline, start: float) -> None:
        base = dict(model=names.get(model, model), spec=model, role=roles[model],
                    attack=attack, family="learning", threat="learning", params=params)
        correct, n = counts
        score, (low, high) = correct / n, wilson_interval(correct, n)
        clean = baseline[0] / baseline[1]
        rows.append({**base, "metric": "accuracy", "value": score, "ci_low": low,
                     "ci_high": high, "n": n})
        rows.append({**base, "metric": "learning_leakage",
                     "value": above_chance(score, clean, start),
                     "ci_low": above_chance(low, clean, start),
                     "ci_high": above_chance(high, clean, start), "n": n})

    if "baseline" in record:
        for model, counts in record["models"].items():
            add(model, record["attack"], record["params"], counts, record["baseline"][model],
                record["start"])
        return rows
    for model, curve in record["curve"].items():
        start = curve["start"][0] / curve["start"][1]
        for fraction, prot, clean in zip(curve["fractions"], curve["protected"], curve["clean"],
                                         strict=True):
            add(model, f"finetune(fraction={fraction:g})",
                json.dumps({"fraction": fraction}), prot, clean, start)
        area = slc_auc(curve["fractions"], [c / n for c, n in curve["protected"]],
                       [c / n for c, n in curve["clean"]])
        rows.append(dict(model=names.get(model, model), spec=model, role=roles[model],
                         attack=record["attack"],
                         family="learning", threat="learning", params=record["params"],
                         metric="slc_auc", value=area, ci_low=math.nan, ci_high=math.nan,
                         n=len(curve["fractions"])))
    return rows


def _chance(score_metric: str, num_classes: int | None, histogram: dict | None
            ) -> float | None:
    if score_metric == "accuracy":
        return 1.0 / num_classes if num_classes else None
    if not histogram:
        return None
    total = sum(histogram.values())
    return sum((c / total) ** 2 for c in histogram.values())


def summarize(table: pd.DataFrame, score_metric: str) -> dict:
    """Headline numbers per model and overall, computed from the table only."""
    summary: dict = {"score_metric": score_metric, "models": {}}
    scores = table[table.metric == score_metric]
    for model, rows in table.groupby("model", sort=False):
        role = rows.role.iloc[0]
        own = scores[scores.model == model].set_index("attack").value
        entry = {"role": role, "clean": _get(own, CLEAN), "protected": _get(own, NONE)}
        ratio = ratio_metric(role)
        attacked = rows[(rows.metric == ratio) & (rows.attack != NONE)].dropna(subset="value")
        if len(attacked):
            pick = attacked.value.idxmin() if role == AUTHORIZED else attacked.value.idxmax()
            worst = attacked.loc[pick]
            entry.update(worst_attack=worst.attack, worst_family=worst.family,
                         worst_threat=worst.threat, **{f"worst_{ratio}": float(worst.value)})
        none_ratio = rows[(rows.metric == ratio) & (rows.attack == NONE)]
        if len(none_ratio):
            entry[ratio] = float(none_ratio.value.iloc[0])
        summary["models"][model] = entry
    roles = {m: e["role"] for m, e in summary["models"].items()}
    authorized = [m for m, r in roles.items() if r == AUTHORIZED]
    others = [m for m, r in roles.items() if r == UNAUTHORIZED]
    scores = [summary["models"][m]["protected"] for m in authorized + others]
    if authorized and others and None not in scores:
        summary["suppression_ratio"] = suppression_ratio(scores[0], scores[1:])
    leak = table[(table.metric == "leakage") & (table.attack != CLEAN)].dropna(subset="value")
    if len(leak):
        worst = leak.loc[leak.value.idxmax()]
        summary["worst_leakage"] = {"model": worst.model, "attack": worst.attack,
                                    "value": float(worst.value), "ci_low": float(worst.ci_low),
                                    "ci_high": float(worst.ci_high), "threat": worst.threat}
    learned = table[(table.metric == "learning_leakage") & (table.role == UNAUTHORIZED)
                    ].dropna(subset="value")
    if len(learned):
        worst = learned.loc[learned.value.idxmax()]
        summary["worst_learning_leakage"] = {
            "model": worst.model, "attack": worst.attack, "value": float(worst.value),
            "ci_low": float(worst.ci_low), "ci_high": float(worst.ci_high)}
    if len(leak) or len(learned):
        by_threat = pd.concat([leak[leak.threat.isin(list(THREAT_LEVELS))], learned])
        summary["worst_by_threat"] = {
            level: {"model": row.model, "attack": row.attack, "value": float(row.value),
                    "ci_low": float(row.ci_low), "ci_high": float(row.ci_high)}
            for level, group in by_threat.groupby("threat")
            for row in [group.loc[group.value.idxmax()]]}
    retention = table[(table.metric == "utility_retention") & (table.attack == NONE)]
    if len(retention):
        summary["authorized_retention"] = float(retention.value.iloc[0])
    return summary


def _get(series: pd.Series, key: str) -> float | None:
    return float(series[key]) if key in series.index else None


RECONSTRUCTING = ("purify", "adaptive", "reconstruct")
"""Families whose attacks rebuild the image, so their output's fidelity to the clean
original says how much of the image the attacker recovered."""


def reconstruction_quality(table: pd.DataFrame) -> list[dict]:
    """Per reconstructing attack (and the release itself, first): PSNR and SSIM of its output
    to the clean originals with 95% intervals, beside the worst inference leakage it caused.
    Empty without originals."""
    images = table[table.metric.isin(["psnr", "ssim"])].drop_duplicates(["attack", "metric"])
    leakage = table[table.metric == "leakage"].dropna(subset="value")  # NaN: clean score 0
    rows = []
    for attack, group in images.groupby("attack", sort=False):
        family = group.family.iloc[0]
        if attack != NONE and family not in RECONSTRUCTING:
            continue
        by_metric = group.set_index("metric")
        leaks = leakage[leakage.attack == attack]
        worst = leaks.loc[leaks.value.idxmax()] if len(leaks) else None
        rows.append({
            "attack": attack, "family": family, "threat": group.threat.iloc[0],
            **{f"{metric}{suffix}": by_metric.at[metric, column]
               for metric in ("psnr", "ssim")
               for suffix, column in (("", "value"), ("_low", "ci_low"), ("_high", "ci_high"))},
            "worst_leakage": None if worst is None else worst.value,
            "worst_model": None if worst is None else worst.model,
        })
    order = {level: i for i, level in enumerate(THREAT_LEVELS)}
    return sorted(rows, key=lambda r: (r["attack"] != NONE, order.get(r["threat"], -1),
                                       -r["psnr"]))
