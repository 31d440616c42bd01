from pathlib import Path

import numpy as np
import pytest
import torch

from neaudit.attacks import ATTACKS, BATCH, AttackContext, get_attack, load_suite
from neaudit.attacks.suites import builtin_suites
from neaudit.data import builtin_dataset
from neaudit.errors import NeauditError
from neaudit.imageio import to_float
from neaudit.metrics import psnr
from neaudit.zoo import create_model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return to_float(builtin_dataset("samples").protected[:8])


def _ctx(seed=0, **kwargs) -> AttackContext:
    return AttackContext(generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.fixture(scope="module")
def zoo(vit_spec) -> dict:
    """An L3 attacker's candidate models (the authorized one among them)."""
    return {spec: create_model(spec) for spec in (vit_spec, "timm:resnet18?num_classes=10")}


@pytest.mark.parametrize("name", sorted(n for n, a in ATTACKS.items()
                                        if a.family != "test" and a.kind == BATCH))
def test_every_attack_keeps_shape_range_and_is_seeded(name, images, tmp_path, zoo, vit_spec):
    attack = get_attack(name)
    kwargs = {"reference": images, "cache_dir": tmp_path,
              "extras": {"surrogates": zoo, "authorized": vit_spec}}
    # networks that train, and descents: a few steps (their quality: test_reconstruct and
    # the denoisers' own tests)
    small = {k: v for k, v in {"steps": 10, "width": 8}.items() if k in attack.params}
    out = attack(images, _ctx(1, **kwargs), **small)
    again = attack(images, _ctx(1, **kwargs), **small)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(out, again), "same seed must give the same output"
    assert not torch.equal(out, images), f"{name} left the images unchanged"


def test_strength_orders_damage(images):
    ctx = _ctx()
    mild = psnr(get_attack("jpeg")(images, ctx, quality=90), images).mean()
    harsh = psnr(get_attack("jpeg")(images, ctx, quality=10), images).mean()
    assert mild > harsh + 3
    blur_small = psnr(get_attack("blur")(images, ctx, sigma=0.5), images).mean()
    blur_big = psnr(get_attack("blur")(images, ctx, sigma=3.0), images).mean()
    assert blur_small > blur_big


def test_translate_shifts_by_whole_pixels(images):
    out = get_attack("translate")(images, _ctx(), pixels=3)
    assert torch.equal(out[..., 3:, 3:], images[..., :-3, :-3])


def test_median_in_chunks_is_kornias_median_of_the_batch():
    """20 images of 224 span three of a CPU's chunks; the result is Kornia's on the whole."""
    import kornia

    batch = torch.rand(20, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for k in (3, 5):
        assert torch.equal(get_attack("median")(batch, _ctx(), kernel=k),
                           kornia.filters.median_blur(batch, (k, k)))


def test_tv_denoise_is_adam_on_the_tv_objective_per_image(images):
    """The written-out gradient and update are autograd's and torch.optim.Adam's: the
    results agree but for the rare pixel where a tie between neighbours (TV's kink) broke
    the other way; each image's result is the same in any batch; and it removes noise."""
    import math

    import kornia

    noisy = (images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
             ).clamp(0, 1)
    out = get_attack("tv_denoise")(noisy, _ctx(), weight=0.5, steps=20)
    x = noisy.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=0.01)
    for _ in range(20):
        optimizer.zero_grad()
        loss = 0.5 * (x - noisy).pow(2).sum() + 0.5 * kornia.losses.total_variation(
            x).sum() / math.sqrt(noisy[0].numel())
        loss.backward()
        optimizer.step()
    apart = (out - x.detach().clamp(0, 1)).abs()
    assert float(apart.mean()) < 1e-5 and float((apart > 1e-4).float().mean()) < 1e-2
    alone = get_attack("tv_denoise")(noisy[3:5], _ctx(), weight=0.5, steps=20)
    assert torch.equal(alone, out[3:5])
    assert psnr(out, images).mean() > psnr(noisy, images).mean() + 1


def test_learned_denoiser_removes_gaussian_noise_and_is_cached(images, tmp_path):
    noisy = (images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
             ).clamp(0, 1)
    ctx = _ctx(reference=images, cache_dir=tmp_path)
    out = get_attack("learned_denoiser")(noisy, ctx, sigma=0.05, steps=150)
    assert psnr(out, images).mean() > psnr(noisy, images).mean() + 1
    assert len(list(tmp_path.glob("denoiser-*.safetensors"))) == 1
    with pytest.raises(NeauditError, match="needs clean reference images"):
        get_attack("learned_denoiser")(noisy, _ctx())


def test_builtin_suites_load_and_cover_families():
    assert {"smoke", "standard", "thorough"} <= set(builtin_suites())
    standard = load_suite("standard")
    families = {e.family for e in standard}
    assert families == {"preprocess", "purify"}
    assert len(load_suite("thorough")) > len(standard) > len(load_suite("smoke"))


def test_suite_lists_expand_and_bad_entries_name_the_fix(tmp_path: Path):
    path = tmp_path / "s.toml"
    path.write_text('[[attack]]\nname = "jpeg"\nquality = [90, 50]\n')
    assert [e.label for e in load_suite(path)] == ["jpeg(quality=90)", "jpeg(quality=50)"]
    path.write_text('[[attack]]\nname = "jpg"\n')
    with pytest.raises(NeauditError, match=r"unknown attack 'jpg'. Valid attacks: .*jpeg"):
        load_suite(path)
    path.write_text('[[attack]]\nname = "jpeg"\nqual = 5\n')
    with pytest.raises(NeauditError, match=r"no parameter 'qual'. Valid parameters: quality"):
        load_suite(path)
    with pytest.raises(NeauditError, match=r"unknown suite 'nope'.*smoke"):
        load_suite("nope")


def test_learned_denoiser_follows_the_audit_seed(images):
    """The denoiser's initialization and batches derive from the audit's seed: the same seed
    gives the same output, another seed another one."""
    attack = get_attack("learned_denoiser")

    def run(seed: int) -> torch.Tensor:
        ctx = AttackContext(generator=torch.Generator().manual_seed(0), seed=seed,
                            reference=images)
        return attack(images, ctx, steps=5)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


@pytest.mark.parametrize("quality", [95, 75, 30, 5])
def test_jpeg_attack_writes_what_pillow_writes(images, quality):
    """The attack's pixels equal an independent Pillow save-and-load of the same uint8
    image (channel order, rounding and chroma subsampling all as a Pillow pipeline has
    them)."""
    import io

    from PIL import Image

    out = get_attack("jpeg")(images, _ctx(), quality=quality)
    for image, attacked in zip(images, out, strict=True):
        pixels = torch.round(image * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        expected = torch.from_numpy(np.array(Image.open(buffer).convert("RGB")))
        assert torch.equal(torch.round(attacked * 255).to(torch.uint8).permute(1, 2, 0),
                           expected)
