"""Reconstruction attacks: the adversary who knows the NE construction (it is public) and
rebuilds the clean image rather than only stripping noise (docs/method.md §3).

* ``simulate_invert`` (L3): identify the authorized model among public candidates (as
  ``surrogate_projection`` does), protect the attacker's own clean images with the public
  construction (``subspace`` and ``reference`` alike, fresh random keys, strength matched to
  the release), train a restorer on the (NE, clean) pairs and apply it to the release.
  The restorer refines project-and-refill, its correction kept inside the subspace (where
  the construction puts the noise). ``simulate_invert_known`` takes the authorized model as
  known.
* ``subspace_prior`` (L3): the release is x + δ with δ in the identified model's subspace S;
  keep the release's component outside S and take the component inside S from a natural-image
  prior, iterating (plug-and-play with a hard data constraint). The prior is the learned
  denoiser where clean images are at hand, else TV denoising. Its first iterate is
  ``surrogate_projection``'s project-and-refill; the prior replaces the blur.
* ``diffusion_purify`` (L2): DiffPure-style. Noise the release to time t* of a diffusion model
  and run the reverse process back (deterministic DDIM steps). The model is a small DDPM
  trained on the attacker's clean images, or a pretrained ``diffusers`` UNet2DModel with its
  scheduler from a local folder (``checkpoint``).

Every network trains once per audit and content and is cached (:mod:`neaudit.attacks.training`).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from neaudit.attacks.adaptive import blur_refill, identified_subspace, known_subspace
from neaudit.attacks.preprocess import gaussian_blur
from neaudit.attacks.purify import denoiser, tv_denoise
from neaudit.attacks.registry import AttackContext, Param, register_attack
from neaudit.attacks.training import (
    TinyUNet,
    aligned_crop,
    autocast,
    content_digest,
    minibatches,
    trained,
)
from neaudit.errors import NeauditError
from neaudit.imageio import quantize
from neaudit.ne import reference_recode, subspace_recode
from neaudit.seeding import derive_seed, generator
from neaudit.spectral import Subspace

TRAIN_STEPS = Param(400, 1, 1_000_000)
"""Optimizer steps of a trained network (batches of 16 crops)."""

CROP = Param(64, 8, 1024)
"""Training crop size in pixels (whole images when they are smaller)."""

WIDTH = Param(32, 4, 256)
"""Channels of the trained U-Net at full resolution (twice that at half)."""


def _reference(ctx: AttackContext, attack: str, like: torch.Tensor) -> torch.Tensor:
    """The attacker's clean images on the device, at the release's size."""
    if ctx.reference is None:
        raise NeauditError(f"{attack} needs clean reference images (threat level L2 and up). "
                           "Fix: give the audit originals or --reference DIR.")
    reference = ctx.reference.to(like.device, torch.float32)
    if reference.shape[-2:] != like.shape[-2:]:
        reference = F.interpolate(reference, size=like.shape[-2:], mode="bilinear",
                                  antialias=True, align_corners=False).clamp(0, 1)
    return quantize(reference)


# --- simulate and invert ------------------------------------------------------------------

CALIBRATION_PSNRS = (12.0, 16.0, 20.0, 24.0, 28.0, 32.0, 36.0, 40.0, 48.0)
"""Strengths (dB) at which the attacker protects its own images to read the release's."""


def _in_subspace_energy(images: torch.Tensor, space, ctx: AttackContext) -> torch.Tensor:
    """Per-image energy of the high-pass residual inside the subspace: grows with the NE
    noise, which lives there, and is what the attacker can read off a release."""
    residual = images - gaussian_blur(images, ctx, sigma=1.0)
    return space.project(residual).pow(2).flatten(1).mean(1)


