"""Hostile and mistaken inputs, through the CLI as users meet them.

Every case must end with its exit code, one line on stderr that names the offending input,
no traceback, and every input file byte-identical afterwards."""

import json
import os
import pickle
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from neaudit.cli import main
from neaudit.imageio import read_image, sha256_file, write_png
from neaudit.protection import protect

AUTH = "demo:patch_cnn"
OTHER = "demo:small_cnn"
FACTORIES = '''
import torch, torch.nn as nn

class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 4, stride=4)
    def forward(self, x):
        return self.conv(x).flatten(1).mean(1)          # 1-D output

class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 4, stride=4)
    def forward(self, x):
        raise RuntimeError("broken on purpose")

def needs_args(width):
    return nn.Conv2d(3, width, 3)

def not_a_module():
    return "a string"

def flat():
    return Flat()

def broken():
    return Broken()

class Nan(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.Flatten(), nn.Linear(256, 10))
    def forward(self, x):
        return self.net(x) * float("nan")

def nan_model():
    return Nan()
'''


class _Payload:
    """Pickles into a call that creates ``marker``: a weights file that would run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bomb_png(path: Path) -> None:
    """A valid 1×1 PNG whose header then claims 100000×100000 pixels."""
    write_png(path, np.zeros((1, 1, 3), np.uint8))
    data = bytearray(path.read_bytes())
    ihdr = struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every input the cases read, under one folder whose files must never change."""
    root = tmp_path_factory.mktemp("hostile") / "inputs"
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        cls = "a" if i % 2 else "b"
        write_png(root / "images" / cls / f"{i}.png", image)
        write_png(root / "victim" / f"{i}.png", image)
    protect(root / "images", AUTH, root / "release", psnr=20, save_originals=True)
    (root / "suites").mkdir()
    (root / "policies").mkdir()
    (root / "models.py").write_text(FACTORIES)
    (root / "a_file").write_text("not a folder")
    (root / "file_out").mkdir()
    (root / "file_out" / "protected").write_text("not a folder")
    (root / "code.pt").write_bytes(pickle.dumps(_Payload(root / "ran"), protocol=4))
    torch.save({"fc.weight": torch.zeros(2, 2)}, root / "other_net.pt")
    (root / "bomb").mkdir()
    _bomb_png(root / "bomb" / "huge.png")
    np.savez(root / "objects.npz", protected=np.array([object(), object()], dtype=object))
    manifests = root / "manifests"
    for i, image in enumerate(images[:2]):
        write_png(manifests / "imgs" / f"{i}.png", image)
        write_png(manifests / f"{i}.png", image)
    rows = {
        "absolute": {"path": [str((root / "victim" / "0.png").resolve()), "imgs/1.png"]},
        "dotdot": {"path": ["../victim/0.png", "imgs/1.png"]},
        "negative": {"path": ["imgs/0.png", "imgs/1.png"], "label": [-1, 0]},
        "evil_label": {"path": ["0.png", "1.png"], "label": ["../../x", "ok"]},
        "big_label": {"path": ["0.png", "1.png"], "label": [12345, 0]},
        "pipe": {"path": ["imgs/0.png", "wait.png"]},
    }
    os.mkfifo(manifests / "wait.png")  # a reader would wait on it for ever
    for name, columns in rows.items():
        pd.DataFrame(columns).to_csv(manifests / f"{name}.csv", index=False)
    big = root / "big_release"
    protect(manifests / "big_label.csv", AUTH, big, psnr=20, save_originals=True)
    frame = pd.DataFrame({"path": [f"protected/{n}" for n in ("12345/0.png", "0/1.png")],
                          "original_path": [f"original/{n}" for n in ("12345/0.png", "0/1.png")],
                          "label": [12345, 0]})
    frame.to_csv(big / "release.csv", index=False)
    (root / "linked").mkdir()
    write_png(root / "linked" / "inside.png", images[0])
    (root / "linked" / "escape.png").symlink_to(root / "victim" / "1.png")
    (root / "dangling").mkdir()
    write_png(root / "dangling" / "inside.png", images[0])
    (root / "dangling" / "gone.png").symlink_to(root / "nowhere.png")
    for name in ("pipes", "devices"):
        write_png(root / name / "inside.png", images[0])
    os.mkfifo(root / "pipes" / "wait.png")
    os.mkfifo(root / "zoo_pipe.toml")
    shutil.copytree(root / "release", root / "pipe_original")
    (root / "pipe_original" / "original" / "a" / "1.png").unlink()
    os.mkfifo(root / "pipe_original" / "original" / "a" / "1.png")
    (root / "devices" / "zero.png").symlink_to("/dev/zero")  # endless bytes
    for name, edit in SIDECARS.items():
        copy = root / "sidecars" / name
        shutil.copytree(root / "release", copy)
        sidecar = json.loads((copy / "neaudit.json").read_text())
        (copy / "neaudit.json").write_bytes(edit(sidecar))
    for name, text in SUITES.items():
        (root / "suites" / f"{name}.toml").write_text(text)
    for name, text in POLICIES.items():
        (root / "policies" / f"{name}.toml").write_text(text)
    return root


