"""Evaluation-validity flags: the audit says when its own figures cannot be trusted.

In the spirit of AutoAttack's flags, every report checks its own evaluation. Each check reads
the results table and the diagnostics the audit stored in ``summary.json``; each flag that
fires says what it means and what to do. A policy's ``fail_on`` list turns chosen flags into
failures of the verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from neaudit.vocabulary import AUTHORIZED, CLEAN, NONE, UNAUTHORIZED

FLAG_NAMES = ("degenerate_model", "wrong_preprocessing", "authorized_failing",
              "nominal_vs_measured", "lossy_or_altered_input", "trivial_break",
              "too_few_samples", "nondeterminism", "missing_threat_levels",
              "device_decoding")


@dataclass(frozen=True)
class Flag:
    name: str
    message: str
    advice: str
    failing: bool = False


def evaluate_flags(table: pd.DataFrame, summary: dict, policy, criteria: Sequence = ()
                   ) -> list[Flag]:
    """Every flag that fires for this run; ``policy`` (rules, levels, fail_on) sets the
    thresholds some flags compare with and which flags fail the verdict; ``criteria`` are
    the policy's evaluated criteria (a threshold inside an interval is flagged)."""
    diagnostics = summary.get("diagnostics", {})
    found: list[Flag] = []
    metric = summary.get("score_metric", "accuracy")
    scores = table[table.metric == metric]
    chance = diagnostics.get("chance")

    for model, info in diagnostics.get("clean_predictions", {}).items():
        if info["distinct"] < min(3, info.get("classes", 3)) or info["top_share"] >= 0.8:
            found.append(Flag(
                "degenerate_model",
                f"{model} gives {info['distinct']} distinct clean prediction(s), the most common "
                f"for {info['top_share']:.0%} of the images: its agreement and leakage figures "
                "say nothing about the protection.",
                "Use trained weights (check the spec's pretrained/weights option) or drop it."))
    if metric == "accuracy" and chance:
        for row in scores[scores.attack == CLEAN].itertuples():
            if row.value < 2 * chance:
                name = ("authorized_failing" if row.role == AUTHORIZED
                        else "wrong_preprocessing")
                found.append(Flag(
                    name, f"{row.model} scores {row.value:.3f} on the clean originals, near "
                    f"chance ({chance:.3f}): a normalization, input-size or class-order "
                    "mismatch, or the wrong weights.",
                    "Check mean/std/input_size and that class folders match the model's "
                    "class order."))
    retention = table[(table.role == AUTHORIZED) & (table.metric == "utility_retention")
                      & (table.attack == NONE)]
    for row in retention.itertuples():
        if row.value < 0.9:
            found.append(Flag(
                "authorized_failing", f"The authorized model keeps only {row.value:.3f} of its "
                "clean score on the unattacked NEs: the protection breaks utility before any "
                "attack.", "Lower the strength (higher PSNR) or check the authorized spec."))
    sidecar = diagnostics.get("sidecar") or {}
    measured = table[(table.metric == "psnr") & (table.attack == NONE)].value
    if sidecar.get("psnr") is not None and len(measured):
        gap = float(measured.iloc[0]) - float(sidecar["psnr"])
        if abs(gap) > 1.0:
            kind = "nominal" if sidecar.get("psnr_is_nominal") else "recorded"
            found.append(Flag(
                "nominal_vs_measured", f"The {kind} PSNR in neaudit.json is "
                f"{sidecar['psnr']:.1f} dB but the released images measure "
                f"{float(measured.iloc[0]):.1f} dB ({gap:+.1f} dB).",
                "Quote the measured strength; for the published construction the nominal "
                "figure is not what is released."))
    files = diagnostics.get("files") or {}
    if files.get("lossy"):
        found.append(Flag(
            "lossy_or_altered_input", f"{files['lossy']} protected file(s) use a lossy format "
            f"(e.g. {files['lossy_example']}): the protection as recorded may not be what was "
            "released.", "Audit the lossless files that will actually be released."))
    if files.get("altered"):
        found.append(Flag(
            "lossy_or_altered_input", f"{files['altered']} protected file(s) differ from the "
            f"hashes written by neaudit protect (e.g. {files['altered_example']}): they were "
            "re-encoded, resampled or edited after protection.",
            "Re-run neaudit protect, or audit exactly the files in hashes.sha256."))
    decoded = diagnostics.get("device_decoded_jpegs") or 0
    if decoded:
        found.append(Flag(
            "device_decoding", f"{decoded} JPEG input file(s) were decoded with nvJPEG on the "
            "GPU (--decode device). Its IDCT and chroma upsampling differ from libjpeg-turbo's "
            "by up to tens of levels at colour edges, so these figures can differ from an "
            "audit of the same files on another machine.",
            "For figures comparable across machines, audit with --decode cpu (the default)."))
    max_leakage = policy.rules.get("max_leakage")
    if max_leakage is not None:
        leak = table[(table.metric == "leakage") & (table.family == "preprocess")
                     & (table.role == UNAUTHORIZED)]
        broken = leak[leak.value > max_leakage]
        if len(broken):
            worst = broken.loc[broken.value.idxmax()]
            found.append(Flag(
                "trivial_break", f"A single ordinary preprocessing step ({worst.attack}) already "
                f"gives {worst.model} leakage {worst.value:.3f} > {max_leakage:g}.",
                "No adaptive attack is needed to break this release."))
    for criterion in criteria:
        low, high = criterion.ci_low, criterion.ci_high
        if low == low and high == high and low < criterion.threshold < high:
            found.append(Flag(
                "too_few_samples", f"{criterion.title}: the threshold "
                f"{criterion.threshold:g} lies inside the 95% interval [{low:.3f}, "
                f"{high:.3f}], so the verdict could flip with more images.",
                "Audit more images before relying on this criterion."))
    unstable = diagnostics.get("nondeterministic_tasks") or []
    if unstable:
        found.append(Flag(
            "nondeterminism", f"Re-running {len(unstable)} task(s) with the same seed gave other "
            f"figures: {', '.join(unstable[:3])}.",
            "Seed every random source of the attacks and models (ctx.generator)."))
    required = set(getattr(policy, "levels", ()) or ())
    ran = set(table.threat.unique())
    missing = sorted(required - ran)
    if missing:
        found.append(Flag(
            "missing_threat_levels", f"The policy covers threat levels {', '.join(missing)} "
            "but no attack at those levels ran, so the verdict is provisional.",
            "Run the adaptive suite (with clean reference data for L2 and a zoo for L3)."))
    fail_on = set(getattr(policy, "fail_on", ()) or ())
    return [Flag(f.name, f.message, f.advice, f.name in fail_on) for f in found]
