"""Command line: ``neaudit protect | audit | report | diff | demo | zoo``.

Exit codes, the same for every command:

  0  success (audit, report: the policy verdict is PASS)
  1  the policy verdict is FAIL (or an audit stopped before its last task)
  2  a usage or input error: one line on stderr naming the input and the fix
  3  an unexpected internal error: one line on stderr, the traceback in a file it names

``neaudit demo`` exits 0 when it ran: its FAIL verdict is the finding it demonstrates.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from neaudit.errors import NeauditError, printable, utf8


def _size(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    return (parts[0], parts[-1])


def _protect(args: argparse.Namespace) -> int:
    from neaudit.data import load_dataset
    from neaudit.fidelity import FIDELITY_COLUMNS
    from neaudit.imageio import UNREAD
    from neaudit.protection import protect
    from neaudit.seeding import MIN_KEY_BITS

    dataset = load_dataset(args.data, originals=None, resize=args.resize,
                           allow_outside=args.allow_outside)
    result = protect(dataset, args.authorized, args.out, method=args.method,
                     psnr=args.psnr, rank=args.rank, threshold=args.threshold,
                     seed=args.seed, key=args.key, store_key=args.store_key,
                     save_originals=args.save_originals, output_format=args.format,
                     batch_size=args.batch_size, patch_fraction=args.patch_fraction,
                     l2=args.l2, device=args.device, fidelity_images=args.fidelity_images,
                     png_compression=args.png_compression, quiet=args.quiet)
    for what, entry in result.sidecar["unread"].items():  # about the release: even if quiet
        print(f"note: {entry['count']} input(s) have {UNREAD[what]} (e.g. "
              f"{', '.join(entry['examples'])})", file=sys.stderr)
    bits = result.sidecar["params"]["key_bits"]
    if bits is not None and bits < MIN_KEY_BITS:
        print(f"note: --key has {bits} bits; under {MIN_KEY_BITS}, anyone who knows the "
              "construction can try every key, and the audit fails this release (exposed_key). "
              "Leave --key out to draw a 128-bit key.", file=sys.stderr)
    if not args.quiet:
        summary = result.summary
        resumed = (f" ({result.resumed} of them written by the stopped run it resumed)"
                   if result.resumed else "")
        print(f"wrote {len(result.per_image)} NEs ({args.method}) to {result.out}{resumed}; "
              f"model figures on {result.sidecar['params']['fidelity_images']} of them")
        print(f"authorized: {result.sidecar['authorized']}")
        for key, meaning in FIDELITY_COLUMNS.items():
            print(f"  {key:<20} {summary[key]:>10.4f}   {meaning}")
        if args.method == "subspace":
            print(f"  {'min_gain':<20} {summary['min_gain']:>10.4f}   smallest gain the operator "
                  "allows at this rank")
        else:
            print(f"  {'psnr_float':<20} {summary['psnr_float']:>10.4f}   PSNR of the unclipped "
                  f"float output (nominal {args.psnr} dB)")
            print(f"  {'agreement_float':<20} {summary['agreement_float']:>10.4f}   agreement on "
                  "the float output, as the paper evaluated it")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from neaudit.auditing import audit
    from neaudit.policy import Policy
    from neaudit.reporting import render_report

    policy = Policy.load(args.policy)  # a bad policy fails before any work
    zoo, authorized = list(args.model or []), args.authorized
    if args.zoo:
        from neaudit.zoo import resolve_zoo, zoo_authorized

        zoo = resolve_zoo(args.zoo) + zoo
        authorized = authorized or zoo_authorized(args.zoo)
    if not zoo:
        raise NeauditError("no models to audit. Fix: pass --zoo PRESET|FILE.toml|SPEC,SPEC or "
                           "--model [NAME=]SPEC.")
    executor = None
    if args.executor == "ray":
        from neaudit.executors import RayExecutor

        executor = RayExecutor(args.ray_address, args.ray_workers, args.ray_cpus, args.ray_gpus)
    result = audit(args.data, zoo, authorized=authorized, suite=args.suite, out=args.out,
                   executor=executor,
                   device=args.device, seed=args.seed, batch_size=args.batch_size,
                   originals=args.originals, reference=args.reference,
                   max_images=args.max_images, quiet=args.quiet, score=args.score,
                   loader_workers=args.loader_workers, decode=args.decode,
                   allow_outside=args.allow_outside, compile_models=args.compile_models,
                   precision=args.precision,
                   command=" ".join(["neaudit", *sys.argv[1:]]))
    print(printable(format_summary(result.summary, result.out)))
    if not result.complete:
        print("audit incomplete: re-run the same command to finish it")
        return 1
    report = render_report(result.out, policy)
    _print_verdict(report)
    return report.exit_code


def format_summary(summary: dict, out: Path) -> str:
    """Plain-text table of an audit's summary for the terminal."""
    lines = [f"{'model':<48} {'role':<12} {'clean':>6} {'NE':>6} {'worst attack':<28} "
             f"{'worst':>6}"]
    for model, entry in summary["models"].items():
        worst = entry.get("worst_leakage", entry.get("worst_utility_retention"))
        lines.append(
            f"{model[:48]:<48} {entry['role']:<12} {_number(entry.get('clean'))} "
            f"{_number(entry['protected'])} {entry.get('worst_attack', '-')[:28]:<28} "
            f"{_number(worst)}")
    lines.append(f"({summary['score_metric']}; 'worst' is leakage for unauthorized models, "
                 "retention for the authorized one)")
    if "suppression_ratio" in summary:
        lines.append(f"suppression ratio {summary['suppression_ratio']:.2f}")
    if "worst_leakage" in summary:
        w = summary["worst_leakage"]
        lines.append(f"worst-case leakage {w['value']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]"
                     f" by {w['model']} under {w['attack']} ({w['threat']})")
    if "worst_learning_leakage" in summary:
        w = summary["worst_learning_leakage"]
        lines.append(f"worst learning leakage {w['value']:.3f} [{w['ci_low']:.3f}, "
                     f"{w['ci_high']:.3f}] by {w['model']} trained by {w['attack']}")
    lines.append(f"results: {out / 'results.csv'}")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return f"{math.nan if value is None else value:>6.3f}"


