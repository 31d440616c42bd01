"""Non-transferable example (NE) recoding: pure functions on [0, 1] NCHW batches.

``reference`` — the published Catch-Only-One construction (docs/method.md §1), reproduced faithfully
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

import functools
import math

import torch
import torch.nn.functional as F

from neaudit.imageio import quantize
from neaudit.patches import from_patches, to_patches
from neaudit.seeding import counter_normal, derive_key
from neaudit.spectral import PatchSubspace, Subspace
from neaudit.stem import FirstLayer

METHODS = ("subspace", "reference")


def noise_key(key: int) -> int:
    """The 256-bit generator key of an NE key's noise (:func:`neaudit.seeding.counter_normal`):
    any integer key, its entropy kept."""
    return derive_key(key, "ne-noise")


def release_key(key: int, salt: str) -> int:
    """The key one release's noise is drawn under: the user's NE key bound to the release's
    ``salt`` (its settings and items: ``noise_salt`` in its sidecar), so that a key given again
    at another strength, or for other items, draws independent noise. Two releases under one
    noise would show it in their difference, and both could be cleaned."""
    return derive_key(key, "ne-release", salt)


def subspace_recode(clean: torch.Tensor, space: Subspace,
                    psnr: float, key: int, index: torch.Tensor,
                    patch_fraction: float = 1.0, repair_iterations: int = 10,
                    calibration_rounds: int = 4) -> torch.Tensor:
    """Recode clean [0,1] images into NEs on the uint8 grid at ``psnr`` (measured).

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
    noise = space.sample(clean.shape, noise_key(key), index.to(clean.device), patch_fraction)
    target_norm = (clean[0].numel() * 10 ** (-psnr / 10)) ** 0.5
    scale = 1.25 * target_norm / noise.flatten(1).norm(dim=1).clamp_min(1e-12)
    delta = torch.empty_like(clean)
    todo = torch.arange(len(clean), device=clean.device)
    for _ in range(calibration_rounds):
        every = todo.numel() == len(clean)  # the first round: skip the gathers
        base = clean if every else clean[todo]
        start = torch.addcmul(base, noise if every else noise[todo], scale[todo].view(-1, 1, 1, 1))
        repaired = box_repair(space, start, repair_iterations).sub_(base)
        delta[todo] = repaired
        shortfall = target_norm / repaired.flatten(1).norm(dim=1).clamp_min(1e-12)
        weak = shortfall > 1.001
        scale[todo[weak]] *= 1.1 * shortfall[weak]
        todo = todo[weak]
        if todo.numel() == 0:
            break
    factor = (target_norm / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
    noise_rms = 255.0 * target_norm / clean[0].numel() ** 0.5
    return round_to_grid(space, torch.addcmul(clean, delta, factor.view(-1, 1, 1, 1)),
                         compensate=compensation_pays(space, noise_rms))


def reference_basis(layer: FirstLayer, tau: float = 1e-2) -> torch.Tensor:
    """Steps 1–2 of the published construction: the (d, k) basis N on normalized patches."""
    m, d = layer.unfolded.shape
    s, vh = layer.unfolded_svd
    if m < d:
        return vh[m:].T.float()
    keep = s <= tau
    if not keep.any():
        keep = s == s.min()
    return vh[: s.numel()][keep].T.float()


def reference_recode(clean: torch.Tensor, layer: FirstLayer, psnr: float,
                     key: int, index: torch.Tensor, tau: float = 1e-2) -> torch.Tensor:
    """The published construction (steps 3–5); returns unclipped float pixels."""
    _check_images(clean)
    basis = reference_basis(layer, tau)
    mean = layer.mean.view(1, -1, 1, 1).to(clean)
    std = layer.std.view(1, -1, 1, 1).to(clean)
    normalized = (clean - mean) / std
    kernel, stride, padding = layer.kernel, layer.stride, layer.padding
    unfolded = F.unfold(normalized, kernel, stride=stride, padding=padding)  # (B, d, L)
    k = basis.shape[1]
    rows = index.to(clean.device)
    first = counter_normal(noise_key(key), rows, k, stream=0) @ basis.to(clean).T
    second = counter_normal(noise_key(key), rows, k, stream=1) @ basis.to(clean).T
    target_mse = 255.0**2 / 10 ** (psnr / 10)
    scale = (target_mse / (unfolded + first[:, :, None]).pow(2).mean(dim=(1, 2))).sqrt()
    recoded = unfolded + (scale[:, None] * second)[:, :, None]
    folded = F.fold(recoded, clean.shape[-2:], kernel, stride=stride, padding=padding)
    return folded * std + mean


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images shaped (B, 3, H, W), got {tuple(images.shape)}")
    if not math.isfinite(float(images.sum())):  # one pass: NaN and ±inf survive a sum
        raise ValueError("images contain NaN or infinite values")


# --- Writing onto the released grid: box repair and uint8 rounding -------------------------

RELAXATION = 1.5
"""Box repair steps (docs/method.md §2, "clip, quantize, repair") are extrapolated
alternating projections (Pierra): a step moves δ by RELAXATION · ‖v‖²/‖Pv‖² · Pv, with v the
box violation and P the projector onto the subspace. On photographs this takes a quarter
fewer patch-steps than a fixed over-relaxation (ω = 1.8), and about half as many as ω = 1.5."""

MAX_EXTRAPOLATION = 10.0
"""Cap on ‖v‖²/‖Pv‖² (about d/r for a violation spread over a patch)."""


def _extrapolated(violation: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
    """Per row (dim 0) of ``projected`` = P(violation): the extrapolated repair step, written
    over ``projected``.

    The factor ‖v‖²/‖Pv‖² is about d/r for a spread-out violation; it is capped so that a
    violation the subspace can barely reach (Pv ≈ 0) cannot throw δ far away.
    """
    ratio = (torch.linalg.vector_norm(violation.flatten(1), dim=1)
             / torch.linalg.vector_norm(projected.flatten(1), dim=1).clamp_min(1e-15))
    scale = ratio.square_().clamp_(max=MAX_EXTRAPOLATION).mul_(RELAXATION)
    return projected.mul_(scale.view(-1, *[1] * (projected.ndim - 1)))


HALF_STEP = 0.5 / 255
"""Box violations smaller than half a uint8 step vanish when the image is rounded."""


def _outside(values: torch.Tensor) -> torch.Tensor:
    """Per row (dim 0): does any value lie more than half a uint8 step outside [0, 1]?"""
    values = values.flatten(1)  # amin and amax: 4× faster than aminmax(dim=1) on a CPU
    return (values.amin(1) < -HALF_STEP) | (values.amax(1) > 1 + HALF_STEP)


def box_repair(space: Subspace, images: torch.Tensor, iterations: int) -> torch.Tensor:
    """Alternate (extrapolated) projections between the box [0,1] and
    {clean + δ : δ in the subspace}, row by row (:meth:`Subspace.to_rows`: per patch where
    the operator is block-diagonal). ``images`` must be clean + δ with δ already in the
    subspace.

    δ stays in the subspace, so each step only projects the box violation. A row stops once
    no pixel is more than half a uint8 step outside the box: rounding to the grid absorbs
    what is left, and most patches get there in two or three steps.
    """
    rows = space.to_rows(images)
    active = _outside(rows).nonzero().flatten()
    positions = rows[active]
    pending = torch.arange(active.numel(), device=images.device)
    for step in range(iterations):
        current = positions if step == 0 else positions[pending]
        violation = current.clamp(0, 1).sub_(current)
        if step > 0:  # the first step's rows are all outside: they were chosen so
            far = torch.maximum(violation.amax(1), violation.amin(1).neg_()) > HALF_STEP
            pending, violation = pending[far], violation[far]
        if pending.numel() == 0:
            break
        positions.index_add_(0, pending, _extrapolated(violation, space.project_rows(violation)))
    rows[active] = positions
    return space.from_rows(rows, images)


def compensation_pays(space: Subspace, noise_rms: float) -> bool:
    """Can compensated rounding change the written gain of noise with ``noise_rms`` (uint8
    steps per pixel) by more than 1%?

    Plain rounding adds an isotropic error of 1/12 step² per pixel; its first-layer energy is
    compared with the noise's own (rms² · min_gain²). Where the subspace only attenuates (a
    full-rank stem), the rounding error is lost in the noise's own response. Only patch stems
    have the per-patch structure to compensate in.
    """
    if not isinstance(space, PatchSubspace):
        return False
    rounding = space.isotropic_gain**2 / 12
    return rounding > 0.02 * noise_rms**2 * space.min_gain**2


def round_to_grid(space: Subspace, target: torch.Tensor, compensate: bool = True
                  ) -> torch.Tensor:
    """Quantize [0,1] images to the uint8 grid so that the rounding error has the smallest
    first-layer response.

    Sequential rounding with error compensation in the metric of W̃ᵀW̃ (the OBQ/GPTQ update):
    each pixel's rounding error is pushed onto the not-yet-rounded pixels of its patch along
    the direction that W̃ cannot see. Plain rounding leaves an isotropic error whose
    first-layer gain is that of isotropic noise; this leaves about half. ``compensate=False``
    (and any stem without patches) rounds plainly.
    """
    if not compensate or not isinstance(space, PatchSubspace):
        return quantize(target)
    patches = to_patches(target * 255.0, space.patch)  # (B, d, L)
    b, d, count = patches.shape
    order, upper = (t.to(target.device) for t in _rounding_factor(space))
    # one contiguous row per pixel position, in rounding order
    columns = patches.permute(1, 0, 2).reshape(d, -1)[order]
    _compensated_round(columns, upper)
    rounded = torch.empty_like(columns)
    rounded[order] = columns
    patches = rounded.view(d, b, count).permute(1, 0, 2)
    h, w = target.shape[-2:]
    covered = h % space.patch[0] == 0 and w % space.patch[1] == 0
    border = target if covered else quantize(target) * 255.0
    return from_patches(patches, border, space.patch) / 255.0


@functools.lru_cache(maxsize=8)
def _rounding_factor(space: PatchSubspace) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel order (largest column norm first) and the upper Cholesky factor of the damped
    inverse Gram matrix in that order, computed once per subspace."""
    gram = space.matrix.double().T @ space.matrix.double()
    damp = 1e-2 * float(gram.diagonal().mean())
    order = gram.diagonal().argsort(descending=True)
    gram = gram[order][:, order] + damp * torch.eye(gram.shape[0], dtype=gram.dtype)
    return order, torch.linalg.cholesky(torch.linalg.inv(gram), upper=True).float()


def _compensated_round(columns: torch.Tensor, upper: torch.Tensor, block: int = 32) -> None:
    """Round ``columns`` (d, N: one row per pixel position, N patches) in place to integers
    in [0, 255], row by row, feeding each row's error forward through the upper Cholesky
    factor of the inverse Gram matrix.

    Within a block of rows the error moves on by in-place rank-1 updates; the block's errors
    reach the later rows in one GEMM (small blocks keep the rank-1 traffic in cache).
    """
    d = columns.shape[0]
    for lo in range(0, d, block):
        hi = min(lo + block, d)
        errors = columns.new_empty(hi - lo, columns.shape[1])
        for j in range(lo, hi):
            exact, error = columns[j], errors[j - lo]
            rounded = exact.round().clamp_(0, 255)
            torch.sub(exact, rounded, out=error).div_(upper[j, j])
            exact.copy_(rounded)
            if j + 1 < hi:
                columns[j + 1 : hi].addr_(upper[j, j + 1 : hi], error, alpha=-1)
        if hi < d:
            columns[hi:].addmm_(upper[lo:hi, hi:].T, errors, alpha=-1)
