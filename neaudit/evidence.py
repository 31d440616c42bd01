"""What the report shows besides the table, computed once when an audit finishes: a few
sample images (clean, protected, and under the worst image-level attack) and the spectral
view (principal angles, predicted and measured first-layer gains). Stored as data
(``samples.npz`` + ``samples.json``, ``spectral.json``); the report draws them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from neaudit.attacks import BATCH, SuiteEntry, get_attack
from neaudit.attacks.adaptive import rank_surrogates
from neaudit.errors import NeauditError
from neaudit.imageio import atomic_write, to_uint8
from neaudit.metrics import first_layer_gain, isotropic_like
from neaudit.seeding import generator
from neaudit.spectral import low_sensitivity_subspace, misalignment
from neaudit.stem import first_layer
from neaudit.store import json_default
from neaudit.vocabulary import NONE
from neaudit.worker import Worker

SAMPLES_PER_CLASS, MAX_SAMPLES = 2, 8
SURROGATE_IMAGES = 64
SPECTRAL_IMAGES = 32


def worst_batch_attack(table: pd.DataFrame, entries: Sequence[SuiteEntry]) -> SuiteEntry | None:
    """The image-level attack with the highest leakage (learning attacks have no image)."""
    by_label = {e.label: e for e in entries if e.kind == BATCH}
    leak = table[(table.metric == "leakage") & table.attack.isin(by_label)].dropna(
        subset="value")
    return by_label[leak.loc[leak.value.idxmax()].attack] if len(leak) else None


def write_samples(worker: Worker, table: pd.DataFrame, entries: Sequence[SuiteEntry]) -> None:
    """Up to two images per class (eight at most): original, protected, and attacked by the
    worst image-level attack, as uint8 arrays."""
    dataset = worker.dataset
    labels = dataset.labels if dataset.labels is not None else np.zeros(len(dataset), int)
    picks = sorted(int(i) for cls in np.unique(labels)
                   for i in np.flatnonzero(labels == cls)[:SAMPLES_PER_CLASS])[:MAX_SAMPLES]
    batches = [next(dataset.batches(1, i, i + 1)) for i in picks]
    original = torch.cat([b.original for b in batches])
    protected = torch.cat([b.protected for b in batches])
    worst = worst_batch_attack(table, entries)
    attacked = protected
    if worst is not None:
        ctx = worker.attack_context(("samples", worst.key), original)
        attacked = get_attack(worst.attack)(protected.to(worker.device), ctx,
                                            **dict(worst.params)).cpu()
    arrays = {"original": to_uint8(original), "protected": to_uint8(protected),
              "attacked": to_uint8(attacked)}
    root = worker.store.root
    atomic_write(root / "samples.npz", lambda h: np.savez(h, **arrays))
    meta = {"attack": worst.label if worst else NONE, "items": picks}
    worker.store.write_text("samples.json", json.dumps(meta))


def surrogate_ranking(worker: Worker) -> list[tuple[str, float]]:
    """The L3 attacker's ranking of candidate models on the first images (for the report)."""
    images = next(worker.dataset.batches(min(SURROGATE_IMAGES, len(worker.dataset)))).protected
    ranking = rank_surrogates(images, worker.attack_context(("surrogate-ranking",), None))
    return [(worker.names.get(spec, spec), odds) for spec, odds in ranking]


def write_spectral(worker: Worker, summary: dict) -> None:
    """Principal angles, predicted and measured first-layer gains per unauthorized model."""
    dataset, models = worker.dataset, worker.models
    size = tuple(dataset.image_shape)
    auth = models[worker.authorized]
    try:
        rank = ((dataset.sidecar or {}).get("params") or {}).get("rank")
        stem = first_layer(auth, size)
        # principal angles are defined for patch stems only; an overlapping stem's
        # per-frequency subspace is costly and would give NaN
        space = None if stem.overlapping else low_sensitivity_subspace(
            stem, tuple(auth.input_size or size), rank)
    except (NeauditError, ValueError) as exc:
        worker.store.write_text("spectral.json", json.dumps({"error": str(exc)}))
        return
    batch = next(dataset.batches(min(SPECTRAL_IMAGES, len(dataset))))
    delta = (batch.protected - batch.original).cpu()
    noise = isotropic_like(delta, torch.randn(delta.shape,
                                              generator=generator(worker.seed, "spectral")))
    rows = []
    for spec, model in models.items():
        if spec == worker.authorized:
            continue
        try:
            layer = first_layer(model, size)
        except NeauditError:
            continue
        resize = model.input_size or size

        def gain(x: torch.Tensor, layer=layer, resize=resize) -> float:
            x = torch.nn.functional.interpolate(x, size=resize, mode="bilinear",
                                                align_corners=False)
            return float(first_layer_gain(layer, x).mean())

        angle, predicted = misalignment(space, layer) if space else (math.nan, math.nan)
        name = worker.names.get(spec, spec)
        rows.append({"model": name, "stem": f"{tuple(layer.unfolded.shape)} k{layer.kernel[0]}"
                     f"/s{layer.stride[0]}", "mean_angle_deg": angle,
                     "predicted_gain_ratio": predicted,
                     "measured_gain_ratio": gain(delta) / gain(noise),
                     "leakage": summary["models"][name].get("leakage")})
    worker.store.write_text("spectral.json", json.dumps(rows, default=json_default))
