"""Learning-based leakage (needs labels): can an unauthorized party *learn* from the NEs?

Both are ``dataset`` attacks in the one registry: each runs as one task over the whole
dataset.

* ``linear_probe``: logistic regression (scikit-learn) on frozen features of an unauthorized
  model (the input of its last linear layer), trained on a seeded half of the protected images
  and scored on the other half; the same probe trained and scored on the clean originals is
  the baseline, and leakage = protected probe accuracy / clean probe accuracy.
* ``finetune``: fine-tune an unauthorized model, from a freshly initialized classifier head
  (so it starts not knowing the task), on random subsets of the protected training half at
  several sample fractions, scoring each on the held-out clean originals; the same curve
  trained on clean data is the baseline. SLC-AUC (:func:`neaudit.metrics.slc_auc`)
  summarizes the two curves.

Learning leakage is defined on the gain over the starting point: (score after training on
NEs − start) / (score after training on clean originals − start); the start is the fresh
head's score for ``finetune`` and chance for the probe. A model that already solves the task
can therefore not show a learning leakage of about 1 for having learnt nothing.

Both are bounded for CPUs by ``max_samples``, ``epochs`` and ``max_steps``, and both run the
models in the audit's precision (``DatasetContext.precision``): bf16 autocast where the device
computes it natively, as an attacker would train, with fp32 weights and optimizer state.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from neaudit.attacks.registry import DATASET, DatasetContext, Param, register_attack
from neaudit.device import forward_precision
from neaudit.models import ImageClassifier
from neaudit.seeding import derive_seed, generator, seeded

MAX_SAMPLES = Param(2000, 10, 10_000_000)
"""Items per half (train, test) a learning attack uses at most."""


def split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, stratified half/half split of item indices."""
    rng = np.random.default_rng(derive_seed(seed, "learning-split"))
    train, test = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        half = max(1, len(idx) // 2)
        train += idx[:half].tolist()
        test += idx[half:].tolist()
    return np.sort(np.array(train)), np.sort(np.array(test))


def features(model: ImageClassifier, images: torch.Tensor, precision: str = "fp32",
             batch: int = 128) -> np.ndarray:
    """The input of the model's last executed linear layer (its penultimate features), or
    its logits where it has none, from forwards in ``precision``."""
    captured: list[torch.Tensor] = []
    linears = [m for m in model.net.modules() if isinstance(m, nn.Linear)]
    last: list[nn.Module] = []

    def record(module, inputs):
        last.append(module)
        captured.append(inputs[0].detach().flatten(1).cpu())

    device = model.mean.device
    out = []
    with torch.inference_mode(), forward_precision(device, precision):
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


def _fresh_head(tuned: ImageClassifier, num_classes: int, seed: int) -> nn.Module | None:
    """Give ``tuned`` a freshly initialized classifier head, so that fine-tuning starts from
    a backbone that does not know the task: timm's ``reset_classifier``, else the last
    ``nn.Linear`` replaced; a model with neither gets a head on its logits (returned)."""
    net = tuned.net
    if hasattr(net, "reset_classifier"):
        seeded(lambda: net.reset_classifier(num_classes), seed, "finetune-head")
        tuned.to(tuned.mean.device)
        return None
    linears = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        name, old = linears[-1]
        parent, _, attribute = name.rpartition(".")
        new = seeded(lambda: nn.Linear(old.in_features, num_classes), seed, "finetune-head")
        setattr(net.get_submodule(parent) if parent else net, attribute,
                new.to(tuned.mean.device))
        return None
    with torch.no_grad():
        outputs = tuned(torch.zeros(1, 3, *(tuned.input_size or (32, 32)),
                                    device=tuned.mean.device)).shape[-1]
    return seeded(lambda: nn.Linear(outputs, num_classes), seed, "finetune-head").to(
        tuned.mean.device)


def finetune_accuracy(model: ImageClassifier, train_x: torch.Tensor, train_y: torch.Tensor,
                      test_x: torch.Tensor, test_y: torch.Tensor, epochs: int, max_steps: int,
                      lr: float, seed: int, num_classes: int, precision: str = "fp32"
                      ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Fine-tune a copy of ``model`` (all weights, from a fresh classifier head) and return
    (correct, n) on the test images before training (the start) and after; its forwards
    run in ``precision`` (bf16 autocast: fp32 weights, bf16 matrix products)."""
    draws = generator(seed, "finetune-batches")
    tuned = copy.deepcopy(model).eval()
    head = _fresh_head(tuned, num_classes, seed)
    device = tuned.mean.device

    def forward(x: torch.Tensor) -> torch.Tensor:
        with forward_precision(device, precision):
            logits = tuned(x.to(device))
            return (head(logits) if head is not None else logits).float()

    def score() -> tuple[int, int]:
        tuned.eval()
        with torch.inference_mode():
            correct = sum(int((forward(test_x[lo:lo + 128]).argmax(1).cpu()
                               == test_y[lo:lo + 128]).sum()) for lo in range(0, len(test_x),
                                                                              128))
        return correct, len(test_x)

    start = score()
    tuned.train().requires_grad_(True)
    params = list(tuned.parameters()) + (list(head.parameters()) if head else [])
    optimizer = torch.optim.Adam(params, lr=lr)
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=draws)
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
    return start, score()


def subset(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(derive_seed(seed, "learning-subset", fraction))
    count = max(2, math.ceil(len(indices) * fraction))
    return np.sort(rng.permutation(indices)[:count])



def _halves(ctx: DatasetContext, max_samples: int):
    """The seeded train/test halves, each capped at ``max_samples`` items, gathered."""
    train, test = split(ctx.labels, ctx.seed)
    if len(train) > max_samples:
        train = subset(train, max_samples / len(train), ctx.seed)
    return ctx.gather(train), ctx.gather(test[:max_samples])


@register_attack("linear_probe", "learning", "learning",
                 {"max_samples": MAX_SAMPLES, "c": Param(1.0, 1e-6, 1e6)},
                 kind=DATASET)
def linear_probe(ctx: DatasetContext, max_samples: int, c: float) -> dict:
    """Logistic-regression probe on frozen features, NEs against clean originals."""
    (protected_train, clean_train, y_train), (protected_test, clean_test, y_test) = _halves(
        ctx, int(max_samples))
    record: dict = {"models": {}, "baseline": {}, "start": 1.0 / ctx.num_classes}
    for spec, model in ctx.models.items():
        record["models"][spec] = probe_accuracy(
            features(model, protected_train, ctx.precision), y_train.numpy(),
            features(model, protected_test, ctx.precision), y_test.numpy(), c, ctx.seed)
        record["baseline"][spec] = probe_accuracy(
            features(model, clean_train, ctx.precision), y_train.numpy(),
            features(model, clean_test, ctx.precision), y_test.numpy(), c, ctx.seed)
    return record


@register_attack("finetune", "learning", "learning",
                 {"fractions": Param([0.1, 0.25, 0.5, 1.0], 1e-4, 1.0),
                  "epochs": Param(3, 1, 1000), "max_steps": Param(200, 1, 10_000_000),
                  "lr": Param(1e-3, 1e-7, 1.0), "max_samples": MAX_SAMPLES}, kind=DATASET)
def finetune(ctx: DatasetContext, fractions: list[float], epochs: int, max_steps: int,
             lr: float, max_samples: int) -> dict:
    """Fine-tuning curves of every unauthorized model on NE subsets and on clean subsets,
    each scored on held-out clean originals."""
    (protected_train, clean_train, y_train), (_, clean_test, y_test) = _halves(
        ctx, int(max_samples))
    record: dict = {"models": {}, "curve": {}}
    fractions = [float(f) for f in fractions]
    for spec, model in ctx.models.items():
        if spec == ctx.authorized:
            continue
        curve = {"fractions": fractions, "protected": [], "clean": [], "start": None}
        for fraction in fractions:
            idx = torch.as_tensor(subset(np.arange(len(y_train)), fraction, ctx.seed))
            for kind, images in (("protected", protected_train), ("clean", clean_train)):
                start, tuned = finetune_accuracy(
                    model, images[idx], y_train[idx], clean_test, y_test, int(epochs),
                    int(max_steps), float(lr), ctx.seed, ctx.num_classes, ctx.precision)
                curve[kind].append(tuned)
                curve["start"] = start  # the same fresh head every time
        record["curve"][spec] = curve
    return record
