"""Learning-based leakage: probe and fine-tuning curves, with SLC-AUC."""

import numpy as np
import pytest

from neaudit import demo_zoo
from neaudit.demo import digits_test_set
from neaudit.engine import audit
from neaudit.errors import NeauditError
from neaudit.learning import features, slc_auc, split
from neaudit.protection import protect
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
    protect(digits_test_set(120), demo_zoo.AUTHORIZED, tmp_path / "data", psnr_target=20,
            save_originals=True)
    suite = tmp_path / "learn.toml"
    suite.write_text('[[attack]]\nname = "linear_probe"\n\n[[attack]]\nname = "finetune"\n'
                     "fractions = [0.5, 1.0]\nepochs = 1\nmax_steps = 5\n")
    result = audit(tmp_path / "data", ["demo:small_cnn"], suite=suite, out=tmp_path / "run",
                   quiet=True)
    table = result.table.set_index(["model", "attack", "metric"]).value
    probe = table["demo:small_cnn", "linear_probe", "accuracy"]
    assert probe >= 0.8  # a trained model's features separate digits, NEs or not
    assert 0 <= table["demo:small_cnn", "linear_probe", "leakage"] <= 1.5
    assert ("demo:small_cnn", "finetune(fraction=0.5)", "leakage") in table.index
    assert np.isfinite(table["demo:small_cnn", "finetune", "slc_auc"])
    assert "learning" in result.summary["worst_by_threat"]


def test_learning_attacks_need_labels_and_originals(tmp_path):
    protect("builtin:samples", "timm:resnet18?num_classes=10&input_size=64", tmp_path / "d")
    suite = tmp_path / "s.toml"
    suite.write_text('[[attack]]\nname = "linear_probe"\n')
    with pytest.raises(NeauditError, match="need labels and the clean originals"):
        audit(tmp_path / "d", ["timm:resnet18?num_classes=10&input_size=64&drop_rate=0.1"],
              suite=suite, out=tmp_path / "r", quiet=True)
