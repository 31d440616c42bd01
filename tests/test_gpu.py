"""CUDA path checks (run by bench/gpu.sh on a GPU machine; skipped without CUDA)."""

import pandas as pd
import pytest
import torch

from neaudit import demo_zoo
from neaudit.auditing import audit
from neaudit.demo import digits_test_set
from neaudit.imageio import read_image
from neaudit.protection import protect
from neaudit.reporting import render_report
from neaudit.seeding import counter_normal, counter_uniform
from neaudit.zoo import create_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("name", list(demo_zoo.ARCHITECTURES))
def test_cpu_and_cuda_predictions_agree(name):
    dataset = digits_test_set(256)
    images = next(dataset.batches(256)).protected
    model = create_model(f"demo:{name}")
    with torch.inference_mode():
        cpu = model(images)
        model.cuda()
        with torch.autocast("cuda"):
            gpu = model(images.cuda()).float().cpu()
    assert (cpu.argmax(1) == gpu.argmax(1)).float().mean() >= 0.99
    assert torch.allclose(cpu.softmax(1), gpu.softmax(1), atol=0.05)


def test_audit_on_cuda_matches_cpu(tmp_path):
    dataset = digits_test_set(120)
    protect(dataset, demo_zoo.AUTHORIZED, tmp_path / "data", psnr=20,
            save_originals=True)
    others = ["demo:resnet", "demo:convmixer", "demo:vit"]
    common = dict(suite="smoke", score="accuracy", quiet=True, batch_size=64)
    cpu = audit(tmp_path / "data", others, out=tmp_path / "cpu", device="cpu", **common)
    gpu = audit(tmp_path / "data", others, out=tmp_path / "gpu", device="cuda", **common)
    keys = ["model", "attack", "metric"]
    merged = pd.merge(cpu.table, gpu.table, on=keys, suffixes=("_cpu", "_gpu"))
    accuracy = merged[merged.metric == "accuracy"]
    # mixed precision and nvJPEG may flip a prediction or two out of 120
    assert (accuracy.value_cpu - accuracy.value_gpu).abs().max() <= 3 / 120
    images = merged[merged.metric == "psnr"]
    assert (images.value_cpu - images.value_gpu).abs().max() < 0.5


@pytest.mark.parametrize("spec", ["timm:vit_small_patch16_224?img_size=64&num_classes=10",
                                  "timm:resnet50?num_classes=10&input_size=64"])
def test_ne_recoding_on_cuda_matches_cpu(spec, tmp_path):
    cpu = protect("builtin:samples", spec, tmp_path / "cpu", device="cpu", key=0).summary
    gpu = protect("builtin:samples", spec, tmp_path / "gpu", device="cuda", key=0).summary
    assert abs(cpu["psnr"] - gpu["psnr"]) < 0.05
    assert abs(cpu["gain"] / cpu["isotropic_gain"] - gpu["gain"] / gpu["isotropic_gain"]) < 0.005
    assert abs(cpu["agreement"] - gpu["agreement"]) <= 1 / 32


def test_models_take_turns_on_the_gpu_when_they_do_not_fit(tmp_path, monkeypatch):
    import neaudit.worker as worker

    dataset = digits_test_set(64)
    protect(dataset, demo_zoo.AUTHORIZED, tmp_path / "data", psnr=20, save_originals=True)
    common = dict(suite="smoke", score="accuracy", quiet=True, loader_workers=2)
    resident = audit(tmp_path / "data", ["demo:resnet"], out=tmp_path / "a", device="cuda",
                     **common).table
    monkeypatch.setattr(worker, "fits_on_device", lambda models, device: False)
    turns = audit(tmp_path / "data", ["demo:resnet"], out=tmp_path / "b", device="cuda",
                  **common).table
    pd.testing.assert_frame_equal(resident, turns)


