"""Metrics, defined once (docs/method.md §4). Images are float NCHW in [0, 1].

* PSNR = 10·log10(1 / MSE) per image; SSIM as Kornia computes it (11×11 Gaussian window,
  σ 1.5, reflect padding), per image; an audit blurs each shard's originals once.
* Wilson score interval, 95%: (p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n).
* First-layer gain of δ: ‖W̃δ‖ / ‖δ‖, with W̃ the stem in pixel space; isotropic noise has
  gain ‖A‖_F / sqrt(C·H·W) (root mean square over draws, A the stem's whole operator).
* Relative first-layer change: ‖W̃δ‖ / ‖W x̃‖, x̃ the normalized clean image.
* Utility retention = authorized score on protected (and attacked) data / score on clean data;
  leakage = the same ratio for an unauthorized model (:func:`score_ratio`).
* Leakage above chance = (score − chance) / (clean score − chance) (:func:`above_chance`).
* Suppression ratio = authorized score / best unauthorized score (Variational Feature
  Compression's figure of merit).
* SLC-AUC = area under fine-tuning accuracy vs ln(fraction), NEs minus clean.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import kornia
import numpy as np
import torch
import torch.nn.functional as F

from neaudit.device import chunks
from neaudit.stem import FirstLayer

Z95 = 1.959963984540054


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (inf for identical images)."""
    return torch.cat([_psnr(images[part], reference[part]) for part in chunks(images)])


def _psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    mse = (images - reference).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


class SsimReference:
    """Reference images with their local means and variances under SSIM's window, computed
    once: an audit compares every attack's output with the same originals, and these are two
    of the five blurs each comparison needs. Kept per cache-sized chunk on a CPU
    (:func:`neaudit.device.chunks`), where full-batch temporaries would not stay in cache."""

    def __init__(self, images: torch.Tensor) -> None:
        self.parts = chunks(images)
        self.moments = [_Moments.of(images[part]) for part in self.parts]


def ssim(images: torch.Tensor, reference: torch.Tensor | SsimReference) -> torch.Tensor:
    """Per-image mean SSIM as Kornia computes it (Gaussian window 11, σ 1.5, reflect padding,
    its arithmetic step for step); ``reference``: images, or a :class:`SsimReference` that
    many comparisons share."""
    if not isinstance(reference, SsimReference):
        reference = SsimReference(reference)
    return torch.cat([_ssim(images[part], moments)
                      for part, moments in zip(reference.parts, reference.moments, strict=True)])


_C1, _C2, _EPS = 0.01**2, 0.03**2, 1e-12  # Kornia's constants for a dynamic range of 1


@dataclass(frozen=True)
class _Moments:
    """One chunk of reference images with its local mean μ₂, μ₂² and local variance σ₂²."""

    images: torch.Tensor
    mu: torch.Tensor
    mu_sq: torch.Tensor
    sigma_sq: torch.Tensor

    @classmethod
    def of(cls, images: torch.Tensor) -> _Moments:
        mu = _blur(images)
        mu_sq = mu * mu
        return cls(images, mu, mu_sq, _blur(images * images).sub_(mu_sq))


def _ssim(images: torch.Tensor, reference: _Moments) -> torch.Tensor:
    """Kornia's SSIM map (``kornia.metrics.ssim``'s CPU path, the same operations in the same
    order) with the reference's moments given, averaged per image."""
    mu1 = _blur(images)
    mu1_mu2 = mu1 * reference.mu
    mu1_sq = mu1.pow_(2)
    sigma1_sq = _blur(images * images).sub_(mu1_sq)
    den = mu1_sq.add_(reference.mu_sq).add_(_C1).mul_(
        sigma1_sq.add_(reference.sigma_sq).add_(_C2))
    del mu1_sq, sigma1_sq
    sigma12 = _blur(images * reference.images).sub_(mu1_mu2)
    num = mu1_mu2.mul_(2.0).add_(_C1).mul_(sigma12.mul_(2.0).add_(_C2))
    return num.div_(den.add_(_EPS)).mean(dim=(1, 2, 3))


