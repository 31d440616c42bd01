"""The package's imports follow its layers: each module imports only from its own layer or
lower ones, so the layout shows the architecture (cli → jobs → engine parts → attacks,
metrics, zoo, data). Read with ``ast``, without importing anything."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "neaudit"

LAYERS = [
    # the foundation: no neaudit imports but each other
    {"_version", "errors", "seeding", "vocabulary", "presets", "arguments", "bars"},
    {"imageio", "device", "patches", "paths", "demo_zoo"},
    {"dataset", "models"},
    {"data", "builders", "pipeline"},
    {"zoo"},
    {"stem"},
    {"metrics", "spectral"},
    {"fidelity"},
    {"ne"},
    # the attack library
    {"attacks.registry"},
    {"attacks", "attacks.preprocess", "attacks.purify", "attacks.adaptive", "attacks.learning",
     "attacks.training", "attacks.reconstruct",
     "attacks.suites"},
    # from task records to a verdict
    {"flags", "results"},
    {"policy"},
    # the engine's parts
    {"plan", "store", "progress", "release"},
    {"worker"},
    {"validity", "evidence", "executors"},
    # the jobs
    {"auditing", "protection"},
    {"reporting", "reporting.plots", "reporting.samples", "reporting.wording", "reporting.diff"},
    {"demo"},
    {"cli"},
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, package_modules: set[str]) -> set[str]:
    """The neaudit modules a file imports (at any depth, lazily or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from X import Y``: Y is a submodule of X, or a name defined in X's __init__
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [n if _relative(n) in package_modules else node.module for n in names]
        else:
            continue
        found |= {_relative(n) for n in names if n == "neaudit" or n.startswith("neaudit.")}
    return found


def _relative(name: str) -> str:
    return name.removeprefix("neaudit").removeprefix(".")


def _layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if module in layer:
            return index
    raise AssertionError(f"neaudit.{module} is in no layer: add it to LAYERS in {__file__}")


def test_every_module_has_a_layer():
    for module in _modules():
        if module:  # the package __init__ is the top, above every layer
            _layer_of(module)


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m))
def test_imports_only_go_down(module):
    modules = _modules()
    imported = _imports(modules[module], set(modules))
    upward = sorted(m for m in imported if m != module and (
        m == "" or _layer_of(m) > _layer_of(module)))
    assert upward == [], f"neaudit.{module} imports higher layers: {upward}"


def test_the_engine_never_imports_the_reporting_package():
    modules = _modules()
    engine = ["plan", "store", "worker", "validity", "evidence", "executors", "auditing"]
    for module in engine:
        imported = _imports(modules[module], set(modules))
        assert not any(m.startswith("reporting") for m in imported), module


def test_the_checker_sees_a_violation(tmp_path):
    """The test above can fail: an upward import is found, lazily inside a function too."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from neaudit.reporting import render_report\n"
                   "from neaudit import __version__\n")
    assert _imports(bad, set(_modules())) == {"", "reporting"}


@pytest.mark.parametrize("argv", [["--help"], ["zoo", "list"], ["audit", "--batch-size", "x"]])
def test_help_listing_and_argument_errors_do_not_import_torch(argv):
    """The command line answers these without loading a framework (fast on any machine)."""
    code = ("import sys\nfrom neaudit.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "False", done.stdout + done.stderr


def test_every_documented_python_twin_is_reachable_after_import_neaudit():
    """The twins the package docstring lists, reached as written (``neaudit.demo.demo``
    included) in a fresh interpreter, where nothing else imported the submodules first."""
    code = ("import neaudit\n"
            "twins = [neaudit.protect, neaudit.audit, neaudit.report, neaudit.diff,\n"
            "         neaudit.demo.demo, neaudit.demo.digits_test_set]\n"
            "print(all(callable(t) for t in twins))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip().splitlines()[-1:] == ["True"], done.stdout + done.stderr