@dataclass
class Simulation:
    """One public construction (``subspace`` or ``reference``) for one subspace, as the
    attacker runs it on its own images, and the strength that matches the release."""

    space: Subspace
    method: str
    psnr: float = 0.0

    def __call__(self, clean: torch.Tensor, psnr: float, key: int) -> torch.Tensor:
        """NEs of ``clean`` at ``psnr`` with ``key``, as they would be written."""
        index = torch.arange(len(clean), device=clean.device)
        if self.method == "subspace":
            return subspace_recode(clean, self.space, psnr, key, index)
        return quantize(reference_recode(clean, self.space.layer, psnr, key, index))

    def match(self, release: torch.Tensor, clean: torch.Tensor, ctx: AttackContext) -> float:
        """The strength at which this construction, run on the attacker's ``clean`` images,
        leaves as much in-subspace residual energy as the release shows: interpolated on a
        grid of strengths and rounded to 0.5 dB, so every batch of a release agrees."""
        target = math.log(float(_in_subspace_energy(release, self.space, ctx).mean()))
        levels = [math.log(float(_in_subspace_energy(
            self(clean[:32], psnr, derive_seed(ctx.seed, "calibration", psnr)), self.space,
            ctx).mean())) for psnr in CALIBRATION_PSNRS]
        # the energy falls as the PSNR rises: find the bracketing pair of the grid
        for (p0, e0), (p1, e1) in itertools.pairwise(zip(CALIBRATION_PSNRS, levels,
                                                         strict=True)):
            if e1 <= target <= e0:
                fraction = (e0 - target) / max(e0 - e1, 1e-12)
                return round(2 * (p0 + fraction * (p1 - p0))) / 2
        return CALIBRATION_PSNRS[0] if target > levels[0] else CALIBRATION_PSNRS[-1]


def train_restorer(release: torch.Tensor, ctx: AttackContext, space: Subspace, steps: int,
                   crop: int, width: int, psnr: float, spec: str) -> TinyUNet:
    """A restorer trained on the attacker's own images protected with both public
    constructions for the model ``spec`` (fresh keys every step, strengths matched to the
    release unless ``psnr`` is given), cached by content."""
    clean = _reference(ctx, "simulate_invert", release)
    simulations = [Simulation(space, method) for method in ("subspace", "reference")]
    for simulation in simulations:
        simulation.psnr = psnr or simulation.match(release, clean, ctx)
    grid = space.layer.stride[0]

    def train(model: TinyUNet) -> None:
        draws = generator(ctx.seed, "restorer-batches", spec)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for step, idx in enumerate(minibatches(len(clean), 16, steps, draws)):
            simulation = simulations[step % 2]
            originals = clean[idx.to(clean.device)]
            made = simulation(originals, simulation.psnr,
                              derive_seed(ctx.seed, "restorer-key", step))
            made, originals = aligned_crop(made, originals, crop, grid, draws)
            with autocast(ctx.device):
                loss = F.mse_loss(_restore(model, space, made, ctx), originals)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    digest = content_digest(clean, spec, steps, crop, width,
                            *(s.psnr for s in simulations), ctx.seed)
    return trained(ctx, "restorer", digest, functools.partial(TinyUNet, width), train,
                   ctx.seed)


def _simulate_invert(images: torch.Tensor, ctx: AttackContext, spec: str, space: Subspace,
                     steps: int, crop: int, width: int, psnr: float) -> torch.Tensor:
    key = ("restorer", spec, int(steps), int(crop), int(width), float(psnr))
    if key not in ctx.extras:
        ctx.extras[key] = train_restorer(images, ctx, space, steps, crop, width, psnr, spec)
    with torch.no_grad():
        return _restore(ctx.extras[key], space, images, ctx)


def _restore(restorer: TinyUNet, space: Subspace, images: torch.Tensor, ctx: AttackContext
             ) -> torch.Tensor:
    """Project-and-refill (``known_model_projection``), then the restorer's correction,
    also kept inside the subspace: an untrained restorer is the projection attack."""
    start = blur_refill(images, space, ctx)
    with autocast(images.device):
        correction = restorer(start).float()
    return start - space.project(correction)


_SIMULATE = {"steps": TRAIN_STEPS, "crop": CROP, "width": WIDTH,
             "psnr": Param(0.0, 0.0, 80.0)}
