"""Non-overlapping patch grids: images ↔ patch vectors by reshaping (``F.unfold``'s layout,
without its copy), for patch-embedding stems and for attacks that work per patch."""

from __future__ import annotations

import torch


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
