"""Evaluation-validity flags: the audit says when its own figures cannot be trusted.

In the spirit of AutoAttack's flags, every report checks its own evaluation. Each check reads
the results table and the diagnostics the audit stored in ``summary.json``; each flag that
fires says what it means and what to do. A policy's ``fail_on`` list turns chosen flags into
failures of the verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pandas as pd

from neaudit.seeding import MIN_KEY_BITS
from neaudit.vocabulary import AUTHORIZED, CLEAN, NONE, UNAUTHORIZED

FLAG_NAMES = ("random_init_model", "degenerate_model", "wrong_preprocessing", "authorized_failing",
              "nominal_vs_measured", "lossy_or_altered_input", "trivial_break",
              "too_few_samples", "nondeterminism", "missing_threat_levels",
              "device_decoding", "exposed_key", "criteria_not_evaluated")


@dataclass(frozen=True)
class Flag:
    name: str
    message: str
    advice: str
    failing: bool = False


@dataclass(frozen=True)
class _Run:
    """What the checks read: the table, the summary's diagnostics, the policy, the criteria."""

    table: pd.DataFrame
    summary: dict
    policy: object
    criteria: Sequence

    @property
    def diagnostics(self) -> dict:
        return self.summary.get("diagnostics", {})


Check = Callable[[_Run], Iterator[Flag]]


def evaluate_flags(table: pd.DataFrame, summary: dict, policy, criteria: Sequence = ()
                   ) -> list[Flag]:
    """Every flag that fires for this run; ``policy`` (rules, levels, fail_on) sets the
    thresholds some flags compare with and which flags fail the verdict; ``criteria`` are
    the policy's evaluated criteria (a threshold inside an interval is flagged)."""
    run = _Run(table, summary, policy, criteria)
    fail_on = set(getattr(policy, "fail_on", ()) or ())
    return [Flag(f.name, f.message, f.advice, f.name in fail_on)
            for check in CHECKS for f in check(run)]


def _random_init_models(run: _Run) -> Iterator[Flag]:
    for spec in run.diagnostics.get("random_init_models") or []:
        yield Flag(
            "random_init_model",
            f"{spec} has random-init weights (a timm spec without pretrained=true or "
            "weights=): its figures describe an untrained network, not a model anyone would "
            "use, so they say little about the release.",
            "Audit with trained weights: pretrained=true (from the local cache) or weights=FILE.")


def _degenerate_models(run: _Run) -> Iterator[Flag]:
    # judged against the labels' own spread where the release has labels: a model that
    # predicts one class on a release of one class is right, not degenerate
    labels = run.diagnostics.get("labels")
    clean = run.diagnostics.get("clean_predictions", {})
    for model, info in clean.items():
        spread = labels or _consensus(model, info, clean) or {"distinct": 3, "top_share": 0.0}
        needed = min(3, spread["distinct"])
        ceiling = max(0.8, spread["top_share"] + 0.05)
        if info["distinct"] < min(needed, info.get("classes", 3)) or info["top_share"] >= ceiling:
            yield Flag(
                "degenerate_model",
                f"{model} gives {info['distinct']} distinct clean prediction(s), the most common "
                f"for {info['top_share']:.0%} of the images: its agreement and leakage figures "
                "say nothing about the protection.",
                "Use trained weights (check the spec's pretrained/weights option) or drop it.")


def _consensus(model: str, info: dict, clean: dict[str, dict]) -> dict | None:
    """Without labels, the spread the zoo agrees on: where another model over the same
    classes gives most of its clean predictions to the same class, the release itself is
    likely of that class, and that model's share stands in for the labels'. (A degenerate
    model under agreement scoring agrees with itself everywhere, so excusing one overstates
    leakage rather than hiding it.)"""
    shares = [other["top_share"] for name, other in clean.items()
              if name != model and other.get("top_class") is not None
              and other.get("top_class") == info.get("top_class")
              and other.get("classes") == info.get("classes") and other["top_share"] >= 0.5]
    return {"distinct": 1, "top_share": max(shares)} if shares else None


