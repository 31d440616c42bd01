"""The embedded default: shipped demo weights and ``neaudit demo --quick`` end to end."""

import pandas as pd
import pytest
import torch

from neaudit import demo_zoo
from neaudit.attacks import load_suite
from neaudit.cli import main
from neaudit.stem import first_layer
from neaudit.zoo import create_model


@pytest.mark.parametrize("name", list(demo_zoo.ARCHITECTURES))
def test_shipped_weights_reach_95_percent(name):
    model = create_model(f"demo:{name}")
    accuracy = demo_zoo.evaluate(model.net)
    assert accuracy >= 0.95, (name, accuracy)


def test_authorized_demo_model_has_a_real_null_space():
    layer = first_layer(create_model(demo_zoo.AUTHORIZED))
    m, d = layer.unfolded.shape
    assert (m, d) == (24, 48) and not layer.overlapping


@pytest.mark.slow  # 8 s of training; `neaudit zoo train-demo` is rarely run
def test_retraining_reproduces_the_shipped_weights(tmp_path):
    """``neaudit zoo train-demo`` (seed 0) gives back the shipped weights, bit for bit."""
    net, accuracy = demo_zoo.train("patch_cnn", seed=0, log=lambda _: None)
    shipped = create_model("demo:patch_cnn").net.state_dict()
    retrained = net.state_dict()
    assert retrained.keys() == shipped.keys()
    for name, tensor in shipped.items():
        assert torch.equal(retrained[name], tensor), name
    assert accuracy == demo_zoo.evaluate(create_model("demo:patch_cnn").net)


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Open the report" in printed
    run = out / "audit"
    assert (run / "index.html").is_file() and (run / "samples.png").is_file()
    from PIL import Image

    width, height = Image.open(run / "samples.png").size  # 32-px digits shown at 96 px
    assert width >= 4 * 96 and height >= 96
    # the report embeds the grid: it is written compressed (zoomed pixels compress well)
    assert (run / "samples.png").stat().st_size < width * height * 3 / 4
    table = pd.read_parquet(run / "results.parquet")
    retention = table[(table.role == "authorized") & (table.attack == "none")
                      & (table.metric == "utility_retention")].value.iloc[0]
    assert retention >= 0.95
    models = {f"demo:{n}" for n in demo_zoo.ARCHITECTURES}
    attacks = {"clean", "none"} | {e.label for e in load_suite("smoke")}
    pairs = set(zip(table.model, table.attack, strict=True))
    assert {(m, a) for m in models for a in attacks} <= pairs
