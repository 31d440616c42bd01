"""Adaptive attacks that exploit the structure of NEs (docs/method.md §3), by threat level.

NEs live in a subspace that is a function of public weights, so an adversary can estimate it:

* L1 (protected data only): ``tile_estimation`` averages the residual against a denoised copy
  over the patch grid and subtracts it (breaks one-tile constructions such as the published
  one); ``blind_subspace`` finds the directions in which per-patch residuals are enriched (PCA)
  and replaces the images' component there by that of the denoised copy. The patch grid's
  period is detected from the residual's periodicity when not given.
* L2 (plus clean in-distribution data): ``clean_patch_prior`` projects protected patches onto
  the principal subspace of clean patches.
* L3 (plus public models): ``surrogate_projection`` ranks the candidate models by how much of
  the residual energy their low-sensitivity subspace captures, then projects out the best
  candidate's subspace and refills it from the denoised copy; ``known_model_projection`` does
  the same with the authorized model itself.

Refill and residuals use a Gaussian blur (σ = ``sigma``) as the denoiser.
"""

from __future__ import annotations

import torch

from neaudit.attacks.preprocess import gaussian_blur
from neaudit.attacks.registry import AttackContext, Param, register_attack
from neaudit.errors import NeauditError
from neaudit.patches import from_patches, to_patches

SIGMA = Param(1.0, 0.1, 10.0)
"""The blur that gives the denoised copy (residuals and refill)."""

PATCH_OR_AUTO = Param(0, 0, 64)
"""The patch-grid period; 0 detects it from the residual."""


def _denoise(images: torch.Tensor, ctx: AttackContext, sigma: float) -> torch.Tensor:
    return gaussian_blur(images, ctx, sigma=sigma)


