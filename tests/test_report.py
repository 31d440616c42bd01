"""Report rendering, policy verdicts, exit codes, JUnit XML and diff, on synthetic results."""

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest

from neaudit.cli import main
from neaudit.models import display_names
from neaudit.policy import Policy, verdict
from neaudit.reporting import render_report
from neaudit.reporting.diff import diff_runs
from neaudit.results import build_table, reconstruction_quality, summarize

AUTH = "timm:resnet50?pretrained=true"
EVIL = "<script>alert(1)</script>"
MODELS = {AUTH: "authorized", "timm:vit_small_patch16_224": "unauthorized", EVIL: "unauthorized"}
ATTACKS = {"jpeg(quality=75)": ("preprocess", "L0", {"quality": 75}),
           "jpeg(quality=50)": ("preprocess", "L0", {"quality": 50}),
           "median(kernel=3)": ("purify", "L1", {"kernel": 3})}


def _record(attack, family, threat, params, correct: dict[str, int], n=100, psnr=30.0):
    return {"attack": attack, "family": family, "threat": threat,
            "params": json.dumps(params), "shard": 0,
            "models": {m: [correct[m], n] for m in MODELS},
            "psnr_sum": psnr * n, "psnr_sq_sum": (psnr**2 + 1) * n, "ssim_sum": 0.9 * n,
            "ssim_sq_sum": 0.81 * n, "n_images": n}


def make_run(root: Path, leak: int) -> Path:
    """A run folder whose unauthorized models recover ``leak``/100 under median filtering."""
    clean = {m: 90 for m in MODELS}
    records = [{**_record("clean", "clean", "-", {}, clean), "n_images": 0},
               _record("none", "none", "-", {}, {AUTH: 89, MODELS and
                                                  "timm:vit_small_patch16_224": 10, EVIL: 12})]
    for attack, (family, threat, params) in ATTACKS.items():
        correct = {AUTH: 85, "timm:vit_small_patch16_224": 15, EVIL: 14}
        if attack.startswith("median"):
            correct = {AUTH: 80, "timm:vit_small_patch16_224": leak, EVIL: 20}
        records.append(_record(attack, family, threat, params, correct))
    table = build_table(records, MODELS, "accuracy", 10)
    root.mkdir(parents=True)
    table.to_parquet(root / "results.parquet")
    (root / "summary.json").write_text(json.dumps(summarize(table, "accuracy")))
    (root / "run.json").write_text(json.dumps({"command": "neaudit audit x", "seed": 0,
                                               "versions": {"neaudit": "0.1.0"}}))
    return root


def policy_file(tmp_path: Path, max_leakage: float) -> Path:
    path = tmp_path / f"policy-{max_leakage}.toml"
    path.write_text(f'name = "test"\nmin_authorized_retention = 0.9\nmax_leakage = {max_leakage}\n'
                    "min_suppression_ratio = 2.0\n[family.preprocess]\n"
                    "min_authorized_retention = 0.9\n")
    return path


def test_report_verdict_matches_policy_and_everything_is_escaped(tmp_path):
    run = make_run(tmp_path / "run", leak=60)
    policy = Policy.load(policy_file(tmp_path, 0.5))
    result = render_report(run, policy)
    html = result.html.read_text()
    table = pd.read_parquet(run / "results.parquet")
    worst = table[(table.metric == "leakage") & (table.role == "unauthorized")].value.max()
    assert worst == pytest.approx(60 / 90)  # the median attack breaks it
    expected = verdict(policy.evaluate(table, json.loads((run / "summary.json").read_text())))
    assert result.verdict == expected == "FAIL"
    assert '<div class="verdict FAIL">FAIL. Do not release:' in html
    assert "1 of 4 criteria fail: max_leakage 0.667" in html
    for model in MODELS:
        if model != EVIL:
            assert model in html
    for attack in ATTACKS:
        assert attack in html
    assert EVIL not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower()
    assert len(html) < 5_000_000