def _with(field: str, value) -> Callable[[dict], bytes]:
    """A sidecar edit: ``field`` (``a.b`` for a nested one) set to ``value``."""
    def edit(sidecar: dict) -> bytes:
        *outer, last = field.split(".")
        place = sidecar
        for key in outer:
            place = place[key]
        place[last] = value
        return json.dumps(sidecar).encode()
    return edit


SIDECARS: dict[str, Callable[[dict], bytes]] = {
    "not_an_object": lambda sidecar: b"[1, 2]",
    "not_utf8": lambda sidecar: b'{"authorized": "\xff\xfe"}',
    "params_list": _with("params", [1, 2]),
    "psnr_text": _with("params.psnr", "high"),
    "authorized_number": _with("authorized", 5),
    "class_names_text": _with("class_names", "cat"),
}
"""Release copies whose neaudit.json an editor or an attacker got wrong."""

SUITES = {
    "quality_text": '[[attack]]\nname = "jpeg"\nquality = "abc"\n',
    "sigma_negative": '[[attack]]\nname = "gaussian_blur"\nsigma = -1.5\n',
    "jpeg_1000": '[[attack]]\nname = "jpeg"\nquality = 1000\n',
    "jpeg_negative": '[[attack]]\nname = "jpeg"\nquality = -5\n',
    "median_0": '[[attack]]\nname = "median"\nkernel = 0\n',
    "median_4": '[[attack]]\nname = "median"\nkernel = 4\n',
    "median_1001": '[[attack]]\nname = "median"\nkernel = 1001\n',
    "empty_list": '[[attack]]\nname = "jpeg"\nquality = []\n',
    "sigma_huge": '[[attack]]\nname = "gaussian_noise"\nsigma = 1e308\n',
    "degrees_nan": '[[attack]]\nname = "rotate"\ndegrees = nan\n',
    "unknown_attack": '[[attack]]\nname = "sharpen"\n',
    "unknown_param": '[[attack]]\nname = "jpeg"\nqualty = 50\n',
    "single_table": '[attack]\nname = "jpeg"\n',
    "syntax": '[[attack]\nname = "jpeg"\n',
    "fractions_empty": '[[attack]]\nname = "finetune"\nfractions = []\n',
}

POLICIES = {
    "syntax": "max_leakage = \n",
    "unknown_key": "max_leak = 0.5\n",
    "string_value": 'max_leakage = "high"\n',
    "list_value": "max_leakage = [0.5]\n",
    "nan_value": "max_leakage = nan\n",
    "unknown_level": 'max_leakage = 0.5\nlevels = ["L9"]\n',
    "unknown_flag": 'max_leakage = 0.5\nfail_on = ["flaky"]\n',
    "empty": "",
    "negative_leakage": "max_leakage = -0.1\n",  # could never pass
    "negative_psnr": "max_leakage = 0.5\nmin_psnr = -5\n",  # could never fail
    "misspelt_family": "max_leakage = 0.5\n[family.purfy]\nmax_leakage = 0.2\n",
    "name_not_text": "name = 5\nmax_leakage = 0.5\n",
}


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]  # {in} is the inputs folder, {out} a fresh output folder
    says: tuple[str, ...]  # texts the one-line message must contain
    code: int = 2


def _protect(*extra: str, data: str = "{in}/images", auth: str = AUTH) -> tuple[str, ...]:
    return ("protect", data, "--authorized", auth, "--out", "{out}", *extra)


def _audit(*extra: str, data: str = "{in}/release") -> tuple[str, ...]:
    return ("audit", data, "--model", OTHER, "--suite", "smoke", "--out", "{out}", "--quiet",
            *extra)


