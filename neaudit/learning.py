"""Learning-based leakage (needs labels): can an unauthorized party *learn* from the NEs?

* ``linear_probe``: logistic regression (scikit-learn) on frozen features of an unauthorized
  model (the input of its last linear layer), trained on a seeded half of the protected images
  and scored on the other half; the same probe trained and scored on the clean originals is
  the baseline, and leakage = protected probe accuracy / clean probe accuracy.
* ``finetune``: fine-tune an unauthorized model on random subsets of the protected training
  half at several sample fractions, scoring each on the held-out clean originals; the same
  curve trained on clean data is the baseline. SLC-AUC (Non-Transferable Pruning) = area
  under accuracy vs ln(fraction) (trapezoid rule), protected minus clean: negative means the
  protection makes learning harder.

Both are bounded for CPUs by ``max_samples``, ``epochs`` and ``max_steps``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from neaudit.zoo import ImageClassifier


@dataclass(frozen=True)
class LearningAttack:
    name: str
    defaults: dict[str, object]
    doc: str


LEARNING: dict[str, LearningAttack] = {
    "linear_probe": LearningAttack(
        "linear_probe", {"max_samples": 2000, "c": 1.0},
        "logistic-regression probe on frozen unauthorized features"),
    "finetune": LearningAttack(
        "finetune", {"fractions": [0.1, 0.25, 0.5, 1.0], "epochs": 3, "max_steps": 200,
                     "lr": 1e-3, "max_samples": 2000},
        "fine-tuning on protected subsets; learning curve and SLC-AUC"),
}


def split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, stratified half/half split of item indices."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        half = max(1, len(idx) // 2)
        train += idx[:half].tolist()
        test += idx[half:].tolist()
    return np.sort(np.array(train)), np.sort(np.array(test))


def features(model: ImageClassifier, images: torch.Tensor, batch: int = 128) -> np.ndarray:
    """The input of the model's last executed linear layer (its penultimate features), or
    its logits where it has none."""
    captured: list[torch.Tensor] = []
    linears = [m for m in model.net.modules() if isinstance(m, nn.Linear)]
    last: list[nn.Module] = []

    def record(module, inputs):
        last.append(module)
        captured.append(inputs[0].detach().flatten(1).cpu())

    device = model.mean.device
    out = []
    with torch.inference_mode():
        for lo in range(0, len(images), batch):
            captured.clear()
            last.clear()
            handles = [m.register_forward_pre_hook(record) for m in linears]
            try:
                logits = model(images[lo:lo + batch].to(device)).float().cpu()
            finally:
                for handle in handles:
                    handle.remove()
            out.append(captured[-1].float() if captured else logits)
    return torch.cat(out).numpy()


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                   test_y: np.ndarray, c: float, seed: int) -> tuple[int, int]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500,
                                                               random_state=seed))
    probe.fit(train_x, train_y)
    return int((probe.predict(test_x) == test_y).sum()), len(test_y)


def finetune_accuracy(model: ImageClassifier, train_x: torch.Tensor, train_y: torch.Tensor,
                      test_x: torch.Tensor, test_y: torch.Tensor, epochs: int, max_steps: int,
                      lr: float, seed: int, num_classes: int) -> tuple[int, int]:
    """Fine-tune a copy of ``model`` (all weights; a fresh head when the class count
    differs) and return (correct, n) on the test images."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(model).eval()
    with torch.no_grad():
        outputs = tuned(test_x[:2].to(tuned.mean.device)).shape[-1]
    tuned.train().requires_grad_(True)
    head: nn.Module | None = None
    if outputs != num_classes:
        head = nn.Linear(outputs, num_classes).to(tuned.mean.device)
    params = list(tuned.parameters()) + (list(head.parameters()) if head else [])
    optimizer = torch.optim.Adam(params, lr=lr)
    device = tuned.mean.device

    def forward(x: torch.Tensor) -> torch.Tensor:
        logits = tuned(x.to(device))
        return head(logits) if head is not None else logits

    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for lo in range(0, len(order) - 1, 32):  # no batch of one (batch norm)
            idx = order[lo:lo + 32]
            loss = F.cross_entropy(forward(train_x[idx]), train_y[idx].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps >= max_steps:
                break
        if steps >= max_steps:
            break
    tuned.eval()
    correct = 0
    with torch.inference_mode():
        for lo in range(0, len(test_x), 128):
            correct += int((forward(test_x[lo:lo + 128]).argmax(1).cpu()
                            == test_y[lo:lo + 128]).sum())
    return correct, len(test_x)


def slc_auc(fractions: list[float], protected: list[float], clean: list[float]) -> float:
    """Area under accuracy vs ln(fraction), protected minus clean (trapezoid rule)."""
    x = np.log(np.asarray(fractions, dtype=float))
    return float(np.trapezoid(protected, x) - np.trapezoid(clean, x))


def subset(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    count = max(2, math.ceil(len(indices) * fraction))
    return np.sort(rng.permutation(indices)[:count])


Loader = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]
