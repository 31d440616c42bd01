"""Validity flags: each is provoked by building its situation; a clean audit fires none."""

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from neaudit import demo_zoo
from neaudit.attacks import ATTACKS, Attack
from neaudit.auditing import audit
from neaudit.cli import main
from neaudit.data import load_dataset
from neaudit.demo import digits_test_set
from neaudit.errors import NeauditError
from neaudit.protection import protect
from neaudit.reporting import render_report
from neaudit.validity import exposed_key

OTHERS = ["demo:convmixer", "demo:small_cnn"]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flags") / "release"
    protect(digits_test_set(120), demo_zoo.AUTHORIZED, out, psnr=20,
            save_originals=True)
    return out


def _policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _flags(result) -> dict[str, list]:
    names: dict[str, list] = {}
    for flag in result.report.flags:
        names.setdefault(flag.name, []).append(flag)
    return names


def _audit(data, tmp_path, policy_text="min_authorized_retention = 0.5\n", zoo=OTHERS,
           suite="smoke", **kwargs) -> SimpleNamespace:
    """Audit, then render the report under the policy: what ``neaudit audit`` does."""
    result = audit(data, zoo, suite=suite, out=tmp_path / "run", quiet=True, **kwargs)
    report = render_report(result.out, _policy(tmp_path, policy_text))
    return SimpleNamespace(table=result.table, out=result.out, report=report)


def test_a_clean_audit_fires_no_flag(release, tmp_path):
    result = _audit(release, tmp_path)
    assert result.report.flags == [] and result.report.verdict == "PASS"
    assert "No evaluation-validity flag fired" in result.report.html.read_text()


def _constant_model(tmp_path: Path) -> str:
    """The spec of a model that predicts class 3 whatever it is shown."""
    factory = tmp_path / "const.py"
    factory.write_text("import torch, torch.nn as nn\n"
                       "class Const(nn.Module):\n"
                       "    def __init__(self):\n"
                       "        super().__init__()\n"
                       "        self.conv = nn.Conv2d(3, 4, 3)\n"
                       "    def forward(self, x):\n"
                       "        constant = torch.eye(10)[3].expand(len(x), 10)\n"
                       "        return self.conv(x).mean() * 0 + constant\n"
                       "def make():\n"
                       "    return Const()\n")
    return f"python:{factory}:make?input_size=32"


def test_degenerate_model_flag_and_fail_on(release, tmp_path):
    spec = _constant_model(tmp_path)
    result = _audit(release, tmp_path, "min_authorized_retention = 0.5\n"
                    'fail_on = ["degenerate_model"]\n', zoo=[*OTHERS, spec])
    flags = _flags(result)
    assert [f.message.split(" ")[0] for f in flags["degenerate_model"]] == ["make"]  # its name
    assert flags["degenerate_model"][0].failing and result.report.verdict == "FAIL"
    html = result.report.html.read_text()
    assert html.index("degenerate_model") < html.index('<div class="verdict')


def test_a_release_of_one_class_does_not_make_good_models_degenerate(tmp_path):
    """Trained models predicting the one class a release holds are right: the flag judges
    their spread against the labels' (the constant model above still fires on ten classes)."""
    digits = digits_test_set(540)
    threes = digits.labels == 3
    one_class = replace(digits, names=[n for n, keep in zip(digits.names, threes, strict=True)
                                       if keep],
                        protected=digits.protected[threes], labels=digits.labels[threes])
    protect(one_class, demo_zoo.AUTHORIZED, tmp_path / "threes", psnr=20, save_originals=True)
    result = _audit(tmp_path / "threes", tmp_path, 'fail_on = ["degenerate_model"]\n'
                    "min_authorized_retention = 0.5\n", score="accuracy")
    predictions = json.loads((result.out / "summary.json").read_text())["diagnostics"]
    assert max(p["top_share"] for p in predictions["clean_predictions"].values()) >= 0.8
    assert predictions["labels"] == {"distinct": 1, "top_share": 1.0}
    assert "degenerate_model" not in _flags(result)


