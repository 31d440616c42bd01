"""Reconstruction attacks: planted structure each can fail on, seeds, caching, checkpoints."""

from pathlib import Path

import pytest
import torch

from neaudit import demo_zoo
from neaudit.attacks import AttackContext, get_attack, load_suite
from neaudit.attacks.adaptive import known_subspace
from neaudit.attacks.reconstruct import Simulation
from neaudit.errors import NeauditError
from neaudit.imageio import quantize, to_float
from neaudit.metrics import psnr
from neaudit.ne import subspace_recode
from neaudit.zoo import create_model

SMALL = {"steps": 200, "width": 16, "crop": 16}
"""Networks small enough to train in seconds on two cores."""


@pytest.fixture(scope="module")
def authorized():
    return create_model(demo_zoo.AUTHORIZED, [str(d) for d in range(10)])


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Clean demo digits: 256 the attacker owns, 48 others released."""
    train, _ = demo_zoo.digits("train")
    test, _ = demo_zoo.digits("test")
    return to_float(train[:256]), to_float(test[:48])


def _ctx(authorized, tmp_path: Path | None = None, reference=None, seed: int = 0
         ) -> AttackContext:
    return AttackContext(generator=torch.Generator().manual_seed(seed), seed=seed,
                         reference=reference, cache_dir=tmp_path,
                         extras={"surrogates": {demo_zoo.AUTHORIZED: authorized},
                                 "authorized": demo_zoo.AUTHORIZED})


def _release(authorized, clean: torch.Tensor, psnr_db: float, key: int) -> torch.Tensor:
    _, space = known_subspace(clean, _ctx(authorized), "test")
    return subspace_recode(clean, space, psnr_db, key, torch.arange(len(clean)))


def test_subspace_prior_recovers_an_image_whose_noise_lies_exactly_in_the_subspace(
        authorized, digits):
    """δ exactly in the authorized model's S, no clipping or rounding: the TV prior (no
    clean data) must take the 20 dB input to within 30 dB of the clean image, and do better
    than the blur refill it starts from."""
    clean = 0.2 + 0.6 * digits[1][:16]  # away from the box's edges: nothing clips
    _, space = known_subspace(clean, _ctx(authorized), "test")
    noise = space.project(torch.randn(clean.shape, generator=torch.Generator().manual_seed(1)))
    noise = noise * 0.1 / noise.pow(2).mean().sqrt()  # 20 dB
    release = clean + noise
    restored = get_attack("subspace_prior")(release, _ctx(authorized))
    refill = get_attack("known_model_projection")(release, _ctx(authorized))
    assert psnr(release, clean).mean() == pytest.approx(20.0, abs=0.1)
    assert psnr(restored, clean).mean() > 30.0
    assert psnr(restored, clean).mean() > psnr(refill, clean).mean() + 3.0


def test_subspace_prior_leaves_the_component_outside_the_subspace_alone(authorized, digits):
    """The data term is hard: whatever the prior does, the output differs from the release
    only inside S (up to clipping to [0, 1])."""
    release = 0.2 + 0.6 * digits[1][:8]
    restored = get_attack("subspace_prior")(release, _ctx(authorized), iterations=3)
    _, space = known_subspace(release, _ctx(authorized), "test")
    change = restored - release
    outside = change - space.project(change)
    assert outside.pow(2).mean() < 1e-3 * change.pow(2).mean()


def test_matched_strength_reads_the_release_psnr(authorized, digits):
    reference, clean = digits
    for target in (20.0, 30.0):
        release = _release(authorized, quantize(clean), target, key=99)
        _, space = known_subspace(release, _ctx(authorized), "test")
        matched = Simulation(space, "subspace").match(release, quantize(reference),
                                                      _ctx(authorized))
        assert matched == pytest.approx(target, abs=2.0)


@pytest.mark.slow  # 14 s of training; the default run keeps its seeding and cache
def test_simulate_invert_trained_on_fresh_keys_restores_another_key(authorized, digits,
                                                                     tmp_path):
    """The restorer never sees the release's key (it trains on its own random keys), yet it
    must lift the release's PSNR by 5 dB: it learned the construction, not a key."""
    reference, clean = digits
    release = _release(authorized, quantize(clean), 20.0, key=123456789)
    ctx = _ctx(authorized, tmp_path, reference)
    restored = get_attack("simulate_invert_known")(release, ctx, **SMALL)
    projected = get_attack("known_model_projection")(release, _ctx(authorized))
    assert psnr(restored, clean).mean() > psnr(release, clean).mean() + 5.0
    # it starts from project-and-refill and must have learned something beyond it
    assert psnr(restored, clean).mean() > psnr(projected, clean).mean() + 0.3
    # identified rather than given: the same model, so the same restorer and output
    identified = get_attack("simulate_invert")(release, _ctx(authorized, tmp_path, reference),
                                               **SMALL)
    assert torch.equal(identified, restored)


