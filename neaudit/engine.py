"""The audit engine: plan → tasks → executor → results store → tidy table.

The plan is a list of independent, serializable :class:`Task` objects, one per (attack,
shard), where a shard is one batch of images. Each task loads its shard, applies its attack
once, and runs every model in the zoo on the result, so each attacked batch is shared by all
models. The ``clean`` tasks (originals) run first and record each model's clean predictions,
which label-free ``agreement`` is scored against. Executors only need ``run(tasks, fn)``; the
local one runs in this process.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shlex
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from neaudit import __version__, learning
from neaudit.attacks import AttackContext, SuiteEntry, get_attack, load_suite
from neaudit.data import ImageDataset, load_dataset
from neaudit.device import resolve_device
from neaudit.errors import NeauditError
from neaudit.imageio import JPEG_SUFFIXES, write_png
from neaudit.learning import LEARNING
from neaudit.metrics import psnr, ssim
from neaudit.reporting import ReportResult, render_report
from neaudit.results import build_table, summarize
from neaudit.spectral import low_sensitivity_subspace, misalignment
from neaudit.stem import first_layer
from neaudit.store import ResultStore, ScratchStore
from neaudit.zoo import ImageClassifier, create_model, resolve_zoo

CLEAN, NONE = "clean", "none"


@dataclass(frozen=True)
class Task:
    """One unit of work: an attack (or ``clean``/``none``) on one shard, for every model."""

    attack: str
    params: tuple[tuple[str, object], ...]
    label: str
    key: str
    shard: int
    start: int
    stop: int

    @property
    def task_id(self) -> str:
        return f"{self.key}__{self.shard:06d}"


@dataclass
class AuditResult:
    """What ``audit`` returns: the tidy table, the summary, the report and where they are."""

    out: Path
    table: pd.DataFrame
    summary: dict
    computed_tasks: int
    skipped_tasks: int
    report: ReportResult | None = None


@dataclass(frozen=True)
class WorkerRecipe:
    """Everything a worker process needs to rebuild the audit's worker: plain, picklable data
    (paths, specs, settings). Workers read the data from these paths, not via the driver."""

    data: str
    originals: str | None
    max_images: int | None
    specs: tuple[str, ...]
    authorized: str
    out: str
    config: dict
    device: str
    seed: int
    reference: str | None
    needs_reference: bool
    score_metric: str
    decode: str = "cpu"


def build_worker(recipe: WorkerRecipe) -> Worker:
    """The worker a recipe describes (models loaded once, kept for every task it runs)."""
    dataset = load_dataset(recipe.data, recipe.originals)
    if recipe.max_images is not None:
        dataset = dataset.head(recipe.max_images)
    device = resolve_device(recipe.device)
    if recipe.decode == "device":
        dataset.decode_device = device
    models = {spec: create_model(spec, dataset.class_names) for spec in recipe.specs}
    offload = not fits_on_device(models, device)
    models = {spec: m if offload else m.to(device) for spec, m in models.items()}
    reference = (_reference_images(dataset, recipe.reference, recipe.seed)
                 if recipe.needs_reference else None)
    worker = Worker(dataset, models, ResultStore(Path(recipe.out), recipe.config), device,
                    recipe.seed, reference, recipe.score_metric)
    worker.extras.update(surrogates=models, authorized=recipe.authorized)
    worker.offload = offload
    return worker


class LocalExecutor:
    """Runs tasks in order in this process (clean tasks first, then by shard)."""

    name = "local"

    def run(self, tasks: Sequence[Task], worker: Callable[[Task], None],
            recipe: WorkerRecipe | None, progress: Callable[[], None] | None = None) -> None:
        for task in tasks:
            worker(task)
            if progress:
                progress()


class Executor(Protocol):
    """Runs a list of tasks: locally (:class:`LocalExecutor`) or on a cluster
    (:class:`neaudit.ray_executor.RayExecutor`), through the same atomic results store."""

    name: str

    def run(self, tasks: Sequence[Task], worker: Callable[[Task], None],
            recipe: WorkerRecipe | None, progress: Callable[[], None] | None = None) -> None: ...


def plan(dataset: ImageDataset, entries: Sequence[SuiteEntry], batch_size: int) -> list[Task]:
    """Clean tasks first (they feed agreement), then every attack shard by shard, then the
    learning attacks, which each need the whole dataset."""
    shards = [(i, lo, min(lo + batch_size, len(dataset)))
              for i, lo in enumerate(range(0, len(dataset), batch_size))]
    heads = ([(CLEAN, (), CLEAN, CLEAN)] if dataset.has_originals else []) + [
        (NONE, (), NONE, NONE)]
    attacks = heads + [(e.attack, e.params, e.label, e.key) for e in entries
                       if e.attack not in LEARNING]
    tasks = [Task(a, p, label, key, i, lo, hi) for (i, lo, hi) in shards
             for (a, p, label, key) in attacks]
    tasks = sorted(tasks, key=lambda t: (t.attack != CLEAN, t.shard))
    return tasks + [Task(e.attack, e.params, e.label, e.key, 0, 0, len(dataset))
                    for e in entries if e.attack in LEARNING]


class Worker:
    """Evaluates tasks; keeps the models loaded and the current shard in memory."""

    def __init__(self, dataset: ImageDataset, models: dict[str, ImageClassifier],
                 store: ResultStore, device: torch.device, seed: int,
                 reference: torch.Tensor | None, score_metric: str) -> None:
        self.dataset, self.models, self.store = dataset, models, store
        self.device, self.seed, self.reference = device, seed, reference
        self.score_metric = score_metric
        self.extras: dict = {}
        self._shard: tuple[int, object] | None = None
        self._upcoming: Iterator | None = None
        self.offload = False  # keep models on the CPU, one on the GPU at a time

    def prefetch(self, tasks: Sequence[Task], workers: int) -> None:
        """Load the shards the tasks will visit, in order, in ``workers`` background processes
        (pinned memory on CUDA, so copies to the device do not block)."""
        visits = [(t.shard, t.start, t.stop) for t in tasks if t.attack not in LEARNING]
        visits = [v for i, v in enumerate(visits) if i == 0 or v[0] != visits[i - 1][0]]
        if workers > 0 and visits:
            loader = torch.utils.data.DataLoader(
                _ShardReader(self.dataset, visits), batch_size=None, num_workers=workers,
                pin_memory=self.device.type == "cuda")
            self._upcoming = iter(zip(visits, loader, strict=True))

    def _batch(self, task: Task):
        while self._upcoming is not None and (
                self._shard is None or self._shard[0] != task.shard):
            try:
                (shard, _, _), batch = next(self._upcoming)
            except StopIteration:
                self._upcoming = None
                break
            self._shard = (shard, batch)
        if self._shard is None or self._shard[0] != task.shard:
            batch = next(self.dataset.batches(task.stop - task.start, task.start, task.stop))
            self._shard = (task.shard, batch)
        return self._shard[1]

    def _predict(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        images = images.to(self.device, non_blocking=True)
        out = {}
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=(
                self.device.type == "cuda")):
            for spec, model in self.models.items():
                if self.offload:
                    model.to(self.device)
                out[spec] = model(images).float().argmax(1).cpu().numpy()
                if self.offload:
                    model.cpu()
        return out

    def __call__(self, task: Task) -> None:
        if self.store.done(task.task_id):
            return
        if task.attack in LEARNING:
            self.store.save(task.task_id, self._learn(task))
            return
        batch = self._batch(task)
        if task.attack == CLEAN:
            images = batch.original
        else:
            images = batch.protected
        if task.attack not in (CLEAN, NONE):
            seed = zlib.crc32(f"{self.seed}:{task.key}:{task.shard}".encode())
            ctx = AttackContext(generator=torch.Generator().manual_seed(seed), device=self.device,
                                reference=self.reference, originals=batch.original,
                                cache_dir=self.store.root.parent / ".cache", extras=self.extras)
            attack = get_attack(task.attack)
            images = attack(images.to(self.device, non_blocking=True), ctx,
                            **dict(task.params)).cpu()
        predictions = self._predict(images)
        if self.score_metric == "accuracy":
            truth = {spec: batch.labels.numpy() for spec in predictions}
        elif task.attack == CLEAN:
            truth = predictions
        else:
            clean = self.store.load_arrays(f"{CLEAN}__{task.shard:06d}")
            truth = {spec: clean[_array_name(spec)] for spec in predictions}
        record = {
            "attack": task.label if task.attack not in (CLEAN, NONE) else task.attack,
            "family": get_attack(task.attack).family if task.attack not in (CLEAN, NONE)
            else task.attack,
            "threat": get_attack(task.attack).threat if task.attack not in (CLEAN, NONE)
            else "-",
            "params": json.dumps(dict(task.params), sort_keys=True),
            "shard": task.shard,
            "models": {spec: [int((pred == truth[spec]).sum()), int(len(pred))]
                       for spec, pred in predictions.items()},
        }
        if batch.original is not None and task.attack != CLEAN:
            p = psnr(images.clamp(0, 1), batch.original).clamp(max=100.0)
            s = ssim(images.clamp(0, 1), batch.original)
            record.update(psnr_sum=float(p.sum()), psnr_sq_sum=float(p.pow(2).sum()),
                          ssim_sum=float(s.sum()), ssim_sq_sum=float(s.pow(2).sum()),
                          n_images=len(p))
        arrays = None
        if task.attack == CLEAN:
            arrays = {_array_name(spec): pred for spec, pred in predictions.items()}
            record["histograms"] = {spec: {str(c): int(k) for c, k in zip(
                *np.unique(pred, return_counts=True), strict=True)}
                for spec, pred in predictions.items()}
        self.store.save(task.task_id, record, arrays)


    def _gather(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batches = [next(self.dataset.batches(1, int(i), int(i) + 1)) for i in indices]
        return (torch.cat([b.protected for b in batches]),
                torch.cat([b.original for b in batches]),
                torch.cat([b.labels for b in batches]))

    def _learn(self, task: Task) -> dict:
        """Linear probe or fine-tuning curve for every model (see :mod:`neaudit.learning`)."""
        params = {**LEARNING[task.attack].defaults, **dict(task.params)}
        train, test = learning.split(self.dataset.labels, self.seed)
        cap = int(params["max_samples"])
        if len(train) > cap:
            train = learning.subset(train, cap / len(train), self.seed)
        protected_train, clean_train, y_train = self._gather(train)
        protected_test, clean_test, y_test = self._gather(test[:cap])
        record = {"attack": task.attack, "family": "learning", "threat": "learning",
                  "params": json.dumps(params, sort_keys=True), "shard": 0, "models": {}}
        if task.attack == "linear_probe":
            record["baseline"] = {}
            for spec, model in self.models.items():
                record["models"][spec] = learning.probe_accuracy(
                    learning.features(model, protected_train), y_train.numpy(),
                    learning.features(model, protected_test), y_test.numpy(),
                    params["c"], self.seed)
                record["baseline"][spec] = learning.probe_accuracy(
                    learning.features(model, clean_train), y_train.numpy(),
                    learning.features(model, clean_test), y_test.numpy(), params["c"],
                    self.seed)
            return record
        record["curve"] = {}
        fractions = [float(f) for f in params["fractions"]]
        classes = self.dataset.num_classes
        for spec, model in self.models.items():
            if spec == self.extras.get("authorized"):
                continue
            curve = {"fractions": fractions, "protected": [], "clean": []}
            for fraction in fractions:
                idx = torch.as_tensor(learning.subset(np.arange(len(train)), fraction,
                                                      self.seed))
                for kind, images in (("protected", protected_train), ("clean", clean_train)):
                    curve[kind].append(learning.finetune_accuracy(
                        model, images[idx], y_train[idx], clean_test, y_test,
                        int(params["epochs"]), int(params["max_steps"]), float(params["lr"]),
                        self.seed, classes))
            record["curve"][spec] = curve
        return record


class _ShardReader(torch.utils.data.Dataset):
    """Shard visits as a map-style dataset, so a DataLoader can read them in worker processes."""

    def __init__(self, dataset: ImageDataset, visits: list[tuple[int, int, int]]) -> None:
        self.dataset, self.visits = dataset, visits

    def __len__(self) -> int:
        return len(self.visits)

    def __getitem__(self, index: int):
        _, start, stop = self.visits[index]
        return next(self.dataset.batches(stop - start, start, stop))


def fits_on_device(models: dict[str, ImageClassifier], device: torch.device) -> bool:
    """Whether every model fits in half of the GPU's free memory (else they take turns)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    size = sum(p.numel() * p.element_size() for m in models.values() for p in m.parameters())
    return size < free / 2


