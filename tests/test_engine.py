"""End-to-end audits on NEs made by ``neaudit protect`` for a random-init authorized model."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from neaudit.attacks import load_suite
from neaudit.auditing import audit
from neaudit.cli import main
from neaudit.data import load_dataset
from neaudit.errors import NeauditError
from neaudit.metrics import psnr, ssim
from neaudit.plan import plan
from neaudit.protection import protect
from neaudit.store import weights_hash
from neaudit.zoo import create_model

OTHER = "timm:convnext_atto?num_classes=10&input_size=64"


@pytest.fixture(scope="module")
def protected(tmp_path_factory, vit_spec) -> Path:
    out = tmp_path_factory.mktemp("ne") / "release"
    protect("builtin:samples", vit_spec, out, save_originals=True)
    return out


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    path = tmp_path / "suite.toml"
    path.write_text('[[attack]]\nname = "oracle_originals"\n\n[[attack]]\nname = "jpeg"\n'
                    'quality = 75\n\n[[attack]]\nname = "gaussian_noise"\nsigma = 0.02\n')
    return path


def _value(table: pd.DataFrame, model: str, attack: str, metric: str) -> float:
    rows = table[(table.spec == model) & (table.attack == attack) & (table.metric == metric)]
    assert len(rows) == 1, (model, attack, metric)
    return float(rows.value.iloc[0])


def test_audit_measures_retention_leakage_and_plumbing(protected, suite, tmp_path, vit_spec):
    result = audit(protected, [OTHER], suite=suite, out=tmp_path / "run", score="agreement",
                   batch_size=16, quiet=True)
    table = result.table
    assert set(table.role) == {"authorized", "unauthorized"}
    authorized = _value(table, vit_spec, "none", "agreement")
    assert authorized >= 0.99  # authorized from neaudit.json
    # the unauthorized model is input-sensitive: the NEs move it more than the authorized one
    assert _value(table, OTHER, "none", "agreement") < authorized
    # an attack that returns the originals must give leakage exactly 1
    assert _value(table, OTHER, "oracle_originals", "leakage") == 1.0
    assert _value(table, OTHER, "oracle_originals", "psnr") == pytest.approx(100.0)
    none_psnr = _value(table, OTHER, "none", "psnr")
    assert abs(none_psnr - 30) < 0.2
    # the image figures, summed per shard on the device, are the means over every image
    release = next(load_dataset(protected).batches(64))
    assert none_psnr == pytest.approx(
        float(psnr(release.protected, release.original).mean()), abs=1e-4)
    assert _value(table, OTHER, "none", "ssim") == pytest.approx(
        float(ssim(release.protected, release.original).mean()), abs=1e-6)
    rows = table[table.metric == "agreement"]
    assert (rows.ci_low <= rows.value).all() and (rows.value <= rows.ci_high).all()
    assert set(rows.n) == {32}
    for name in ("results.parquet", "results.csv", "summary.json", "run.json"):
        assert (result.out / name).is_file()
    assert pd.read_parquet(result.out / "results.parquet").equals(table)
    manifest = json.loads((result.out / "run.json").read_text())
    assert set(manifest["phases"]) == {"setup", "tasks", "finish"}
    assert sum(manifest["phases"].values()) == pytest.approx(manifest["seconds"], abs=0.5)
    # the weights hashed in a thread while the models moved are the weights as built
    classes = load_dataset(protected).class_names
    assert manifest["weights"] == {spec: weights_hash(create_model(spec, classes).state_dict())
                                   for spec in (vit_spec, OTHER)}
    summary = result.summary
    assert summary["models"]["convnext_atto"]["worst_attack"] == "oracle_originals"
    assert set(table.model) == {"vit_small_patch16_224", "convnext_atto"}  # display names
    assert summary["worst_leakage"]["value"] == 1.0


def test_resume_skips_finished_tasks_and_gives_the_same_table(protected, suite, tmp_path):
    kwargs = dict(suite=suite, out=tmp_path / "run", score="agreement", batch_size=16,
                  quiet=True)
    total = len(plan(load_dataset(protected), load_suite(suite), 16))
    first = audit(protected, [OTHER], stop_after=3, **kwargs)
    assert first.computed_tasks == 3 and not first.summary["complete"]
    second = audit(protected, [OTHER], **kwargs)
    assert second.computed_tasks == total - 3 and second.skipped_tasks == 3
    assert second.summary["complete"]
    fresh = audit(protected, [OTHER], **{**kwargs, "out": tmp_path / "fresh"})
    pd.testing.assert_frame_equal(second.table, fresh.table)
    third = audit(protected, [OTHER], **kwargs)
    assert third.computed_tasks == 0


def test_same_seed_same_numbers_other_seed_other_noise(protected, suite, tmp_path):
    kwargs = dict(suite=suite, score="agreement", batch_size=32, quiet=True)
    a = audit(protected, [OTHER], out=tmp_path / "a", seed=1, **kwargs).table
    b = audit(protected, [OTHER], out=tmp_path / "b", seed=1, **kwargs).table
    c = audit(protected, [OTHER], out=tmp_path / "c", seed=2, **kwargs).table
    pd.testing.assert_frame_equal(a, b)
    noise = (a.attack == "gaussian_noise(sigma=0.02)") & (a.metric == "psnr")
    assert a[noise].value.iloc[0] != c[noise].value.iloc[0]


def test_bad_suite_fails_before_any_work(protected, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[attack]]\nname = "jpeg"\nstrength = 3\n')
    with pytest.raises(NeauditError, match="Valid parameters: quality"):
        audit(protected, [OTHER], suite=bad, out=tmp_path / "never", quiet=True)
    assert not (tmp_path / "never").exists()


def test_a_folder_holding_another_audit_is_refused(protected, suite, tmp_path):
    audit(protected, [OTHER], suite=suite, out=tmp_path / "run", score="agreement",
          quiet=True, max_images=8)
    with pytest.raises(NeauditError, match="different audit"):
        audit(protected, [OTHER], suite=suite, out=tmp_path / "run", score="agreement",
              quiet=True, max_images=8, seed=5)


def test_cli_audit_exit_code_follows_the_verdict(protected, tmp_path, capsys):
    args = ["audit", str(protected), "--model", OTHER, "--suite", "smoke", "--out",
            str(tmp_path / "cli"), "--score", "agreement", "--quiet", "--max-images", "8"]
    lenient = tmp_path / "lenient.toml"
    lenient.write_text("min_authorized_retention = 0.5\nmax_leakage = 1.0\n")
    assert main([*args, "--policy", str(lenient)]) == 0
    out = capsys.readouterr().out
    assert "worst-case leakage" in out and "suppression ratio" in out and "verdict: PASS" in out
    # the default policy asks for a twofold suppression, which random-init models do not give
    assert main(args) == 1
    assert "verdict: FAIL" in capsys.readouterr().out
    assert main(["audit", str(protected), "--model", OTHER, "--suite", "nope",
                 "--out", str(tmp_path / "x")]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err


def test_prefetching_in_worker_processes_gives_the_same_table(protected, suite, tmp_path):
    common = dict(suite=suite, score="agreement", batch_size=8, quiet=True)
    plain = audit(protected, [OTHER], out=tmp_path / "plain", **common).table
    ahead = audit(protected, [OTHER], out=tmp_path / "ahead", loader_workers=2, **common).table
    pd.testing.assert_frame_equal(plain, ahead)


def test_compiled_forwards_are_part_of_the_run_identity(protected, suite, tmp_path):
    """A run started with --compile-models is not resumed with eager forwards (their last
    bits may differ), and the flag reaches the Python twin."""
    from neaudit.cli import build_parser

    args = build_parser().parse_args(["audit", str(protected), "--model", OTHER,
                                      "--compile-models"])
    assert args.compile_models
    kwargs = dict(suite=suite, out=tmp_path / "run", score="agreement", quiet=True,
                  max_images=8)
    started = audit(protected, [OTHER], compile_models=True, stop_after=0, **kwargs)
    assert started.computed_tasks == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["compile_models"]
    with pytest.raises(NeauditError, match="different audit"):
        audit(protected, [OTHER], **kwargs)


def test_forwards_run_in_the_recorded_precision_which_is_part_of_the_run_identity(
        protected, suite, tmp_path):
    """--precision reaches the Python twin; the zoo's forwards run in the format the run
    records (bf16 autocast on a CPU too); a run is not resumed in another format."""
    from neaudit import device
    from neaudit.cli import build_parser

    args = build_parser().parse_args(["audit", str(protected), "--model", OTHER,
                                      "--precision", "bf16"])
    assert args.precision == "bf16"
    formats: dict[str, set] = {}
    depths: set[int] = set()

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            formats[current].add(output.dtype)
            depths.add(device._heap_jobs)  # inside device.retained_heap, as every job runs

    kwargs = dict(suite=suite, out=tmp_path / "run", score="agreement", quiet=True,
                  max_images=8)
    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        for current in ("bf16", "fp32"):
            formats[current] = set()
            audit(protected, [OTHER], precision=current, **{**kwargs, "out": tmp_path / current})
    finally:
        hook.remove()
    # every layer of every forward, the model checks included (this suite has no attack
    # that runs a model)
    assert formats == {"bf16": {torch.bfloat16}, "fp32": {torch.float32}}
    assert depths == {1} and device._heap_jobs == 0
    for current in ("bf16", "fp32"):
        run = json.loads((tmp_path / current / "run.json").read_text())
        assert run["config"]["precision"] == current
    with pytest.raises(NeauditError, match="settings that differ: precision"):
        audit(protected, [OTHER], precision="fp32", **{**kwargs, "out": tmp_path / "bf16"})
    with pytest.raises(NeauditError, match="--precision fp16: .* Fix: use auto, bf16, fp32"):
        audit(protected, [OTHER], precision="fp16", **kwargs)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(monkeypatch,
                                                                           native):
    from neaudit import device

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    cpu = torch.device("cpu")
    assert device.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert device.resolve_precision("fp32", cpu) == "fp32"
    assert device.resolve_precision("bf16", cpu) == "bf16"  # asked for: emulated if need be


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_forwards_give_the_eager_table(protected, suite, tmp_path, precision):
    """torch.compile'd forwards (minutes of compiling on a CPU) predict what eager ones do:
    exactly in fp32; in bf16, whose casts the compiler fuses and rounds its own way, a
    prediction of the 16 may move, and nothing else."""
    kwargs = dict(suite=suite, score="agreement", batch_size=16, quiet=True, max_images=16,
                  precision=precision)
    eager = audit(protected, [OTHER], out=tmp_path / "eager", **kwargs).table
    compiled = audit(protected, [OTHER], out=tmp_path / "compiled", compile_models=True,
                     **kwargs).table
    if precision == "fp32":
        pd.testing.assert_frame_equal(eager, compiled)
        return
    pd.testing.assert_frame_equal(eager.drop(columns=["value", "ci_low", "ci_high"]),
                                  compiled.drop(columns=["value", "ci_low", "ci_high"]))
    moved = (eager.value - compiled.value).abs()
    assert moved[eager.metric == "agreement"].max() <= 1 / 16 + 1e-9
    assert moved[eager.metric.isin(["psnr", "ssim"])].max() == 0  # no model runs in these


def test_weights_hash_reads_any_stored_weights():
    """bf16 and sparse weights are hashed (bf16 once stopped an audit), and one changed
    value changes the hash."""
    import torch

    state = {"half": torch.ones(4, dtype=torch.bfloat16),
             "sparse": torch.eye(3).to_sparse(), "count": torch.tensor(7)}
    changed = {**state, "half": torch.tensor([1, 1, 1, 2], dtype=torch.bfloat16)}
    assert weights_hash(state) == weights_hash(dict(state))
    assert weights_hash(state) != weights_hash(changed)


def test_compiling_models_that_must_take_turns_is_refused_before_any_work(
        protected, suite, tmp_path, monkeypatch, snapshot, capsys):
    """A zoo too large for the device together cannot be compiled: one line, exit 2, no run
    folder, the inputs untouched."""
    from neaudit import worker

    monkeypatch.setattr(worker, "fits_on_device", lambda models, device: False)
    before = snapshot(protected)
    out = tmp_path / "never"
    code = main(["audit", str(protected), "--model", OTHER, "--suite", str(suite), "--out",
                 str(out), "--score", "agreement", "--compile-models", "--quiet"])
    assert code == 2 and not out.exists()
    assert "--compile-models" in capsys.readouterr().err
    assert snapshot(protected) == before




def test_reference_images_come_at_the_release_size(protected, tmp_path):
    """An attacker's clean images of other sizes (mixed ones included) are resized to the
    release's, not refused with a fix the audit has no option for."""
    from PIL import Image

    from neaudit.worker import reference_images

    folder = tmp_path / "reference"
    folder.mkdir()
    for i, (height, width) in enumerate([(48, 40), (96, 96), (64, 64)]):
        Image.fromarray(np.full((height, width, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    dataset = load_dataset(protected)
    images = reference_images(dataset, folder)
    assert images.shape == (3, 3, *dataset.image_shape)
    assert torch.allclose(images[2], torch.full_like(images[2], 120 / 255))  # uniform stays


def test_default_reference_images_span_the_classes(tmp_path):
    """Without --reference, the L2 attacker learns from up to 256 of the dataset's originals,
    spread over it: a run of 256 would hold one or two classes of a class-sorted dataset."""
    from neaudit.worker import REFERENCE_IMAGES, reference_images

    count = 3 * REFERENCE_IMAGES // 2
    index = np.arange(count)
    images = np.broadcast_to((index * 255 // (count - 1)).astype(np.uint8)[:, None, None, None],
                             (count, 8, 8, 3)).copy()
    np.savez(tmp_path / "set.npz", protected=images, original=images, labels=index * 3 // count)
    reference = reference_images(load_dataset(tmp_path / "set.npz"), None)
    assert len(reference) == REFERENCE_IMAGES
    levels = (reference[:, 0, 0, 0] * 255).round().long()
    classes = (levels * (count - 1) // 255) * 3 // count  # each image's class, from its level
    assert set(classes.tolist()) == {0, 1, 2}
    assert levels.min() <= 2 and levels.max() >= 250  # from the first items to the last