def _near_chance(run: _Run) -> Iterator[Flag]:
    metric = run.summary.get("score_metric", "accuracy")
    chance = run.diagnostics.get("chance")
    if metric != "accuracy" or not chance:
        return
    scores = run.table[(run.table.metric == metric) & (run.table.attack == CLEAN)]
    for row in scores.itertuples():
        if row.value < 2 * chance:
            yield Flag(
                "authorized_failing" if row.role == AUTHORIZED else "wrong_preprocessing",
                f"{row.model} scores {row.value:.3f} on the clean originals, near chance "
                f"({chance:.3f}): a normalization, input-size or class-order mismatch, or the "
                "wrong weights.",
                "Check mean/std/input_size and that class folders match the model's "
                "class order.")


def _authorized_failing(run: _Run) -> Iterator[Flag]:
    table = run.table
    retention = table[(table.role == AUTHORIZED) & (table.metric == "utility_retention")
                      & (table.attack == NONE)]
    for row in retention.itertuples():
        if row.value < 0.9:
            yield Flag(
                "authorized_failing", f"The authorized model keeps only {row.value:.3f} of its "
                "clean score on the unattacked NEs: the protection breaks utility before any "
                "attack.", "Lower the strength (higher PSNR) or check the authorized spec.")


def _nominal_vs_measured(run: _Run) -> Iterator[Flag]:
    sidecar = run.diagnostics.get("sidecar") or {}
    measured = run.table[(run.table.metric == "psnr") & (run.table.attack == NONE)].value
    if sidecar.get("psnr") is None or not len(measured):
        return
    gap = float(measured.iloc[0]) - float(sidecar["psnr"])
    if abs(gap) > 1.0:
        kind = "nominal" if sidecar.get("psnr_is_nominal") else "recorded"
        yield Flag(
            "nominal_vs_measured", f"The {kind} PSNR in neaudit.json is "
            f"{sidecar['psnr']:.1f} dB but the released images measure "
            f"{float(measured.iloc[0]):.1f} dB ({gap:+.1f} dB).",
            "Quote the measured strength; for the published construction the nominal "
            "figure is not what is released.")


def _input_files(run: _Run) -> Iterator[Flag]:
    files = run.diagnostics.get("files") or {}
    if files.get("lossy"):
        yield Flag(
            "lossy_or_altered_input", f"{files['lossy']} protected file(s) use a lossy format "
            f"(e.g. {files['lossy_example']}): the protection as recorded may not be what was "
            "released.", "Audit the lossless files that will actually be released.")
    if files.get("altered"):
        yield Flag(
            "lossy_or_altered_input", f"{files['altered']} protected file(s) differ from the "
            f"hashes written by neaudit protect (e.g. {files['altered_example']}): they were "
            "re-encoded, resampled or edited after protection.",
            "Re-run neaudit protect, or audit exactly the files in hashes.sha256.")
    if files.get("unlisted"):
        yield Flag(
            "lossy_or_altered_input", f"{files['unlisted']} protected file(s) are not in the "
            f"hashes written by neaudit protect (e.g. {files['unlisted_example']}): they were "
            "added or renamed after protection, and may not be protected at all.",
            "Re-run neaudit protect on the whole release, or audit exactly the files in "
            "hashes.sha256.")
    decoded = run.diagnostics.get("device_decoded_jpegs") or 0
    if decoded:
        yield Flag(
            "device_decoding", f"{decoded} JPEG input file(s) were decoded with nvJPEG on the "
            "GPU (--decode device). Its IDCT and chroma upsampling differ from libjpeg-turbo's "
            "by up to tens of levels at colour edges, so these figures can differ from an "
            "audit of the same files on another machine.",
            "For figures comparable across machines, audit with --decode cpu (the default).")


def _trivial_break(run: _Run) -> Iterator[Flag]:
    max_leakage = run.policy.rules.get("max_leakage")
    if max_leakage is None:
        return
    table = run.table
    leak = table[(table.metric == "leakage") & (table.family == "preprocess")
                 & (table.role == UNAUTHORIZED)]
    broken = leak[leak.value > max_leakage]
    if len(broken):
        worst = broken.loc[broken.value.idxmax()]
        yield Flag(
            "trivial_break", f"A single ordinary preprocessing step ({worst.attack}) already "
            f"gives {worst.model} leakage {worst.value:.3f} > {max_leakage:g}.",
            "No adaptive attack is needed to break this release.")


