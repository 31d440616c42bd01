"""Learning-based leakage: probe and fine-tuning curves, with SLC-AUC."""

import json
from dataclasses import replace

import numpy as np
import pytest

from neaudit import demo_zoo
from neaudit.attacks import ATTACKS, BATCH, DATASET, Attack
from neaudit.attacks.learning import features, split
from neaudit.attacks.registry import Param
from neaudit.auditing import audit
from neaudit.cli import main
from neaudit.demo import digits_test_set
from neaudit.errors import NeauditError
from neaudit.metrics import slc_auc
from neaudit.protection import protect
from neaudit.reporting import render_report
from neaudit.zoo import create_model


def test_split_is_stratified_and_seeded():
    labels = np.repeat(np.arange(3), 10)
    train, test = split(labels, seed=0)
    assert len(train) == len(test) == 15 and not set(train) & set(test)
    assert np.bincount(labels[train]).tolist() == [5, 5, 5]
    assert np.array_equal(split(labels, seed=0)[0], train)
    assert not np.array_equal(split(labels, seed=1)[0], train)


def test_slc_auc_matches_the_trapezoid_rule():
    # protected curve 0.5 → 0.9, clean 0.7 → 0.9, over ln(0.1) … ln(1)
    expected = (0.7 - 0.8) * np.log(10)
    assert slc_auc([0.1, 1.0], [0.5, 0.9], [0.7, 0.9]) == pytest.approx(expected)


def test_features_are_the_penultimate_activations():
    model = create_model("demo:resnet")
    images = next(digits_test_set(8).batches(8)).protected
    assert features(model, images).shape == (8, 128)


def test_probe_and_finetune_rows_in_the_results(tmp_path):
    protect(digits_test_set(120), demo_zoo.AUTHORIZED, tmp_path / "data", psnr=20,
            save_originals=True)
    suite = tmp_path / "learn.toml"
    suite.write_text('[[attack]]\nname = "linear_probe"\n\n[[attack]]\nname = "finetune"\n'
                     "fractions = [0.5, 1.0]\nepochs = 1\nmax_steps = 5\n")
    result = audit(tmp_path / "data", ["demo:small_cnn"], suite=suite, out=tmp_path / "run",
                   quiet=True)
    table = result.table.set_index(["model", "attack", "metric"]).value
    probe = table["demo:small_cnn", "linear_probe", "accuracy"]
    assert probe >= 0.8  # a trained model's features separate digits, NEs or not
    # learning leakage = the NE probe's gain over chance / the clean probe's gain over chance
    rows = result.table.set_index(["model", "attack", "metric"])
    leak = rows.loc[("demo:small_cnn", "linear_probe", "learning_leakage")]
    clean_probe = 0.1 + (probe - 0.1) / leak.value
    assert 0.8 <= clean_probe <= 1.0 and leak.ci_low <= leak.value <= leak.ci_high
    assert ("demo:small_cnn", "linear_probe", "leakage") not in table.index
    assert ("demo:small_cnn", "finetune(fraction=0.5)", "learning_leakage") in table.index
    slc = result.table[(result.table.metric == "slc_auc")]
    assert slc.model.tolist() == ["demo:small_cnn"] and np.isfinite(slc.value).all()
    assert result.summary["worst_learning_leakage"]["model"] == "demo:small_cnn"
    assert "learning" in result.summary["worst_by_threat"]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_learning_attacks_run_the_models_in_the_audits_precision(tmp_path, precision):
    """The probe's features and every fine-tuning forward run in the number format the run
    records, as the zoo's other forwards do (bf16 autocast on a CPU too)."""
    import torch

    protect(digits_test_set(40), demo_zoo.AUTHORIZED, tmp_path / "data", psnr=20,
            save_originals=True)
    suite = tmp_path / "learn.toml"
    suite.write_text('[[attack]]\nname = "linear_probe"\n\n[[attack]]\nname = "finetune"\n'
                     "fractions = [1.0]\nepochs = 1\nmax_steps = 2\n")
    formats: dict[str, set] = {"linear_probe": set(), "finetune": set()}

    def record(module, inputs, output):
        for name, attack in (("linear_probe", "linear_probe"), ("finetune", "finetune_accuracy")):
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and _in_frame(attack):
                formats[name].add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        audit(tmp_path / "data", ["demo:small_cnn"], suite=suite, out=tmp_path / "run",
              quiet=True, precision=precision)
    finally:
        hook.remove()
    expected = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    assert formats == {"linear_probe": {expected}, "finetune": {expected}}


def _in_frame(function: str) -> bool:
    """Is a function of that name on the call stack?"""
    import inspect

    return any(frame.function == function for frame in inspect.stack(context=0))


