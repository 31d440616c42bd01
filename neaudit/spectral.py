"""Low-sensitivity subspaces of a first layer, as operators on pixel perturbations.

Two exact descriptions of the same idea (docs/method.md §2), both :class:`Subspace`:

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

import math
from abc import ABC, abstractmethod

import torch

from neaudit.errors import NeauditError
from neaudit.patches import from_patches, to_patches
from neaudit.seeding import counter_normal, counter_uniform
from neaudit.stem import FirstLayer


def _select(singular_values: torch.Tensor, rank: int | None, threshold: float | None
            ) -> torch.Tensor:
    """Boolean mask of the kept (smallest) singular values; a selection that keeps every
    direction (no protection at all) is refused."""
    flat = singular_values.flatten()
    if threshold is not None:
        if not (math.isfinite(threshold) and threshold > 0):
            raise NeauditError(f"--threshold {threshold}: must be a positive number.")
        mask = flat <= threshold * flat.max()
        if not mask.any():
            mask = flat == flat.min()
    else:
        if rank is None:
            null = int((flat <= 1e-6 * flat.max()).sum())
            rank = null if null > 0 else flat.numel() // 2
        if not 1 <= rank < flat.numel():
            raise NeauditError(f"--rank {rank}: the first layer sees {flat.numel()} directions, "
                               "and a subspace must keep at least one and leave at least one "
                               f"out. Fix: give a rank from 1 to {flat.numel() - 1}.")
        mask = singular_values <= flat.sort().values[rank - 1]
    if bool(mask.all()):
        raise NeauditError("the selected subspace keeps every direction the first layer sees, "
                           "so the perturbation would reach the authorized model in full. Fix: "
                           "a lower --rank or --threshold.")
    return mask.view_as(singular_values)


PATCH_CHOICE = 1
"""The counter stream that chooses which patches carry noise (``patch_fraction`` < 1)."""


class Subspace(ABC):
    """A low-sensitivity subspace of a first layer: the kept directions (``mask`` over the
    operator's ``singular_values``), projection onto them, and noise spread over them.

    Box repair works on *rows* (:meth:`to_rows`): the smallest pieces of an image that the
    subspace constrains independently (a patch for a patch stem, the whole image otherwise).
    """

    layer: FirstLayer
    singular_values: torch.Tensor
    mask: torch.Tensor
    rank: int

    @property
    def min_gain(self) -> float:
        """The smallest gain ‖W̃δ‖/‖δ‖ noise spread over the subspace can have."""
        return float(self.singular_values[self.mask].pow(2).mean().sqrt())

    @property
    def isotropic_gain(self) -> float:
        """The gain of isotropic noise."""
        return float(self.singular_values.pow(2).mean().sqrt())

    @property
    @abstractmethod
    def kept_fraction(self) -> float:
        """Share of all pixel dimensions the subspace spans."""

    @abstractmethod
    def project(self, delta: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection of pixel perturbations (NCHW) onto the subspace."""

    @abstractmethod
    def sample(self, shape: torch.Size, key: int, rows: torch.Tensor,
               patch_fraction: float = 1.0) -> torch.Tensor:
        """Noise in the subspace for the images ``rows`` (their dataset indices), a pure
        function of (key, image index) computed on ``rows``' device
        (:func:`neaudit.seeding.counter_normal`)."""

    @abstractmethod
    def to_rows(self, images: torch.Tensor) -> torch.Tensor:
        """(N, d) rows that the subspace constrains independently."""

    @abstractmethod
    def from_rows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_rows` (pixels no row covers come from ``like``)."""

    @abstractmethod
    def project_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`project` on rows."""


class PatchSubspace(Subspace):
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
    def kept_fraction(self) -> float:
        """Share of all pixel dimensions the subspace spans (``rank`` is per patch)."""
        return self.rank / self.basis.shape[0]

    def _unfold(self, images: torch.Tensor) -> torch.Tensor:
        return to_patches(images, self.patch)

    def _fold(self, patches: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return from_patches(patches, like, self.patch)

    def to_rows(self, images: torch.Tensor) -> torch.Tensor:
        """One row per patch, (B·L, d)."""
        return self._unfold(images).transpose(1, 2).reshape(-1, self.basis.shape[0])

    def from_rows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        patches = rows.view(like.shape[0], -1, self.basis.shape[0]).transpose(1, 2)
        return self._fold(patches, like)

    def project_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows @ self.projector.to(rows)

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection of pixel perturbations onto the subspace (borders the stem
        never sees are left as they are)."""
        basis = self.basis.to(delta)
        patches = self._unfold(delta)
        return self._fold(basis @ (basis.T @ patches), delta)

    def sample(self, shape: torch.Size, key: int, rows: torch.Tensor,
               patch_fraction: float = 1.0) -> torch.Tensor:
        """Gaussian noise with unit variance per subspace coordinate, independent per patch.

        With ``patch_fraction`` < 1 only that share of each image's patches, chosen by the
        key, carries noise. Rounding to uint8 leaves a residual first-layer response in every
        noisy patch whatever its strength, so the same energy in fewer patches reaches the
        authorized model less (and leaves the other patches untouched).
        """
        b, _, h, w = shape
        count = (h // self.patch[0]) * (w // self.patch[1])
        z = counter_normal(key, rows, self.rank * count).view(b, self.rank, count)
        if patch_fraction < 1.0:
            noisy = max(1, round(patch_fraction * count))
            order = counter_uniform(key, rows, count, stream=PATCH_CHOICE).argsort(dim=1)
            keep = torch.zeros(b, count, dtype=torch.bool, device=z.device)
            keep.scatter_(1, order[:, :noisy], True)
            z = z * keep[:, None, :]
        return self._fold(self.basis.to(z) @ z, torch.zeros(shape, device=z.device))


class FourierSubspace(Subspace):
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
        # a real perturbation's spectrum is conjugate-symmetric, so the projector is applied
        # on the half that ``rfft2`` keeps; one contiguous (C·s² × C·s²) matrix per frequency
        half = kept[:, : self.grid[1] // 2 + 1]
        projector = half.conj().transpose(-2, -1) @ half
        self.projector = projector.reshape(-1, *projector.shape[-2:]).to(torch.complex64)
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
    def kept_fraction(self) -> float:
        """Share of all pixel dimensions the subspace spans."""
        return self.rank / self.mask.numel()

    def to_rows(self, images: torch.Tensor) -> torch.Tensor:
        """One row per image: the operator couples every pixel."""
        return images.flatten(1).clone()

    def from_rows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return rows.view_as(like)

    def project_rows(self, rows: torch.Tensor) -> torch.Tensor:
        shape = (rows.shape[0], self.layer.weight.shape[1], *self.image_size)
        return self.project(rows.view(shape)).flatten(1)

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        b, c, h, w = delta.shape
        sh, sw = self.layer.stride
        n1, n2 = self.grid
        poly = delta.reshape(b, c, n1, sh, n2, sw).permute(0, 1, 3, 5, 2, 4)
        spec = torch.fft.rfft2(poly.to(torch.float32), norm="ortho")  # ..., N1, N2 // 2 + 1
        half = spec.shape[-1]
        # (frequencies, C·s², B), contiguous: a batched matmul on strided operands takes a
        # per-frequency slow path (15× slower on a CPU)
        spec = spec.reshape(b, -1, n1 * half).permute(2, 1, 0).contiguous()
        spec = torch.bmm(self.projector.to(spec.device), spec)
        spec = spec.permute(2, 1, 0).reshape(b, c, sh, sw, n1, half)
        out = torch.fft.irfft2(spec, s=(n1, n2), norm="ortho")
        return out.permute(0, 1, 4, 2, 5, 3).reshape(b, c, h, w).to(delta.dtype)

    def sample(self, shape: torch.Size, key: int, rows: torch.Tensor,
               patch_fraction: float = 1.0) -> torch.Tensor:
        """Noise spread over the whole operator's subspace; an overlapping stem has no patches
        to leave out, so ``patch_fraction`` must be 1."""
        if patch_fraction != 1.0:
            raise ValueError("patch_fraction applies to non-overlapping stems (patch "
                             f"embeddings); this stem {self.layer.kernel}/{self.layer.stride} "
                             "overlaps. Fix: leave it at 1.")
        numel = math.prod(shape[1:])
        noise = counter_normal(key, rows, numel).view(shape)
        return self.project(noise) * math.sqrt(numel / self.rank)


def low_sensitivity_subspace(layer: FirstLayer, image_size: tuple[int, int],
                             rank: int | None = None, threshold: float | None = None
                             ) -> Subspace:
    """The exact construction for this stem: per patch when windows do not overlap."""
    if not layer.overlapping:
        return PatchSubspace(layer, rank, threshold)
    return FourierSubspace(layer, image_size, rank, threshold)


def misalignment(space: Subspace, other: FirstLayer
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