def test_simulate_invert_is_seeded_and_cached(authorized, digits, tmp_path):
    reference, clean = digits
    release = _release(authorized, quantize(clean[:8]), 25.0, key=5)
    attack = get_attack("simulate_invert_known")
    first = attack(release, _ctx(authorized, tmp_path / "a", reference), steps=20, width=8)
    cached = list((tmp_path / "a").glob("restorer-*.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = attack(release, _ctx(authorized, tmp_path / "a", reference), steps=20, width=8)
    assert cached[0].stat().st_mtime_ns == stamp  # reused, not retrained
    retrained = attack(release, _ctx(authorized, tmp_path / "b", reference), steps=20, width=8)
    other_seed = attack(release, _ctx(authorized, tmp_path / "c", reference, seed=1),
                        steps=20, width=8)
    assert torch.equal(first, again) and torch.equal(first, retrained)
    assert not torch.equal(first, other_seed)


def test_reconstruction_attacks_need_clean_images(authorized, digits):
    for name in ("simulate_invert", "diffusion_purify"):
        with pytest.raises(NeauditError, match="reference images"):
            get_attack(name)(digits[1][:4], _ctx(authorized), steps=1)


@pytest.mark.slow
def test_diffusion_purify_removes_gaussian_noise(authorized, digits, tmp_path):
    """A DDPM trained on clean digits, started from the noisy image at t*, lands closer to
    the clean image than the noisy input (about +1.9 dB after 400 steps)."""
    reference, clean = digits
    noisy = (clean[:16] + 0.15 * torch.randn(clean[:16].shape,
                                             generator=torch.Generator().manual_seed(2)))
    noisy = noisy.clamp(0, 1)
    ctx = _ctx(authorized, tmp_path, reference)
    purified = get_attack("diffusion_purify")(noisy, ctx, t_star=0.1, steps=400, width=16,
                                              crop=32)
    assert psnr(purified, clean[:16]).mean() > psnr(noisy, clean[:16]).mean() + 1.0


def test_diffusion_purify_trains_once_and_follows_the_seed(authorized, digits, tmp_path):
    reference, clean = digits
    attack = get_attack("diffusion_purify")
    first = attack(clean[:4], _ctx(authorized, tmp_path, reference), steps=5, width=8)
    (cached,) = tmp_path.glob("ddpm-*.safetensors")
    stamp = cached.stat().st_mtime_ns
    again = attack(clean[:4], _ctx(authorized, tmp_path, reference), steps=5, width=8)
    other = attack(clean[:4], _ctx(authorized, tmp_path, reference, seed=1), steps=5, width=8)
    assert cached.stat().st_mtime_ns == stamp and torch.equal(first, again)
    assert not torch.equal(first, other)


def _tiny_diffusers(folder: Path, size: int = 32) -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=size, in_channels=3, out_channels=3,
                                 block_out_channels=(8, 16), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")


def test_diffusion_purify_runs_a_local_diffusers_checkpoint(authorized, digits, tmp_path,
                                                            snapshot):
    """A diffusers pipeline folder (unet/ + scheduler/) at another resolution: the images
    are resized to the model's size and back; the same generator gives the same output; the
    checkpoint folder is only read."""
    _tiny_diffusers(tmp_path / "ddpm", size=16)
    before = snapshot(tmp_path / "ddpm")
    images = digits[1][:4]
    attack = get_attack("diffusion_purify")
    first = attack(images, _ctx(authorized), checkpoint=str(tmp_path / "ddpm"))
    second = attack(images, _ctx(authorized), checkpoint=str(tmp_path / "ddpm"))
    assert first.shape == images.shape and torch.equal(first, second)
    assert 0 <= float(first.min()) and float(first.max()) <= 1
    assert not torch.equal(first, images)
    assert snapshot(tmp_path / "ddpm") == before


def test_diffusion_checkpoint_must_be_a_diffusers_folder(authorized, digits, tmp_path):
    attack = get_attack("diffusion_purify")
    with pytest.raises(NeauditError, match="names no folder"):
        attack(digits[1][:2], _ctx(authorized), checkpoint=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NeauditError, match="holds none of unet/config.json, config.json"):
        attack(digits[1][:2], _ctx(authorized), checkpoint=str(tmp_path / "empty"))
    (tmp_path / "broken" / "unet").mkdir(parents=True)  # a config but no usable weights
    (tmp_path / "broken" / "unet" / "config.json").write_text("{}")
    with pytest.raises(NeauditError, match="not a diffusers UNet2DModel"):
        attack(digits[1][:2], _ctx(authorized), checkpoint=str(tmp_path / "broken"))


def test_suite_checkpoint_paths_resolve_beside_the_suite_and_label_by_name(tmp_path):
    _tiny_diffusers(tmp_path / "ddpm")
    suite = tmp_path / "mine.toml"
    suite.write_text('[[attack]]\nname = "diffusion_purify"\ncheckpoint = "ddpm"\n')
    (entry,) = load_suite(suite)
    assert dict(entry.params)["checkpoint"] == str(tmp_path / "ddpm")
    assert "checkpoint=ddpm@" in entry.label and "/" not in entry.key
    suite.write_text('[[attack]]\nname = "diffusion_purify"\ncheckpoint = "nowhere"\n')
    with pytest.raises(NeauditError, match="checkpoint"):
        load_suite(suite)


def test_reconstruction_suite_lists_old_and_new_attacks():
    names = {e.attack for e in load_suite("reconstruction")}
    assert {"simulate_invert", "simulate_invert_known", "subspace_prior",
            "diffusion_purify", "learned_denoiser", "known_model_projection"} <= names
    assert {"simulate_invert", "subspace_prior", "diffusion_purify"} <= {
        e.attack for e in load_suite("thorough")}


def test_tiny_unet_handles_odd_sizes():
    from neaudit.attacks.training import TinyUNet

    net = TinyUNet(8, timed=True)
    out = net(torch.rand(2, 3, 17, 23), torch.tensor([0.1, 0.9]))
    assert out.shape == (2, 3, 17, 23)
    assert not out.any()  # the output layer starts at zero: "change nothing"
    out.pow(2).add(out).sum().backward()
    assert net.head.weight.grad.abs().sum() > 0


def test_a_suite_naming_a_folder_that_is_no_checkpoint_exits_2_before_work(tmp_path, capsys):
    from neaudit.cli import main

    (tmp_path / "weights").mkdir()
    suite = tmp_path / "mine.toml"
    suite.write_text('[[attack]]\nname = "diffusion_purify"\ncheckpoint = "weights"\n')
    out = tmp_path / "run"
    code = main(["audit", "builtin:samples", "--authorized", "demo:patch_cnn",
                 "--model", "demo:vit", "--suite", str(suite), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "checkpoint" in err[0] and "config.json" in err[0]
    assert not out.exists()  # refused before any work