def test_jpeg_inputs_decode_on_the_gpu_when_asked(tmp_path):
    from PIL import Image

    from neaudit.data import load_dataset

    protect(digits_test_set(64), demo_zoo.AUTHORIZED, tmp_path / "png", psnr=20,
            save_originals=True)
    jpeg = tmp_path / "jpeg"
    for png in sorted((tmp_path / "png").rglob("*.png")):
        target = jpeg / png.relative_to(tmp_path / "png").with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(png).save(target, quality=95)
    on_device = load_dataset(jpeg)
    on_device.decode_device = torch.device("cuda")
    gpu_pixels = next(on_device.batches(64)).protected
    cpu_pixels = next(load_dataset(jpeg).batches(64)).protected
    difference = (gpu_pixels - cpu_pixels).abs()
    assert difference.max() > 0, "the batch must come from nvJPEG, not from PIL"
    assert difference.mean() < 8 / 255, "the same images (about 4 levels apart on digits)"

    common = dict(suite="smoke", score="accuracy", quiet=True, device="cuda",
                  authorized=demo_zoo.AUTHORIZED)
    device = audit(jpeg, ["demo:resnet"], out=tmp_path / "a", decode="device", **common)
    host = audit(jpeg, ["demo:resnet"], out=tmp_path / "b", **common)
    flags = {f.name: f for f in render_report(device.out).flags}
    assert flags["device_decoding"].message.startswith("128 JPEG input file(s)")
    assert "device_decoding" not in {f.name for f in render_report(host.out).flags}
    merged = pd.merge(host.table, device.table, on=["model", "attack", "metric"])
    accuracy = merged[merged.metric == "accuracy"]
    assert (accuracy.value_x - accuracy.value_y).abs().max() <= 4 / 64


def test_counter_noise_and_written_nes_are_the_same_on_cpu_and_cuda(tmp_path):
    """The NE noise is a pure function of (key, image index): the integer hash is identical
    on both devices, the floats within a few ulps, and the written uint8 NEs identical but
    for rare rounding ties."""
    rows = torch.arange(1000, 1064)
    cpu = counter_normal(12345, rows, 50_000)
    gpu = counter_normal(12345, rows.cuda(), 50_000).cpu()
    assert torch.equal(counter_uniform(7, rows, 999), counter_uniform(7, rows.cuda(), 999).cpu())
    assert (cpu - gpu).abs().max() < 1e-5
    spec = "timm:vit_small_patch16_224?img_size=64&num_classes=10"
    protect("builtin:samples", spec, tmp_path / "cpu", device="cpu", key=0)
    protect("builtin:samples", spec, tmp_path / "gpu", device="cuda", key=0)
    a = torch.stack([read_image(p) for p in sorted((tmp_path / "cpu").rglob("*.png"))])
    b = torch.stack([read_image(p) for p in sorted((tmp_path / "gpu").rglob("*.png"))])
    differ = (a != b).float().mean().item()
    print(f"written NEs: {differ:.2e} of uint8 values differ between CPU and CUDA, "
          f"max {(a - b).abs().max().item() * 255:.0f} level(s)")
    assert differ <= 1e-3 and (a - b).abs().max() * 255 <= 2


@pytest.mark.parametrize("name", ["subspace_prior", "simulate_invert_known", "diffusion_purify"])
def test_reconstruction_attacks_on_cuda_match_cpu(name, tmp_path):
    """The same attack on CPU and CUDA (networks trained on each device, bf16 on CUDA): the
    reconstructions agree to within 1.5 dB of PSNR to the clean images, and both improve on
    the release where the CPU one does."""
    from neaudit.attacks import AttackContext, get_attack
    from neaudit.imageio import to_float
    from neaudit.metrics import psnr

    train, _ = demo_zoo.digits("train")
    reference = to_float(train[:256])
    dataset = digits_test_set(64)
    clean = next(dataset.batches(64)).protected
    protect(dataset, demo_zoo.AUTHORIZED, tmp_path / "data", psnr=20)
    release = torch.stack([read_image(p) for p in sorted(
        (tmp_path / "data" / "protected").rglob("*.png"))])
    scores = {}
    for device in ("cpu", "cuda"):
        model = create_model(demo_zoo.AUTHORIZED).to(device)
        ctx = AttackContext(generator=torch.Generator().manual_seed(0), device=torch.device(device),
                            reference=reference, cache_dir=tmp_path / device,
                            extras={"surrogates": {demo_zoo.AUTHORIZED: model},
                                    "authorized": demo_zoo.AUTHORIZED})
        out = get_attack(name)(release.to(device), ctx, steps=200, width=16) if name != (
            "subspace_prior") else get_attack(name)(release.to(device), ctx)
        assert out.device.type == device
        scores[device] = float(psnr(out.cpu(), clean).mean())
    assert abs(scores["cpu"] - scores["cuda"]) < 1.5, scores


