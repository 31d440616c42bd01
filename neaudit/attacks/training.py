"""What the attacks that train a network share: the networks, a content-addressed cache of
trained weights, and seeded minibatches.

An attack that trains (a denoiser, a restorer, a diffusion model) trains once per audit and
content: its weights are saved under the audit's cache folder by a hash of everything they
depend on (the training images' bytes, the settings, the seed), so a re-run or a resumed run
reuses them and every task of one audit applies the same network.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save

from neaudit.attacks.registry import AttackContext
from neaudit.imageio import atomic_write
from neaudit.seeding import seeded


def _block(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1), nn.SiLU(),
                         nn.Conv2d(outputs, outputs, 3, padding=1), nn.SiLU())


class TinyUNet(nn.Module):
    """A two-level U-Net (full and half resolution, one skip connection).

    As a restorer (``timed=False``) it predicts what to subtract from its input; as a
    diffusion model (``timed=True``) it predicts the noise ε of a noised input at time
    t ∈ [0, 1], the time entering as a sinusoidal embedding added at half resolution.
    Any image size works (odd sizes are pooled down and interpolated back). The output layer
    starts at zero, so training starts from "change nothing".
    """

    def __init__(self, width: int = 32, timed: bool = False) -> None:
        super().__init__()
        self.width, self.timed = width, timed
        self.encode = _block(3, width)
        self.middle = _block(width, 2 * width)
        self.decode = _block(3 * width, width)
        self.head = nn.Conv2d(width, 3, 3, padding=1)
        nn.init.zeros_(self.head.weight)  # an untrained network predicts nothing
        nn.init.zeros_(self.head.bias)
        if timed:
            self.time = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(),
                                      nn.Linear(2 * width, width))

    def _embed(self, t: torch.Tensor) -> torch.Tensor:
        half = self.width // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def forward(self, images: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        full = self.encode(images)
        half = F.avg_pool2d(full, 2, ceil_mode=True)
        if self.timed:
            half = half + self.time(self._embed(t))[:, :, None, None]
        half = self.middle(half)
        up = F.interpolate(half, size=full.shape[-2:], mode="nearest")
        return self.head(self.decode(torch.cat([up, full], dim=1)))


def content_digest(*parts: torch.Tensor | str | float | int) -> str:
    """A short hash of tensors' bytes and settings: the cache key of a trained network."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def trained(ctx: AttackContext, name: str, digest: str, build: Callable[[], nn.Module],
            train: Callable[[nn.Module], None], seed: int) -> nn.Module:
    """The network ``build()`` (initialized from ``seed``) after ``train``, in eval mode on
    ``ctx.device``: loaded from ``<cache>/<name>-<digest>.safetensors`` when an earlier run
    saved it there, else trained and saved atomically."""
    model = seeded(build, seed, name, "init").to(ctx.device)
    path = ctx.cache_dir / f"{name}-{digest}.safetensors" if ctx.cache_dir else None
    if path is not None and path.is_file():
        model.load_state_dict(load_file(str(path), device=str(ctx.device)))
        return model.eval()
    model.train()
    with torch.enable_grad():
        train(model)
    if path is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write(path, lambda handle: handle.write(save(state)))
    return model.eval()


def minibatches(count: int, size: int, steps: int, draws: torch.Generator
                ) -> Iterable[torch.Tensor]:
    """``steps`` random index batches of up to ``size`` items out of ``count`` (CPU draws)."""
    for _ in range(int(steps)):
        yield torch.randint(0, count, (min(size, count),), generator=draws)


def aligned_crop(images: torch.Tensor, targets: torch.Tensor, size: int, grid: int,
                 draws: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random ``size``-pixel crop of both batches, its corner on multiples of
    ``grid`` (an NE's patch grid or stride), so the crop keeps the grid's phase."""
    h, w = images.shape[-2:]
    if size >= min(h, w):
        return images, targets
    top = int(torch.randint(0, (h - size) // grid + 1, (1,), generator=draws)) * grid
    left = int(torch.randint(0, (w - size) // grid + 1, (1,), generator=draws)) * grid
    window = (..., slice(top, top + size), slice(left, left + size))
    return images[window], targets[window]


def autocast(device: torch.device):
    """bf16 autocast on CUDA (training and inference of these small networks are safe in
    it); a no-op elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