def _array_name(spec: str) -> str:
    return "m" + hashlib.sha256(spec.encode()).hexdigest()[:16]


def _weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


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


def audit(data: str | Path | ImageDataset, zoo: str | Sequence[str],
          authorized: str | None = None, suite: str | Path = "standard",
          out: str | Path | None = None, device: str = "auto", seed: int = 0,
          batch_size: int = 64, originals: str | Path | None = None,
          reference: str | Path | None = None, max_images: int | None = None,
          executor: Executor | None = None, quiet: bool = False,
          command: str | None = None, stop_after: int | None = None,
          score: str = "auto", policy: str | Path | None = None,
          loader_workers: int = 0, decode: str = "cpu") -> AuditResult:
    """Run an audit and return its table; see the module docstring for the plan.

    ``authorized`` defaults to the spec recorded in the dataset's ``neaudit.json``.
    ``score``: ``accuracy`` (needs labels), ``agreement`` (needs originals) or ``auto``
    (accuracy where labels exist). ``stop_after`` computes at most that many new tasks, then
    stops (used to test resume). ``loader_workers`` > 0 reads shards ahead in that many
    processes (pinned memory on CUDA). ``decode="device"`` decodes JPEG inputs with nvJPEG on
    the CUDA device (opt-in: its pixels differ from libjpeg-turbo's, and the audit says so).
    """
    started = time.time()
    entries = load_suite(suite)  # validated before any image is read
    dataset = data if isinstance(data, ImageDataset) else load_dataset(data, originals)
    if max_images is not None:
        dataset = dataset.head(max_images)
    if authorized is None:
        authorized = (dataset.sidecar or {}).get("authorized")
        if authorized is None:
            raise NeauditError("no authorized model: the dataset has no neaudit.json naming one. "
                               "Fix: pass --authorized SPEC.")
    specs = [authorized] + [s for s in resolve_zoo(zoo) if s != authorized]
    if len(specs) < 2:
        raise NeauditError("the zoo has no unauthorized model. Fix: pass --zoo or --model.")
    if any(e.attack in LEARNING for e in entries) and (
            dataset.labels is None or not dataset.has_originals):
        raise NeauditError(f"{dataset.source}: learning attacks (linear_probe, finetune) need "
                           "labels and the clean originals. Fix: use class folders and "
                           "--originals, or drop them from the suite.")
    score_metric = score if score != "auto" else (
        "accuracy" if dataset.labels is not None else "agreement")
    if score_metric == "agreement" and not dataset.has_originals:
        raise NeauditError(f"{dataset.source}: agreement needs the clean originals. Fix: pass "
                           "--originals DIR, or --score accuracy with labels.")
    if score_metric == "accuracy" and dataset.labels is None:
        raise NeauditError(f"{dataset.source}: accuracy needs labels. Fix: use class folders, "
                           "a label column, or --score agreement.")
    if score_metric not in ("accuracy", "agreement"):
        raise NeauditError(f"unknown score '{score}'. Fix: use auto, accuracy or agreement.")
    torch_device = resolve_device(device)
    _check_decode(decode, torch_device, loader_workers)
    if decode == "device":
        dataset.decode_device = torch_device
    models = {spec: create_model(spec, dataset.class_names) for spec in specs}
    offload = not fits_on_device(models, torch_device)
    models = {spec: m if offload else m.to(torch_device) for spec, m in models.items()}
    roles = {spec: "authorized" if spec == authorized else "unauthorized" for spec in specs}
    out = Path(out) if out else default_run_dir(
        data if not isinstance(data, ImageDataset) else "data", str(suite), specs, seed)
    config = {
        "dataset": _dataset_hash(dataset), "count": len(dataset), "models": specs,
        "authorized": authorized, "suite": [e.label for e in entries], "seed": seed,
        "batch_size": batch_size, "score_metric": score_metric,
        "reference": str(reference) if reference else None, "decode": decode,
    }
    store = ResultStore(out, config)
    needs_reference = any(e.threat == "L2" for e in entries)
    if len(dataset) == 0:
        raise NeauditError(f"{dataset.source}: no images to audit.")
    reference_images = _reference_images(dataset, reference, seed) if needs_reference else None
    tasks = plan(dataset, entries, batch_size)
    pending = [t for t in tasks if not store.done(t.task_id)]
    if stop_after is not None:
        pending = pending[:stop_after]
    worker = Worker(dataset, models, store, torch_device, seed, reference_images, score_metric)
    worker.extras.update(surrogates=models, authorized=authorized)  # the L3 attacker's zoo
    worker.offload = offload
    if loader_workers:
        worker.prefetch(pending, loader_workers)
    recipe = None if isinstance(data, ImageDataset) else WorkerRecipe(
        str(data), str(originals) if originals else None, max_images, tuple(specs), authorized,
        str(out), config, device, seed, str(reference) if reference else None,
        needs_reference, score_metric, decode)
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), desc="audit", unit="task", file=sys.stderr)
    (executor or LocalExecutor()).run(pending, worker, recipe, bar.update if bar else None)
    if bar:
        bar.close()
    num_classes = len(dataset.class_names) if dataset.class_names else None
    records = store.records()
    table = build_table(records, roles, score_metric, num_classes)
    summary = summarize(table, score_metric)
    if all(store.done(t.task_id) for t in tasks):
        summary["diagnostics"] = _diagnostics(dataset, records, tasks, worker, num_classes)
    if any(e.attack == "surrogate_projection" for e in entries):
        summary["surrogate_ranking"] = _surrogate_ranking(dataset, worker)
    finished = len([t for t in tasks if store.done(t.task_id)]) == len(tasks)
    summary["complete"] = finished
    if finished and dataset.has_originals:
        _write_samples(store.root, dataset, entries, summary, worker, seed)
        _write_spectral(store.root, dataset, models, authorized, summary)
    _write_outputs(store, table, summary, config, models, dataset, torch_device, command,
                   time.time() - started, finished)
    report = render_report(out, policy) if finished else None
    return AuditResult(out, table, summary, len(pending), len(tasks) - len(pending), report)


