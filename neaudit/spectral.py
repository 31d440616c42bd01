"""Low-sensitivity subspaces of a first layer, as operators on pixel perturbations.

Two exact descriptions of the same idea (PRIMER §1):

* :class:`PatchSubspace` for non-overlapping stems (stride = kernel, no padding: patch
  embeddings, ConvNeXt/Swin stems). The image operator is block-diagonal, one copy of the
  pixel-space matrix W̃ (m × d) per patch, so the per-patch subspace (the right singular
  vectors with the smallest singular values) is exact for the whole image.
* :class:`FourierSubspace` for overlapping stems (stride < kernel). With circular boundaries a
  strided convolution splits into s² polyphase components and is diagonalized by the 2-D DFT:
  at each output frequency ω it is an m × (C·s²) matrix H(ω). The operator's singular values
  are the union of those of every H(ω); the subspace keeps the smallest ones overall. Zero
  padding makes this approximate within a kernel width of the border.

Both select ``rank`` directions: by default the exact null space where one exists, otherwise
half of the dimensions. The best gain any perturbation spread over the chosen subspace can
have is ``min_gain`` = sqrt(mean of the selected σ²).
"""

from __future__ import annotations

import functools
import math

import torch

from neaudit.imageio import quantize
from neaudit.stem import FirstLayer

RELAXATION = 1.5
"""Box repair steps (PRIMER §1, "clip and quantize, then repair") are extrapolated
alternating projections (Pierra): a step moves δ by RELAXATION · ‖v‖²/‖Pv‖² · Pv, with v the
box violation and P the projector onto the subspace. On photographs this takes a quarter
fewer patch-steps than a fixed over-relaxation (ω = 1.8), and about half as many as ω = 1.5."""

MAX_EXTRAPOLATION = 10.0
"""Cap on ‖v‖²/‖Pv‖² (about d/r for a violation spread over a patch)."""