def _too_few_samples(run: _Run) -> Iterator[Flag]:
    for criterion in run.criteria:
        low, high = criterion.ci_low, criterion.ci_high
        if low == low and high == high and low < criterion.threshold < high:
            yield Flag(
                "too_few_samples", f"{criterion.title}: the threshold "
                f"{criterion.threshold:g} lies inside the 95% interval [{low:.3f}, "
                f"{high:.3f}], so the verdict could flip with more images.",
                "Audit more images before relying on this criterion.")


def _nondeterminism(run: _Run) -> Iterator[Flag]:
    unstable = run.diagnostics.get("nondeterministic_tasks") or []
    if unstable:
        yield Flag(
            "nondeterminism", f"Re-running {len(unstable)} task(s) with the same seed gave other "
            f"figures: {', '.join(unstable[:3])}.",
            "Seed every random source of the attacks and models (ctx.generator).")


def _missing_threat_levels(run: _Run) -> Iterator[Flag]:
    required = set(getattr(run.policy, "levels", ()) or ())
    missing = sorted(required - set(run.table.threat.unique()))
    if missing:
        yield Flag(
            "missing_threat_levels", f"The policy covers threat levels {', '.join(missing)} "
            "but no attack at those levels ran, so the verdict is provisional.",
            "Run the adaptive suite (with clean reference data for L2 and a zoo for L3).")


def _exposed_key(run: _Run) -> Iterator[Flag]:
    source = run.diagnostics.get("exposed_key")
    if source is None:
        return
    how = {
        "stored": "neaudit.json records the noise key (protect --store-key)",
        "seed": "this release's neaudit.json comes from a protect that used the recorded seed "
                "as the noise key unless --key was given",
        "searchable": "this release comes from a protect (neaudit before the ChaCha noise "
                      "generator) whose noise depends on only 32 bits of its key, which anyone "
                      "who knows the construction can search",
        "short": "this release's noise key was given (--key) and has fewer than "
                 f"{MIN_KEY_BITS} bits, few enough for anyone who knows the construction to "
                 "try them all",
    }[source]
    advice = ("Re-protect with this version of neaudit (its noise generator keeps every bit of "
              "the key)." if source == "searchable" else
              "Re-protect without --key: protect then draws a 128-bit key." if source == "short"
              else
              "Re-protect without --store-key (the key is then drawn at random and not "
              "recorded), or keep neaudit.json out of the release; if that release was written "
              "with its own secret --key, drop exposed_key from the policy's fail_on.")
    yield Flag(
        "exposed_key", f"{how}: whoever holds the file can regenerate each image's noise and "
        "subtract it, an attack none of the figures below covers.", advice)


def _criteria_not_evaluated(run: _Run) -> Iterator[Flag]:
    """A policy threshold that no figure of the run measures does not enter the verdict; the
    reader must know that it was not checked rather than read its silence as a pass."""
    evaluated = {c.title for c in run.criteria}
    rules = [(key, None) for key in getattr(run.policy, "rules", {})] + [
        (key, family) for family, rules in getattr(run.policy, "families", {}).items()
        for key in rules]
    families = set(run.table.family)
    missing = []
    for key, family in rules:
        title = key if family is None else f"{key} [{family}]"
        if title in evaluated:
            continue
        if key == "max_learning_leakage":
            why = "no learning attack ran"
        elif family is not None and family not in families:
            why = f"no {family} attack ran"
        elif key in ("max_leakage", "max_leakage_above_chance"):
            floor = "chance" if key == "max_leakage_above_chance" else "zero"
            why = f"no unauthorized model scores above {floor} on the clean images"
        else:
            why = "no figure of this audit measures it"
        missing.append(f"{title} ({why})")
    if missing:
        yield Flag(
            "criteria_not_evaluated", "The policy sets thresholds this audit has no figure for, "
            f"so the verdict does not cover them: {'; '.join(missing)}.",
            "Run the attacks that measure them (the adaptive and thorough suites hold the "
            "learning attacks), or drop them from the policy.")


CHECKS: tuple[Check, ...] = (
    _random_init_models, _degenerate_models, _near_chance, _authorized_failing,
    _nominal_vs_measured, _input_files, _trivial_break, _too_few_samples, _nondeterminism,
    _missing_threat_levels, _criteria_not_evaluated, _exposed_key)