def _print_verdict(report) -> None:
    for flag in report.flags:
        print(printable(f"  FLAG{' (fails)' if flag.failing else ''}  {flag.name}: {flag.message}"))
    for criterion in report.criteria:
        print(printable(f"  {'PASS' if criterion.passed else 'FAIL'}  {criterion.title}: "
                    f"{criterion.observed:.3f} (threshold {criterion.threshold:g}; "
                    f"{criterion.where})"))
    print(printable(f"verdict: {report.verdict}. {report.sentence}"))
    print(f"report: {report.html}")


def _report(args: argparse.Namespace) -> int:
    from neaudit.reporting import render_report

    report = render_report(args.run_dir, args.policy)
    _print_verdict(report)
    return report.exit_code


def _diff(args: argparse.Namespace) -> int:
    from neaudit.reporting.diff import diff_runs

    print(printable(diff_runs(args.run_a, args.run_b, args.policy, args.out).text()))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from neaudit.demo import demo

    result = demo(args.out, quick=args.quick, psnr=args.psnr, quiet=args.quiet,
                  policy=args.policy, suite=args.suite)
    print(printable(format_summary(result.audit.summary, result.audit.out)))
    _print_verdict(result.report)
    print(f"\nOpen the report: {result.report.html.resolve()}")
    return 0


