"""What ``neaudit protect`` measures on the NEs it writes, per image: pixel fidelity (PSNR,
L2, SSIM), the first-layer gain beside isotropic noise's, and, on an evenly spaced sample
(run in batches collected across the job's), the authorized model's agreement and logit
cosine with its clean predictions (and the same under the noise control). Every figure is
computed on the uint8 images as written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from neaudit.dataset import evenly_spaced
from neaudit.errors import NeauditError
from neaudit.imageio import quantize
from neaudit.metrics import (
    clean_response_norm,
    isotropic_like,
    logit_cosine,
    response_norm,
    ssim,
)
from neaudit.metrics import psnr as measured_psnr
from neaudit.models import ImageClassifier
from neaudit.seeding import counter_normal, derive_seed
from neaudit.stem import FirstLayer

FIDELITY_COLUMNS = {
    "psnr": "measured PSNR of the written image (dB)",
    "l2": "L2 norm of the written perturbation ([0, 1] pixel units)",
    "ssim": "SSIM of the written image",
    "gain": "first-layer gain ‖W̃δ‖/‖δ‖ of the written perturbation",
    "isotropic_gain": "gain of isotropic noise (exact root mean square over draws)",
    "relative_change": "relative first-layer change ‖W̃δ‖/‖Wx̃‖",
    "agreement": "authorized top-1 on the written NE equals its clean top-1",
    "logit_cosine": "cosine between authorized logits on NE and on clean",
    "noise_agreement": "control: top-1 agreement under isotropic noise of the same PSNR",
    "noise_logit_cosine": "control: logit cosine under that noise",
}


def measured_columns(floats: bool) -> list[str]:
    """The columns :func:`measure` returns, in order (``psnr_float`` with a float output)."""
    return ["psnr", "l2", "ssim", "gain", "isotropic_gain", "relative_change",
            *(["psnr_float"] if floats else [])]


def fidelity_sample(count: int, size: int) -> torch.Tensor:
    """Evenly spaced item indices whose fidelity includes the model-based figures."""
    return torch.from_numpy(evenly_spaced(count, size))


def measure(layer: FirstLayer, noise_gain: float, clean: torch.Tensor,
            protected: torch.Tensor, floats: torch.Tensor | None) -> pd.DataFrame:
    """Per-image pixel and first-layer fidelity of the written NEs, beside isotropic noise
    (``noise_gain``: :func:`neaudit.metrics.isotropic_gain`)."""
    delta = protected - clean
    l2 = delta.flatten(1).norm(dim=1)
    response = response_norm(layer, delta)
    frame = {
        "psnr": measured_psnr(protected, clean),
        "l2": l2,
        "ssim": ssim(protected, clean),
        "gain": response / l2,
        "isotropic_gain": torch.full_like(l2, noise_gain),
        "relative_change": response / clean_response_norm(layer, clean),
    }
    if floats is not None:
        frame["psnr_float"] = measured_psnr(floats, clean)
    columns = measured_columns(floats is not None)  # the order a checkpoint expects
    values = torch.stack([frame[c].detach().float() for c in columns]).cpu().numpy()
    return pd.DataFrame(dict(zip(columns, values, strict=True)))  # one copy back, not one a column


PREVIEW_BATCH = 256
"""Sampled images the authorized model runs on at a time, collected across the job's batches: a
job's batch holds a few of them (64 among 4096 images in batches of 256 is 4 a batch), and
three forwards for each batch's few would cost more than the recoding on a GPU. Runs take the
sampled items in item order, this many each, so the figures do not depend on the job's batch
size, nor on where a resumed run took over."""

Kept = tuple[torch.Tensor, ...]
"""One batch's sampled items for :class:`ModelPreview`: item numbers, clean, written NE,
noise control and, for the reference construction, its float output."""


class ModelPreview:
    """The authorized model's agreement and logit cosine on the ``sampled`` items (and under
    the noise control: isotropic noise of the same energy, keyed by ``seed`` and the item),
    collected across batches and run :data:`PREVIEW_BATCH` images at a time."""

    def __init__(self, model: ImageClassifier, seed: int, sampled: torch.Tensor) -> None:
        self.model, self.seed, self.sampled = model, seed, sampled
        self.pending: list[Kept] = []
        self.done: list[pd.DataFrame] = []

    def add(self, clean: torch.Tensor, protected: torch.Tensor, floats: torch.Tensor | None,
            index: torch.Tensor) -> Kept | None:
        """Keep the sampled items of one batch (``index``: their item numbers) and return
        them, for a checkpoint to hand to :meth:`keep` when the job resumes."""
        rows = torch.isin(index, self.sampled).nonzero().flatten()
        if not len(rows):
            return None
        picked = rows.to(clean.device)
        delta = protected[picked] - clean[picked]
        gaussian = counter_normal(derive_seed(self.seed, "noise-control"),
                                  index[rows].to(clean.device), delta[0].numel())
        noisy = quantize(clean[picked] + isotropic_like(delta, gaussian.view_as(delta)))
        kept = (index[rows], clean[picked], protected[picked], noisy)
        kept = kept if floats is None else (*kept, floats[picked])
        self.keep(kept)
        return kept

    def keep(self, kept: Kept) -> None:
        """Queue sampled items (from :meth:`add`, or restored), running the model on each full
        :data:`PREVIEW_BATCH`."""
        self.pending.append(kept)
        while sum(len(p[0]) for p in self.pending) >= PREVIEW_BATCH:
            self._run(PREVIEW_BATCH)

    def table(self) -> pd.DataFrame:
        """The figures of every sampled item, indexed by item number."""
        while self.pending:
            self._run(PREVIEW_BATCH)
        return pd.concat(self.done) if self.done else pd.DataFrame()

    def _run(self, count: int) -> None:
        """Run the model on the first ``count`` pending items (or all there are)."""
        merged = [torch.cat(column) for column in zip(*self.pending, strict=True)]
        self.pending = [tuple(c[count:] for c in merged)] if len(merged[0]) > count else []
        index, clean, protected, noisy, *floats = (c[:count] for c in merged)
        figures = _model_figures(self.model, clean, protected, noisy,
                                 floats[0] if floats else None)
        self.done.append(pd.DataFrame(figures, index=index.numpy()))


def _model_figures(model: ImageClassifier, clean: torch.Tensor, protected: torch.Tensor,
                    noisy: torch.Tensor, floats: torch.Tensor | None) -> dict[str, np.ndarray]:
    """The authorized model's agreement and logit cosine on the NEs and on the noise control
    (and on the reference construction's float output, as the paper evaluated it)."""
    with torch.inference_mode():
        logits_clean, logits_ne, logits_noise = model(clean), model(protected), model(noisy)
        logits_float = model(floats) if floats is not None else None
    if not all(torch.isfinite(t).all() for t in (logits_clean, logits_ne, logits_noise)):
        raise NeauditError(f"{model.name}: the authorized model returns NaN or infinite logits "
                           "on these images, so no fidelity figure can be trusted. Fix: check "
                           "its weights and normalization.")
    top = logits_clean.argmax(1)
    figures = {
        "agreement": (logits_ne.argmax(1) == top).float(),
        "logit_cosine": logit_cosine(logits_ne, logits_clean),
        "noise_agreement": (logits_noise.argmax(1) == top).float(),
        "noise_logit_cosine": logit_cosine(logits_noise, logits_clean),
        "clean_prediction": top.float(),
    }
    if logits_float is not None:
        figures["agreement_float"] = (logits_float.argmax(1) == top).float()
    return {k: v.float().cpu().numpy() for k, v in figures.items()}
