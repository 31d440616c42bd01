"""``neaudit diff RUN_A RUN_B``: which policy criteria flipped and which leakage moved."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from neaudit.arguments import checked
from neaudit.errors import utf8
from neaudit.imageio import atomic_write
from neaudit.policy import Policy
from neaudit.reporting import _environment, load_run


@dataclass
class DiffResult:
    verdicts: tuple[str, str]
    failing_flags: tuple[list[str], list[str]]  # flags the policy fails on, per run
    criteria: pd.DataFrame  # criterion, a, b, passed_a, passed_b (None: not evaluated), flipped
    moves: pd.DataFrame  # model, attack, metric, a, b, change
    html: Path

    def text(self) -> str:
        lines = [f"verdict: {self.verdicts[0]} → {self.verdicts[1]}"]
        for run, names in zip("ab", self.failing_flags, strict=True):
            if names:
                lines.append(f"  flags failing run {run}: {', '.join(names)}")
        for row in self.criteria.itertuples():
            mark = "FLIPPED " if row.flipped else ""
            lines.append(f"  {mark}{row.criterion}: {_outcome(row.a, row.passed_a)} → "
                         f"{_outcome(row.b, row.passed_b)}")
        lines.append("largest moves (b − a):")
        for row in self.moves.head(10).itertuples():
            lines.append(f"  {row.metric:<18} {row.change:+.3f}  {row.model} under {row.attack}")
        lines.append(f"html: {self.html}")
        return "\n".join(lines)


def _outcome(observed: float, passed: bool | None) -> str:
    if passed is None:
        return "not evaluated"
    return f"{observed:.3f} ({'PASS' if passed else 'FAIL'})"


def _path_key(run: Path) -> str:
    """Eight hex digits of the run's resolved path: two runs with the same folder name (say
    two demos' ``audit``) get different diff files."""
    return hashlib.blake2b(str(run.resolve()).encode(), digest_size=4).hexdigest()


@checked
def diff_runs(run_a: str | Path, run_b: str | Path, policy: str | Path | None = None,
              out: str | Path | None = None) -> DiffResult:
    run_a, run_b = Path(run_a), Path(run_b)
    policy_obj = Policy.load(policy)
    (table_a, summary_a, _), (table_b, summary_b, _) = load_run(run_a), load_run(run_b)
    judged_a, judged_b = policy_obj.judge(table_a, summary_a), policy_obj.judge(table_b, summary_b)
    crit_a = {c.title: c for c in judged_a.criteria}
    crit_b = {c.title: c for c in judged_b.criteria}
    # every criterion either run evaluated: one that only one run could evaluate (a learning
    # attack dropped from the suite, say) is a change a reviewer must see, not a missing row
    names = [*crit_a, *(name for name in crit_b if name not in crit_a)]
    criteria = pd.DataFrame([
        {"criterion": name,
         "a": crit_a[name].observed if name in crit_a else math.nan,
         "b": crit_b[name].observed if name in crit_b else math.nan,
         "passed_a": crit_a[name].passed if name in crit_a else None,
         "passed_b": crit_b[name].passed if name in crit_b else None,
         "flipped": name in crit_a and name in crit_b
         and crit_a[name].passed != crit_b[name].passed}
        for name in names], columns=["criterion", "a", "b", "passed_a", "passed_b", "flipped"])
    keys = ["model", "attack", "metric"]
    wanted = ["leakage", "utility_retention"]
    merged = table_a[table_a.metric.isin(wanted)][keys + ["value"]].merge(
        table_b[table_b.metric.isin(wanted)][keys + ["value"]], on=keys, suffixes=("_a", "_b"))
    merged = merged.rename(columns={"value_a": "a", "value_b": "b"})
    merged["change"] = merged.b - merged.a
    moves = merged.reindex(merged.change.abs().sort_values(ascending=False).index)
    verdicts = (judged_a.verdict, judged_b.verdict)
    failing = tuple([f.name for f in j.flags if f.failing] for j in (judged_a, judged_b))
    html_path = Path(out) if out else run_b / f"diff-{run_a.name}-{_path_key(run_a)}.html"
    html = _environment().get_template("diff.html.j2").render(
        run_a=str(run_a), run_b=str(run_b), verdicts=verdicts, failing_flags=failing,
        criteria=criteria.to_dict("records"), moves=moves.head(50).to_dict("records"))
    atomic_write(html_path, lambda h: h.write(utf8(html)))
    return DiffResult(verdicts, failing, criteria, moves.reset_index(drop=True), html_path)