def test_exit_codes_and_junit_on_passing_and_failing_policies(tmp_path, capsys):
    run = make_run(tmp_path / "run", leak=30)
    assert main(["report", str(run), "--policy", str(policy_file(tmp_path, 0.5))]) == 0
    junit = ET.parse(run / "junit.xml").getroot()
    criteria = [case for case in junit if case.get("classname") == "neaudit.policy"]
    assert junit.get("failures") == "0" and len(criteria) == 4
    assert main(["report", str(run), "--policy", str(policy_file(tmp_path, 0.2))]) == 1
    sentence = render_report(run, policy_file(tmp_path, 0.2)).sentence
    assert sentence.startswith("Do not release: under median(kernel=3), the unauthorized "
                               "model timm:vit_small_patch16_224 recovers")
    assert "recovers 33% of its clean accuracy" in sentence
    assert "the policy allows at most 20%" in sentence and "95% interval" in sentence
    assert sentence in (run / "index.html").read_text().replace("&#39;", "'")
    junit = ET.parse(run / "junit.xml").getroot()
    failed = [case.get("name") for case in junit if case.find("failure") is not None]
    assert failed == ["max_leakage"]
    assert "verdict: FAIL" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("max_leak = 0.1\n")
    assert main(["report", str(run), "--policy", str(bad)]) == 2
    assert "unknown key(s) max_leak. Valid keys" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == 2


@pytest.mark.parametrize("damage", ["garbage table", "table of other columns",
                                    "summary not an object", "summary missing",
                                    "manifest not JSON"])