def _diagnostics(dataset: ImageDataset, records: list[dict], tasks: list[Task], worker: Worker,
                 num_classes: int | None) -> dict:
    """What the validity flags (:mod:`neaudit.flags`) read besides the table."""
    histograms: dict[str, dict[str, int]] = {}
    for record in records:
        for spec, hist in record.get("histograms", {}).items():
            merged = histograms.setdefault(spec, {})
            for cls, count in hist.items():
                merged[cls] = merged.get(cls, 0) + count
    clean = {spec: {"distinct": len(h), "top_share": max(h.values()) / sum(h.values()),
                    "classes": num_classes or 1000} for spec, h in histograms.items()}
    params = (dataset.sidecar or {}).get("params") or {}
    return {
        "chance": 1.0 / num_classes if num_classes else None,
        "clean_predictions": clean,
        "sidecar": {"psnr": params.get("psnr"), "psnr_is_nominal": params.get("psnr_is_nominal"),
                    "method": (dataset.sidecar or {}).get("method")} if params else None,
        "files": _file_checks(dataset),
        "nondeterministic_tasks": _rerun(tasks, worker),
        "device_decoded_jpegs": _device_decoded_jpegs(dataset),
    }


def _device_decoded_jpegs(dataset: ImageDataset) -> int:
    """How many input files (protected and originals) nvJPEG decoded."""
    if dataset.decode_device is None:
        return 0
    files = [items for items in (dataset.protected, dataset.original)
             if items is not None and not isinstance(items, np.ndarray)]
    return sum(f.suffix.lower() in JPEG_SUFFIXES for items in files for f in items)


