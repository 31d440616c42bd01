import math

import pytest
import torch

from neaudit.metrics import (
    SsimReference,
    above_chance,
    first_layer_gain,
    isotropic_gain,
    psnr,
    score_ratio,
    ssim,
    suppression_ratio,
    wilson_interval,
)
from neaudit.spectral import PatchSubspace
from neaudit.stem import FirstLayer


def test_wilson_interval_matches_published_values():
    # Reference values: Newcombe (1998), Table I, e.g. 0/10 → [0, 0.2775], 5/10 → [0.2366, 0.7634]
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(29, 30)
    assert low < 29 / 30 < high <= 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_ratios():
    assert score_ratio(0.45, 0.9) == pytest.approx(0.5)
    assert above_chance(0.1, 0.9, 0.1) == pytest.approx(0.0)
    assert above_chance(0.9, 0.9, 0.1) == pytest.approx(1.0)
    # a clean score at or below chance leaves nothing to recover a share of
    assert math.isnan(above_chance(0.0, 0.0, 0.5)) and math.isnan(above_chance(0.5, 0.5, 0.5))
    assert math.isnan(score_ratio(0.3, 0.0))
    assert suppression_ratio(0.72, [0.016, 0.01]) == pytest.approx(45.0)


def test_psnr_on_known_error():
    clean = torch.zeros(2, 3, 8, 8)
    assert psnr(clean + 0.1, clean) == pytest.approx(torch.tensor([20.0, 20.0]), abs=1e-4)


def test_image_metrics_in_chunks_are_per_image(monkeypatch):
    """The CPU computes SSIM and PSNR a few images at a time; each image's SSIM is Kornia's
    and its PSNR the one computed alone."""
    import kornia

    from neaudit import device

    monkeypatch.setattr(device, "CPU_CHUNK_VALUES", 4 * 3 * 32 * 32)
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(19, 3, 32, 32, generator=generator)  # not a multiple of the chunk
    noisy = (clean + 0.05 * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    expected = torch.stack([kornia.metrics.ssim(noisy[i:i + 1], clean[i:i + 1], 11).mean()
                            for i in range(len(clean))])
    assert torch.allclose(ssim(noisy, clean), expected, atol=1e-6)
    # the originals blurred once and shared by several comparisons: the same figures
    reference = SsimReference(clean)
    for images in (noisy, noisy.flip(-1), clean):
        assert torch.equal(ssim(images, reference), ssim(images, clean))
    assert torch.allclose(ssim(clean, reference), torch.ones(len(clean)))
    alone = torch.cat([psnr(noisy[i:i + 1], clean[i:i + 1]) for i in range(len(clean))])
    assert torch.allclose(psnr(noisy, clean), alone)


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(8, 8, 0), (7, 2, 3)])
def test_isotropic_gain_is_the_root_mean_square_gain_of_noise(kernel, stride, padding):
    """The exact control figure agrees with noise drawn and measured, for a patch stem and
    for an overlapping stem whose padding taps see no pixels."""
    generator = torch.Generator().manual_seed(0)
    layer = FirstLayer(weight=torch.randn(16, 3, kernel, kernel, generator=generator),
                       stride=(stride, stride), padding=(padding, padding),
                       mean=torch.tensor([0.5, 0.4, 0.3]), std=torch.tensor([0.2, 0.25, 0.3]),
                       module_name="stem")
    noise = torch.randn(256, 3, 32, 32, generator=generator)
    drawn = first_layer_gain(layer, noise).pow(2).mean().sqrt()
    assert isotropic_gain(layer, (3, 32, 32)) == pytest.approx(float(drawn), rel=0.01)
    if stride == kernel:  # a patch stem tiling the image: the subspace's own figure
        space = PatchSubspace(layer)
        assert isotropic_gain(layer, (3, 32, 32)) == pytest.approx(space.isotropic_gain,
                                                                   rel=1e-5)
