"""The Python API refuses arguments of the wrong type in one line naming the argument, before
any work, and takes every type its annotations allow."""

from pathlib import Path

import numpy as np
import pytest

import neaudit
from neaudit.arguments import ArgumentTypeError, checked
from neaudit.errors import NeauditError


@pytest.mark.parametrize("call,named", [
    (lambda out: neaudit.protect("builtin:samples", "demo:patch_cnn", out, psnr="30"),
     "psnr='30' is str, not a number"),
    (lambda out: neaudit.protect("builtin:samples", 5, out), "authorized=5"),
    (lambda out: neaudit.protect("builtin:samples", "demo:patch_cnn", out, key=1.5),
     "key=1.5 is float, not an integer or None"),
    (lambda out: neaudit.protect("builtin:samples", "demo:patch_cnn", out, save_originals=1),
     "save_originals=1 is int, not True or False"),
    (lambda out: neaudit.audit("builtin:samples", 5, out=out), "zoo=5"),
    (lambda out: neaudit.audit("builtin:samples", ["demo:small_cnn", 3], out=out),
     "a string or a list of strings"),
    (lambda out: neaudit.audit("builtin:samples", "demo:small_cnn", out=out, batch_size="64"),
     "batch_size='64' is str, not an integer"),
    (lambda out: neaudit.load_dataset("builtin:samples", resize=(32,)),
     "resize=(32,) is tuple, not a pair of integers or None"),
    (lambda out: neaudit.report(5), "run_dir=5 is int, not a string or a path"),
    (lambda out: neaudit.diff(out, out, policy=0.5), "policy=0.5"),
    (lambda out: neaudit.demo.demo(out, quick="yes"), "quick='yes'"),
], ids=["psnr", "authorized", "key", "flag", "zoo", "zoo_item", "batch_size", "resize",
        "report", "diff", "demo"])
def test_a_wrong_type_is_one_line_naming_the_argument(tmp_path, call, named):
    out = tmp_path / "out"
    with pytest.raises(ArgumentTypeError) as refused:
        call(out)
    message = str(refused.value)
    assert named in message and "Fix: pass" in message and "\n" not in message
    assert isinstance(refused.value, TypeError) and isinstance(refused.value, NeauditError)
    assert not out.exists()  # before any work


def test_every_type_an_annotation_allows_is_taken():
    @checked
    def f(path: str | Path, size: tuple[int, int] | None = None, strength: float = 1.0,
          names: list[str] | None = None, anything: object = None) -> tuple:
        return path, size, strength, names, anything

    assert f(Path("a"), (2, 3), 2, ["x"], anything=object())[:4] == (Path("a"), (2, 3), 2,
                                                                     ["x"])
    assert f("a", [2, 3], np.float64(0.5))[2] == 0.5
    for bad in ({"strength": True}, {"size": (2, 3, 4)}, {"names": "x"}, {"path": None}):
        with pytest.raises(ArgumentTypeError):
            f(**{"path": "a", **bad})
    with pytest.raises(TypeError, match="unexpected keyword"):  # Python's own, as before
        f("a", colour=1)
