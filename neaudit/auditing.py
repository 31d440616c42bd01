"""``neaudit audit``: attack a protected dataset and measure leakage (the job).

Load and check every input before any work, plan the tasks (:mod:`neaudit.plan`), run them
with an executor (:mod:`neaudit.executors`) through the results store (:mod:`neaudit.store`),
then build the tidy table and its summary (:mod:`neaudit.results`) and what the flags and the
report read (:mod:`neaudit.validity`, :mod:`neaudit.evidence`). The verdict and the HTML
report are a separate step over the stored run (:func:`neaudit.reporting.render_report`).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from neaudit import evidence, validity
from neaudit.arguments import checked
from neaudit.attacks import DATASET, SuiteEntry, load_suite
from neaudit.bars import progress_bar
from neaudit.data import load_dataset
from neaudit.dataset import ImageDataset
from neaudit.device import resolve_device, resolve_precision, retained_heap
from neaudit.errors import NeauditError
from neaudit.executors import Executor, LocalExecutor
from neaudit.models import display_names, split_name
from neaudit.paths import refuse_overlap
from neaudit.plan import plan
from neaudit.results import build_table, summarize
from neaudit.store import json_default, run_folders, write_run_manifest, write_table
from neaudit.vocabulary import AUTHORIZED, UNAUTHORIZED
from neaudit.worker import WorkerRecipe, build_worker
from neaudit.zoo import RUNS_CODE, resolve_zoo, zoo_authorized

SCORES = ("auto", "accuracy", "agreement")
DECODERS = ("cpu", "device")


@dataclass
class AuditResult:
    """What ``audit`` returns: the tidy table, its summary and where the run is stored."""

    out: Path
    table: pd.DataFrame
    summary: dict
    computed_tasks: int
    skipped_tasks: int

    @property
    def complete(self) -> bool:
        return bool(self.summary.get("complete"))


@retained_heap()  # the job's batches reuse the memory the last one freed
@checked
def audit(data: str | Path | ImageDataset, zoo: str | Sequence[str],
          authorized: str | None = None, suite: str | Path = "standard",
          out: str | Path | None = None, device: str = "auto", seed: int = 0,
          batch_size: int = 64, originals: str | Path | None = None,
          reference: str | Path | None = None, max_images: int | None = None,
          executor: Executor | None = None, quiet: bool = False,
          command: str | None = None, stop_after: int | None = None,
          score: str = "auto", loader_workers: int = 0, decode: str = "cpu",
          allow_outside: bool = False, compile_models: bool = False,
          precision: str = "auto") -> AuditResult:
    """Run an audit and return its table; see the module docstring for the steps.

    ``authorized`` defaults to the spec recorded in the dataset's ``neaudit.json``.
    ``score``: ``accuracy`` (needs labels), ``agreement`` (needs originals) or ``auto``
    (accuracy where labels exist). ``stop_after`` computes at most that many new tasks, then
    stops (used to test resume). ``loader_workers`` > 0 reads shards ahead in that many
    processes (pinned memory on CUDA; off by default: on an H200 the readers took cores
    from the CPU-side attacks, and the tasks went from 1.08 to 1.16 of the bare loop).
    ``decode="device"`` decodes JPEG inputs with nvJPEG on the CUDA device (opt-in: its
    pixels differ from libjpeg-turbo's, and the audit says so).
    ``allow_outside`` reads input files outside the dataset's folder (:mod:`neaudit.paths`).
    ``compile_models`` runs the zoo's forwards through ``torch.compile`` (opt-in: compiling
    takes minutes, and compiled kernels may round differently from eager ones, so the choice
    is part of the run's identity).
    ``precision`` (``auto``, ``bf16`` or ``fp32``) is the zoo's forwards' number format:
    ``auto`` is bf16 where the device computes it natively, fp32 elsewhere
    (:func:`neaudit.device.resolve_precision`); the one used is part of the run's identity.
    """
    started = time.time()
    entries = load_suite(suite)  # validated before any image is read
    needs_reference = uses_reference(entries)
    if reference is not None:
        _check_reference(reference, suite, needs_reference)
    for name, value in (("--max-images", max_images), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise NeauditError(f"{name} {value}: must be at least 1.")
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)  # the one the forwards use
    dataset = (data if isinstance(data, ImageDataset)
               else load_dataset(data, originals, allow_outside=allow_outside))
    if max_images is not None:
        dataset = dataset.spread(max_images)
    names = _check_inputs(dataset, authorized, zoo, entries, score)
    specs = list(names)
    authorized = specs[0]
    score_metric = score if score != "auto" else (
        "accuracy" if dataset.labels is not None else "agreement")
    _check_decode(decode, torch_device.type, loader_workers)
    out = Path(out) if out else default_run_dir(
        data if not isinstance(data, ImageDataset) else "data", str(suite), specs, seed)
    refuse_overlap(out, [*dataset.input_roots(), *([Path(reference)] if reference else [])])
    run_folders(out)
    config = {  # the run's identity: a run folder holding another config is refused
        "dataset": _dataset_hash(dataset), "count": len(dataset), "models": specs,
        "names": names, "authorized": authorized, "suite": [e.label for e in entries],
        "seed": seed, "batch_size": batch_size, "score_metric": score_metric,
        "reference": str(reference) if reference else None, "decode": decode,
        "compile_models": compile_models, "precision": precision,
        # which items --max-images chose (a run that chose others, the first N, is another run)
        "items": (hashlib.sha256(json.dumps(dataset.names).encode()).hexdigest()
                  if max_images is not None else None)}
    recipe = WorkerRecipe(
        data if isinstance(data, ImageDataset) else str(data),
        str(originals) if originals else None, max_images, tuple(specs), authorized, str(out),
        config, str(torch_device), seed, str(reference) if reference else None,
        needs_reference, score_metric, decode, compile_models, precision)
    worker = build_worker(recipe, dataset)
    worker.names = names
    tasks = plan(worker.dataset, entries, batch_size)
    finished = worker.store.finished()
    pending = [t for t in tasks if t.task_id not in finished][:stop_after]
    if loader_workers:
        worker.prefetch(pending, loader_workers)
    phases = {"setup": time.time() - started}
    with progress_bar(len(pending), "audit", "task", quiet) as advance:
        (executor or LocalExecutor(worker)).run(pending, recipe, advance)
    phases["tasks"] = time.time() - started - phases["setup"]
    table, summary = _finish(worker, tasks, entries)
    phases["finish"] = time.time() - started - phases["setup"] - phases["tasks"]
    write_run_manifest(worker.store, command=command or shlex.join(sys.argv), config=config,
                       complete=summary["complete"], device=worker.device,
                       source=str(dataset.source), count=len(dataset),
                       outside_files=dataset.outside_files, weights=worker.weights,
                       seconds=time.time() - started, phases=phases)
    return AuditResult(out, table, summary, len(pending), len(tasks) - len(pending))


def _finish(worker, tasks, entries: Sequence[SuiteEntry]) -> tuple[pd.DataFrame, dict]:
    """The table and summary from every stored record, and, once the run is complete, what
    the flags and the report read."""
    store, dataset = worker.store, worker.dataset
    roles = {spec: AUTHORIZED if spec == worker.authorized else UNAUTHORIZED
             for spec in worker.models}
    num_classes = len(dataset.class_names) if dataset.class_names else None
    records = store.records()
    table = build_table(records, roles, worker.score_metric, num_classes, worker.names)
    summary = summarize(table, worker.score_metric)
    finished = store.finished()
    summary["complete"] = all(t.task_id in finished for t in tasks)
    if summary["complete"]:
        summary["diagnostics"] = validity.diagnostics(worker, records, tasks)
    if any(e.attack == "surrogate_projection" for e in entries):
        summary["surrogate_ranking"] = evidence.surrogate_ranking(worker)
    if summary["complete"] and dataset.has_originals:
        evidence.write_samples(worker, table, entries)
        evidence.write_spectral(worker, summary)
    write_table(store.root, table)
    store.write_text("summary.json", json.dumps(summary, indent=2, default=json_default))
    return table, summary


def _recorded_authorized(dataset: ImageDataset) -> str:
    """The authorized spec ``neaudit.json`` records. The release is an input, so a spec that
    would run code from a file is refused: a hostile release could name any file."""
    recorded = (dataset.sidecar or {}).get("authorized")
    if not isinstance(recorded, str) or not recorded.strip():
        raise NeauditError("no authorized model: the dataset has no neaudit.json naming one. "
                           "Fix: pass --authorized SPEC.")
    scheme = split_name(recorded)[1].partition(":")[0]
    if scheme in RUNS_CODE:
        raise NeauditError(f"{dataset.source}: its neaudit.json names the authorized model "
                           f"'{recorded}', which runs code from a file; neaudit does not run "
                           "code that an input names. Fix: if you trust that file, pass "
                           f"--authorized '{recorded}' yourself.")
    return recorded


REFERENCE_LEVELS = ("L2", "L3")
"""The threat levels whose attacks use clean in-distribution images (``--reference``)."""


def uses_reference(entries: list[SuiteEntry]) -> bool:
    """Does any of a suite's attacks use clean in-distribution images?"""
    return any(e.threat in REFERENCE_LEVELS for e in entries)


def _check_reference(reference: str | Path, suite: str | Path, needed: bool) -> None:
    """Refuse reference images no attack would read (recorded in the run, never used), and a
    reference folder that cannot be read, before any model is loaded."""
    if not needed:
        raise NeauditError(f"--reference {reference}: no attack of the suite '{suite}' uses "
                           f"reference images (only {' and '.join(REFERENCE_LEVELS)} attacks "
                           "do). Fix: drop --reference, or choose a suite with L2 or L3 attacks "
                           "(e.g. standard).")
    load_dataset(reference)  # lists the files only; refused here, by path, if it cannot be


def _check_inputs(dataset: ImageDataset, authorized: str | None, zoo: str | Sequence[str],
                  entries: Sequence[SuiteEntry], score: str) -> dict[str, str]:
    """Refuse what cannot be audited, before any work; returns the zoo's specs (authorized
    first: given, else marked in a zoo file, else recorded in neaudit.json) with their display
    names."""
    authorized = authorized or (zoo_authorized(zoo) if isinstance(zoo, str) else None)
    if authorized is None:
        authorized = _recorded_authorized(dataset)
    names = display_names([authorized, *resolve_zoo(zoo)])
    if len(names) < 2:
        raise NeauditError("the zoo has no unauthorized model. Fix: pass --zoo or --model.")
    if any(e.kind == DATASET for e in entries):
        if dataset.labels is None or not dataset.has_originals:
            raise NeauditError(f"{dataset.source}: learning attacks (linear_probe, finetune) "
                               "need labels and the clean originals. Fix: use class folders "
                               "and --originals, or drop them from the suite.")
        counts = np.bincount(dataset.labels)
        if (counts >= 2).sum() < 2:  # each class splits into a training and a test half
            raise NeauditError(f"{dataset.source}: learning attacks (linear_probe, finetune) "
                               "train and test on halves of each class, so they need two "
                               f"classes with two images or more; this dataset has "
                               f"{(counts > 0).sum()} class(es), {(counts >= 2).sum()} of them "
                               "with two images or more. Fix: add classes or images, or drop "
                               "the learning attacks from the suite.")
    if score not in SCORES:
        raise NeauditError(f"unknown score '{score}'. Fix: use auto, accuracy or agreement.")
    if score == "agreement" and not dataset.has_originals:
        raise NeauditError(f"{dataset.source}: agreement needs the clean originals. Fix: pass "
                           "--originals DIR, or --score accuracy with labels.")
    if score == "accuracy" and dataset.labels is None:
        raise NeauditError(f"{dataset.source}: accuracy needs labels. Fix: use class folders, "
                           "a label column, or --score agreement.")
    if score == "auto" and dataset.labels is None and not dataset.has_originals:
        raise NeauditError(f"{dataset.source}: agreement needs the clean originals. Fix: pass "
                           "--originals DIR, or --score accuracy with labels.")
    return names


def _check_decode(decode: str, device_type: str, loader_workers: int) -> None:
    if loader_workers < 0:
        raise NeauditError(f"--loader-workers {loader_workers}: must be 0 or more.")
    if decode not in DECODERS:
        raise NeauditError(f"unknown --decode '{decode}'. Fix: use cpu or device.")
    if decode == "device" and device_type != "cuda":
        raise NeauditError(f"--decode device needs a CUDA device (the audit runs on "
                           f"{device_type}). Fix: add --device cuda, or drop --decode device.")
    if decode == "device" and loader_workers:
        raise NeauditError("--decode device decodes in the process that owns the GPU, not in "
                           "--loader-workers processes. Fix: drop one of the two options.")


def _dataset_hash(dataset: ImageDataset) -> str:
    if dataset.sidecar and "content_digest" in dataset.sidecar:
        return dataset.sidecar["content_digest"]
    digest = hashlib.sha256(json.dumps(dataset.names).encode())
    digest.update(str(dataset.source).encode())
    return digest.hexdigest()


def default_run_dir(data: str | Path, suite: str, zoo: Sequence[str], seed: int) -> Path:
    """``reports/<data>-<suite>-<hash>``: the same command maps to the same folder, so a
    re-run resumes."""
    key = hashlib.sha256(json.dumps([str(data), suite, list(zoo), seed]).encode()).hexdigest()
    return Path("reports") / f"{Path(str(data)).stem or 'data'}-{Path(suite).stem}-{key[:8]}"

