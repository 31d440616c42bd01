"""The worker: evaluates tasks with the zoo loaded once and the current shard in memory.

Every worker, in this process or on a Ray actor, is built the same way: from a
:class:`WorkerRecipe`, plain picklable data (paths or an in-memory dataset, specs, settings).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from neaudit.attacks import (
    CLEAN,
    DATASET,
    AttackContext,
    DatasetContext,
    get_attack,
)
from neaudit.data import load_dataset
from neaudit.dataset import Batch, ImageDataset
from neaudit.device import forward_precision, resolve_device
from neaudit.errors import DataError, NeauditError
from neaudit.metrics import SsimReference, psnr, ssim
from neaudit.pipeline import span_batches
from neaudit.plan import Task
from neaudit.seeding import generator
from neaudit.store import ResultStore, weights_hash
from neaudit.zoo import ImageClassifier, check_model, create_model

REFERENCE_IMAGES = 256
"""How many clean images the L2 attacker owns when the audit draws them from the dataset."""


@dataclass(frozen=True)
class WorkerRecipe:
    """Everything needed to build the audit's worker in any process. ``data`` is a path that
    every worker reads itself (shared storage), or an in-memory dataset."""

    data: str | ImageDataset
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
    compile_models: bool = False
    precision: str = "fp32"  # resolved by the driver: every worker runs the forwards in it


def build_worker(recipe: WorkerRecipe, dataset: ImageDataset | None = None) -> Worker:
    """The worker a recipe describes (models loaded once, kept for every task it runs).
    ``dataset``: the recipe's dataset, already loaded and cut in this process."""
    if dataset is None:
        dataset = (recipe.data if isinstance(recipe.data, ImageDataset)
                   else load_dataset(recipe.data, recipe.originals))
        if recipe.max_images is not None:
            dataset = dataset.spread(recipe.max_images)
    device = resolve_device(recipe.device)
    if recipe.decode == "device":
        dataset = replace(dataset, decode_device=device)
    models = {spec: create_model(spec, dataset.class_names) for spec in recipe.specs}
    # hashed in a thread while the audit works (hashlib releases the GIL): the state dicts
    # taken here keep the CPU tensors, which moving the models to the device does not change
    hashing = ThreadPoolExecutor(1, thread_name_prefix="neaudit-weights")
    weights = {spec: hashing.submit(weights_hash, model.state_dict())
               for spec, model in models.items()}
    hashing.shutdown(wait=False)  # the thread ends once the hashes are done
    offload = not fits_on_device(models, device)
    if offload and recipe.compile_models:
        raise NeauditError(f"--compile-models: the zoo does not fit on {device} together, so its "
                           "models take turns there and cannot be compiled. Fix: drop "
                           "--compile-models, or audit fewer models at a time.")
    # channels-last on every device: on 2 CPU cores it took ResNet-50 from 13 to 18 img/s in
    # fp32 and from 22 to 51 in bf16, and left transformers as they were
    models = {spec: m.to(memory_format=torch.channels_last) if offload
              else m.to(device, memory_format=torch.channels_last)
              for spec, m in models.items()}
    _check_models(models, dataset, recipe.score_metric, device, offload, recipe.precision)
    reference = (reference_images(dataset, recipe.reference)
                 if recipe.needs_reference else None)
    store = ResultStore(Path(recipe.out), recipe.config)
    worker = Worker(dataset, models, recipe.authorized, store, device, recipe.seed, reference,
                    recipe.score_metric, offload, recipe.precision)
    if recipe.compile_models:  # compiled at the first forward; attacks keep the eager models
        # with a symbolic batch size: the last shard and the nondeterminism re-run's smaller
        # batches reuse the one compilation instead of each compiling anew
        worker.forwards = {spec: torch.compile(model, dynamic=True)
                           for spec, model in models.items()}
    worker.pending_weights = weights
    return worker


PROBE_IMAGES = 4
"""Dataset images every model is run on once before any work (:func:`check_model`)."""


def _check_models(models: dict[str, ImageClassifier], dataset: ImageDataset, score_metric: str,
                  device: torch.device, offload: bool, precision: str) -> None:
    """Refuse a model that fails on the dataset's images, or whose classes do not cover the
    labels it is scored against. The probe runs as the audit's forwards will (``precision``,
    channels-last), which also readies their kernels."""
    probe = next(dataset.batches(min(PROBE_IMAGES, len(dataset)))).protected
    probe = probe.contiguous(memory_format=torch.channels_last)
    for spec, model in models.items():
        with forward_precision(device, precision):
            classes = check_model(model.to(device) if offload else model, probe)
        if offload:
            model.cpu()
        if score_metric == "accuracy" and int(dataset.labels.max()) >= classes:
            raise DataError(f"{dataset.source}: label {int(dataset.labels.max())} is beyond the "
                            f"{classes} classes '{spec}' predicts. Fix: give labels as that "
                            "model's class indices, or use --score agreement.")


