"""The self-contained HTML compliance report, its policy verdict and JUnit XML.

``render_report(run_dir)`` reads only what an audit stored (``results.parquet``,
``summary.json``, ``run.json`` and the optional ``samples.npz`` and ``spectral.json``) and
writes ``index.html``, ``junit.xml`` and ``samples.png`` beside them: re-rendering never
recomputes a measurement. The verdict is :meth:`neaudit.policy.Policy.judge`'s, the one rule
the terminal, JUnit and ``diff`` use too.
"""

from __future__ import annotations

import base64
import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import jinja2
import pandas as pd

from neaudit._version import __version__
from neaudit.arguments import checked
from neaudit.errors import NeauditError, printable, utf8
from neaudit.flags import Flag
from neaudit.imageio import atomic_write
from neaudit.policy import Criterion, Policy
from neaudit.reporting import plots
from neaudit.reporting.samples import write_sample_grid
from neaudit.reporting.wording import verdict_sentence
from neaudit.results import COLUMNS, reconstruction_quality
from neaudit.vocabulary import AUTHORIZED, CLEAN, NONE, THREAT_LEVELS

TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class ReportResult:
    """What ``report`` returns: the verdict, the criteria, the validity flags and the files."""

    verdict: str
    sentence: str
    criteria: list[Criterion]
    flags: list[Flag]
    html: Path
    junit: Path

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == "PASS" else 1


def load_run(run_dir: Path) -> tuple[pd.DataFrame, dict, dict]:
    """The stored table, summary and manifest of an audit folder; a folder whose files are
    missing, unreadable or not what an audit writes is refused by file, before rendering."""
    results = run_dir / "results.parquet"
    if not results.is_file():
        raise NeauditError(f"{run_dir}: no results.parquet. Fix: point to the folder an audit "
                           "wrote (reports/<run>).")
    try:
        table = pd.read_parquet(results)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise _damaged(results, str(exc)) from exc
    missing = [column for column in COLUMNS if column not in table.columns]
    if missing:
        raise _damaged(results, f"no {', '.join(missing)} column")
    summary = _json_object(run_dir / "summary.json")
    manifest_path = run_dir / "run.json"
    manifest = _json_object(manifest_path) if manifest_path.is_file() else {}
    return table, summary, manifest


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # missing, not UTF-8, not JSON
        raise _damaged(path, str(exc)) from exc
    if not isinstance(value, dict):
        raise _damaged(path, "not a JSON object")
    return value


def _damaged(path: Path, why: str) -> NeauditError:
    return NeauditError(f"{path}: not as an audit wrote it ({why[:200]}). Fix: re-run the "
                        "audit with the same --out (it resumes from its task records), or "
                        "point to another run folder.")


@checked
def render_report(run_dir: str | Path, policy: str | Path | Policy | None = None
                  ) -> ReportResult:
    """Render ``index.html`` and ``junit.xml`` for a finished audit folder."""
    run_dir = Path(run_dir)
    table, summary, manifest = load_run(run_dir)
    policy = policy if isinstance(policy, Policy) else Policy.load(policy)
    judgement = policy.judge(table, summary)
    criteria, flags, result = judgement.criteria, judgement.flags, judgement.verdict
    sentence = verdict_sentence(criteria, flags, result, policy.name,
                                summary.get("score_metric", "score"))
    summary.update(criteria=[{**asdict(c), "title": c.title} for c in criteria],
                   flags=[asdict(f) for f in flags], verdict=result, policy=policy.name,
                   verdict_sentence=sentence)
    atomic_write(run_dir / "summary.json",
                 lambda h: h.write(json.dumps(summary, indent=2, default=str).encode()))
    html = _render_html(run_dir, table, summary, manifest, policy, criteria, flags, result)
    atomic_write(run_dir / "index.html", lambda h: h.write(utf8(html)))
    junit = junit_xml(criteria, flags, policy.name)
    atomic_write(run_dir / "junit.xml", lambda h: h.write(utf8(junit)))
    return ReportResult(result, sentence, criteria, flags, run_dir / "index.html",
                        run_dir / "junit.xml")