def _extrapolated(violation: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
    """Per row (dim 0) of ``projected`` = P(violation): the extrapolated repair step.

    The factor ‖v‖²/‖Pv‖² is about d/r for a spread-out violation; it is capped so that a
    violation the subspace can barely reach (Pv ≈ 0) cannot throw δ far away.
    """
    scale = violation.flatten(1).pow(2).sum(1) / projected.flatten(1).pow(2).sum(1).clamp_min(1e-30)
    scale = scale.clamp(max=MAX_EXTRAPOLATION)
    return projected * (RELAXATION * scale).view(-1, *[1] * (projected.ndim - 1))


HALF_STEP = 0.5 / 255
"""Box violations smaller than half a uint8 step vanish when the image is rounded."""


def _outside(values: torch.Tensor) -> torch.Tensor:
    """Per row (dim 0): does any value lie more than half a uint8 step outside [0, 1]?"""
    low, high = values.flatten(1).aminmax(dim=1)
    return (low < -HALF_STEP) | (high > 1 + HALF_STEP)


def to_patches(images: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) → (B, C·ph·pw, L) non-overlapping patches on the grid anchored at the top
    left, by reshaping (same layout as ``F.unfold``); a partial border is left out."""
    b, c, h, w = images.shape
    ph, pw = patch
    grid = images[..., : h - h % ph, : w - w % pw].reshape(b, c, h // ph, ph, w // pw, pw)
    return grid.permute(0, 1, 3, 5, 2, 4).reshape(b, c * ph * pw, -1)


def from_patches(patches: torch.Tensor, like: torch.Tensor, patch: tuple[int, int]
                 ) -> torch.Tensor:
    """Inverse of :func:`to_patches`; pixels outside the patch grid come from ``like``."""
    b, c, h, w = like.shape
    ph, pw = patch
    nh, nw = h // ph, w // pw
    grid = patches.reshape(b, c, ph, pw, nh, nw).permute(0, 1, 4, 2, 5, 3)
    if h % ph == 0 and w % pw == 0:
        return grid.reshape(b, c, h, w)
    out = like.clone()
    out[..., : nh * ph, : nw * pw] = grid.reshape(b, c, nh * ph, nw * pw)
    return out


def _select(singular_values: torch.Tensor, rank: int | None, threshold: float | None
            ) -> torch.Tensor:
    """Boolean mask of the kept (smallest) singular values."""
    flat = singular_values.flatten()
    if threshold is not None:
        mask = flat <= threshold * flat.max()
        if not mask.any():
            mask = flat == flat.min()
        return mask.view_as(singular_values)
    if rank is None:
        null = int((flat <= 1e-6 * flat.max()).sum())
        rank = null if null > 0 else flat.numel() // 2
    rank = max(1, min(rank, flat.numel()))
    cutoff = flat.sort().values[rank - 1]
    return singular_values <= cutoff


class PatchSubspace:
    """Exact per-patch subspace of a non-overlapping stem; noise is independent per patch."""

    def __init__(self, layer: FirstLayer, rank: int | None = None,
                 threshold: float | None = None) -> None:
        self.layer = layer
        self.patch = layer.kernel
        matrix = layer.pixel_weight.reshape(layer.weight.shape[0], -1).double()
        self.matrix = matrix.float()  # W̃, (m, d)
        _, s, vh = torch.linalg.svd(matrix, full_matrices=True)
        d = matrix.shape[1]
        self.singular_values = torch.cat([s, s.new_zeros(d - s.numel())]).float()
        self.mask = _select(self.singular_values, rank, threshold)
        basis = vh[self.mask].T  # (d, r)
        self.basis = basis.float().contiguous()
        self.projector = (basis @ basis.T).float()  # (d, d): one GEMM per projection
        self.rank = int(self.mask.sum())

    @property
    def min_gain(self) -> float:
        return float(self.singular_values[self.mask].pow(2).mean().sqrt())

    @property
    def isotropic_gain(self) -> float:
        return float(self.singular_values.pow(2).mean().sqrt())

    @property
    def kept_fraction(self) -> float:
        """Share of all pixel dimensions the subspace spans (``rank`` is per patch)."""
        return self.rank / self.basis.shape[0]

    def _unfold(self, images: torch.Tensor) -> torch.Tensor:
        return to_patches(images, self.patch)

    def _fold(self, patches: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return from_patches(patches, like, self.patch)

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection of pixel perturbations onto the subspace (borders the stem
        never sees are left as they are)."""
        basis = self.basis.to(delta)
        patches = self._unfold(delta)
        return self._fold(basis @ (basis.T @ patches), delta)

    def repair(self, images: torch.Tensor, iterations: int) -> torch.Tensor:
        """Alternate (extrapolated) projections between the box [0,1] and
        {clean + δ : δ in the subspace}, patch by patch (the operator is block-diagonal).
        ``images`` must be clean + δ with δ already in the subspace.

        δ stays in the subspace, so each step only projects the box violation. A patch stops
        once no pixel is more than half a uint8 step outside the box: rounding to the grid
        absorbs what is left, and most patches get there in two or three steps.
        """
        d = self.basis.shape[0]
        rows = self._unfold(images).transpose(1, 2).reshape(-1, d)
        projector = self.projector.to(images)
        active = _outside(rows).nonzero().flatten()
        positions = rows[active]
        pending = torch.arange(active.numel(), device=images.device)
        for _ in range(iterations):
            current = positions[pending]
            violation = current.clamp(0, 1).sub_(current)
            far = violation.abs().amax(1) > HALF_STEP
            pending, violation = pending[far], violation[far]
            if pending.numel() == 0:
                break
            positions.index_add_(0, pending, _extrapolated(violation, violation @ projector))
        rows[active] = positions
        b = images.shape[0]
        patches = rows.view(b, -1, d).transpose(1, 2)
        return self._fold(patches, images)

    def sample(self, shape: torch.Size, generator: torch.Generator,
               patch_fraction: float = 1.0, device: torch.device | None = None) -> torch.Tensor:
        """Gaussian noise with unit variance per subspace coordinate, independent per patch,
        drawn from ``generator`` (on the CPU, so every device gets the same draw) and shaped on
        ``device``.

        With ``patch_fraction`` < 1 only that share of each image's patches, drawn from
        ``generator``, carries noise. Rounding to uint8 leaves a residual first-layer response
        in every noisy patch whatever its strength, so the same energy in fewer patches
        reaches the authorized model less (and leaves the other patches untouched).
        """
        b, _, h, w = shape
        count = (h // self.patch[0]) * (w // self.patch[1])
        z = torch.randn(b, self.rank, count, generator=generator)
        if patch_fraction < 1.0:
            noisy = max(1, round(patch_fraction * count))
            for image in z:
                image[:, torch.randperm(count, generator=generator)[noisy:]] = 0.0
        z = z.to(device)
        return self._fold(self.basis.to(z) @ z, torch.zeros(shape, device=z.device))

    @functools.cached_property
    def _rounding_factor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel order (largest column norm first) and the upper Cholesky factor of the
        damped inverse Gram matrix in that order, computed once per subspace."""
        gram = self.matrix.double().T @ self.matrix.double()
        damp = 1e-2 * float(gram.diagonal().mean())
        order = gram.diagonal().argsort(descending=True)
        gram = gram[order][:, order] + damp * torch.eye(gram.shape[0], dtype=gram.dtype)
        return order, torch.linalg.cholesky(torch.linalg.inv(gram), upper=True).float()

    def compensation_pays(self, noise_rms: float) -> bool:
        """Can compensated rounding change the written gain of noise with ``noise_rms``
        (uint8 steps per pixel) by more than 1%?

        Plain rounding adds an isotropic error of 1/12 step² per pixel; its first-layer
        energy is compared with the noise's own (rms² · min_gain²). Where the subspace only
        attenuates (a full-rank stem), the rounding error is lost in the noise's own response.
        """
        rounding = self.isotropic_gain**2 / 12
        return rounding > 0.02 * noise_rms**2 * self.min_gain**2

    def round_to_grid(self, target: torch.Tensor, compensate: bool = True) -> torch.Tensor:
        """Quantize [0,1] images to the uint8 grid so that the rounding error has the
        smallest first-layer response.

        Sequential rounding with error compensation in the metric of W̃ᵀW̃ (the OBQ/GPTQ
        update): each pixel's rounding error is pushed onto the not-yet-rounded pixels of its
        patch along the direction that W̃ cannot see. Plain rounding leaves an isotropic
        error whose first-layer gain is that of isotropic noise; this leaves about half.
        ``compensate=False`` rounds plainly.
        """
        if not compensate:
            return quantize(target)
        patches = self._unfold(target * 255.0)  # (B, d, L)
        b, d, count = patches.shape
        order, upper = (t.to(target.device) for t in self._rounding_factor)
        # one contiguous row per pixel position, in rounding order
        columns = patches.permute(1, 0, 2).reshape(d, -1)[order]
        _compensated_round(columns, upper)
        rounded = torch.empty_like(columns)
        rounded[order] = columns
        patches = rounded.view(d, b, count).permute(1, 0, 2)
        h, w = target.shape[-2:]
        covered = h % self.patch[0] == 0 and w % self.patch[1] == 0
        border = target if covered else quantize(target) * 255.0
        return self._fold(patches, border) / 255.0


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


class FourierSubspace:
    """Whole-operator subspace of an overlapping (strided) convolution, built per frequency."""

    def __init__(self, layer: FirstLayer, image_size: tuple[int, int], rank: int | None = None,
                 threshold: float | None = None) -> None:
        self.layer = layer
        h, w = image_size
        sh, sw = layer.stride
        if h % sh or w % sw:
            raise ValueError(f"image size {image_size} is not a multiple of the stem stride "
                             f"{layer.stride}; resize the images first.")
        self.image_size = image_size
        self.grid = (h // sh, w // sw)
        response = self._frequency_response()  # (N1, N2, m, C·s²), complex128
        _, s, vh = torch.linalg.svd(response, full_matrices=True)
        n_in = response.shape[-1]
        pad = n_in - s.shape[-1]
        if pad > 0:
            s = torch.cat([s, s.new_zeros(*s.shape[:-1], pad)], dim=-1)
        self.singular_values = s.float()  # (N1, N2, C·s²)
        # ω and −ω carry the same singular values; select on their average so that both
        # halves of every conjugate pair are kept together and the noise stays real.
        mirrored = torch.roll(self.singular_values.flip(0, 1), shifts=(1, 1), dims=(0, 1))
        self.mask = _select((self.singular_values + mirrored) / 2, rank, threshold)
        kept = vh * self.mask[..., :, None]
        self.projector = (kept.conj().transpose(-2, -1) @ kept).to(torch.complex64)
        self.rank = int(self.mask.sum())

    def _frequency_response(self) -> torch.Tensor:
        layer = self.layer
        weight = layer.pixel_weight
        m, c, kh, kw = weight.shape
        h, w = self.image_size
        if kh > h or kw > w:
            raise ValueError(f"kernel {layer.kernel} is larger than the image {self.image_size}")
        full = torch.zeros(m, c, h, w, dtype=torch.float64)
        full[:, :, :kh, :kw] = weight.double()
        full = torch.roll(full, shifts=(-layer.padding[0], -layer.padding[1]), dims=(2, 3))
        sh, sw = layer.stride
        n1, n2 = self.grid
        poly = full.view(m, c, n1, sh, n2, sw).permute(0, 1, 3, 5, 2, 4)  # m,c,u1,u2,τ1,τ2
        spectrum = torch.fft.fft2(poly).reshape(m, c * sh * sw, n1, n2)
        return spectrum.conj().permute(2, 3, 0, 1)

    @property
    def min_gain(self) -> float:
        return float(self.singular_values[self.mask].pow(2).mean().sqrt())

    @property
    def isotropic_gain(self) -> float:
        return float(self.singular_values.pow(2).mean().sqrt())

    @property
    def kept_fraction(self) -> float:
        """Share of all pixel dimensions the subspace spans."""
        return self.rank / self.mask.numel()

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        b, c, h, w = delta.shape
        sh, sw = self.layer.stride
        n1, n2 = self.grid
        poly = delta.reshape(b, c, n1, sh, n2, sw).permute(0, 1, 3, 5, 2, 4)
        spec = torch.fft.fft2(poly.to(torch.float32), norm="ortho").reshape(b, -1, n1, n2)
        spec = spec.permute(2, 3, 1, 0)  # N1, N2, C·s², B
        projector = self.projector.to(spec.device)
        spec = (projector @ spec).permute(3, 2, 0, 1).reshape(b, c, sh, sw, n1, n2)
        out = torch.fft.ifft2(spec, norm="ortho").real
        return out.permute(0, 1, 4, 2, 5, 3).reshape(b, c, h, w).to(delta.dtype)

    def repair(self, images: torch.Tensor, iterations: int) -> torch.Tensor:
        """Alternate (extrapolated) projections between the box [0,1] and
        {clean + δ : δ in the subspace}, for the images that leave the box; ``images`` must
        be clean + δ with δ already in the subspace (see :meth:`PatchSubspace.repair`)."""
        images = images.clone()
        for _ in range(iterations):
            outside = _outside(images).nonzero().flatten()
            if outside.numel() == 0:
                break
            current = images[outside]
            violation = current.clamp(0, 1).sub_(current)
            images[outside] = current + _extrapolated(violation, self.project(violation))
        return images

    def sample(self, shape: torch.Size, generator: torch.Generator,
               patch_fraction: float = 1.0, device: torch.device | None = None) -> torch.Tensor:
        """Noise spread over the whole operator's subspace, drawn on the CPU and projected on
        ``device``; an overlapping stem has no patches to leave out, so ``patch_fraction``
        must be 1."""
        if patch_fraction != 1.0:
            raise ValueError("patch_fraction applies to non-overlapping stems (patch "
                             f"embeddings); this stem {self.layer.kernel}/{self.layer.stride} "
                             "overlaps. Fix: leave it at 1.")
        noise = torch.randn(shape, generator=generator).to(device)
        scale = math.sqrt(noise[0].numel() / self.rank)
        return self.project(noise) * scale

    def compensation_pays(self, noise_rms: float) -> bool:
        """The Fourier operator has no per-patch structure to compensate in."""
        return False

    def round_to_grid(self, target: torch.Tensor, compensate: bool = False) -> torch.Tensor:
        """Plain rounding (see :meth:`compensation_pays`)."""
        return quantize(target)


def low_sensitivity_subspace(layer: FirstLayer, image_size: tuple[int, int],
                             rank: int | None = None, threshold: float | None = None
                             ) -> PatchSubspace | FourierSubspace:
    """The exact construction for this stem: per patch when windows do not overlap."""
    if not layer.overlapping:
        return PatchSubspace(layer, rank, threshold)
    return FourierSubspace(layer, image_size, rank, threshold)


def misalignment(space: PatchSubspace | FourierSubspace, other: FirstLayer
                 ) -> tuple[float, float]:
    """Principal angles between ``other``'s first-layer row space and ``space``, as (mean
    angle in degrees, predicted gain of noise spread over ``space`` / isotropic gain).

    Defined where both act on the same patches (same kernel, stride and channels); NaN
    otherwise, where only the measured gain is meaningful.
    """
    if not isinstance(space, PatchSubspace) or other.overlapping or (
            other.kernel != space.patch or other.weight.shape[1] != space.layer.weight.shape[1]):
        return math.nan, math.nan
    matrix = other.pixel_weight.reshape(other.weight.shape[0], -1).double()
    basis = space.basis.double()
    rowspace = torch.linalg.qr(matrix.T).Q  # (d, m')
    cosines = torch.linalg.svdvals(basis.T @ rowspace).clamp(max=1.0)
    angles = torch.rad2deg(torch.arccos(cosines))
    # principal angles beyond min(r, m') are 90°: the subspace has directions W' cannot see
    full = torch.cat([angles, angles.new_full((basis.shape[1] - angles.numel(),), 90.0)])
    predicted = (matrix @ basis).norm() / math.sqrt(basis.shape[1])
    isotropic = matrix.norm() / math.sqrt(matrix.shape[1])
    return float(full.mean()), float(predicted / isotropic)
