"""A stopped ``protect`` resumes from its checkpoint and writes what an uninterrupted run
writes; it refuses another run's checkpoint, keeps no secret key on disk, and rewrites what
went missing."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from neaudit import fidelity, protection
from neaudit.cli import main
from neaudit.data import load_dataset
from neaudit.imageio import sha256_file, write_png
from neaudit.progress import PROGRESS_DIR
from neaudit.protection import protect

BATCH = 4


@pytest.fixture
def folder(tmp_path: Path, photos: np.ndarray) -> Path:
    """32 photo crops in two class folders: 8 batches of 4."""
    root = tmp_path / "in"
    for i, image in enumerate(photos):
        write_png(root / ("a" if i % 2 else "b") / f"{i:02d}.png", image)
    return root


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file()}


def _count_batches(monkeypatch, stop_at: int | None = None) -> list[int]:
    """The first item of every batch ``protect`` measures from now on; at the ``stop_at``-th
    it stops as at Ctrl-C (its writers finish what they were given)."""
    seen, measure = [], fidelity.measure  # the real one, whatever was patched before

    def counted(layer, gain, clean, *rest):
        if len(seen) == stop_at:
            raise KeyboardInterrupt
        seen.append(len(clean))
        return measure(layer, gain, clean, *rest)

    monkeypatch.setattr(protection, "measure", counted)
    return seen


def _records(out: Path) -> list[Path]:
    return sorted((out / PROGRESS_DIR).glob("batch-*.npz"))


def _stopped_command(folder: Path, out: Path, spec: str, monkeypatch, *extra: str
                     ) -> list[str]:
    """``neaudit protect`` with key 5, run and stopped as at Ctrl-C after two batches (exit
    130), the stop undone; returns its arguments, to run it again."""
    argv = ["protect", str(folder), "--authorized", spec, "--out", str(out), "--key", "5",
            "--batch-size", str(BATCH), *extra]
    _count_batches(monkeypatch, stop_at=2)
    assert main(argv) == 130
    monkeypatch.undo()
    return argv


@pytest.mark.parametrize("method", ["subspace", "reference"])
def test_a_stopped_run_resumes_to_the_bytes_and_figures_of_an_uninterrupted_one(
        folder, tmp_path, vit_spec, monkeypatch, method):
    """Stopped after three of eight batches, the same command writes the other five only, and
    the release (images, originals, hashes, sidecar) and the fidelity table are those of a
    run never stopped, the model preview's groups straddling the stop included."""
    monkeypatch.setattr(fidelity, "PREVIEW_BATCH", 3)
    settings = dict(method=method, key=5, batch_size=BATCH, fidelity_images=10,
                    save_originals=True)
    whole = protect(folder, vit_spec, tmp_path / "whole", **settings)
    out = tmp_path / "stopped"
    _count_batches(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        protect(folder, vit_spec, out, **settings)
    assert not (out / "neaudit.json").exists() and len(_records(out)) == 3
    measured = _count_batches(monkeypatch)
    resumed = protect(folder, vit_spec, out, **settings)
    assert resumed.resumed == 3 * BATCH and measured == [BATCH] * 5
    assert _files(out) == _files(tmp_path / "whole")  # no checkpoint left, every byte equal
    pd.testing.assert_frame_equal(resumed.per_image, whole.per_image)
    assert pd.Series(resumed.summary).equals(pd.Series(whole.summary))  # NaN where NaN


def test_a_drawn_key_is_never_on_disk_and_the_resumed_run_draws_its_own(
        folder, tmp_path, vit_spec, monkeypatch):
    """A key drawn at random and not stored is in no file of the stopped run; the resumed
    run draws a new one for the images left, which are then exactly that key's NEs, while
    the images already written stay as they were (the first key's)."""
    first, second = 0x1234_5678_9ABC_DEF0_1122_3344_5566_7788, 0x0FED_CBA9_8765_4321_99AA_BBCC
    monkeypatch.setattr(protection, "secrets", SimpleNamespace(randbits=lambda bits: first))
    out = tmp_path / "stopped"
    _count_batches(monkeypatch, stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        protect(folder, vit_spec, out, batch_size=BATCH)
    stored = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for form in (str(first), f"{first:x}", f"{first:X}", first.to_bytes(16, "little"),
                 first.to_bytes(16, "big")):
        assert (form.encode() if isinstance(form, str) else form) not in stored
    monkeypatch.undo()
    monkeypatch.setattr(protection, "secrets", SimpleNamespace(randbits=lambda bits: second))
    resumed = protect(folder, vit_spec, out, batch_size=BATCH)
    assert resumed.sidecar["params"]["key"] is None and resumed.resumed == 2 * BATCH
    runs = {key: _files(protect(folder, vit_spec, tmp_path / str(key), key=key,
                                batch_size=BATCH).out / "protected") for key in (first, second)}
    names = sorted(runs[first])
    written = _files(out / "protected")
    assert all(written[n] == runs[first][n] for n in names[:2 * BATCH])
    assert all(written[n] == runs[second][n] != runs[first][n] for n in names[2 * BATCH:])


def test_a_drawn_key_to_be_stored_is_kept_so_the_release_holds_one_keys_noise(
        folder, tmp_path, vit_spec, monkeypatch):
    """With --store-key the sidecar names the key; the resumed run uses the stopped run's, so
    that key regenerates every image of the release."""
    out = tmp_path / "stopped"
    monkeypatch.setattr(protection, "secrets", SimpleNamespace(randbits=lambda bits: 987654321))
    _count_batches(monkeypatch, stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        protect(folder, vit_spec, out, batch_size=BATCH, store_key=True)
    monkeypatch.undo()
    monkeypatch.setattr(protection, "secrets", SimpleNamespace(randbits=lambda bits: 55))
    resumed = protect(folder, vit_spec, out, batch_size=BATCH, store_key=True)
    assert resumed.sidecar["params"]["key"] == 987654321
    again = protect(folder, vit_spec, tmp_path / "again", key=987654321, batch_size=BATCH)
    assert _files(out / "protected") == _files(again.out / "protected")


@pytest.mark.parametrize("change,named", [
    (["--psnr", "25"], "psnr"),
    (["--key", "6"], "key"),
    (["--save-originals"], "save_originals"),
])
def test_another_runs_checkpoint_is_refused_and_left_alone(folder, tmp_path, vit_spec,
                                                           monkeypatch, capsys, change, named):
    out = tmp_path / "stopped"
    argv = _stopped_command(folder, out, vit_spec, monkeypatch, "-q")
    capsys.readouterr()
    before, inputs = _files(out), _files(folder)
    assert main([*argv, *change]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "resume" in err
    assert str(out / PROGRESS_DIR) in err and _files(out) == before
    assert _files(folder) == inputs


def test_files_gone_since_the_stop_are_written_again_and_half_written_ones_removed(
        folder, tmp_path, vit_spec, monkeypatch):
    """A recorded batch with a file deleted since is written again; a killed writer's
    temporary file is removed; the release is the uninterrupted run's."""
    whole = protect(folder, vit_spec, tmp_path / "whole", key=5, batch_size=BATCH)
    out = tmp_path / "stopped"
    _count_batches(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        protect(folder, vit_spec, out, key=5, batch_size=BATCH)
    gone = sorted((out / "protected").rglob("*.png"))[1]  # item 2 (b/02.png): batch 0
    gone.unlink()
    (gone.parent / f".{gone.name}.a1b2c3d4.tmp").write_bytes(b"half a file")
    measured = _count_batches(monkeypatch)
    resumed = protect(folder, vit_spec, out, key=5, batch_size=BATCH)
    assert resumed.resumed == 2 * BATCH and len(measured) == 6
    assert _files(out) == _files(whole.out)


def test_every_batch_is_recorded_before_the_model_preview_runs(folder, tmp_path, vit_spec,
                                                               monkeypatch):
    """The preview runs last, for as long as 64 × 3 forwards take (half a minute on a CPU):
    a run killed then resumes with nothing to write again."""
    out, seen, table = tmp_path / "out", [], fidelity.ModelPreview.table

    def counted(preview):
        seen.append(len(_records(out)))
        return table(preview)

    monkeypatch.setattr(fidelity.ModelPreview, "table", counted)
    protect(folder, vit_spec, out, key=5, batch_size=BATCH)
    assert seen == [32 // BATCH]


@pytest.mark.parametrize("damage", ["garbage", "pickled", "span", "column", "preview",
                                    "unread_kind"])
def test_a_damaged_checkpoint_is_one_line_naming_it(folder, tmp_path, vit_spec, monkeypatch,
                                                    capsys, damage):
    out = tmp_path / "stopped"
    argv = _stopped_command(folder, out, vit_spec, monkeypatch, "-q")
    inputs = _files(folder)
    record = _records(out)[0]
    if damage == "garbage":
        record.write_bytes(b"not an npz")
    else:
        with np.load(record) as data:
            arrays = {name: data[name] for name in data.files}
        if damage == "pickled":
            arrays["digests"] = np.array([object()] * BATCH, dtype=object)
        elif damage == "span":
            arrays["span"] = np.array([0, 99], np.int64)
        elif damage == "column":  # a figure the run does not measure, under a known name
            arrays["fidelity_columns"] = np.array(["psnr", "l2", "ssim", "gain", "name"])
            arrays["fidelity.name"] = arrays["fidelity.psnr"]
        elif damage == "preview":  # one sampled item fewer: its row would lose its figures
            arrays["preview_index"] = arrays["preview_index"][1:]
            arrays["preview_images"] = arrays["preview_images"][1:]
        else:  # a note the command would have no words for
            arrays["unread_kinds"] = np.array(["sound"])
            arrays["unread.sound"] = np.array(["b/00.png"])
        np.savez(record, **arrays)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(record) in err and "delete" in err
    assert _files(folder) == inputs


def test_a_run_killed_outright_resumes_to_the_uninterrupted_release(tmp_path, photos):
    """SIGKILL while writing (no handler runs, writers die mid-file): the same command
    finishes the release, equal to an uninterrupted run's."""
    images = tmp_path / "in"
    for i in range(240):
        write_png(images / f"{i:03d}.png", np.roll(photos[i % 32], i, axis=1))
    argv = [sys.executable, "-m", "neaudit.cli", "protect", str(images), "--authorized",
            "demo:patch_cnn", "--key", "77", "--batch-size", "2", "-q", "--out"]
    whole = subprocess.run([*argv, str(tmp_path / "whole")], capture_output=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    run = subprocess.Popen([*argv, str(out)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(_records(out)) < 3 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(run.pid, signal.SIGKILL)  # the writer processes too
    run.wait()
    assert not (out / "neaudit.json").exists() and _records(out)
    resumed = subprocess.run([*argv, str(out)], capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _files(out) == _files(tmp_path / "whole")
    assert json.loads((out / "neaudit.json").read_text())["count"] == 240


def test_batches_skip_what_is_done():
    from neaudit.pipeline import batch_spans

    done = np.zeros(11, bool)
    assert batch_spans(11, 4, done) == batch_spans(11, 4) == [(0, 4), (4, 8), (8, 11)]
    done[[0, 1, 2, 3, 6]] = True
    assert batch_spans(11, 4, done) == [(4, 6), (7, 11)]
    assert batch_spans(3, 4, np.ones(3, bool)) == []
    assert list(itertools.chain(*[range(*s) for s in batch_spans(11, 2, done)])) == [
        4, 5, 7, 8, 9, 10]


@pytest.mark.parametrize("method", ["subspace", "reference"])
def test_a_checkpoint_expects_the_columns_measure_returns(vit_spec, method):
    import torch

    from neaudit.fidelity import measure, measured_columns
    from neaudit.metrics import isotropic_gain
    from neaudit.stem import first_layer
    from neaudit.zoo import create_model

    layer = first_layer(create_model(vit_spec), (64, 64))
    clean = torch.rand(2, 3, 64, 64)
    floats = clean + 0.01 if method == "reference" else None
    frame = measure(layer, isotropic_gain(layer, (3, 64, 64)), clean, clean.flip(0), floats)
    assert list(frame.columns) == measured_columns(floats is not None)


def test_a_stopped_run_is_never_taken_for_a_release(folder, tmp_path, vit_spec, monkeypatch,
                                                    capsys):
    """Re-running over a finished release with other settings and stopping leaves no sidecar
    that would vouch for the mixed files, and loading or auditing the folder while its
    checkpoint is there is refused with the way to finish it."""
    out = tmp_path / "release"
    protect(folder, vit_spec, out, key=5, batch_size=BATCH, save_originals=True)
    _count_batches(monkeypatch, stop_at=1)
    with pytest.raises(KeyboardInterrupt):
        protect(folder, vit_spec, out, key=5, batch_size=BATCH, psnr=25, save_originals=True)
    monkeypatch.undo()
    assert not (out / "neaudit.json").exists() and not (out / "hashes.sha256").exists()
    capsys.readouterr()  # the runs' progress bars
    for path in (out, out / "protected"):
        assert main(["audit", str(path), "--model", "demo:small_cnn", "--suite", "smoke",
                     "--out", str(tmp_path / "audit"), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "stopped before its end" in err
        assert "protect command again" in err
    protect(folder, vit_spec, out, key=5, batch_size=BATCH, psnr=25, save_originals=True)
    assert load_dataset(out).sidecar["params"]["psnr"] == 25


def test_the_command_says_what_it_resumed(folder, tmp_path, vit_spec, monkeypatch, capsys):
    out = tmp_path / "stopped"
    argv = _stopped_command(folder, out, vit_spec, monkeypatch)
    assert "interrupted; re-running the same command resumes" in capsys.readouterr().err
    assert main(argv) == 0
    said = capsys.readouterr()
    assert (f"wrote 32 NEs (subspace) to {out} ({2 * BATCH} of them written by the stopped run "
            "it resumed)") in said.out
    # the progress bar starts where the stopped run ended, and ends at the whole dataset
    assert "protect:  25%" in said.err and f"{2 * BATCH}/32" in said.err and "32/32" in said.err
    (out / "protected").rename(tmp_path / "moved")  # a fresh run, quiet: no bar
    assert main([*argv, "-q"]) == 0
    assert "protect:" not in capsys.readouterr().err
