"""Property-based checks (hypothesis) over what users type: suite TOMLs, model spec options
and numeric CLI options. Whatever the input: never a traceback or an internal error, never a
NaN or infinite figure behind exit 0, never a changed input file."""

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neaudit.attacks import ATTACKS, BATCH, AttackContext, load_suite
from neaudit.cli import main
from neaudit.errors import NeauditError
from neaudit.imageio import sha256_file, write_png
from neaudit.zoo import check_model, create_model

SETTINGS = settings(deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])
"""Derandomized: the same examples on every run, so CI is repeatable."""
NEEDS_A_ZOO_OR_TRAINING = {"surrogate_projection", "known_model_projection", "learned_denoiser",
                           "simulate_invert", "simulate_invert_known", "subspace_prior",
                           "diffusion_purify"}
ATTACK_NAMES = sorted(n for n, a in ATTACKS.items() if a.kind == BATCH
                      and a.family != "test" and n not in NEEDS_A_ZOO_OR_TRAINING)

numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True))
values = st.one_of(numbers, st.booleans(), st.text(max_size=4), st.lists(numbers, max_size=3))


def _run(argv: list[str]) -> int:
    """``main``'s exit code, argparse's own refusals included."""
    try:
        return main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def _in_range(param) -> st.SearchStrategy:
    """Values the schema accepts (and its edges), so that attacks really run."""
    if param.path:
        return st.just("")
    if param.choices is not None:
        return st.sampled_from(param.choices)
    if isinstance(param.default, int):
        return st.integers(int(param.low), int(param.high))
    scalar = st.floats(param.low, param.high)
    return st.lists(scalar, min_size=1, max_size=3) if isinstance(param.default, list) else scalar


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(
            value) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@settings(SETTINGS, max_examples=60)
@given(data=st.data())
def test_any_suite_is_refused_cleanly_or_gives_finite_images(data, images, tmp_path):
    name = data.draw(st.sampled_from(ATTACK_NAMES))
    schema = ATTACKS[name].params
    params = {}
    for key in data.draw(st.lists(st.sampled_from([*schema, "bogus"]), max_size=3,
                                  unique=True)):
        near = _in_range(schema[key]) if key in schema else values
        params[key] = data.draw(st.one_of(values, near))
    suite = tmp_path / "suite.toml"
    suite.write_text(f'[[attack]]\nname = "{name}"\n'
                     + "".join(f"{k} = {_toml(v)}\n" for k, v in params.items()))
    try:
        entries = load_suite(suite)
    except NeauditError:
        return
    for entry in entries:
        ctx = AttackContext(generator=torch.Generator().manual_seed(0), reference=images)
        try:
            out = ATTACKS[entry.attack](images, ctx, **dict(entry.params))
        except NeauditError:  # e.g. a patch grid larger than these 32×32 images
            continue
        assert out.shape == images.shape and torch.isfinite(out).all(), entry.label
        assert float(out.min()) >= 0 and float(out.max()) <= 1


FACTORY = """
import torch.nn as nn

def make(**kwargs):
    return nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))
"""
option_values = st.one_of(st.text(max_size=6), numbers.map(str),
                          st.lists(numbers.map(str), min_size=1, max_size=4).map(",".join))


@settings(SETTINGS, max_examples=40)
@given(options=st.dictionaries(
    st.sampled_from(["input_size", "mean", "std", "weights", "%%%", ""]), option_values,
    max_size=3))
def test_any_spec_options_build_a_working_model_or_are_refused(options, images, tmp_path):
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY)
    query = "&".join(f"{k}={v}" for k, v in options.items())
    try:
        model = create_model(f"python:{factory}:make?{query}")
        check_model(model, images)
    except NeauditError:
        return
    assert torch.isfinite(model(images)).all()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("numeric") / "images"
    rng = np.random.default_rng(1)
    for i in range(6):
        write_png(root / f"{i}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return root


@settings(SETTINGS, max_examples=25)
@given(psnr=numbers, rank=st.integers(-5, 60), batch=st.integers(-2, 8),
       fraction=st.floats(allow_nan=True, allow_infinity=True))
def test_numeric_protect_options_never_crash_or_write_nan(psnr, rank, batch, fraction, folder,
                                                         capsys):
    before = {p: sha256_file(p) for p in folder.rglob("*.png")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        code = _run(["protect", str(folder), "--authorized", "demo:patch_cnn", "--out", str(out),
                     "--psnr", str(psnr), "--rank", str(rank), "--batch-size", str(batch),
                     "--patch-fraction", str(fraction), "--quiet"])
        err = capsys.readouterr().err
        assert code in (0, 2) and "Traceback" not in err, err
        if code == 0:
            fidelity = json.loads((out / "neaudit.json").read_text())["fidelity"]
            assert all(math.isfinite(v) for k, v in fidelity.items() if k != "min_gain")
            assert abs(fidelity["psnr"] - psnr) < 1.0
    assert {p: sha256_file(p) for p in folder.rglob("*.png")} == before


@settings(SETTINGS, max_examples=6)
@given(batch=st.integers(-2, 40), max_images=st.integers(-3, 10), seed=st.integers(0, 2**31))
def test_numeric_audit_options_never_exit_0_with_a_nan_figure(batch, max_images, seed, release,
                                                             capsys):
    with tempfile.TemporaryDirectory() as tmp:
        code = _run(["audit", str(release), "--model", "demo:small_cnn", "--suite", "smoke",
                     "--out", str(Path(tmp) / "run"), "--batch-size", str(batch),
                     "--max-images", str(max_images), "--seed", str(seed), "--quiet"])
        err = capsys.readouterr().err
        assert code in (0, 1, 2) and "Traceback" not in err, err
        if code in (0, 1):
            table = pd.read_parquet(Path(tmp) / "run" / "results.parquet")
            scored = table[table.metric.isin(["accuracy", "leakage", "utility_retention"])]
            assert np.isfinite(scored.value).all()


@pytest.fixture(scope="module")
def release(tmp_path_factory, folder) -> Path:
    from neaudit.protection import protect

    out = tmp_path_factory.mktemp("release") / "release"
    protect(folder, "demo:patch_cnn", out, psnr=20, save_originals=True)
    return out