@pytest.mark.parametrize("name", ["tile_estimation", "blind_subspace", "clean_patch_prior"])
def test_adaptive_attacks_on_cuda_match_cpu(name):
    """The grid's detection and the principal directions (double GEMMs and an eigh on CUDA)
    find what the CPU finds: the same period, and outputs within float rounding."""
    from neaudit.attacks import AttackContext, get_attack
    from neaudit.attacks.adaptive import detect_period
    from neaudit.data import builtin_dataset
    from neaudit.imageio import to_float

    photos = to_float(builtin_dataset("samples").protected)
    tile = 0.05 * torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))
    release = (photos + tile.repeat(1, 4, 4)).clamp(0, 1)
    outputs, periods = {}, {}
    for device in ("cpu", "cuda"):
        images = release.to(device)
        ctx = AttackContext(generator=torch.Generator().manual_seed(0), device=torch.device(device),
                            reference=photos.to(device))
        periods[device] = detect_period(images - get_attack("gaussian_blur")(images, ctx,
                                                                             sigma=1.0))
        outputs[device] = get_attack(name)(images, ctx).cpu()
    assert periods["cpu"] == periods["cuda"] == 16
    assert torch.allclose(outputs["cpu"], outputs["cuda"], atol=1e-4), name


def test_uint8_hand_over_gives_the_same_floats_on_cpu_and_cuda():
    from neaudit.pipeline import on_device

    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(2, 3, 1, 1)
    assert torch.equal(on_device(levels, torch.device("cpu")),
                       on_device(levels, torch.device("cuda")).cpu())


def test_uint8_copy_back_through_pinned_memory_matches_cpu_and_is_not_reused_while_held():
    from neaudit.imageio import to_uint8

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 32, 48, generator=generator) * 1.2 - 0.1  # some values clipped
    first = to_uint8(images.cuda())
    assert first.flags.c_contiguous and first.shape == (8, 32, 48, 3)
    assert (first == to_uint8(images)).all()
    kept = first.copy()
    second = to_uint8(torch.zeros_like(images).cuda())  # a block freed now could be reused
    assert not second.any() and (first == kept).all()


def test_read_ahead_batches_arrive_in_pinned_memory(tmp_path):
    """The readers' batches reach the device thread pinned, so their copies to the GPU do not
    block it (a DataLoader hands an unknown type back unpinned)."""
    from neaudit.data import builtin_dataset, load_dataset
    from neaudit.imageio import write_png
    from neaudit.pipeline import read_ahead

    for i, image in enumerate(builtin_dataset("samples", count=6, size=32).protected):
        write_png(tmp_path / "clean" / f"{i}.png", image)
    dataset = load_dataset(tmp_path / "clean")
    for on_grid in (True, False):
        batches = list(read_ahead(dataset, 4, workers=1, pin_memory=True, on_grid=on_grid))
        assert [len(b.index) for b in batches] == [4, 2]
        assert all(b.protected.is_pinned() and b.index.is_pinned() for b in batches)


def test_a_stopped_run_on_cuda_resumes_to_the_uninterrupted_release(tmp_path, monkeypatch):
    """The checkpoint's preview items come back as the device computed them: a run stopped
    and resumed on CUDA writes the bytes and figures of one never stopped, there too."""
    from neaudit import fidelity, protection
    from neaudit.data import builtin_dataset

    dataset = builtin_dataset("samples", count=24, size=64)
    monkeypatch.setattr(fidelity, "PREVIEW_BATCH", 3)
    settings = dict(key=9, batch_size=4, fidelity_images=10, device="cuda",
                    save_originals=True)
    spec = "timm:vit_small_patch16_224?img_size=64&num_classes=10"
    whole = protect(dataset, spec, tmp_path / "whole", **settings)
    calls, measure = [], fidelity.measure

    def stop_at_third(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return measure(*args)

    monkeypatch.setattr(protection, "measure", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        protect(dataset, spec, tmp_path / "stopped", **settings)
    monkeypatch.setattr(protection, "measure", measure)
    resumed = protect(dataset, spec, tmp_path / "stopped", **settings)
    assert resumed.resumed == 12
    pd.testing.assert_frame_equal(resumed.per_image, whole.per_image)
    for name in ("hashes.sha256", "neaudit.json"):
        assert (whole.out / name).read_bytes() == (resumed.out / name).read_bytes()