def _blur(images: torch.Tensor) -> torch.Tensor:
    """SSIM's separable Gaussian blur with reflect padding, as Kornia runs it: two depthwise
    convolutions, on channels-last copies on a CPU (oneDNN reorders NCHW images around every
    depthwise convolution)."""
    height, width = images.shape[-2:]
    window = min(11, height, width) // 2 * 2 - 1
    kernel = _gaussian(window, images.device, images.dtype)
    if images.device.type == "cpu":
        images = images.contiguous(memory_format=torch.channels_last)
    channels, radius = images.shape[1], window // 2
    with torch.autocast(images.device.type, enabled=False):
        out = F.conv2d(F.pad(images, [radius, radius, 0, 0], mode="reflect"),
                       kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        return F.conv2d(F.pad(out, [0, 0, radius, radius], mode="reflect"),
                        kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


@functools.lru_cache(maxsize=16)
def _gaussian(window: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return kornia.filters.get_gaussian_kernel1d(window, 1.5, device=device,
                                                dtype=dtype).flatten()


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def response_norm(layer: FirstLayer, delta: torch.Tensor) -> torch.Tensor:
    """Per-image ‖W̃δ‖: the first-layer change a pixel perturbation causes."""
    return layer.response(delta).flatten(1).norm(dim=1)


def first_layer_gain(layer: FirstLayer, delta: torch.Tensor) -> torch.Tensor:
    """Per-image ‖W̃δ‖ / ‖δ‖."""
    return response_norm(layer, delta) / delta.flatten(1).norm(dim=1)


def clean_response_norm(layer: FirstLayer, clean: torch.Tensor) -> torch.Tensor:
    """Per-image ‖W x̃‖ (the clean response without bias), the denominator of the relative
    first-layer change ‖W̃δ‖ / ‖W x̃‖."""
    normalized = (clean - layer.mean.view(1, -1, 1, 1).to(clean)) / layer.std.view(
        1, -1, 1, 1).to(clean)
    clean_response = torch.nn.functional.conv2d(normalized, layer.weight.to(clean),
                                                stride=layer.stride, padding=layer.padding)
    return clean_response.flatten(1).norm(dim=1)


def isotropic_gain(layer: FirstLayer, shape: tuple[int, int, int]) -> float:
    """The gain isotropic noise has on (C, H, W) images, exactly: sqrt(E‖W̃n‖² / E‖n‖²) =
    ‖A‖_F / sqrt(C·H·W), with A the whole stem operator (taps in the zero padding left out);
    ‖A‖_F² is the stem with squared weights applied to an image of ones, summed. For a patch
    stem tiling the image it is :attr:`neaudit.spectral.Subspace.isotropic_gain`; this one also
    holds at borders and for the published construction, which has no subspace."""
    ones = torch.ones(1, *shape, dtype=torch.float64)
    squared = layer.pixel_weight.double().pow(2).sum(0, keepdim=True)  # one output channel
    energy = torch.nn.functional.conv2d(ones, squared, stride=layer.stride,
                                        padding=layer.padding).sum()
    return float((energy / ones.numel()).sqrt())


def isotropic_like(delta: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Isotropic ``noise`` (e.g. standard normal, same shape) rescaled to the per-image energy
    of ``delta``: the control every first-layer gain is compared with."""
    noise = noise.to(delta)
    scale = delta.flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1)
    return noise * scale.view(-1, 1, 1, 1)


def logit_cosine(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(logits, reference, dim=1)


def score_ratio(score: float, clean_score: float) -> float:
    """Utility retention (authorized) or leakage (unauthorized): score / clean score."""
    return score / clean_score if clean_score and not math.isnan(clean_score) else math.nan


def above_chance(score: float, clean_score: float, chance: float) -> float:
    """(score − chance) / (clean score − chance): 0 at chance, 1 at the clean level. NaN
    where the clean score is not above chance: there is no way back to measure a share of
    (a negative denominator would turn a model below chance into "100% recovered", its
    interval upside down)."""
    if not clean_score > chance:
        return math.nan
    return (score - chance) / (clean_score - chance)


def slc_auc(fractions: list[float], protected: list[float], clean: list[float]) -> float:
    """SLC-AUC (Non-Transferable Pruning): the area under accuracy vs ln(fraction) of the
    fine-tuning curve on NEs minus that on clean data (trapezoid rule); negative means the
    protection makes learning harder."""
    x = np.log(np.asarray(fractions, dtype=float))
    return float(np.trapezoid(protected, x) - np.trapezoid(clean, x))


def suppression_ratio(authorized_score: float, unauthorized_scores: list[float]) -> float:
    best = max(unauthorized_scores)
    return authorized_score / best if best > 0 else math.inf