def _check_decode(decode: str, device: torch.device, loader_workers: int) -> None:
    if decode not in ("cpu", "device"):
        raise NeauditError(f"unknown --decode '{decode}'. Fix: use cpu or device.")
    if decode == "device" and device.type != "cuda":
        raise NeauditError(f"--decode device needs a CUDA device (the audit runs on {device}). "
                           "Fix: add --device cuda, or drop --decode device.")
    if decode == "device" and loader_workers:
        raise NeauditError("--decode device decodes in the process that owns the GPU, not in "
                           "--loader-workers processes. Fix: drop one of the two options.")


def _file_checks(dataset: ImageDataset, limit: int = 5000) -> dict:
    """Lossy formats among the protected files, and files whose hash differs from the
    ``hashes.sha256`` that ``neaudit protect`` wrote (a deterministic sample of ``limit``)."""
    from neaudit.imageio import is_lossy, sha256_file

    if isinstance(dataset.protected, np.ndarray):
        return {}
    files = dataset.protected
    sample = files if len(files) <= limit else [files[i] for i in
                                                 np.linspace(0, len(files) - 1, limit, dtype=int)]
    lossy = [str(f) for f in sample if is_lossy(f)]
    out = {"lossy": len(lossy), "lossy_example": lossy[0] if lossy else None}
    root = dataset.source
    hashes = root / "hashes.sha256" if root is not None else None
    if hashes is not None and hashes.is_file():
        recorded = dict(reversed(line.split("  ", 1)) for line in hashes.read_text().splitlines()
                        if "  " in line)
        wanted = {str(f.relative_to(root)): f for f in sample if f.is_relative_to(root)}
        altered = [str(path) for name, path in wanted.items()
                   if name in recorded and sha256_file(path) != recorded[name]]
        out.update(altered=len(altered), altered_example=altered[0] if altered else None)
    return out