def test_learning_attacks_need_labels_and_originals(tmp_path):
    protect("builtin:samples", "timm:resnet18?num_classes=10&input_size=64", tmp_path / "d")
    suite = tmp_path / "s.toml"
    suite.write_text('[[attack]]\nname = "linear_probe"\n')
    with pytest.raises(NeauditError, match="need labels and the clean originals"):
        audit(tmp_path / "d", ["timm:resnet18?num_classes=10&input_size=64&drop_rate=0.1"],
              suite=suite, out=tmp_path / "r", quiet=True)


def test_learning_attacks_need_two_classes_to_split(tmp_path):
    """Each class splits into a training and a test half: with one class, or classes of one
    image, the probe has nothing to tell apart (it raised from scikit-learn mid-audit)."""
    images = digits_test_set(12)
    suite = tmp_path / "s.toml"
    suite.write_text('[[attack]]\nname = "linear_probe"\n')
    for name, labels in (("one class", [0] * 12), ("single images", [0, 1] + [2] * 10)):
        release = tmp_path / name
        one = replace(images, labels=np.array(labels), class_names=["a", "b", "c"])
        protect(one, demo_zoo.AUTHORIZED, release, psnr=20, save_originals=True)
        with pytest.raises(NeauditError, match=r"need two classes with two images or more"):
            audit(release, ["demo:small_cnn"], suite=suite, out=tmp_path / "r", quiet=True)
        assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def digits_release(tmp_path_factory):
    out = tmp_path_factory.mktemp("learn") / "release"
    protect(digits_test_set(60), demo_zoo.AUTHORIZED, out, psnr=20, save_originals=True)
    return out


@pytest.mark.parametrize("worst_kind", [BATCH, DATASET])
def test_an_audit_finishes_with_a_report_whatever_kind_of_attack_is_worst(
        worst_kind, digits_release, tmp_path, monkeypatch, capsys):
    """A planted dataset attack reports leakage 2.0 (worst) or 0.5 (beaten by the oracle's
    1.0); either way the run ends with a verdict and a report, not a usage error."""
    def planted(ctx, correct: int) -> dict:
        return {"models": {spec: [correct, 10] for spec in ctx.models},
                "baseline": {spec: [5, 10] for spec in ctx.models}, "start": 0.1}

    monkeypatch.setitem(ATTACKS, "planted_learning",
                        Attack("planted_learning", "test", "learning", planted,
                               {"correct": Param(5, 0, 10)}, kind=DATASET))
    suite = tmp_path / "suite.toml"
    suite.write_text('[[attack]]\nname = "oracle_originals"\n\n[[attack]]\n'
                     f'name = "planted_learning"\ncorrect = {10 if worst_kind == DATASET else 2}\n')
    out = tmp_path / "run"
    code = main(["audit", str(digits_release), "--model", "demo:small_cnn", "--suite",
                 str(suite), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code in (0, 1), captured.err
    summary = json.loads((out / "summary.json").read_text())
    worst = summary["worst_by_threat"]
    if worst_kind == DATASET:  # learning leakage (10/10 − 0.1) / (5/10 − 0.1) = 2.25
        assert summary["worst_learning_leakage"]["attack"] == "planted_learning(correct=10)"
        assert worst["learning"]["value"] == pytest.approx(2.25)
    else:  # the oracle reads as well as the originals: inference leakage 1.0
        assert summary["worst_leakage"]["value"] >= 1.0 > worst["learning"]["value"]
    assert (out / "index.html").is_file() and "verdict:" in captured.out
    samples = json.loads((out / "samples.json").read_text())
    assert samples["attack"] == "oracle_originals"  # the worst attack that has images


def test_learning_attacks_do_not_move_the_inference_headline(digits_release, tmp_path):
    """Fine-tuning models that already solve the task (the demo zoo) is learning leakage, a
    headline of its own: adding it leaves the worst inference leakage exactly as it was."""
    inference = '[[attack]]\nname = "jpeg"\nquality = 50\n\n[[attack]]\nname = "median"\n'
    learning = ('\n[[attack]]\nname = "linear_probe"\n\n[[attack]]\nname = "finetune"\n'
                "fractions = [0.5, 1.0]\nepochs = 1\nmax_steps = 4\n")
    summaries = []
    for name, text in (("plain", inference), ("with_learning", inference + learning)):
        suite = tmp_path / f"{name}.toml"
        suite.write_text(text)
        result = audit(digits_release, ["demo:small_cnn", "demo:resnet"], suite=suite,
                       out=tmp_path / name, quiet=True)
        summaries.append(result.summary)
    plain, learned = summaries
    assert learned["worst_leakage"] == plain["worst_leakage"]
    assert learned["worst_leakage"]["threat"] != "learning"
    assert "worst_learning_leakage" in learned and "worst_learning_leakage" not in plain
    report = render_report(tmp_path / "with_learning")
    names = {c.name for c in report.criteria}
    assert {"max_leakage", "max_learning_leakage"} <= names
