"""Non-transferable example (NE) recoding: pure functions on [0, 1] NCHW batches.

``reference`` — the published Catch-Only-One construction (PRIMER §1), reproduced faithfully
so that users can audit what the paper's code produces:

1. W = first conv weight as an (m, C·kh·kw) matrix on *normalized* inputs; SVD.
2. Basis N = the exact null space (last d − m right singular vectors) when W is wide, else the
   right singular vectors with σ ≤ τ, falling back to the single smallest one.
3. One z ~ N(0, I) per image: the same noise vector N·z in every patch (a periodic tile).
4. Scale from a nominal PSNR with the paper's formula, which assumes a 0–255 range and
   includes the image itself: scale = sqrt(255²·10^(−psnr/10) / mean((X_unf + Nz)²)); a
   fresh z is then drawn and multiplied by that scale.
5. Added to the unfolded normalized input and folded back with ``F.fold`` (which *sums*
   overlapping windows), with no clipping or quantization.

Returned in pixel space as floats; what a user could release is ``quantize`` of that, and
the fidelity lost there is measured by :func:`neaudit.protection.protect`.

``subspace`` — the construction that holds on released images (the project's design):
independent noise per patch (or per frequency for overlapping stems, see
:mod:`neaudit.spectral`), built in pixel space through the model's normalization, pushed
back into the box [0, 1] by alternating projections, quantized to uint8 with the rounding
error compensated in the first-layer metric, and scaled so that the *written* image has the
target PSNR.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from neaudit.spectral import FourierSubspace, PatchSubspace
from neaudit.stem import FirstLayer

METHODS = ("subspace", "reference")


def image_generators(seed: int, indices: torch.Tensor) -> list[torch.Generator]:
    """One generator per image, so noise depends on (seed, image index) only, not batching."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]


def subspace_recode(clean: torch.Tensor, space: PatchSubspace | FourierSubspace,
                    target_psnr: float, generators: list[torch.Generator],
                    patch_fraction: float = 1.0, repair_iterations: int = 10,
                    calibration_rounds: int = 4) -> torch.Tensor:
    """Recode clean [0,1] images into NEs on the uint8 grid at ``target_psnr`` (measured).

    Convention: ``clean`` should already be on the uint8 grid (what was read from files);
    the output is exactly the values a PNG will store.

    Strength: the noise starts a little too strong, is repaired into the box, and is then
    scaled down to the target energy; scaling towards ``clean`` keeps it inside both the box
    and the subspace, so only images that clipping left too weak are repaired again.
    ``patch_fraction`` < 1 puts the noise into that share of patches only (see
    :meth:`PatchSubspace.sample`).
    """
    _check_images(clean)
    if not 0.0 < patch_fraction <= 1.0:
        raise ValueError(f"patch_fraction must be in (0, 1], got {patch_fraction}")
    noise = torch.cat([space.sample((1, *clean.shape[1:]), g, patch_fraction, clean.device)
                       for g in generators])
    target_norm = (clean[0].numel() * 10 ** (-target_psnr / 10)) ** 0.5
    scale = 1.25 * target_norm / noise.flatten(1).norm(dim=1).clamp_min(1e-12)
    delta = torch.empty_like(clean)
    todo = torch.arange(len(clean), device=clean.device)
    for _ in range(calibration_rounds):
        every = todo.numel() == len(clean)  # the first round: skip the gathers
        base = clean if every else clean[todo]
        start = torch.addcmul(base, noise if every else noise[todo], scale[todo].view(-1, 1, 1, 1))
        repaired = space.repair(start, repair_iterations).sub_(base)
        delta[todo] = repaired
        shortfall = target_norm / repaired.flatten(1).norm(dim=1).clamp_min(1e-12)
        weak = shortfall > 1.001
        scale[todo[weak]] *= 1.1 * shortfall[weak]
        todo = todo[weak]
        if todo.numel() == 0:
            break
    factor = (target_norm / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
    noise_rms = 255.0 * target_norm / clean[0].numel() ** 0.5
    return space.round_to_grid(torch.addcmul(clean, delta, factor.view(-1, 1, 1, 1)),
                               compensate=space.compensation_pays(noise_rms))


def reference_basis(layer: FirstLayer, tau: float = 1e-2) -> torch.Tensor:
    """Steps 1–2 of the published construction: the (d, k) basis N on normalized patches."""
    matrix = layer.unfolded.double()
    m, d = matrix.shape
    _, s, vh = torch.linalg.svd(matrix, full_matrices=True)
    if m < d:
        return vh[m:].T.float()
    keep = s <= tau
    if not keep.any():
        keep = s == s.min()
    return vh[: s.numel()][keep].T.float()


def reference_recode(clean: torch.Tensor, layer: FirstLayer, nominal_psnr: float,
                     generators: list[torch.Generator], tau: float = 1e-2) -> torch.Tensor:
    """The published construction (steps 3–5); returns unclipped float pixels."""
    _check_images(clean)
    basis = reference_basis(layer, tau)
    mean = layer.mean.view(1, -1, 1, 1).to(clean)
    std = layer.std.view(1, -1, 1, 1).to(clean)
    normalized = (clean - mean) / std
    kernel, stride, padding = layer.kernel, layer.stride, layer.padding
    unfolded = F.unfold(normalized, kernel, stride=stride, padding=padding)  # (B, d, L)
    k = basis.shape[1]
    first = torch.stack([basis @ torch.randn(k, generator=g) for g in generators]).to(clean)
    second = torch.stack([basis @ torch.randn(k, generator=g) for g in generators]).to(clean)
    target_mse = 255.0**2 / 10 ** (nominal_psnr / 10)
    scale = (target_mse / (unfolded + first[:, :, None]).pow(2).mean(dim=(1, 2))).sqrt()
    recoded = unfolded + (scale[:, None] * second)[:, :, None]
    folded = F.fold(recoded, clean.shape[-2:], kernel, stride=stride, padding=padding)
    return folded * std + mean


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images shaped (B, 3, H, W), got {tuple(images.shape)}")
    if not math.isfinite(float(images.sum())):  # one pass: NaN and ±inf survive a sum
        raise ValueError("images contain NaN or infinite values")
