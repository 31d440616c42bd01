"""L0: transformations ordinary pipelines apply. Also used on the authorized model, whose
retention under them is part of utility."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import imagecodecs
import kornia
import numpy as np
import torch
import torch.nn.functional as F

from neaudit.attacks.registry import AttackContext, Param, register_attack
from neaudit.errors import NeauditError
from neaudit.imageio import to_uint8
from neaudit.pipeline import on_device

BLUR_SIGMA = Param(1.0, 0.1, 10.0)


@register_attack("resize", "preprocess", "L0", {"scale": Param(0.5, 0.05, 8.0)})
def resize_round_trip(images: torch.Tensor, ctx: AttackContext, scale: float) -> torch.Tensor:
    """Resize by ``scale`` (bilinear, antialiased) and back to the original size."""
    h, w = images.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bilinear", antialias=True, align_corners=False)



@register_attack("center_crop", "preprocess", "L0", {"fraction": Param(0.875, 0.05, 1.0)})
def center_crop(images: torch.Tensor, ctx: AttackContext, fraction: float) -> torch.Tensor:
    """Crop the central ``fraction`` of each side and resize back."""
    h, w = images.shape[-2:]
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = images[..., top:top + ch, left:left + cw]
    return F.interpolate(crop, size=(h, w), mode="bilinear", antialias=True, align_corners=False)


@register_attack("hflip", "preprocess", "L0", {})
def hflip(images: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
    """Horizontal flip."""
    return images.flip(-1)


@register_attack("rotate", "preprocess", "L0", {"degrees": Param(5.0, -360.0, 360.0)})
def rotate(images: torch.Tensor, ctx: AttackContext, degrees: float) -> torch.Tensor:
    """Rotate about the centre (bilinear, reflected borders)."""
    angle = torch.full((images.shape[0],), float(degrees), device=images.device)
    return kornia.geometry.transform.rotate(images, angle, padding_mode="reflection")


@register_attack("translate", "preprocess", "L0", {"pixels": Param(2, 0, 64)})
def translate(images: torch.Tensor, ctx: AttackContext, pixels: int) -> torch.Tensor:
    """Shift right and down by ``pixels`` (reflected borders): misaligns a patch grid."""
    p = int(pixels)
    if p >= min(images.shape[-2:]):
        raise NeauditError(f"translate(pixels={p}) on {tuple(images.shape[-2:])} images shifts "
                           "the whole image out. Fix: a shift smaller than the images.")
    padded = F.pad(images, (p, 0, p, 0), mode="reflect")
    return padded[..., : images.shape[-2], : images.shape[-1]]


@register_attack("color_jitter", "preprocess", "L0", {"strength": Param(0.1, 0.0, 1.0)})
def color_jitter(images: torch.Tensor, ctx: AttackContext, strength: float) -> torch.Tensor:
    """Brightness, contrast and saturation each scaled by a random factor in 1 ± strength."""
    factors = 1 + (torch.rand(3, images.shape[0], generator=ctx.generator) * 2 - 1) * strength
    factors = factors.to(images.device)
    out = kornia.enhance.adjust_brightness(images, factors[0] - 1)
    out = kornia.enhance.adjust_contrast(out.clamp(0, 1), factors[1])
    return kornia.enhance.adjust_saturation(out.clamp(0, 1), factors[2])


@register_attack("grayscale", "preprocess", "L0", {})
def grayscale(images: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
    """Luma, repeated over three channels."""
    return kornia.color.rgb_to_grayscale(images).expand_as(images).contiguous()


@register_attack("gaussian_noise", "preprocess", "L0", {"sigma": Param(0.02, 0.0, 1.0)})
def gaussian_noise(images: torch.Tensor, ctx: AttackContext, sigma: float) -> torch.Tensor:
    """Add N(0, sigma²) noise."""
    noise = torch.randn(images.shape, generator=ctx.generator).to(images.device)
    return images + sigma * noise


@register_attack("gaussian_blur", "preprocess", "L0", {"sigma": BLUR_SIGMA})
def gaussian_blur(images: torch.Tensor, ctx: AttackContext, sigma: float) -> torch.Tensor:
    """Gaussian blur, kernel 2·ceil(3σ)+1, reflected borders."""
    k = 2 * int(torch.ceil(torch.tensor(3 * sigma))) + 1
    return kornia.filters.gaussian_blur2d(images, (k, k), (sigma, sigma), border_type="reflect")



@register_attack("jpeg", "preprocess", "L0", {"quality": Param(75, 1, 100)})
def jpeg(images: torch.Tensor, ctx: AttackContext, quality: int) -> torch.Tensor:
    """JPEG round trip at ``quality`` through libjpeg-turbo with Pillow's defaults (4:2:0
    chroma subsampling, accurate DCT): the pixels a pipeline that saves and loads with Pillow
    gets (a test compares them), on every device.

    nvJPEG's encoder quantizes differently: on the demo it moved one model's accuracy under
    JPEG q75 from 0.78 to 0.29, so the codec stays on the CPU, in a thread per core.
    """
    pixels = to_uint8(images)  # rounded where the images are; uint8 crosses to the CPU
    with ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, len(pixels)) or 1) as pool:
        decoded = list(pool.map(lambda image: _jpeg_round_trip(image, int(quality)), pixels))
    return on_device(torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2), images.device)


def _jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """One HWC uint8 image through a JPEG file in memory, by imagecodecs' libjpeg-turbo:
    Pillow's pixels at 0.34 instead of 0.59 ms a 224×224 image, and without Pillow's Python
    marker parsing, which held the GIL: on an H200 host's 16 cores, eight Pillow threads took
    3.1 s for the 2,048 round trips of a 512-image standard audit."""
    encoded = imagecodecs.jpeg8_encode(np.ascontiguousarray(image), level=quality,
                                       subsampling=(2, 2))
    return imagecodecs.jpeg8_decode(encoded)


@register_attack("bit_depth", "preprocess", "L0", {"bits": Param(5, 1, 8)})
def bit_depth(images: torch.Tensor, ctx: AttackContext, bits: int) -> torch.Tensor:
    """Keep ``bits`` bits per channel (posterize), values at bin centres."""
    levels = 2 ** int(bits)
    return (torch.floor(images.clamp(0, 1) * (levels - 1e-6)) + 0.5) / levels



@register_attack("gamma", "preprocess", "L0", {"gamma": Param(1.2, 0.05, 20.0)})
def gamma(images: torch.Tensor, ctx: AttackContext, gamma: float) -> torch.Tensor:
    """Gamma curve x^gamma."""
    return images.clamp(0, 1) ** gamma