CASES = [
    # writes outside --out or into the inputs
    Case("manifest_absolute_path", _protect(data="{in}/manifests/absolute.csv"),
         ("absolute.csv", "outside the dataset's folder", "--allow-outside")),
    Case("manifest_dotdot_path", _protect(data="{in}/manifests/dotdot.csv"),
         ("dotdot.csv", "outside the dataset's folder")),
    Case("symlink_out_of_folder", _protect(data="{in}/linked"), ("linked", "symlink")),
    Case("class_name_with_path", _protect(data="{in}/manifests/evil_label.csv"),
         ("class name", "../../x")),
    Case("protect_out_is_input", ("protect", "{in}/images", "--authorized", AUTH, "--out",
                                  "{in}/images"), ("overlaps the input",)),
    Case("protect_out_inside_input", ("protect", "{in}/images", "--authorized", AUTH, "--out",
                                      "{in}/images/sub"), ("overlaps the input",)),
    Case("audit_out_is_data", ("audit", "{in}/release", "--model", OTHER, "--suite", "smoke",
                               "--out", "{in}/release"), ("overlaps the input",)),
    Case("audit_out_in_protected", ("audit", "{in}/release", "--model", OTHER, "--suite",
                                    "smoke", "--out", "{in}/release/protected/run"),
         ("overlaps the input",)),
    Case("audit_out_holds_data", ("audit", "{in}/release", "--model", OTHER, "--suite", "smoke",
                                  "--out", "{in}"), ("overlaps the input",)),
    Case("audit_out_is_reference", ("audit", "{in}/release", "--model", OTHER, "--suite",
                                    "reconstruction", "--reference", "{in}/images", "--out",
                                    "{in}/images/run"), ("overlaps the input",)),
    Case("out_is_a_file", _protect()[:-1] + ("{in}/a_file",), ("a_file", "is a file")),
    Case("out_folder_is_a_file", _protect()[:-1] + ("{in}/file_out",),
         ("file_out/protected is a file", "another --out")),
    # silent wrong results, now refused
    Case("psnr_nan", _protect("--psnr", "nan"), ("--psnr nan",)),
    Case("psnr_inf", _protect("--psnr", "inf"), ("--psnr inf",)),
    Case("psnr_1000", _protect("--psnr", "1000"), ("--psnr 1000",)),
    Case("psnr_negative", _protect("--psnr", "-10"), ("--psnr -10",)),
    Case("rank_0", _protect("--rank", "0"), ("--rank 0",)),
    Case("rank_negative", _protect("--rank", "-1"), ("--rank -1",)),
    Case("rank_full", _protect("--rank", "100000"), ("--rank 100000", "1 to 47")),
    Case("threshold_keeps_all", _protect("--threshold", "2"), ("keeps every direction",)),
    Case("l2_negative", _protect("--l2", "-1"), ("--l2 -1",)),
    Case("l2_below_rounding", _protect("--l2", "0.001"), ("--l2 0.001", "between")),
    Case("l2_beyond_the_range", _protect("--l2", "1000"), ("--l2 1000", "between")),
    Case("dangling_image_link", _protect(data="{in}/dangling"),
         ("gone.png", "does not exist")),
    Case("pipe_named_as_an_image", _protect(data="{in}/pipes"),
         ("pipes/wait.png: a pipe, socket or device",)),
    Case("link_to_a_device", _protect(data="{in}/devices"),
         ("devices/zero.png: a link to a pipe, socket or device",)),
    Case("original_is_a_pipe", _audit(data="{in}/pipe_original"),
         ("original/a/1.png: a pipe, socket or device",)),
    Case("zoo_file_is_a_pipe", ("audit", "{in}/release", "--zoo", "{in}/zoo_pipe.toml",
                                "--suite", "smoke", "--out", "{out}", "--quiet"),
         ("zoo_pipe.toml is not a regular file",)),
    Case("manifest_lists_a_pipe", _protect(data="{in}/manifests/pipe.csv"),
         ("manifests/wait.png: a pipe, socket or device",)),
    Case("policy_is_a_folder", _audit("--policy", "{in}/images"),
         ("images", "not a regular file")),
    Case("patch_fraction_0", _protect("--patch-fraction", "0"), ("--patch-fraction 0",)),
    Case("png_compression_unknown", _protect("--png-compression", "zstd"),
         ("--png-compression 'zstd'", "none or deflate")),
    Case("loader_workers_negative", _audit("--loader-workers", "-1"), ("--loader-workers -1",)),
    Case("nan_authorized_model", _protect(auth="python:{in}/models.py:nan_model?input_size=32"),
         ("nan_model", "NaN")),
    Case("negative_label", _protect(data="{in}/manifests/negative.csv"),
         ("negative.csv", "label -1")),
    Case("label_beyond_classes", _audit("--score", "accuracy",
                                        data="{in}/big_release/release.csv"),
         ("label 12345", "demo:")),
    Case("reference_unused", _audit("--reference", "{in}/images"),
         ("--reference", "smoke", "L2")),  # recorded, never read: refused, not ignored
    Case("reference_missing", _audit("--suite", "reconstruction", "--reference", "{in}/nowhere"),
         ("nowhere",)),
    Case("max_images_negative", _audit("--max-images", "-5"), ("--max-images -5",)),
    Case("max_images_zero", _audit("--max-images", "0"), ("--max-images 0",)),
    # errors before any work instead of tracebacks
    *[Case(f"suite_{name}", _audit()[:5] + ("{in}/suites/" + name + ".toml",) + _audit()[6:],
           (f"{name}.toml",)) for name in SUITES],
    *[Case(f"policy_{name}", _audit("--policy", "{in}/policies/" + name + ".toml"),
           (f"{name}.toml",)) for name in POLICIES],
    Case("weights_that_run_code", _protect(auth="timm:resnet18?weights={in}/code.pt"),
         ("code.pt: holds Python objects besides tensors", "state dict")),
    Case("weights_of_another_net", _protect(auth="timm:resnet18?weights={in}/other_net.pt"),
         ("other_net.pt: weights do not fit", "Missing key(s)", "Fix: give the architecture")),
    Case("spec_num_classes_text", _protect(auth="timm:resnet18?num_classes=abc"),
         ("num_classes=abc",)),
    Case("spec_negative_size", _protect(auth="timm:resnet18?input_size=-32"),
         ("input_size=-32",)),
    Case("spec_mean_text", _protect(auth="timm:resnet18?mean=a,b,c"), ("mean=a,b,c",)),
    Case("spec_mean_two_values", _protect(auth="timm:resnet18?mean=0.5,0.5"),
         ("mean=0.5,0.5",)),
    Case("spec_unknown_keyword", _protect(auth="timm:resnet18?colour=red"), ("colour",)),
    Case("spec_percent", _protect(auth="timm:resnet18?%%%"), ("%%%",)),
    Case("spec_unknown_scheme", _protect(auth="keras:resnet"), ("keras:resnet",)),
    Case("factory_needs_args", _protect(auth="python:{in}/models.py:needs_args"),
         ("needs_args", "without arguments")),
    Case("factory_not_a_module", _protect(auth="python:{in}/models.py:not_a_module"),
         ("not_a_module", "not a torch.nn.Module")),
    Case("model_1d_output", _audit("--model", "python:{in}/models.py:flat?input_size=32"),
         ("flat", "logits")),
    Case("model_raises", _audit("--model", "python:{in}/models.py:broken?input_size=32"),
         ("broken", "broken on purpose")),
    Case("batch_size_0_protect", _protect("--batch-size", "0"), ("--batch-size 0",)),
    Case("batch_size_negative_audit", _audit("--batch-size", "-1"), ("--batch-size -1",)),
    Case("ray_workers_0", _audit("--executor", "ray", "--ray-workers", "0"),
         ("--ray-workers 0",)),
    Case("ray_cpus_negative", _audit("--executor", "ray", "--ray-cpus", "-1"),
         ("--ray-cpus -1",)),
    Case("ray_gpus_nan", _audit("--executor", "ray", "--ray-gpus", "nan"), ("--ray-gpus nan",)),
    Case("device_tpu", _protect("--device", "tpu"), ("--device tpu",)),
    Case("resize_0", _protect("--resize", "0"), ("resize (0, 0)",)),
    # options that would be recorded but not used
    Case("rank_with_reference", _protect("--method", "reference", "--rank", "5"),
         ("--rank 5", "--method subspace")),
    Case("threshold_with_reference", _protect("--method", "reference", "--threshold", "0.1"),
         ("--threshold 0.1",)),
    Case("png_compression_with_npz", _protect("--format", "npz", "--png-compression", "deflate"),
         ("--png-compression deflate", "--format npz")),
    Case("resize_negative", _protect("--resize", "10x-3"), ("resize (10, -3)",)),
    Case("decompression_bomb", _protect(data="{in}/bomb"), ("huge.png",)),
    Case("pickled_npz", _protect(data="{in}/objects.npz"), ("objects.npz",)),
    Case("missing_input", _protect(data="{in}/nowhere"), ("nowhere",)),
    Case("bad_int_option", _audit("--batch-size", "abc"), ("--batch-size", "abc")),
    Case("report_not_a_run", ("report", "{in}/images"), ("images", "results.parquet")),
    # a sidecar of the wrong shape: refused by field, not met inside the audit
    *(Case(f"sidecar_{name}", _audit(data=f"{{in}}/sidecars/{name}"),
           (f"sidecars/{name}/neaudit.json", says)) for name, says in (
        ("not_an_object", "not an object"), ("not_utf8", "not valid JSON"),
        ("params_list", "'params' is [1, 2], not an object"),
        ("psnr_text", "'params.psnr' is \"high\", not an integer or a number"),
        ("authorized_number", "'authorized' is 5, not a string"),
        ("class_names_text", "'class_names' is \"cat\", not an array"))),
]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_line_and_exit_code(case, inputs, tmp_path, capsys):
    before = _tree(inputs)
    argv = [a.replace("{in}", str(inputs)).replace("{out}", str(tmp_path / "out"))
            for a in case.argv]
    code = main(argv) if case.name != "bad_int_option" else _argparse_code(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == case.code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in case.says:
        assert text.replace("{in}", str(inputs)) in lines[0], (text, lines[0])
    assert _tree(inputs) == before, "an input file changed"
    out = tmp_path / "out"
    assert not out.exists() or not any(out.rglob("*")), "refused, yet something was written"


def _argparse_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


def test_outside_inputs_are_read_with_allow_outside_and_written_inside_out(inputs, tmp_path):
    """The README's promise: a manifest with absolute and '..' paths never leads a write
    outside --out, and the inputs stay byte-identical."""
    before = _tree(inputs)
    for manifest in ("absolute.csv", "dotdot.csv"):
        out = tmp_path / manifest
        assert main(["protect", str(inputs / "manifests" / manifest), "--authorized", AUTH,
                     "--out", str(out), "--allow-outside", "--quiet"]) == 0
        written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        assert "protected/_outside/000000-0.png" in written, written
        assert all(not name.startswith("..") for name in written)
        sidecar = json.loads((out / "neaudit.json").read_text())
        assert sidecar["outside_files"] == 1
        listed = [line.split("  ")[1] for line in (out / "hashes.sha256").read_text().splitlines()]
        assert len(listed) == sidecar["count"] == 2
    assert _tree(inputs) == before


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    assert image.shape == (3, 32, 32)
    np.testing.assert_allclose(image[0].numpy(), values / 65535, atol=1e-6)
    assert float((image == 1).float().mean()) == 0.0


def test_protect_refuses_to_mix_with_an_earlier_release(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["protect", str(inputs / "images"), "--authorized", AUTH, "--out", str(out),
                 "--quiet"]) == 0
    assert main(["protect", str(inputs / "images"), "--authorized", AUTH, "--out", str(out),
                 "-q"]) == 0  # the same files again: allowed
    assert capsys.readouterr().out == ""  # --quiet, and its short form
    write_png(out / "protected" / "stale.png", np.zeros((32, 32, 3), np.uint8))
    assert main(["protect", str(inputs / "images"), "--authorized", AUTH, "--out",
                 str(out)]) == 2
    assert "stale.png" in capsys.readouterr().err


def test_colliding_output_names_are_refused(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    for suffix in (".png", ".jpg"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "in" / f"x{suffix}")
    assert main(["protect", str(tmp_path / "in"), "--authorized", AUTH, "--out",
                 str(tmp_path / "out")]) == 2
    assert "would both be written as x.png" in capsys.readouterr().err


def test_an_internal_error_exits_3_with_the_traceback_in_a_file(inputs, tmp_path, capsys,
                                                               monkeypatch):
    import neaudit.protection

    def explode(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(neaudit.protection, "_recode_all", explode)
    out = tmp_path / "out"
    out.mkdir()
    code = main(["protect", str(inputs / "images"), "--authorized", AUTH, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1 and "Traceback" not in err
    report = Path(err.split("traceback is in ")[1].split(". ")[0])
    assert report.parent == out and "ZeroDivisionError: a bug" in report.read_text()


@pytest.mark.parametrize("where", ["link_out", "read_only"])
def test_the_traceback_file_is_never_written_through_a_link_and_always_written(
        inputs, tmp_path, capsys, monkeypatch, where):
    """``RUN/neaudit-error.txt`` planted as a link to another file replaces the link, not that
    file; a run folder it cannot be written in gets it in a temporary file instead, still
    one line and exit code 3."""
    import neaudit.imageio
    import neaudit.protection

    def explode(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(neaudit.protection, "_recode_all", explode)
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious")
    if where == "link_out":
        (out / "neaudit-error.txt").symlink_to(victim)
    argv = ["protect", str(inputs / "images"), "--authorized", AUTH, "--out", str(out)]
    if where == "read_only":  # as a folder it may not write in (chmod would not stop root)
        def refused(path, write):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(neaudit.imageio, "atomic_write", refused)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 3 and len(err.splitlines()) == 1 and "Traceback" not in err
    report = Path(err.split("traceback is in ")[1].split(". ")[0])
    assert "ZeroDivisionError: a bug" in report.read_text() and victim.read_text() == "precious"
    assert (report.parent == out and not report.is_symlink()) == (where == "link_out")


@pytest.mark.parametrize("command", ["audit", "protect"])
def test_a_full_disk_is_one_line_that_says_what_a_rerun_does(command, inputs, tmp_path, capsys,
                                                            monkeypatch):
    """An audit resumes from its task records, protect from its checkpoint: the message says
    so."""
    import errno

    import neaudit.release
    import neaudit.store

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    module = neaudit.store if command == "audit" else neaudit.release
    monkeypatch.setattr(module, "atomic_write", full)
    argv = (["audit", str(inputs / "release"), "--model", OTHER, "--suite", "smoke"]
            if command == "audit" else ["protect", str(inputs / "images"), "--authorized", AUTH])
    code = main([*argv, "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "No space left on device" in err and str(tmp_path / "run") in err
    assert "re-running the same command resumes" in err


@pytest.mark.parametrize("command", ["protect", "audit"])
def test_an_unreadable_file_met_by_a_reader_process_is_one_line(command, inputs, tmp_path,
                                                                 capsys):
    """Reader processes meet the files the in-process checks do not read: their error must
    reach the user as the same one line, not as the worker's traceback."""

    if command == "protect":
        data = tmp_path / "images"
        shutil.copytree(inputs / "images", data)
        bad = data / "b" / "zz.png"  # read last, by a reader process
        argv = ["protect", str(data), "--authorized", AUTH, "--quiet", "--batch-size", "2"]
    else:
        data = tmp_path / "release"
        shutil.copytree(inputs / "release", data)
        bad = max((data / "protected").rglob("*.png"))
        argv = ["audit", str(data), "--model", OTHER, "--suite", "smoke", "--quiet",
                "--batch-size", "2", "--loader-workers", "2"]
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    code = main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "DataLoader" not in err, err
    assert err.startswith(f"neaudit: error: {bad}: cannot read this image") and "Fix:" in err
    if command == "protect":  # no sidecar, so a part release is not taken for a whole one
        assert not (tmp_path / "out" / "neaudit.json").exists()


@pytest.mark.parametrize("scheme", ["python", "torchscript"])
def test_a_release_never_names_code_to_run(scheme, inputs, tmp_path, capsys):
    """neaudit.json is part of the input: a spec in it that loads code from a file is refused
    (and the file never runs); the user may still name the same spec."""

    release = tmp_path / "release"
    shutil.copytree(inputs / "release", release)
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "import torch.nn as nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 4, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),"
        " nn.Linear(4, 10))\n")
    spec = (f"python:{tmp_path / 'evil.py'}:make?input_size=32" if scheme == "python"
            else f"torchscript:{tmp_path / 'net.pt'}?input_size=32")
    sidecar = json.loads((release / "neaudit.json").read_text())
    sidecar["authorized"] = spec
    (release / "neaudit.json").write_text(json.dumps(sidecar))
    argv = ["audit", str(release), "--model", OTHER, "--suite", "smoke", "--quiet", "--out",
            str(tmp_path / "out")]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"names the authorized model '{spec}', which runs code from a file" in err
    assert not marker.exists() and not (tmp_path / "out").exists()
    if scheme == "python":  # named by the user, the same spec is built
        assert main([*argv[:-1], str(tmp_path / "chosen"), "--authorized", spec]) in (0, 1)
        assert marker.exists()


def test_a_garbled_hashes_file_is_read_as_far_as_it_goes(inputs, tmp_path, capsys):
    release = tmp_path / "release"
    shutil.copytree(inputs / "release", release)
    lines = (release / "hashes.sha256").read_bytes().splitlines()
    (release / "hashes.sha256").write_bytes(b"\n".join([b"\xff\xfe garbage", b"no spaces",
                                                         *lines[1:]]))
    code = main(["audit", str(release), "--model", OTHER, "--suite", "smoke", "--out",
                 str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 1 and "internal error" not in out
    # the one line lost is the one file unlisted; the rest still vouch for their files
    assert "lossy_or_altered_input: 1 protected file(s) are not in the hashes" in out


@pytest.mark.parametrize("name", [b"\x1b]0;pwned\x07\x1b[2J.png", b"\xff\xfe-latin.png"],
                         ids=["escape_sequence", "not_utf8"])
def test_odd_names_from_a_release_reach_terminal_and_reports_as_text(name, inputs, tmp_path,
                                                                     capsys):
    """A file added to a release under a name holding an escape sequence, or bytes that are
    not UTF-8, is named in the terminal's flags escaped (not obeyed, not a crash), and the
    report and a well-formed junit.xml are still written."""
    import os
    import xml.etree.ElementTree as ET

    release = tmp_path / "release"
    shutil.copytree(inputs / "release", release)
    added = max((release / "protected").rglob("*.png"))
    original = release / "original" / added.relative_to(release / "protected")
    for path in (added, original):  # renamed after protection, with its original
        os.rename(bytes(path), bytes(path.parent) + b"/" + name)
    shown = repr(name.decode(errors="surrogateescape"))[1:-1]
    code = main(["audit", str(release), "--model", OTHER, "--suite", "smoke", "--out",
                 str(tmp_path / "run"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1 and "\x1b" not in out and "\x07" not in out
    assert shown in out  # named, escaped
    junit = ET.parse(tmp_path / "run" / "junit.xml").getroot()
    assert any(shown in failure.text for failure in junit.iter("failure"))
    assert "lossy_or_altered_input" in (tmp_path / "run" / "index.html").read_text()


@pytest.mark.slow  # 8 s of CLI processes
def test_framework_warnings_stay_off_the_command_line(inputs, tmp_path):
    """torch warns on every TorchScript load (deprecated) and on some weights files; stderr is
    for the user's inputs: those warnings do not reach it."""
    import subprocess
    import sys

    import torch
    import torch.nn as nn

    net = nn.Sequential(nn.Conv2d(3, 4, 4, 4), nn.Flatten(), nn.Linear(256, 2))
    torch.jit.trace(net.eval(), torch.zeros(1, 3, 32, 32)).save(str(tmp_path / "net.pt"))
    command = subprocess.run(  # its own process: pytest would catch the warnings itself
        [sys.executable, "-m", "neaudit.cli", "audit", str(inputs / "release"), "--model",
         f"torchscript:{tmp_path / 'net.pt'}?input_size=32", "--suite", "smoke", "--out",
         str(tmp_path / "run"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert command.returncode in (0, 1) and command.stderr == "", command.stderr


def test_a_short_given_key_is_noted(inputs, tmp_path, capsys):
    """A key typed by hand is often short; every key under MIN_KEY_BITS can be tried."""
    from neaudit.seeding import MIN_KEY_BITS

    for key, noted in ((12345, True), (2**MIN_KEY_BITS + 7, False)):
        out = tmp_path / str(key)
        assert main(["protect", str(inputs / "images"), "--authorized", AUTH, "--out", str(out),
                     "--key", str(key), "--quiet"]) == 0
        err = capsys.readouterr().err
        assert ("note: --key has 14 bits" in err) == noted, err
        bits = json.loads((out / "neaudit.json").read_text())["params"]["key_bits"]
        assert bits == key.bit_length()


def test_a_closed_output_pipe_ends_the_command_quietly():
    """`neaudit zoo list | head -1`: when the reader of stdout goes away, the command stops
    with the shell's SIGPIPE status and no bogus disk-error line."""
    import signal
    import subprocess
    import sys

    command = subprocess.Popen([sys.executable, "-m", "neaudit.cli", "zoo", "list"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    command.stdout.close()  # before the command has written anything
    _, errors = command.communicate(timeout=60)
    assert command.returncode == 128 + signal.SIGPIPE and errors == b""


@pytest.mark.parametrize("dangling", [False, True], ids=["link", "dangling_link"])
def test_a_symlink_in_out_leading_outside_is_refused_and_nothing_written_there(
        inputs, tmp_path, capsys, dangling):
    """A folder of ``--out`` that is a symlink out of it (a class folder from an earlier run
    replaced by a link), live or not yet existing: refused, nothing written through it."""
    outside = tmp_path / "elsewhere"
    if not dangling:
        outside.mkdir()
    out = tmp_path / "out"
    (out / "protected").mkdir(parents=True)
    (out / "protected" / "a").symlink_to(outside, target_is_directory=True)
    before = _tree(inputs)
    assert main(["protect", str(inputs / "images"), "--authorized", AUTH, "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "leads outside" in err and "protected/a" in err
    assert not outside.exists() or not any(outside.iterdir())
    # refused before any work: nothing written, not even into the folders that were safe
    assert sorted(p.name for p in out.rglob("*")) == ["a", "protected"]
    assert _tree(inputs) == before


@pytest.mark.parametrize("command,folder", [
    (_protect(), "protected"),
    (_protect("--save-originals"), "original"),
    (_protect(), ".neaudit-progress"),
    (_audit(), "tasks"),
    (_audit(), ".cache"),
], ids=["protect_protected", "protect_original", "protect_checkpoint", "audit_tasks",
        "audit_cache"])
def test_an_out_folder_that_is_itself_a_symlink_out_is_refused(inputs, tmp_path, capsys,
                                                               command, folder):
    """``--out``'s own working folders (``protected/``, ``original/``, protect's checkpoint, an
    audit's ``tasks/`` and ``.cache/``) replaced by links out of it: refused before any work,
    nothing written through them."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / folder).symlink_to(outside, target_is_directory=True)
    before = _tree(inputs)
    argv = [a.replace("{in}", str(inputs)).replace("{out}", str(out)) for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "leads outside" in err and folder in err
    assert not any(outside.iterdir())
    assert _tree(inputs) == before


def test_trained_attacks_cache_inside_out_and_not_through_a_link(inputs, tmp_path):
    """Trained networks are cached in ``--out``'s own ``.cache/``, never beside it, and a
    ``.cache`` that links out of ``--out`` is refused."""
    from neaudit.errors import NeauditError
    from neaudit.store import ResultStore

    out = tmp_path / "runs" / "one"
    store = ResultStore(out, {"seed": 0})
    assert Path(store.cache_dir).parent == out
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / ".cache").symlink_to(outside, target_is_directory=True)
    with pytest.raises(NeauditError, match="leads outside"):
        ResultStore(linked, {"seed": 0})
    assert not any(outside.iterdir())


def test_output_names_follow_pathlib_and_stay_under_the_folder():
    from pathlib import PurePosixPath

    from neaudit.errors import NeauditError
    from neaudit.paths import safe_relative
    from neaudit.release import _png_name

    for name in ["a.jpg", "d/a.JPEG", "./d//a.tar.gz", ".hidden", "a.", "a..b", "...",
                 "d.x/noext", "d/./e/f.webp", "x/.png", "é/ü.png"]:
        expected = PurePosixPath(name).with_suffix(".png").as_posix()
        assert _png_name(safe_relative(name, "item name")) == expected, name
    for bad in ["/etc/passwd", "../x.png", "a/../../x.png", "", ".", "a\\b.png", "a\x00.png",
                "//server/x.png", "a\nb.png", "a\rb.png", "d\t/x.png", "a\x1b[31m.png",
                b"\xff\xfe.png".decode(errors="surrogateescape")]:  # not UTF-8
        with pytest.raises(NeauditError, match="not a plain relative path") as refused:
            safe_relative(bad, "item name")
        assert "\n" not in str(refused.value)  # the one-line message shows the name escaped