"""``psnr`` 0 matches the release's strength; another value fixes it (dB)."""


@register_attack("simulate_invert", "reconstruct", "L3", _SIMULATE)
def simulate_invert(images: torch.Tensor, ctx: AttackContext, steps: int, crop: int,
                    width: int, psnr: float) -> torch.Tensor:
    """Identify the authorized model, simulate its NEs on own images, invert them."""
    spec, space = identified_subspace(images, ctx)
    return _simulate_invert(images, ctx, spec, space, steps, crop, width, psnr)


@register_attack("simulate_invert_known", "reconstruct", "L3", _SIMULATE)
def simulate_invert_known(images: torch.Tensor, ctx: AttackContext, steps: int, crop: int,
                          width: int, psnr: float) -> torch.Tensor:
    """``simulate_invert`` for an attacker who knows the authorized model."""
    spec, space = known_subspace(images, ctx, "simulate_invert_known")
    return _simulate_invert(images, ctx, spec, space, steps, crop, width, psnr)


# --- subspace-constrained prior -----------------------------------------------------------

@register_attack("subspace_prior", "reconstruct", "L3",
                 {"iterations": Param(10, 1, 1000), "sigma": Param(0.03, 0.001, 0.5),
                  "tv_weight": Param(0.1, 0.0, 10.0)})