def _zoo(args: argparse.Namespace) -> int:
    if args.zoo_command == "train-demo":
        from neaudit import demo_zoo

        demo_zoo.train_all(Path(args.out) if args.out else demo_zoo.WEIGHTS, seed=args.seed)
        return 0
    if args.zoo_command == "list":
        return _zoo_list(args.check)
    from neaudit.spectral import low_sensitivity_subspace
    from neaudit.stem import first_layer
    from neaudit.zoo import create_model

    model = create_model(args.spec)
    size = model.input_size or (224, 224)
    layer = first_layer(model, size)
    space = low_sensitivity_subspace(layer, size)
    m, d = layer.unfolded.shape
    print(f"{model.name}: stem '{layer.module_name}' {m}×{d} kernel {layer.kernel} "
          f"stride {layer.stride} padding {layer.padding} "
          f"({'overlapping' if layer.overlapping else 'non-overlapping'})")
    mean, std = ([round(v, 4) for v in t.tolist()] for t in (layer.mean, layer.std))
    print(f"  input size {size}, mean {mean}, std {std}")
    print(f"  subspace rank {space.rank}: min gain {space.min_gain:.4g} vs isotropic "
          f"{space.isotropic_gain:.4g}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit code 2, as for every input error)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}. Fix: see {self.prog} --help.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="neaudit", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_protect, _add_audit, _add_report, _add_diff, _add_demo, _add_zoo):
        add(sub)
    return parser


def _add_protect(sub) -> None:
    protect = sub.add_parser("protect", help="recode a dataset into NEs for one model")
    protect.add_argument("data", help="folder, .npz, .csv/.parquet manifest, or builtin:samples")
    protect.add_argument("--authorized", required=True, help="model spec, e.g. timm:resnet50")
    protect.add_argument("--out", required=True, help="output folder (never the input); a "
                         "stopped run resumes when the same command runs again")
    protect.add_argument("--method", choices=("subspace", "reference"), default="subspace")
    strength = protect.add_mutually_exclusive_group()
    strength.add_argument("--psnr", type=float, default=30.0,
                          help="target PSNR in dB (measured for subspace, nominal for reference)")
    strength.add_argument("--l2", type=float,
                          help="target L2 norm of each perturbation in [0, 1] pixel units "
                               "(subspace; instead of --psnr)")
    protect.add_argument("--rank", type=int, help="subspace dimensions kept")
    protect.add_argument("--threshold", type=float,
                         help="keep singular values ≤ threshold × the largest (instead of rank)")
    protect.add_argument("--patch-fraction", type=float, default=1.0,
                         help="share of each image's patches that carry noise (patch stems): "
                              "lower reaches the authorized model less and protects less")
    protect.add_argument("--seed", type=int, default=0)
    protect.add_argument("--key", type=int, help="secret key of the noise, to repeat a release: "
                         "56 bits or more; a new one for edited data (default: a 128-bit key "
                         "drawn at random and not recorded)")
    protect.add_argument("--store-key", action="store_true", help="record the key in neaudit.json")
    protect.add_argument("--save-originals", action="store_true",
                         help="also write the clean images under OUT/original/")
    protect.add_argument("--format", choices=("png", "npz"), default="png",
                         help="png (default: files that stream and resume) or npz (one file, "
                              "held in memory until written; refused when larger than the "
                              "free memory)")
    protect.add_argument("--png-compression", default="none",
                         help="none (default: ten times faster to write) or deflate (files "
                              "about a quarter smaller); the pixels are the same")
    protect.add_argument("--resize", type=_size, help="resize policy for mixed sizes, H[xW]")
    protect.add_argument("--batch-size", type=int,
                         help="images per batch (default: 256 on CUDA, 32 on a CPU); the NEs "
                              "written do not depend on it")
    protect.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    protect.add_argument("--fidelity-images", type=int, default=64,
                         help="images the authorized model is run on to preview its agreement "
                              "(pixel and first-layer figures cover every image)")
    protect.add_argument("--allow-outside", action="store_true",
                         help="read input files outside the dataset's folder (manifest paths, "
                              "symlinks); recorded in neaudit.json")
    protect.add_argument("-q", "--quiet", action="store_true",
                         help="no progress bar and no summary (notes about the inputs "
                              "still print)")
    protect.set_defaults(handler=_protect)


def _add_audit(sub) -> None:
    run = sub.add_parser("audit", help="attack a protected dataset and measure leakage")
    run.add_argument("data", help="protected dataset (folder, .npz, manifest)")
    run.add_argument("--authorized", help="authorized model spec (default: from neaudit.json)")
    run.add_argument("--zoo", help="preset name, zoo file (.toml: [[model]] name, spec, role) "
                                   "or comma-separated specs")
    run.add_argument("--model", action="append",
                     help="one more model, SPEC or NAME=SPEC (repeatable)")
    run.add_argument("--suite", default="standard", help="suite name or TOML file")
    run.add_argument("--out", help="run folder (default: reports/<data>-<suite>-<hash>)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--originals", help="folder of clean originals (same relative paths)")
    run.add_argument("--reference", help="clean in-distribution images for L2 attacks")
    run.add_argument("--max-images", type=int,
                     help="audit N images evenly spread over the dataset (every class)")
    run.add_argument("--score", choices=("auto", "accuracy", "agreement"), default="auto",
                     help="accuracy against labels, or agreement with clean predictions")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    run.add_argument("--allow-outside", action="store_true",
                     help="read input files outside the dataset's folder (manifest paths, "
                          "symlinks); recorded in run.json")
    run.add_argument("--policy", help="policy TOML (default: the packaged default policy)")
    run.add_argument("--loader-workers", type=int, default=0,
                     help="processes reading shards ahead (pinned memory on CUDA)")
    run.add_argument("--decode", choices=("cpu", "device"), default="cpu",
                     help="where JPEG inputs are decoded: cpu (libjpeg-turbo, the same pixels "
                          "on every machine) or device (nvJPEG on CUDA; flagged)")
    run.add_argument("--compile-models", action="store_true",
                     help="run the zoo's forwards through torch.compile (minutes of compiling "
                          "first; part of the run's identity)")
    run.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                     help="number format of the zoo's forwards: auto is bf16 where the device "
                          "has bf16 units (CUDA from Ampere; CPUs with AMX or AVX-512 BF16), "
                          "else fp32; recorded, and part of the run's identity")
    run.add_argument("--executor", choices=("local", "ray"), default="local")
    run.add_argument("--ray-address", help="existing Ray cluster: auto or HOST:PORT")
    run.add_argument("--ray-workers", type=int, default=2, help="Ray actors")
    run.add_argument("--ray-cpus", type=float, default=1, help="CPUs each actor asks for")
    run.add_argument("--ray-gpus", type=float, default=0, help="GPUs each actor asks for")
    run.set_defaults(handler=_audit)