def fits_on_device(models: dict[str, ImageClassifier], device: torch.device) -> bool:
    """Whether every model fits in half of the GPU's free memory (else they take turns)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    size = sum(p.numel() * p.element_size() for m in models.values() for p in m.parameters())
    return size < free / 2


def reference_images(dataset: ImageDataset, reference: str | Path | None
                     ) -> torch.Tensor | None:
    """Clean in-distribution images for L2 attacks: ``reference`` if given (resized to the
    release's size, as an attacker would bring them), else up to 256 originals of the dataset
    itself (the strongest such attacker), spread over it: a class-folder dataset is grouped by
    class, and a run of 256 would hold one or two of its classes."""
    if reference is not None:
        source = load_dataset(reference, resize=tuple(dataset.image_shape))
        return torch.cat([b.protected for b in source.batches(64, stop=REFERENCE_IMAGES)])
    if not dataset.has_originals:
        return None
    return torch.cat([b.original for b in dataset.spread(REFERENCE_IMAGES).batches(64)])


def array_name(spec: str) -> str:
    """The key of a model's stored prediction array (specs may hold any character)."""
    return "m" + hashlib.sha256(spec.encode()).hexdigest()[:16]


class Worker:
    """Evaluates tasks; keeps the models loaded and the current shard in memory.

    ``offload`` keeps the models on the CPU and moves one at a time to the GPU, for zoos that
    do not fit in its memory together. ``precision`` (``bf16`` or ``fp32``) is the number
    format of the zoo's forwards (:func:`neaudit.device.resolve_precision`).
    """

    def __init__(self, dataset: ImageDataset, models: dict[str, ImageClassifier],
                 authorized: str, store: ResultStore, device: torch.device, seed: int,
                 reference: torch.Tensor | None, score_metric: str, offload: bool = False,
                 precision: str = "fp32") -> None:
        self.dataset, self.models, self.authorized = dataset, models, authorized
        self.store, self.device, self.seed = store, device, seed
        self.reference, self.score_metric, self.offload = reference, score_metric, offload
        self.precision = precision
        # what attacks cache between calls (trained denoisers, subspaces) and the L3
        # attacker's zoo of public models
        self.extras: dict = {"surrogates": models, "authorized": authorized}
        self.pending_weights: dict[str, Future[str]] = {}  # spec → weights_hash, in a thread
        self.names: dict[str, str] = {spec: spec for spec in models}  # spec → display name
        self._shard: tuple[int, Batch] | None = None
        self._upcoming: Iterator | None = None
        # the current shard's clean predictions, which every attack task of it is scored
        # against (``agreement``): kept from its clean task instead of read back per task
        self._clean: tuple[int, dict[str, np.ndarray]] | None = None
        # the current shard's originals as SSIM's reference, blurred once for every attack
        self._ssim_reference: tuple[int, SsimReference] | None = None
        # what predict() calls for each model: the model itself, or its compiled forward
        self.forwards: dict[str, Callable[[torch.Tensor], torch.Tensor]] = dict(models)

    @property
    def weights(self) -> dict[str, str]:
        """Each model's :func:`neaudit.store.weights_hash` (waits for the hashing thread)."""
        return {spec: future.result() for spec, future in self.pending_weights.items()}

    def attack_context(self, task_parts: Sequence[object], originals: torch.Tensor | None
                       ) -> AttackContext:
        """The context a batch attack gets: a generator keyed by the audit's seed and the
        task, so a task draws the same numbers wherever and whenever it runs."""
        return AttackContext(generator=generator(self.seed, *task_parts), seed=self.seed,
                             device=self.device, reference=self.reference,
                             originals=originals, cache_dir=self.store.cache_dir,
                             extras=self.extras)

    def prefetch(self, tasks: Sequence[Task], workers: int) -> None:
        """Load the shards the tasks will visit, in order, in ``workers`` background processes
        (pinned memory on CUDA, so copies to the device do not block)."""
        visits = [(t.shard, t.start, t.stop) for t in tasks if t.kind != DATASET]
        visits = [v for i, v in enumerate(visits) if i == 0 or v[0] != visits[i - 1][0]]
        if workers > 0 and visits:
            batches = span_batches(self.dataset, [(start, stop) for _, start, stop in visits],
                                   workers, pin_memory=self.device.type == "cuda")
            self._upcoming = iter(zip(visits, batches, strict=True))

    def _batch(self, task: Task) -> Batch:
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
        if self._shard[1].protected.device != self.device:  # once per shard, for every task
            self._shard = (self._shard[0], self.to_device(self._shard[1]))
        return self._shard[1]

    def to_device(self, batch: Batch) -> Batch:
        """The batch's images on the audit's device (labels stay on the CPU)."""
        def move(images: torch.Tensor | None) -> torch.Tensor | None:
            return None if images is None else images.to(self.device, non_blocking=True)

        return replace(batch, protected=move(batch.protected), original=move(batch.original))

    def predict(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """Top-1 predictions of every model on one batch, copied back to the CPU once (in the
        run's precision, channels-last)."""
        images = images.to(self.device, non_blocking=True)
        images = images.contiguous(memory_format=torch.channels_last)
        top = []
        with torch.inference_mode(), forward_precision(self.device, self.precision):
            for spec, model in self.models.items():
                if self.offload:
                    model.to(self.device)
                top.append(self.forwards[spec](images).argmax(1))
                if self.offload:
                    model.cpu()
        stacked = torch.stack(top).cpu().numpy()
        return dict(zip(self.models, stacked, strict=True))

    def attack(self, task: Task, images: torch.Tensor, originals: torch.Tensor | None
               ) -> torch.Tensor:
        """``images`` under the task's batch attack, left on the device for every model."""
        ctx = self.attack_context((task.key, task.shard), originals)
        attack = get_attack(task.attack)
        return attack(images.to(self.device, non_blocking=True), ctx, **dict(task.params))

    def __call__(self, task: Task) -> None:
        if self.store.done(task.task_id):
            return
        if task.kind == DATASET:
            self.store.save(task.task_id, self._run_on_dataset(task))
            return
        batch = self._batch(task)
        images = batch.original if task.attack == CLEAN else batch.protected
        if not task.is_reference:
            images = self.attack(task, images, batch.original)
        sums = None  # queued on the device ahead of the forwards: one wait serves both
        if batch.original is not None and task.attack != CLEAN:
            sums = _image_sums(images.clamp(0, 1), batch.original,
                               self._reference(task.shard, batch.original))
        predictions = self.predict(images)
        record = {**self._describe(task), "models": self._counts(task, batch, predictions)}
        if sums is not None:
            record.update(zip(("psnr_sum", "psnr_sq_sum", "ssim_sum", "ssim_sq_sum"),
                              sums.tolist(), strict=True), n_images=len(images))
        arrays = None
        if task.attack == CLEAN:
            arrays = {array_name(spec): pred for spec, pred in predictions.items()}
            self._clean = (task.shard, arrays)
            record["histograms"] = {spec: {str(c): int(k) for c, k in zip(
                *np.unique(pred, return_counts=True), strict=True)}
                for spec, pred in predictions.items()}
        self.store.save(task.task_id, record, arrays)

    def _reference(self, shard: int, originals: torch.Tensor) -> SsimReference:
        if self._ssim_reference is None or self._ssim_reference[0] != shard:
            self._ssim_reference = (shard, SsimReference(originals))
        return self._ssim_reference[1]

    def _describe(self, task: Task) -> dict:
        if task.is_reference:
            return {"attack": task.attack, "family": task.attack, "threat": "-",
                    "params": "{}", "shard": task.shard}
        attack = get_attack(task.attack)
        params = {**attack.defaults, **dict(task.params)} if task.kind == DATASET else dict(
            task.params)
        return {"attack": task.label, "family": attack.family, "threat": attack.threat,
                "params": json.dumps(params, sort_keys=True), "shard": task.shard}

    def _counts(self, task: Task, batch: Batch, predictions: dict[str, np.ndarray]
                ) -> dict[str, list[int]]:
        """[correct, n] per model: against the labels, or against the model's own clean
        predictions (``agreement``)."""
        if self.score_metric == "accuracy":
            truth = {spec: batch.labels.numpy() for spec in predictions}
        elif task.attack == CLEAN:
            truth = predictions
        else:
            if self._clean is None or self._clean[0] != task.shard:  # a resumed run
                self._clean = (task.shard, self.store.load_arrays(f"{CLEAN}__{task.shard:06d}"))
            truth = {spec: self._clean[1][array_name(spec)] for spec in predictions}
        return {spec: [int((pred == truth[spec]).sum()), int(len(pred))]
                for spec, pred in predictions.items()}

    def gather(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Protected images, clean originals and labels of the given items."""
        batches = [next(self.dataset.batches(1, int(i), int(i) + 1)) for i in indices]
        return (torch.cat([b.protected for b in batches]),
                torch.cat([b.original for b in batches]),
                torch.cat([b.labels for b in batches]))

    def _run_on_dataset(self, task: Task) -> dict:
        ctx = DatasetContext(gather=self.gather, labels=self.dataset.labels,
                             num_classes=self.dataset.num_classes, models=self.models,
                             authorized=self.authorized, seed=self.seed,
                             precision=self.precision)
        record = get_attack(task.attack).run_on_dataset(ctx, **dict(task.params))
        return {**self._describe(task), **record}


def _image_sums(images: torch.Tensor, originals: torch.Tensor, reference: SsimReference
                ) -> torch.Tensor:
    """PSNR and SSIM sums and sums of squares of an attacked batch against its clean
    originals (``reference``: the same, blurred for SSIM), as four numbers left where the
    images are (the table's mean and interval add them up over shards)."""
    p = psnr(images, originals).clamp(max=100.0)
    s = ssim(images, reference)
    return torch.stack([p.sum(), p.pow(2).sum(), s.sum(), s.pow(2).sum()])