def test_without_labels_the_zoo_agreeing_on_one_class_is_not_degeneracy(tmp_path):
    """An unlabelled release of one class: the trained models all give most clean
    predictions to that class, which stands in for the labels' spread. On an unlabelled
    release of ten classes a constant model still fires."""
    digits = digits_test_set(540)
    threes = digits.labels == 3
    unlabelled = replace(digits, names=[n for n, keep in zip(digits.names, threes, strict=True)
                                        if keep],
                         protected=digits.protected[threes], labels=None, class_names=None)
    protect(unlabelled, demo_zoo.AUTHORIZED, tmp_path / "threes", psnr=20, save_originals=True)
    result = _audit(tmp_path / "threes", tmp_path / "one", 'fail_on = ["degenerate_model"]\n'
                    "min_authorized_retention = 0.5\n")
    predictions = json.loads((result.out / "summary.json").read_text())["diagnostics"]
    assert predictions["labels"] is None
    shares = [p["top_share"] for p in predictions["clean_predictions"].values()]
    assert min(shares) >= 0.8, "every model sees mostly one class"
    assert len({p["top_class"] for p in predictions["clean_predictions"].values()}) == 1
    assert "degenerate_model" not in _flags(result)

    mixed = replace(digits_test_set(120), labels=None, class_names=None)
    protect(mixed, demo_zoo.AUTHORIZED, tmp_path / "mixed", psnr=20, save_originals=True)
    result = _audit(tmp_path / "mixed", tmp_path / "ten", zoo=[*OTHERS, _constant_model(tmp_path)])
    assert [f.message.split(" ")[0] for f in _flags(result)["degenerate_model"]] == ["make"]


def test_wrong_preprocessing_flag_on_a_shuffled_class_order(release, tmp_path):
    dataset = load_dataset(release)
    dataset.labels = (dataset.labels + 3) % 10  # a class-order mismatch
    result = _audit(dataset, tmp_path)
    flagged = {f.message.split(" ")[0] for f in _flags(result)["wrong_preprocessing"]}
    assert flagged == set(OTHERS)
    assert "authorized_failing" in _flags(result)


def test_authorized_failing_when_the_protection_breaks_utility(tmp_path):
    protect(digits_test_set(120), demo_zoo.AUTHORIZED, tmp_path / "weak",
            method="reference", psnr=30, save_originals=True)
    result = _audit(tmp_path / "weak", tmp_path)
    assert "authorized_failing" in _flags(result)
    # the published formula's nominal 30 dB is nowhere near what is released
    assert "nominal_vs_measured" in _flags(result)


