"""What the validity flags (:mod:`neaudit.flags`) read besides the table: clean prediction
histograms, the sidecar's recorded strength, lossy or altered input files, tasks that give
other figures when re-run, and files decoded on the GPU. Stored as ``diagnostics`` in
``summary.json``, so a report re-rendered later flags the same things.
"""

from __future__ import annotations

import os

import numpy as np

from neaudit.attacks import DATASET
from neaudit.data import HASHES
from neaudit.dataset import ImageDataset, evenly_spaced
from neaudit.imageio import JPEG_SUFFIXES, is_lossy, sha256_file
from neaudit.plan import Task
from neaudit.seeding import MIN_KEY_BITS
from neaudit.worker import Worker

RERUN_TASKS = 2
"""Attack tasks re-run with the same seed to detect nondeterminism."""

RERUN_SHARE = 0.02
"""The share of the audit's attack work the nondeterminism check may add."""

HALF_LEVEL = 0.5 / 255
"""Attacked images that differ by less than half a uint8 level count as the same."""

HASHED_FILES = 5000
"""Protected files whose hash is checked against ``hashes.sha256`` (a deterministic sample)."""


def diagnostics(worker: Worker, records: list[dict], tasks: list[Task]) -> dict:
    dataset = worker.dataset
    num_classes = dataset.num_classes if dataset.class_names else None
    histograms: dict[str, dict[str, int]] = {}
    for record in records:
        for spec, hist in record.get("histograms", {}).items():
            merged = histograms.setdefault(spec, {})
            for cls, count in hist.items():
                merged[cls] = merged.get(cls, 0) + count
    names = worker.names
    clean = {names.get(spec, spec): {"distinct": len(h),
                                     "top_share": max(h.values()) / sum(h.values()),
                                     "top_class": max(h, key=h.get),
                                     "classes": num_classes or 1000}
             for spec, h in histograms.items()}
    params = (dataset.sidecar or {}).get("params") or {}
    return {
        "chance": 1.0 / num_classes if num_classes else None,
        "labels": label_spread(dataset.labels),
        "random_init_models": [names.get(spec, spec) for spec, model in worker.models.items()
                               if getattr(model, "random_init", False)],
        "clean_predictions": clean,
        "sidecar": {"psnr": params.get("psnr"), "psnr_is_nominal": params.get("psnr_is_nominal"),
                    "method": (dataset.sidecar or {}).get("method")} if params else None,
        "files": file_checks(dataset),
        "nondeterministic_tasks": rerun(tasks, worker),
        "device_decoded_jpegs": device_decoded_jpegs(dataset),
        "exposed_key": exposed_key(dataset.sidecar),
    }


def label_spread(labels: np.ndarray | None) -> dict | None:
    """How many classes the audited images hold and the largest one's share: the spread a
    model's clean predictions are judged against (a release of one class is no evidence of a
    degenerate model)."""
    if labels is None or len(labels) == 0:
        return None
    counts = np.bincount(labels)
    return {"distinct": int((counts > 0).sum()), "top_share": float(counts.max() / len(labels))}


def exposed_key(sidecar: dict | None) -> str | None:
    """How the release's noise can be had without its key's secret, from its ``neaudit.json``:
    ``"stored"`` (``protect --store-key``), ``"seed"`` (written before ``protect`` drew secret
    keys, when the key was the recorded seed unless ``--key`` was given), ``"searchable"``
    (written before the ChaCha generator, whose predecessor reduced any key to 32 bits of
    state: 2³² candidates, each checked by correlating its noise with the release), ``"short"``
    (a given key of fewer than :data:`neaudit.seeding.MIN_KEY_BITS` bits), or None."""
    params = (sidecar or {}).get("params") or {}
    if params.get("key") is not None:
        return "stored"
    if "seed" in params and "key_source" not in params:
        return "seed"
    if "key_source" in params and "noise_generator" not in params:
        return "searchable"
    if params.get("key_bits") is not None and params["key_bits"] < MIN_KEY_BITS:
        return "short"
    return None


def device_decoded_jpegs(dataset: ImageDataset) -> int:
    """How many input files (protected and originals) nvJPEG decoded."""
    if dataset.decode_device is None:
        return 0
    files = [items for items in (dataset.protected, dataset.original)
             if items is not None and not isinstance(items, np.ndarray)]
    return sum(os.path.splitext(f)[1].lower() in JPEG_SUFFIXES for items in files for f in items)


def file_checks(dataset: ImageDataset, limit: int = HASHED_FILES) -> dict:
    """Lossy formats among the protected files, files whose hash differs from the
    ``hashes.sha256`` that ``neaudit protect`` wrote (a deterministic sample of ``limit``),
    and files it does not list (added after protection: perhaps not protected at all)."""
    if isinstance(dataset.protected, np.ndarray):
        return {}
    files = dataset.protected
    picked = evenly_spaced(len(files), limit).tolist()
    sample = [files[i] for i in picked]
    lossy = [str(f) for f in sample if is_lossy(f)]
    out = {"lossy": len(lossy), "lossy_example": lossy[0] if lossy else None}
    root = dataset.source
    hashes = root / HASHES if root is not None else None
    if hashes is not None and hashes.is_file():
        text = hashes.read_text(encoding="utf-8", errors="surrogateescape")  # as names are
        recorded = dict(reversed(line.split("  ", 1)) for line in text.splitlines()
                        if "  " in line)
        prefix = f"{root}{os.sep}"  # names as strings: a release may hold a million files
        names = [str(f)[len(prefix):] if str(f).startswith(prefix) else None for f in files]
        altered = [str(files[i]) for i in picked if names[i] in recorded
                   and sha256_file(files[i]) != recorded[names[i]]]
        unlisted = [str(f) for f, name in zip(files, names, strict=True) if name not in recorded]
        out.update(altered=len(altered), altered_example=altered[0] if altered else None,
                   unlisted=len(unlisted), unlisted_example=unlisted[0] if unlisted else None)
    return out


def rerun(tasks: list[Task], worker: Worker) -> list[str]:
    """Run up to two attack tasks twice more, with the same seed, on the first images of
    their shard, and list those whose attacked images or predictions differ between the two
    runs (unseeded randomness, nondeterministic kernels). Bounded to RERUN_SHARE of the
    audit's attack work."""
    attack_tasks = [t for t in tasks if not t.is_reference and t.kind != DATASET]
    candidates = [t for t in attack_tasks if t.shard == 0][:RERUN_TASKS]
    if not candidates:
        return []
    work = sum(t.stop - t.start for t in attack_tasks)
    images = max(1, int(RERUN_SHARE * work / (2 * len(candidates))))
    differing = []
    for task in candidates:
        stop = min(task.stop, task.start + images)
        batch = worker.to_device(next(worker.dataset.batches(stop - task.start, task.start,
                                                             stop)))
        runs = [worker.attack(task, batch.protected, batch.original) for _ in range(2)]
        predictions = [worker.predict(run) for run in runs]
        moved = float((runs[0] - runs[1]).abs().max()) > HALF_LEVEL
        if moved or any(not np.array_equal(predictions[0][spec], predictions[1][spec])
                        for spec in predictions[0]):
            differing.append(task.label)
    return differing