def _add_report(sub) -> None:
    report = sub.add_parser("report", help="re-render a run's HTML report and verdict")
    report.add_argument("run_dir", help="run folder written by neaudit audit")
    report.add_argument("--policy", help="policy TOML (default: the packaged default policy)")
    report.set_defaults(handler=_report)


def _add_diff(sub) -> None:
    diff = sub.add_parser("diff", help="compare two audits")
    diff.add_argument("run_a")
    diff.add_argument("run_b")
    diff.add_argument("--policy", help="policy TOML (default: the packaged default policy)")
    diff.add_argument("--out", help="HTML file to write (default: "
                                    "RUN_B/diff-<name of A>-<hash of A's path>.html)")
    diff.set_defaults(handler=_diff)


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="protect and audit the bundled digits, offline")
    demo.add_argument("--out", default="reports/demo")
    demo.add_argument("--quick", action="store_true", help="120 images, smoke suite (< 1 min)")
    demo.add_argument("--psnr", type=float, default=20.0, help="target PSNR of the NEs (dB)")
    demo.add_argument("--policy", help="policy TOML (default: the packaged default policy)")
    demo.add_argument("--suite", help="suite (default: standard; smoke with --quick)")
    demo.add_argument("-q", "--quiet", action="store_true")
    demo.set_defaults(handler=_demo)