def test_a_damaged_run_folder_is_refused_by_file(damage, tmp_path, capsys):
    run = make_run(tmp_path / "run", leak=30)
    file = {"garbage table": "results.parquet", "table of other columns": "results.parquet",
            "summary not an object": "summary.json", "summary missing": "summary.json",
            "manifest not JSON": "run.json"}[damage]
    if damage == "table of other columns":
        pd.DataFrame({"model": ["x"], "value": [1.0]}).to_parquet(run / file)
    elif damage == "summary missing":
        (run / file).unlink()
    else:
        (run / file).write_bytes({"garbage table": b"PAR1 not parquet",
                                  "summary not an object": b"[1, 2]",
                                  "manifest not JSON": b"\xff{"}[damage])
    for argv in (["report", str(run)], ["diff", str(make_run(tmp_path / "a", 30)), str(run)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "internal error" not in err, err
        assert f"{run / file}: not as an audit wrote it" in err and "Fix:" in err


def test_default_policy_ships_with_the_package():
    policy = Policy.load()
    assert policy.name == "default" and policy.rules["max_leakage"] == 0.5
    assert "preprocess" in policy.families


def test_diff_reports_flipped_criteria_and_moves(tmp_path, capsys):
    a = make_run(tmp_path / "a", leak=30)
    b = make_run(tmp_path / "b", leak=80)
    result = diff_runs(a, b, policy_file(tmp_path, 0.5))
    flipped = result.criteria[result.criteria.flipped].criterion.tolist()
    assert flipped == ["max_leakage"] and result.verdicts == ("PASS", "FAIL")
    top = result.moves.iloc[0]
    assert top.attack == "median(kernel=3)" and top.change == pytest.approx(50 / 90)
    assert result.html.is_file() and result.html.parent == b
    other = make_run(tmp_path / "elsewhere" / "a", leak=30)  # another run named "a"
    assert diff_runs(other, b, policy_file(tmp_path, 0.5)).html != result.html
    assert main(["diff", str(a), str(b), "--policy", str(policy_file(tmp_path, 0.5))]) == 0
    assert "FLIPPED max_leakage" in capsys.readouterr().out
    # a criterion only one run could evaluate is listed as such, not left out
    table = pd.read_parquet(b / "results.parquet")
    table[table.family != "preprocess"].to_parquet(b / "results.parquet")
    result = diff_runs(a, b, policy_file(tmp_path, 0.5))
    dropped = result.criteria.set_index("criterion").loc["min_authorized_retention [preprocess]"]
    assert dropped.passed_a and dropped.passed_b is None and not dropped.flipped
    assert "min_authorized_retention [preprocess]: 0.944 (PASS) → not evaluated" in result.text()
    assert "not evaluated</td>" in result.html.read_text()


def test_report_terminal_junit_and_diff_agree_on_a_run_failed_by_a_flag(tmp_path, capsys):
    """Every criterion passes, but a validity flag the policy fails on fires: the report,
    the terminal, JUnit and diff must all say FAIL (one verdict rule)."""
    run = make_run(tmp_path / "run", leak=30)
    summary = json.loads((run / "summary.json").read_text())
    summary["diagnostics"] = {"clean_predictions": {
        EVIL: {"distinct": 1, "top_share": 1.0, "classes": 10}}}
    (run / "summary.json").write_text(json.dumps(summary))
    policy = tmp_path / "flagged.toml"
    policy.write_text('fail_on = ["degenerate_model"]\n' + policy_file(tmp_path, 0.5).read_text())
    report = render_report(run, policy)
    assert all(c.passed for c in report.criteria)
    assert report.verdict == "FAIL" and verdict(report.criteria, report.flags) == "FAIL"
    assert "failed a validity check" in report.sentence and "degenerate_model" in report.sentence
    assert verdict(report.criteria) == "PASS"  # the same criteria without the flag
    assert main(["report", str(run), "--policy", str(policy)]) == 1
    assert "verdict: FAIL" in capsys.readouterr().out
    junit = ET.parse(run / "junit.xml").getroot()
    failed = [case.get("name") for case in junit if case.find("failure") is not None]
    assert failed == ["degenerate_model"]
    passing = make_run(tmp_path / "passing", leak=30)
    result = diff_runs(passing, run, policy)
    assert result.verdicts == ("PASS", "FAIL")
    assert result.failing_flags == ([], ["degenerate_model"])
    assert "flags failing run b: degenerate_model" in result.text()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed here (.ci/run installs it); "
    "the browser check of the report did not run")
ARTIFACTS = Path(__file__).parent / "artifacts"
"""Screenshots the browser tests leave for people to look at (git-ignored)."""


def _chromium(page: Path, profile: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", *options, page.as_uri()],
        capture_output=True, text=True, timeout=120)


@needs_chromium
def test_report_renders_in_headless_chromium_without_errors_or_requests(tmp_path):
    run = make_run(tmp_path / "run", leak=60)
    html = render_report(run).html
    screenshot, netlog = tmp_path / "report.png", tmp_path / "netlog.json"
    done = _chromium(html, tmp_path / "profile", "--enable-logging=stderr", "--v=0",
                     f"--log-net-log={netlog}", "--window-size=1200,2400",
                     f"--screenshot={screenshot}")
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    events = json.loads(netlog.read_text())["events"]
    # requests the page itself made carry the file page's opaque origin as initiator
    from_page = [e["params"]["url"] for e in events
                 if e.get("params", {}).get("initiator") == "null"]
    assert from_page == [], from_page


LONG_SPECS = [f"python:/srv/team/checkpoints/cifar10/akamaster-pytorch-resnet-cifar10/models/"
              f"akresnet.py:resnet{depth}?weights=/srv/team/checkpoints/cifar10/"
              f"akamaster-pytorch-resnet-cifar10/weights/resnet{depth}-2020-01-13.th"
              "&mean=0.4914,0.4822,0.4465&std=0.2470,0.2435,0.2616&input_size=32"
              for depth in (20, 32, 44, 56)]


def _long_spec_run(root: Path) -> Path:
    """A failing run over four real-looking ``python:`` models (resnet20 authorized)."""
    roles = {spec: "unauthorized" for spec in LONG_SPECS} | {LONG_SPECS[0]: "authorized"}
    names = display_names(LONG_SPECS)

    def record(attack, family, threat, params, correct):
        return {"attack": attack, "family": family, "threat": threat,
                "params": json.dumps(params), "shard": 0,
                "models": {m: [c, 1000] for m, c in zip(LONG_SPECS, correct, strict=True)},
                "psnr_sum": 30_000.0, "psnr_sq_sum": 901_000.0, "ssim_sum": 900.0,
                "ssim_sq_sum": 810.0, "n_images": 1000}

    records = [{**record("clean", "clean", "-", {}, [860, 840, 830, 850]), "n_images": 0},
               record("none", "none", "-", {}, [850, 250, 300, 210]),
               record("resize(scale=1.5)", "preprocess", "L0", {"scale": 1.5},
                      [840, 700, 760, 650]),
               record("known_model_projection", "adaptive", "L3", {"sigma": 1.0},
                      [845, 800, 790, 810])]
    table = build_table(records, roles, "accuracy", 10, names)
    root.mkdir(parents=True)
    table.to_parquet(root / "results.parquet")
    summary = summarize(table, "accuracy")
    (root / "summary.json").write_text(json.dumps(summary))
    (root / "run.json").write_text(json.dumps({"command": "neaudit audit data " + " ".join(
        f"--model {spec}" for spec in LONG_SPECS), "seed": 0, "versions": {"neaudit": "0.1.0"},
        "names": names}))
    return root


@needs_chromium
def test_report_over_four_long_python_specs_fits_the_page(tmp_path):
    """The report of four long ``python:`` specs, in a 1200 px window: no horizontal
    overflow, the display names and the plain verdict sentence on the page. The page is
    measured by a copy with a script appended (the report itself carries none, and its
    Content-Security-Policy forbids them)."""
    report = render_report(_long_spec_run(tmp_path / "run"))
    assert report.verdict == "FAIL"
    html = report.html.read_text()
    for name in ("resnet20", "resnet32", "resnet44", "resnet56"):
        assert name in html
    assert report.sentence.startswith("Do not release:") and report.sentence in html
    probe = tmp_path / "probe.html"  # without the report's CSP, which forbids scripts
    probe.write_text(re.sub(r"<meta http-equiv=\"Content-Security-Policy\"[^>]*>", "",
                            html).replace("</body>", (
        "<pre id='measure'><script>document.getElementById('measure').textContent = "
        "'width=' + document.documentElement.scrollWidth + ' viewport=' + "
        "window.innerWidth;</script></pre></body>")))
    dom = _chromium(probe, tmp_path / "profile", "--window-size=1200,900", "--dump-dom").stdout
    width, viewport = (int(v) for v in re.search(r"width=(\d+) viewport=(\d+)", dom).groups())
    assert width <= viewport, f"the page is {width} px wide in a {viewport} px window"
    ARTIFACTS.mkdir(exist_ok=True)
    for size in ("1200,3000", "800,3000"):
        shot = ARTIFACTS / f"report-long-specs-{size.split(',')[0]}px.png"
        _chromium(report.html, tmp_path / "profile", f"--window-size={size}",
                  f"--screenshot={shot}")
        assert shot.is_file() and shot.stat().st_size > 10_000


def test_reconstruction_quality_lists_the_release_then_rebuilding_attacks():
    clean = {m: 90 for m in MODELS}
    records = [{**_record("clean", "clean", "-", {}, clean), "n_images": 0},
               _record("none", "none", "-", {}, {AUTH: 89, "timm:vit_small_patch16_224": 10,
                                                   EVIL: 12}, psnr=20.0),
               _record("jpeg(quality=50)", "preprocess", "L0", {"quality": 50},
                       {AUTH: 85, "timm:vit_small_patch16_224": 15, EVIL: 14}, psnr=19.0),
               _record("median(kernel=3)", "purify", "L1", {"kernel": 3},
                       {AUTH: 80, "timm:vit_small_patch16_224": 30, EVIL: 45}, psnr=24.0),
               _record("subspace_prior", "reconstruct", "L3", {},
                       {AUTH: 88, "timm:vit_small_patch16_224": 80, EVIL: 20}, psnr=35.0)]
    rows = reconstruction_quality(build_table(records, MODELS, "accuracy", 10))
    assert [r["attack"] for r in rows] == ["none", "median(kernel=3)", "subspace_prior"]
    prior = rows[-1]
    assert prior["psnr"] == pytest.approx(35.0) and prior["psnr_low"] < 35.0 < prior["psnr_high"]
    assert prior["worst_leakage"] == pytest.approx(80 / 90)
    assert prior["worst_model"] == "timm:vit_small_patch16_224"


def test_a_large_audit_report_stays_small(tmp_path):
    models = {f"timm:model_{i}": "unauthorized" for i in range(19)} | {AUTH: "authorized"}
    records = [{"attack": "clean", "family": "clean", "threat": "-", "params": "{}",
                "models": {m: [90, 100] for m in models}}]
    for j in range(-1, 40):
        records.append({"attack": f"jpeg(quality={j})" if j >= 0 else "none",
                        "family": "preprocess" if j >= 0 else "none", "threat": "L0",
                        "params": json.dumps({"quality": j}),
                        "models": {m: [(j * 7 + k) % 90, 100] for k, m in enumerate(models)},
                        "psnr_sum": 3000.0, "psnr_sq_sum": 90100.0, "ssim_sum": 90.0,
                        "ssim_sq_sum": 81.0, "n_images": 100})
    table = build_table(records, models, "accuracy", 10)
    run = tmp_path / "big"
    run.mkdir()
    table.to_parquet(run / "results.parquet")
    (run / "summary.json").write_text(json.dumps(summarize(table, "accuracy")))
    html = render_report(run).html
    assert html.stat().st_size < 5_000_000
    text = html.read_text()
    assert all(m in text for m in models) and "jpeg(quality=39)" in text


def test_every_plot_panel_has_axis_labels_and_a_legend_for_several_series(monkeypatch):
    """The figures as matplotlib objects: every used panel labels both axes, the heatmap
    keeps whole labels, and more than one model on a panel comes with a legend."""
    from neaudit.reporting import plots

    monkeypatch.setattr(plots, "_encode", lambda fig: fig)
    records = [{**_record("clean", "clean", "-", {}, {m: 90 for m in MODELS}), "n_images": 0},
               _record("none", "none", "-", {}, {AUTH: 89, "timm:vit_small_patch16_224": 10,
                                                   EVIL: 12})]
    long_attack = "a_rather_long_attack_name_for_a_user_suite(strength=0.5)"
    for quality in (90, 50, 10):
        records.append(_record(f"jpeg(quality={quality})", "preprocess", "L0",
                               {"quality": quality}, {AUTH: 85, "timm:vit_small_patch16_224":
                                                      quality // 2, EVIL: 14}))
    records.append(_record(long_attack, "purify", "L1", {"strength": 0.5},
                           {AUTH: 80, "timm:vit_small_patch16_224": 50, EVIL: 20}))
    table = build_table(records, MODELS, "accuracy", 10)
    figures = {name: getattr(plots, name)(table) for name in
               ("leakage_heatmap", "strength_curves", "damage_scatter", "retention_bars")}
    for name, fig in figures.items():
        for ax in fig.axes:
            if not ax.axison or ax.get_label() == "<colorbar>":
                continue
            assert ax.get_xlabel() and ax.get_ylabel(), f"{name}: an axis without a label"
    heatmap = figures["leakage_heatmap"].axes[0]
    assert long_attack in [t.get_text() for t in heatmap.get_xticklabels()]
    assert EVIL in [t.get_text() for t in heatmap.get_yticklabels()]
    assert figures["damage_scatter"].axes[0].get_legend() is not None
    assert figures["strength_curves"].legends, "several models, one legend for the panels"
    assert figures["strength_curves"].axes[0].get_xlabel() == "quality"


def test_an_output_that_cannot_be_replaced_is_named_itself(tmp_path, capsys):
    """A folder where ``index.html`` goes: the one line names ``index.html``, not the
    temporary file it was written through, and no temporary file is left."""
    run = make_run(tmp_path / "run", leak=30)
    (run / "index.html").unlink(missing_ok=True)
    (run / "index.html").mkdir()
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{run / 'index.html'}: Is a directory" in err, err
    assert ".tmp" not in err and not list(run.glob(".index.html.*"))
    assert "re-running the same command writes it again from the stored results" in err