def _rerun(tasks: list[Task], worker: Worker, count: int = 2) -> list[str]:
    """Re-run a few attack tasks with the same seed in scratch and list those that differ."""
    candidates = [t for t in tasks if t.attack not in (CLEAN, NONE) and t.shard == 0
                  and t.attack not in LEARNING]
    scratch = ScratchStore(worker.store)
    rerun = Worker(worker.dataset, worker.models, scratch, worker.device, worker.seed,
                   worker.reference, worker.score_metric)
    rerun.extras, rerun.offload = worker.extras, worker.offload
    differing = []
    for task in candidates[:count]:
        rerun(task)
        fresh, stored = scratch.saved[task.task_id], scratch.record(task.task_id)
        if fresh["models"] != stored["models"] or abs(
                fresh.get("psnr_sum", 0.0) - stored.get("psnr_sum", 0.0)) > 1e-3:
            differing.append(task.label)
    return differing


def _surrogate_ranking(dataset: ImageDataset, worker: Worker) -> list[tuple[str, float]]:
    """The L3 attacker's ranking of candidate models on the first shard (for the report)."""
    from neaudit.attacks.adaptive import rank_surrogates

    images = next(dataset.batches(min(64, len(dataset)))).protected
    ctx = AttackContext(generator=torch.Generator().manual_seed(0), extras=worker.extras)
    return rank_surrogates(images, ctx)