def test_nominal_vs_measured_flag(release, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(release, copy)
    sidecar = json.loads((copy / "neaudit.json").read_text())
    sidecar["params"]["psnr"] = 35.0
    (copy / "neaudit.json").write_text(json.dumps(sidecar))
    result = _audit(copy, tmp_path)
    message = _flags(result)["nominal_vs_measured"][0].message
    table = result.table
    measured = table[(table.metric == "psnr") & (table.attack == "none")].value.iloc[0]
    assert "recorded PSNR in neaudit.json is 35.0 dB" in message
    assert f"({measured - 35:+.1f} dB)" in message


def test_exposed_key_flag_fails_a_release_whose_sidecar_gives_the_key_away(release, tmp_path):
    """A recorded key lets anyone regenerate and subtract the noise (tests/test_protect.py
    shows the alignment): flagged, and failing under the default policy. So is a sidecar from
    before protect drew secret keys, whose key was the recorded seed."""
    copy = tmp_path / "copy"
    shutil.copytree(release, copy)
    sidecar = json.loads((copy / "neaudit.json").read_text())
    assert exposed_key(sidecar) is None  # drawn at random, recorded nowhere
    sidecar["params"]["key"] = 1234
    (copy / "neaudit.json").write_text(json.dumps(sidecar))
    result = _audit(copy, tmp_path, 'min_authorized_retention = 0.5\nfail_on = ["exposed_key"]\n')
    flag = _flags(result)["exposed_key"][0]
    assert "records the noise key" in flag.message and flag.failing
    assert result.report.verdict == "FAIL"  # the same release passes with its key kept secret
    assert any(f.name == "exposed_key" and f.failing for f in render_report(result.out).flags)
    legacy = {k: v for k, v in sidecar["params"].items() if k != "key_source"} | {"key": None}
    assert exposed_key({"params": legacy}) == "seed"
    # drawn at random but by the generator that kept 32 bits of it: searchable, so flagged
    searchable = {k: v for k, v in sidecar["params"].items() if k != "noise_generator"}
    assert exposed_key({"params": searchable | {"key": None}}) == "searchable"
    summary = json.loads((result.out / "summary.json").read_text())
    summary["diagnostics"]["exposed_key"] = "searchable"
    (result.out / "summary.json").write_text(json.dumps(summary))
    report = render_report(result.out)  # the packaged default policy
    [flag] = [f for f in report.flags if f.name == "exposed_key"]
    assert "only 32 bits of its key" in flag.message and "Re-protect" in flag.advice
    assert flag.failing and report.verdict == "FAIL"
    # a key given by hand, short enough to try every one: flagged; a long one is not
    given = sidecar["params"] | {"key": None, "key_source": "given"}
    assert exposed_key({"params": given | {"key_bits": 40}}) == "short"
    assert exposed_key({"params": given | {"key_bits": 100}}) is None


def test_lossy_and_altered_input_flags(release, tmp_path):
    jpeg = tmp_path / "jpeg"
    shutil.copytree(release, jpeg)
    for png in sorted((jpeg / "protected").rglob("*.png")):
        Image.open(png).save(png.with_suffix(".jpg"), quality=90)
        png.unlink()
    for png in sorted((jpeg / "original").rglob("*.png")):
        png.rename(png.with_suffix(".jpg"))
    result = _audit(jpeg, tmp_path / "a")
    lossy = _flags(result)["lossy_or_altered_input"]
    assert any("lossy format" in f.message for f in lossy)

    altered = tmp_path / "altered"
    shutil.copytree(release, altered)
    victim = sorted((altered / "protected").rglob("*.png"))[5]
    pixels = np.array(Image.open(victim))
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(victim)
    result = _audit(altered, tmp_path / "b")
    messages = [f.message for f in _flags(result)["lossy_or_altered_input"]]
    assert any("1 protected file(s) differ" in m and victim.name in m for m in messages)
    assert not any("not in the hashes" in m for m in messages)

    # a clean image slipped into the release after protection
    added = tmp_path / "added"
    shutil.copytree(release, added)
    clean = sorted((added / "original").rglob("*.png"))[3]
    for folder in ("protected", "original"):
        shutil.copy(clean, added / folder / clean.parent.name / "zz-added.png")
    result = _audit(added, tmp_path / "c")
    messages = [f.message for f in _flags(result)["lossy_or_altered_input"]]
    assert any("1 protected file(s) are not in the hashes" in m and "zz-added.png" in m
               for m in messages)


def test_trivial_break_and_too_few_samples(release, tmp_path):
    result = _audit(release, tmp_path, "max_leakage = 0.5\nmin_authorized_retention = 0.98\n")
    flags = _flags(result)
    assert "preprocessing step" in flags["trivial_break"][0].message
    assert any("min_authorized_retention" in f.message for f in flags["too_few_samples"])


def test_nondeterminism_flag(release, tmp_path, monkeypatch):
    def unseeded_noise(images, ctx):
        """Draws from the global RNG: a bug the flag must catch."""
        return images + 0.2 * torch.rand(images.shape)

    monkeypatch.setitem(ATTACKS, "unseeded_noise",
                        Attack("unseeded_noise", "test", "L0", unseeded_noise, {}))

    suite = tmp_path / "s.toml"
    suite.write_text('[[attack]]\nname = "unseeded_noise"\n')
    result = _audit(release, tmp_path, suite=suite)
    assert "unseeded_noise" in _flags(result)["nondeterminism"][0].message


def test_missing_threat_levels_flag(release, tmp_path):
    result = _audit(release, tmp_path, 'min_authorized_retention = 0.5\n'
                    'levels = ["L0", "L1", "L2", "L3"]\n')
    message = _flags(result)["missing_threat_levels"][0].message
    assert "L2, L3" in message


def test_criteria_no_figure_measures_are_flagged_not_dropped(release, tmp_path):
    """The smoke suite has no learning attack and no adaptive one: thresholds on those are
    named as not covered by the verdict (they used to vanish from it)."""
    result = _audit(release, tmp_path, "min_authorized_retention = 0.5\n"
                    'max_learning_leakage = 0.5\nfail_on = ["criteria_not_evaluated"]\n'
                    "[family.adaptive]\nmax_leakage = 0.5\n")
    flag = _flags(result)["criteria_not_evaluated"][0]
    assert "max_learning_leakage (no learning attack ran)" in flag.message
    assert "max_leakage [adaptive] (no adaptive attack ran)" in flag.message
    assert "min_authorized_retention" not in flag.message  # evaluated
    assert flag.failing and result.report.verdict == "FAIL"


def test_device_decoding_needs_cuda_and_is_flagged(release, tmp_path):
    with pytest.raises(NeauditError, match="needs a CUDA device"):
        _audit(release, tmp_path, device="cpu", decode="device")
    with pytest.raises(NeauditError, match="unknown --decode"):
        _audit(release, tmp_path, device="cpu", decode="gpu")
    result = _audit(release, tmp_path, device="cpu")
    assert "device_decoding" not in _flags(result)
    assert json.loads((result.out / "run.json").read_text())["config"]["decode"] == "cpu"
    # what an audit with --decode device on JPEG inputs records (run on a GPU in test_gpu.py)
    summary_path = result.out / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["diagnostics"]["device_decoded_jpegs"] = 7
    summary_path.write_text(json.dumps(summary))
    report = render_report(result.out, _policy(
        tmp_path, 'min_authorized_retention = 0.5\nfail_on = ["device_decoding"]\n'))
    flag = next(f for f in report.flags if f.name == "device_decoding")
    assert flag.message.startswith("7 JPEG input file(s) were decoded with nvJPEG")
    assert flag.failing and report.verdict == "FAIL"


def test_random_init_models_are_flagged_from_their_spec(release, tmp_path):
    from safetensors.torch import save_file

    from neaudit.zoo import create_model

    untrained = "timm:resnet18?num_classes=10&input_size=32"
    weights = tmp_path / "resnet18.safetensors"
    save_file(create_model(untrained).net.state_dict(), str(weights))
    loaded = f"{untrained}&weights={weights}"  # the same numbers, but given as weights
    result = _audit(release, tmp_path, zoo=[OTHERS[0], untrained, loaded])
    flagged = [f.message.split(" ")[0] for f in _flags(result)["random_init_model"]]
    assert flagged == ["resnet18"]  # demo models ship trained weights; loaded ones are given
    assert "random-init weights" in result.report.html.read_text()


def test_models_are_shown_by_display_names(release, tmp_path, capsys):
    """Terminal, table and report read short names; the full spec is in the ``spec`` column
    and in the provenance."""
    resnet = "timm:resnet18?num_classes=10&input_size=32"
    code = main(["audit", str(release), "--model", "small=demo:small_cnn", "--model", resnet,
                 "--model", f"{resnet}&drop_rate=0.1", "--suite", "smoke", "--out",
                 str(tmp_path / "run"), "--quiet", "--policy",
                 str(_policy(tmp_path, "min_authorized_retention = 0.5\n"))])
    printed = capsys.readouterr().out
    assert code in (0, 1)
    table = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert set(table.model) == {"demo:patch_cnn", "small", "resnet18", "resnet18-2"}
    assert f"{resnet}&drop_rate=0.1" in set(table.spec)
    assert "resnet18-2" in printed and "num_classes=10" not in printed
    html = (tmp_path / "run" / "index.html").read_text()
    assert "resnet18-2" in html and "drop_rate=0.1" in html  # the spec, once, in provenance


def test_a_zoo_file_names_the_models_and_the_authorized_one(release, tmp_path):
    """Long specs live in one reviewed file; its names are what the report reads."""
    zoo = tmp_path / "zoo.toml"
    zoo.write_text('[[model]]\nname = "guardian"\nspec = "demo:patch_cnn"\nrole = "authorized"\n'
                   '\n[[model]]\nname = "mixer"\nspec = "demo:mixer"\n'
                   '\n[[model]]\nspec = "demo:small_cnn"\n')
    code = main(["audit", str(release), "--zoo", str(zoo), "--suite", "smoke", "--out",
                 str(tmp_path / "run"), "--quiet", "--policy",
                 str(_policy(tmp_path, "min_authorized_retention = 0.5\n"))])
    assert code in (0, 1)
    table = pd.read_parquet(tmp_path / "run" / "results.parquet")
    roles = dict(zip(table.model, table.role, strict=False))
    assert roles == {"guardian": "authorized", "mixer": "unauthorized",
                     "demo:small_cnn": "unauthorized"}
    bad = tmp_path / "bad.toml"
    bad.write_text('[[model]]\nname = "x"\nspek = "demo:vit"\n')
    assert main(["audit", str(release), "--zoo", str(bad), "--out", str(tmp_path / "r")]) == 2