def _fmt(value, pattern: str = "%.3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return pattern % value


@functools.cache
def _environment() -> jinja2.Environment:
    """One environment per process, so that each template is compiled once (68 ms a
    report otherwise)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    env.globals["fmt"] = _fmt
    return env


def _verdict_text(criteria: list[Criterion], flags: list[Flag], result: str) -> str:
    if not criteria:
        return "no policy criterion could be evaluated on these results"
    failed = [c for c in criteria if not c.passed]
    failing_flags = [f.name for f in flags if f.failing]
    if result == "PASS":
        return f"all {len(criteria)} policy criteria are met"
    parts = []
    if failed:
        parts.append(f"{len(failed)} of {len(criteria)} criteria fail: " + "; ".join(
            f"{c.title} {_fmt(c.observed)} ({c.where})" for c in failed))
    if failing_flags:
        parts.append("validity flag(s) the policy fails on: " + ", ".join(failing_flags))
    return "; ".join(parts)


def _render_html(run_dir, table, summary, manifest, policy, criteria, flags, result) -> str:
    models = summary.get("models", {})
    authorized = next((m for m, e in models.items() if e["role"] == AUTHORIZED), "–")
    samples = write_sample_grid(run_dir)
    spectral_path = run_dir / "spectral.json"
    headline = table[table.metric != "ssim"].sort_values(["model", "attack", "metric"])
    context = dict(
        verdict=result, verdict_text=_verdict_text(criteria, flags, result), criteria=criteria,
        sentence=summary["verdict_sentence"],
        policy_name=policy.name, authorized=authorized, n_models=len(models),
        n_attacks=table[~table.attack.isin([CLEAN, NONE])].attack.nunique(),
        score_metric=summary.get("score_metric", "score"),
        retention=summary.get("authorized_retention"), worst=summary.get("worst_leakage"),
        learning=summary.get("worst_learning_leakage"),
        suppression=summary.get("suppression_ratio"), models=models,
        flags=flags,
        plots=dict(heatmap=plots.leakage_heatmap(table), strength=plots.strength_curves(table),
                   damage=plots.damage_scatter(table), retention=plots.retention_bars(table)),
        samples=(base64.b64encode((run_dir / "samples.png").read_bytes()).decode()
                 if samples else None),
        samples_gain=(samples or {}).get("gain", "–"),
        samples_attack=(samples or {}).get("attack", "–"),
        spectral=json.loads(spectral_path.read_text()) if spectral_path.is_file() else None,
        rows=headline.to_dict("records"), provenance=_provenance(manifest),
        reconstruction=reconstruction_quality(table),
        by_threat=dict(sorted(summary.get("worst_by_threat", {}).items())),
        threat_levels=THREAT_LEVELS, surrogates=summary.get("surrogate_ranking"),
        authorized_rank=_rank_of(authorized, summary.get("surrogate_ranking")),
        version=__version__,
    )
    return _environment().get_template("report.html.j2").render(**context)


def _rank_of(spec: str, ranking: list | None) -> str:
    if not ranking:
        return "–"
    names = [name for name, _ in ranking]
    return f"{names.index(spec) + 1} of {len(names)}" if spec in names else "not a candidate"


def _provenance(manifest: dict) -> list[tuple[str, str]]:
    if not manifest:
        return [("run.json", "missing")]
    items = [("command", manifest.get("command", "–")),
             ("seed", str(manifest.get("seed", "–"))),
             ("device", manifest.get("device", "–")),
             ("forwards in", manifest.get("config", {}).get("precision", "–")),
             ("complete", str(manifest.get("complete", "–"))),
             ("seconds", _fmt(manifest.get("seconds"), "%.1f"))]
    items += [(f"version {k}", v) for k, v in manifest.get("versions", {}).items()]
    dataset = manifest.get("dataset", {})
    items += [("dataset", f"{dataset.get('source')} ({dataset.get('count')} images)"),
              ("dataset hash", dataset.get("hash", "–"))]
    items += [(f"weights {k}", v) for k, v in manifest.get("weights", {}).items()]
    items.append(("config", json.dumps(manifest.get("config", {}), sort_keys=True)))
    return items


def junit_xml(criteria: list[Criterion], flags: list[Flag], suite_name: str) -> str:
    """One JUnit test case per policy criterion (failures carry the measurement) and one per
    validity flag that fired (a failure where the policy fails on it)."""
    failures = sum(not c.passed for c in criteria) + sum(f.failing for f in flags)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<testsuite name={quoteattr("neaudit policy " + suite_name)} '
             f'tests="{len(criteria) + len(flags)}" failures="{failures}">']
    for flag in flags:
        lines.append(f'  <testcase classname="neaudit.flags" name={quoteattr(flag.name)}>')
        text = f"{flag.message} {flag.advice}"
        if flag.failing:
            lines.append(f"    <failure message={quoteattr(text)}>{escape(text)}</failure>")
        else:
            lines.append(f"    <system-out>{escape('warning: ' + text)}</system-out>")
        lines.append("  </testcase>")
    for c in criteria:
        lines.append(f'  <testcase classname="neaudit.policy" name={quoteattr(c.title)}>')
        if not c.passed:
            message = (f"{c.name} = {c.observed:.4f} violates "
                       f"{'≥' if c.name.startswith('min') else '≤'} {c.threshold:g} ({c.where})")
            lines.append(f"    <failure message={quoteattr(message)}>{escape(message)}</failure>")
        lines.append("  </testcase>")
    lines.append("</testsuite>")
    # names from a release can hold characters XML cannot: CI refuses a file not well-formed
    return printable("\n".join(lines) + "\n")