SAMPLE_GAIN = 10


def _write_samples(root: Path, dataset: ImageDataset, entries: Sequence[SuiteEntry],
                   summary: dict, worker: Worker, seed: int) -> None:
    """A grid for the report: original | protected | amplified difference | worst attack,
    for up to two images per class (eight at most)."""
    from torchvision.utils import make_grid

    picks: list[int] = []
    labels = dataset.labels if dataset.labels is not None else np.zeros(len(dataset), int)
    for cls in np.unique(labels):
        picks += [int(i) for i in np.flatnonzero(labels == cls)[:2]]
    picks = sorted(picks)[:8]
    batches = [next(dataset.batches(1, i, i + 1)) for i in picks]
    original = torch.cat([b.original for b in batches])
    protected = torch.cat([b.protected for b in batches])
    worst = summary.get("worst_leakage", {}).get("attack")
    by_label = {e.label: e for e in entries}
    attacked = protected
    if worst in by_label:
        entry = by_label[worst]
        ctx = AttackContext(generator=torch.Generator().manual_seed(seed), device=worker.device,
                            reference=worker.reference, originals=original,
                            cache_dir=root.parent / ".cache", extras=worker.extras)
        attacked = get_attack(entry.attack)(protected.to(worker.device), ctx,
                                            **dict(entry.params)).cpu()
    difference = (0.5 + SAMPLE_GAIN * (protected - original)).clamp(0, 1)
    rows = torch.stack([original, protected, difference, attacked], dim=1).flatten(0, 1)
    grid = make_grid(rows, nrow=4, padding=2, pad_value=1.0)
    image = torch.round(grid.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    write_png(root / "samples.png", image)
    meta = {"gain": SAMPLE_GAIN, "attack": worst or "none", "items": picks}
    (root / "samples.json").write_text(json.dumps(meta))


def _write_spectral(root: Path, dataset: ImageDataset, models: dict[str, ImageClassifier],
                    authorized: str, summary: dict) -> None:
    """Principal angles, predicted and measured first-layer gains per unauthorized model."""
    size = tuple(dataset.image_shape)
    auth = models[authorized]
    try:
        auth_layer = first_layer(auth, size)
        rank = ((dataset.sidecar or {}).get("params") or {}).get("rank")
        space = low_sensitivity_subspace(auth_layer, tuple(auth.input_size or size), rank)
    except (NeauditError, ValueError) as exc:
        (root / "spectral.json").write_text(json.dumps({"error": str(exc)}))
        return
    batch = next(dataset.batches(min(32, len(dataset))))
    delta = (batch.protected - batch.original).cpu()
    noise = torch.randn(delta.shape, generator=torch.Generator().manual_seed(0))
    noise = noise * (delta.flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
    rows = []
    for spec, model in models.items():
        if spec == authorized:
            continue
        try:
            layer = first_layer(model, size)
        except NeauditError:
            continue
        resize = model.input_size or size

        def gain(x: torch.Tensor, layer=layer, resize=resize) -> float:
            x = torch.nn.functional.interpolate(x, size=resize, mode="bilinear",
                                                align_corners=False)
            return float(layer.response(x).norm() / x.norm())

        angle, predicted = misalignment(space, layer)
        rows.append({"model": spec, "stem": f"{tuple(layer.unfolded.shape)} k{layer.kernel[0]}"
                     f"/s{layer.stride[0]}", "mean_angle_deg": angle,
                     "predicted_gain_ratio": predicted,
                     "measured_gain_ratio": gain(delta) / gain(noise),
                     "leakage": summary["models"][spec].get("leakage")})
    (root / "spectral.json").write_text(json.dumps(rows, default=_json_default))


def _reference_images(dataset: ImageDataset, reference: str | Path | None, seed: int
                      ) -> torch.Tensor | None:
    """Clean in-distribution images for L2 attacks: ``reference`` if given, else a seeded run
    of up to 256 originals of the dataset itself (the strongest such attacker)."""
    if reference is not None:
        source = load_dataset(reference)
        return torch.cat([b.protected for b in source.batches(64, stop=256)])
    if not dataset.has_originals:
        return None
    count = min(256, len(dataset))
    start = int(np.random.default_rng(seed).integers(0, len(dataset) - count + 1))
    return torch.cat([b.original for b in dataset.batches(64, start, start + count)])


def _write_outputs(store: ResultStore, table: pd.DataFrame, summary: dict, config: dict,
                   models: dict, dataset: ImageDataset, device: torch.device,
                   command: str | None, seconds: float, finished: bool) -> None:
    import kornia
    import open_clip
    import timm

    table.to_csv(store.root / "results.csv.tmp", index=False)
    (store.root / "results.csv.tmp").replace(store.root / "results.csv")
    table.to_parquet(store.root / "results.parquet.tmp", index=False)
    (store.root / "results.parquet.tmp").replace(store.root / "results.parquet")
    store.write_text("summary.json", json.dumps(summary, indent=2, default=_json_default))
    manifest = {
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "config": config,
        "seed": config["seed"],
        "complete": finished,
        "versions": {"neaudit": __version__, "torch": torch.__version__,
                     "timm": timm.__version__, "open_clip": open_clip.__version__,
                     "kornia": kornia.__version__, "python": platform.python_version()},
        "device": str(device),
        "dataset": {"source": str(dataset.source), "hash": config["dataset"],
                    "count": len(dataset)},
        "weights": {spec: _weights_hash(model) for spec, model in models.items()},
        "seconds": seconds,
    }
    store.write_text("run.json", json.dumps(manifest, indent=2, default=_json_default))


def _json_default(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)


def format_summary(result: AuditResult) -> str:
    """Plain-text table for the terminal."""
    summary = result.summary
    metric = summary["score_metric"]
    lines = [f"{'model':<48} {'role':<12} {'clean':>6} {'NE':>6} {'worst attack':<28} "
             f"{'worst':>6}"]
    for model, entry in summary["models"].items():
        worst = entry.get("worst_leakage", entry.get("worst_utility_retention"))
        clean = entry.get("clean")
        lines.append(
            f"{model[:48]:<48} {entry['role']:<12} "
            f"{(clean if clean is not None else math.nan):>6.3f} {entry['protected']:>6.3f} "
            f"{entry.get('worst_attack', '-')[:28]:<28} "
            f"{(worst if worst is not None else math.nan):>6.3f}")
    lines.append(f"({metric}; 'worst' is leakage for unauthorized models, retention for the "
                 "authorized one)")
    if "suppression_ratio" in summary:
        lines.append(f"suppression ratio {summary['suppression_ratio']:.2f}")
    if "worst_leakage" in summary:
        w = summary["worst_leakage"]
        lines.append(f"worst-case leakage {w['value']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]"
                     f" by {w['model']} under {w['attack']} ({w['threat']})")
    lines.append(f"results: {result.out / 'results.csv'}")
    return "\n".join(lines)