def detect_period(residual: torch.Tensor, max_period: int = 32) -> int:
    """The patch-grid period of a residual: NE noise (a repeated tile, or independent noise
    confined to a per-patch subspace) makes the residual's patches concentrate in few
    principal directions exactly on the true grid, measured by the participation ratio
    (Σλ)²/Σλ² over min(rows, dims). Multiples of the period score as well, so the smallest
    period within 10% of the best wins.

    The λ are the eigenvalues of the rows' Gram matrix G, so Σλ = tr G and Σλ² = ‖G‖²_F:
    one GEMM per period instead of an SVD (:func:`participation`; 3.5–9× faster on 2 cores
    at 224×224)."""
    h, w = residual.shape[-2:]
    spread = {}
    for period in range(2, min(max_period, h // 2, w // 2) + 1):
        rows = _patches(residual, period)
        spread[period] = participation(rows.reshape(-1, rows.shape[-1]))
    best = min(spread.values())
    return min(p for p, v in spread.items() if v <= 1.1 * best)


def participation(rows: torch.Tensor) -> float:
    """The participation ratio (Σλ)²/Σλ² of the rows' (N, d) power spectrum λ = σ², over
    min(N, d): near 1 when the power spreads over every direction, small when few hold it."""
    flat = rows.double()
    gram = flat.T @ flat if flat.shape[0] >= flat.shape[1] else flat @ flat.T
    return float(gram.trace() ** 2 / gram.square().sum() / min(flat.shape))


def _patches(images: torch.Tensor, period: int) -> torch.Tensor:
    """(B, C, H, W) → (B, L, C·p²) rows on the grid anchored at the top left."""
    return to_patches(images, (period, period)).transpose(1, 2)


def _unpatch(rows: torch.Tensor, like: torch.Tensor, period: int) -> torch.Tensor:
    return from_patches(rows.transpose(1, 2), like, (period, period))


def _grid(images: torch.Tensor, ctx: AttackContext, patch: int, sigma: float) -> int:
    if not patch:
        return _detected_period(images, ctx, sigma)
    if patch > min(images.shape[-2:]) // 2:
        raise NeauditError(f"a patch grid of {patch} px needs images of at least {2 * patch} px "
                           f"(these are {tuple(images.shape[-2:])}). Fix: a smaller patch, or 0 "
                           "to detect it.")
    return int(patch)


def _detected_period(images: torch.Tensor, ctx: AttackContext, sigma: float) -> int:
    """:func:`detect_period` of the batch's residual, kept for the next attack that asks of
    the same images (an audit runs tile_estimation and blind_subspace on each batch in turn,
    and the detection is most of their work on a CPU)."""
    last = ctx.extras.get("detected_period")
    if (last is not None and last[0] == sigma and last[1].shape == images.shape
            and torch.equal(last[1], images)):
        return last[2]
    period = detect_period(images - _denoise(images, ctx, sigma))
    ctx.extras["detected_period"] = (sigma, images.clone(), period)
    return period


@register_attack("tile_estimation", "adaptive", "L1",
                 {"patch": PATCH_OR_AUTO, "sigma": SIGMA})
def tile_estimation(images: torch.Tensor, ctx: AttackContext, patch: int, sigma: float
                    ) -> torch.Tensor:
    """Estimate a noise tile repeated in every patch (mean residual per image) and subtract it."""
    period = _grid(images, ctx, patch, sigma)
    residual = _patches(images - _denoise(images, ctx, sigma), period)
    tile = residual.mean(dim=1, keepdim=True)  # content averages out, a repeated tile does not
    rows = _patches(images, period)
    return _unpatch(rows - tile, images, period)


def principal_spectrum(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies σ² (descending, min(N, d) of them) and principal directions (d, min(N, d)) of
    row vectors (N, d), uncentred, in double.

    For tall rows they are the eigenpairs of the (d, d) Gram matrix: one GEMM and a small
    eigendecomposition, 5× faster than an SVD of the rows on 2 cores at ViT-B/16's patch grid
    (12,544 × 768)."""
    flat = rows.double()
    if flat.shape[0] < flat.shape[1]:  # wide: the SVD of the rows is the smaller problem
        _, s, vh = torch.linalg.svd(flat, full_matrices=False)
        return s.square(), vh.T
    energy, vectors = torch.linalg.eigh(flat.T @ flat)
    return energy.flip(0).clamp_min(0), vectors.flip(1)


def enriched_rank(energy: torch.Tensor) -> int:
    """The number of leading principal directions (of energies ``energy``, descending) before
    the largest eigengap (the largest ratio between consecutive energies in the top half):
    where a perturbation confined to a subspace stands out above the residual of natural
    content."""
    energy = energy.clamp_min(1e-30)
    half = max(2, energy.numel() // 2)
    gaps = energy[: half - 1] / energy[1:half]
    return int(gaps.argmax()) + 1


@register_attack("blind_subspace", "adaptive", "L1",
                 {"patch": PATCH_OR_AUTO, "rank": Param(0, 0, 4096), "sigma": SIGMA})
def blind_subspace(images: torch.Tensor, ctx: AttackContext, patch: int, rank: int,
                   sigma: float) -> torch.Tensor:
    """PCA of per-patch residuals; replace the images' component in the enriched directions
    by the denoised copy's (``rank`` 0 = automatic)."""
    period = _grid(images, ctx, patch, sigma)
    smooth = _denoise(images, ctx, sigma)
    residual = _patches(images - smooth, period)
    energy, directions = principal_spectrum(residual.reshape(-1, residual.shape[-1]))
    basis = directions[:, : int(rank) or enriched_rank(energy)].to(images.dtype)
    rows = _patches(images, period)
    return _unpatch(rows - (residual @ basis) @ basis.T, images, period)


@register_attack("clean_patch_prior", "adaptive", "L2",
                 {"patch": Param(8, 2, 64), "energy": Param(0.99, 0.01, 1.0)})
def clean_patch_prior(images: torch.Tensor, ctx: AttackContext, patch: int, energy: float
                      ) -> torch.Tensor:
    """Project protected patches onto the principal subspace of clean reference patches that
    holds ``energy`` of their energy (a natural-image prior)."""
    if ctx.reference is None:
        raise NeauditError("clean_patch_prior needs clean reference images (threat level L2). "
                           "Fix: give the audit originals or --reference DIR.")
    key = ("clean_prior", int(patch), float(energy))
    if key not in ctx.extras:
        clean = _patches(ctx.reference.to(images.device), int(patch))
        spectrum, directions = principal_spectrum(clean.reshape(-1, clean.shape[-1]))
        keep = int((spectrum.cumsum(0) / spectrum.sum() < energy).sum()) + 1
        ctx.extras[key] = directions[:, :keep].float()
    basis = ctx.extras[key].to(images)
    rows = _patches(images, int(patch))
    return _unpatch((rows @ basis) @ basis.T, images, int(patch))


def _subspace(spec: str, model, size: tuple[int, int], ctx: AttackContext):
    from neaudit.spectral import low_sensitivity_subspace
    from neaudit.stem import first_layer

    key = ("subspace", spec, size)
    if key not in ctx.extras:
        if model.input_size is not None and tuple(model.input_size) != tuple(size):
            ctx.extras[key] = None  # its stem sees resized images; no pixel-space subspace
        else:
            try:
                ctx.extras[key] = low_sensitivity_subspace(first_layer(model, size), size)
            except (NeauditError, ValueError):
                ctx.extras[key] = None
    return ctx.extras[key]


def rank_surrogates(images: torch.Tensor, ctx: AttackContext, sigma: float = 1.0
                    ) -> list[tuple[str, float]]:
    """Candidates ranked by enrichment: residual energy per dimension inside their subspace
    over that outside it (1 for a subspace unrelated to the perturbation)."""
    surrogates = ctx.extras.get("surrogates")
    if not surrogates:
        raise NeauditError("surrogate attacks need a zoo of candidate models (threat level L3). "
                           "Fix: audit with --authorized and models (--model or --zoo).")
    residual = images - _denoise(images, ctx, sigma)
    size = tuple(images.shape[-2:])
    scores = []
    for spec, model in surrogates.items():
        space = _subspace(spec, model, size, ctx)
        if space is None:
            continue
        captured = float(space.project(residual).pow(2).sum() / residual.pow(2).sum())
        chance = space.kept_fraction
        # odds of residual energy per dimension inside vs outside the candidate's subspace
        odds = (captured / chance) / max((1 - captured) / max(1 - chance, 1e-9), 1e-9)
        scores.append((spec, odds))
    return sorted(scores, key=lambda item: -item[1])


def blur_refill(images: torch.Tensor, space, ctx: AttackContext, sigma: float = 1.0
                ) -> torch.Tensor:
    """Project-and-refill: the images' component inside ``space`` replaced by that of the
    blurred copy, on the images' device."""
    return images - space.project(images - _denoise(images, ctx, sigma))


def identified_subspace(images: torch.Tensor, ctx: AttackContext, sigma: float = 1.0
                        ) -> tuple[str, object]:
    """The L3 attacker's guess of the authorized model (the best-ranked public candidate,
    the ranking kept in ``ctx.extras["ranking"]``) and its low-sensitivity subspace."""
    ranking = rank_surrogates(images, ctx, sigma)
    if not ranking:
        raise NeauditError("no candidate model has a pixel-space subspace at this image size. "
                           "Fix: add candidates whose stem is a plain Conv2d or patch embedding "
                           "at this size, or drop the surrogate attacks from the suite.")
    ctx.extras["ranking"] = ranking
    best = ranking[0][0]
    return best, _subspace(best, ctx.extras["surrogates"][best], tuple(images.shape[-2:]), ctx)


def known_subspace(images: torch.Tensor, ctx: AttackContext, attack: str
                   ) -> tuple[str, object]:
    """The authorized model and its subspace, for the direct case where the attacker knows
    which model the release was made for."""
    spec = ctx.extras.get("authorized")
    surrogates = ctx.extras.get("surrogates") or {}
    if spec not in surrogates:
        raise NeauditError(f"{attack} needs the authorized model (threat L3). Fix: name it "
                           "with --authorized.")
    space = _subspace(spec, surrogates[spec], tuple(images.shape[-2:]), ctx)
    if space is None:
        raise NeauditError(f"{spec}: no pixel-space subspace at this image size. Fix: drop "
                           "the attacks that need it from the suite.")
    return spec, space


@register_attack("surrogate_projection", "adaptive", "L3", {"sigma": SIGMA})
def surrogate_projection(images: torch.Tensor, ctx: AttackContext, sigma: float
                         ) -> torch.Tensor:
    """Identify the most likely authorized model among public candidates, project out its
    low-sensitivity subspace and refill it from the denoised copy."""
    _, space = identified_subspace(images, ctx, sigma)
    return blur_refill(images, space, ctx, sigma)


@register_attack("known_model_projection", "adaptive", "L3", {"sigma": SIGMA})
def known_model_projection(images: torch.Tensor, ctx: AttackContext, sigma: float
                           ) -> torch.Tensor:
    """The direct case: the attacker knows the authorized model."""
    _, space = known_subspace(images, ctx, "known_model_projection")
    return blur_refill(images, space, ctx, sigma)