def _zoo_list(check: bool) -> int:
    """Presets and the shipped demo models, each marked with whether it loads offline
    (without ``check``, told from the caches alone, with no framework imported)."""
    from neaudit.presets import PRESETS, demo_specs, local_status

    statuses: dict[str, str] = {}
    for name, specs in {**PRESETS, "demo (shipped)": demo_specs()}.items():
        print(name)
        for spec in specs:
            if spec not in statuses:
                statuses[spec] = _loads(spec) if check else local_status(spec)
            print(f"  {statuses[spec]:<11} {spec}")
    if not check and "check" in statuses.values():
        print("\n'check': only the framework can tell; run neaudit zoo list --check.")
    return 0


def _loads(spec: str) -> str:
    """``loads`` if the model builds offline, else why not (the builder's one line)."""
    from neaudit.zoo import create_model

    try:
        create_model(spec)
    except NeauditError as exc:
        return f"fails: {str(exc).split('. ')[0]}"
    return "loads"


def _add_zoo(sub) -> None:
    zoo = sub.add_parser("zoo", help="model presets and first-layer inspection")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    listing = zoo_sub.add_parser("list", help="list the named presets and demo models, "
                                 "marked with whether their weights load offline")
    listing.add_argument("--check", action="store_true",
                         help="build every model to be sure (imports the frameworks)")
    inspect = zoo_sub.add_parser("inspect", help="show a model's first layer and subspace")
    inspect.add_argument("spec")
    train = zoo_sub.add_parser("train-demo", help="retrain the shipped demo zoo reproducibly")
    train.add_argument("--out", help="folder for the weights (default: the package's own)")
    train.add_argument("--seed", type=int, default=0)
    zoo.set_defaults(handler=_zoo)


LIBRARIES = r"(torch|timm|open_clip|kornia|torchvision|safetensors)(\.|$)"
"""Frameworks whose warnings (deprecations, pickle-protocol notes) the command line does not
pass on: its stderr carries notes and one-line errors about the user's inputs."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=LIBRARIES)
    try:
        return args.handler(args)
    except NeauditError as exc:
        return _fail(f"neaudit: error: {exc}", 2)
    except BrokenPipeError:  # the reader of stdout went away (`neaudit zoo list | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 128 + signal.SIGPIPE
    except OSError as exc:  # a disk full, read-only or missing while reading or writing
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"neaudit: error: {where}{exc.strerror or exc}. Fix: check the path, its "
                     "permissions and the free space; what was written is complete (files "
                     f"are replaced atomically) and {_rerun(args)}.", 2)
    except KeyboardInterrupt:
        return _fail(f"neaudit: interrupted; {_rerun(args)}.", 130)
    except Exception:
        report = _write_traceback(getattr(args, "out", None))
        return _fail(f"neaudit: internal error (a bug in neaudit, not in your input); the "
                     f"traceback is in {report}. Please report it with that file.", 3)


def _rerun(args: argparse.Namespace) -> str:
    """What running the stopped command again does: an audit resumes from its task records,
    ``protect`` from its checkpoint (:mod:`neaudit.progress`), except into one ``.npz``; a
    report or a diff is written again from the stored run."""
    if args.handler is _protect and args.format == "npz":
        return ("re-running the same command writes the whole .npz again (no sidecar marks "
                "this one complete)")
    if args.handler in (_report, _diff):
        return "re-running the same command writes it again from the stored results"
    return "re-running the same command resumes"


def _fail(message: str, code: int) -> int:
    print(printable(" ".join(message.split())), file=sys.stderr)
    return code


def _write_traceback(out: str | None) -> Path:
    """The current traceback, in the run folder where it exists and takes it, else in a
    temporary file."""
    import tempfile
    import traceback

    from neaudit import imageio

    text = traceback.format_exc()
    if out and Path(out).is_dir():
        path = Path(out) / "neaudit-error.txt"
        try:  # replaces a link planted there, never writes through it
            imageio.atomic_write(path, lambda handle: handle.write(utf8(text)))
            return path
        except OSError:
            pass  # a folder it may not write in: a temporary file, as without one
    handle, name = tempfile.mkstemp(prefix="neaudit-error-", suffix=".txt")
    with open(handle, "wb") as file:
        file.write(utf8(text))
    return Path(name)


if __name__ == "__main__":
    sys.exit(main())