def subspace_prior(images: torch.Tensor, ctx: AttackContext, iterations: int, sigma: float,
                   tv_weight: float) -> torch.Tensor:
    """x̂ = (I − P)·release + P·D(x̂), iterated from the blur refill: P projects onto the
    identified subspace, D is the learned denoiser at noise level ``sigma`` when clean
    reference images exist, else TV denoising with ``tv_weight``."""
    _, space = identified_subspace(images, ctx)
    if ctx.reference is not None:
        prior = denoiser(ctx, sigma)

        def restore(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return prior(x)
    else:
        def restore(x: torch.Tensor) -> torch.Tensor:
            return tv_denoise(x, ctx, weight=tv_weight, steps=20)

    outside = images - space.project(images)
    estimate = blur_refill(images, space, ctx)
    for _ in range(int(iterations)):
        estimate = outside + space.project(restore(estimate.clamp(0, 1)))
    return estimate


# --- diffusion purification ---------------------------------------------------------------

DIFFUSION_TIMESTEPS = 1000


def _linear_schedule() -> torch.Tensor:
    """ᾱ_t of the DDPM linear β schedule (1e-4 … 0.02 over 1000 steps)."""
    betas = torch.linspace(1e-4, 0.02, DIFFUSION_TIMESTEPS, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


class _Diffusion:
    """An ε-predicting model on [−1, 1] images, its ᾱ schedule and its native size."""

    def __init__(self, predict, alphas: torch.Tensor, size: tuple[int, int] | None) -> None:
        self.predict, self.alphas, self.size = predict, alphas, size


def train_ddpm(ctx: AttackContext, like: torch.Tensor, steps: int, crop: int, width: int
               ) -> _Diffusion:
    """A small DDPM trained on the attacker's clean images (cached by content)."""
    clean = _reference(ctx, "diffusion_purify", like) * 2 - 1
    alphas = _linear_schedule().to(like.device)

    def train(model: TinyUNet) -> None:
        draws = generator(ctx.seed, "ddpm-batches")
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for idx in minibatches(len(clean), 16, steps, draws):
            x0, _ = aligned_crop(clean[idx.to(clean.device)], clean[:0], crop, 1, draws)
            t = torch.randint(0, DIFFUSION_TIMESTEPS, (len(x0),), generator=draws)
            noise = torch.randn(x0.shape, generator=draws).to(x0.device)
            a = alphas[t.to(x0.device)].view(-1, 1, 1, 1)
            noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
            with autocast(ctx.device):
                loss = F.mse_loss(model(noisy, t.to(x0.device) / DIFFUSION_TIMESTEPS).float(),
                                  noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    digest = content_digest(clean, steps, crop, width, ctx.seed)
    model = trained(ctx, "ddpm", digest, functools.partial(TinyUNet, width, timed=True), train,
                    ctx.seed)
    return _Diffusion(lambda x, t: model(x, t.float() / DIFFUSION_TIMESTEPS), alphas, None)


DIFFUSERS_CONFIGS = ("unet/config.json", "config.json")
"""What a diffusers checkpoint folder holds: a pipeline's UNet config, or a model's own."""


def load_diffusers(folder: str, device: torch.device) -> _Diffusion:
    """A pretrained ``diffusers`` UNet2DModel and its scheduler's ᾱ from a local folder (a
    pipeline folder with ``unet/`` and ``scheduler/``, or a model folder with a
    ``scheduler_config.json``); safetensors weights only, nothing downloads."""
    try:
        from diffusers import DDPMScheduler, UNet2DModel
    except ImportError as exc:
        raise NeauditError("diffusion_purify with a checkpoint needs diffusers. Fix: pip "
                           "install 'neaudit[diffusion]'.") from exc
    root = Path(folder)
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    scheduler_dir = root / "scheduler" if (root / "scheduler").is_dir() else root
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True,
                                           local_files_only=True).to(device).eval()
        scheduler = DDPMScheduler.from_pretrained(scheduler_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise NeauditError(f"{folder}: not a diffusers UNet2DModel with safetensors weights "
                           f"and a DDPM scheduler config ({exc}). Fix: save the pipeline with "
                           "save_pretrained(..., safe_serialization=True).") from None
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return _Diffusion(lambda x, t: unet(x, t).sample, scheduler.alphas_cumprod.float().to(device),
                      size)


@register_attack("diffusion_purify", "reconstruct", "L2",
                 {"t_star": Param(0.1, 0.001, 1.0), "sampler_steps": Param(10, 1, 1000),
                  "steps": TRAIN_STEPS, "crop": CROP, "width": WIDTH,
                  "checkpoint": Param("", path=True, holds=DIFFUSERS_CONFIGS)})
def diffusion_purify(images: torch.Tensor, ctx: AttackContext, t_star: float,
                     sampler_steps: int, steps: int, crop: int, width: int, checkpoint: str
                     ) -> torch.Tensor:
    """Diffuse to t* (a fraction of the model's timesteps) and run ``sampler_steps``
    deterministic DDIM steps back to t = 0."""
    key = ("diffusion", checkpoint, int(steps), int(crop), int(width))
    if key not in ctx.extras:
        ctx.extras[key] = (load_diffusers(checkpoint, images.device) if checkpoint
                           else train_ddpm(ctx, images, steps, crop, width))
    model: _Diffusion = ctx.extras[key]
    size = images.shape[-2:]
    x = images * 2 - 1
    if model.size is not None and tuple(model.size) != tuple(size):
        x = F.interpolate(x, size=model.size, mode="bilinear", antialias=True)
    alphas = model.alphas.to(x.device)
    last = max(1, min(len(alphas) - 1, round(t_star * len(alphas))))
    times = torch.linspace(last, 0, int(sampler_steps) + 1).round().long().unique_consecutive()
    noise = torch.randn(x.shape, generator=ctx.generator).to(x.device)
    x = alphas[last].sqrt() * x + (1 - alphas[last]).sqrt() * noise
    with torch.no_grad():
        for t, previous in zip(times[:-1].tolist(), times[1:].tolist(), strict=True):
            batch_t = torch.full((len(x),), t, device=x.device, dtype=torch.long)
            with autocast(x.device):
                eps = model.predict(x, batch_t).float()
            x0 = ((x - (1 - alphas[t]).sqrt() * eps) / alphas[t].sqrt()).clamp(-1, 1)
            x = (alphas[previous].sqrt() * x0 + (1 - alphas[previous]).sqrt() * eps
                 if previous > 0 else x0)
    if x.shape[-2:] != size:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True)
    return (x + 1) / 2

