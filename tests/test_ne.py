"""NE recoding: fidelity is measured on the written uint8 images."""

import pytest
import torch
import torch.nn.functional as F

from neaudit.data import builtin_dataset
from neaudit.imageio import quantize, to_float
from neaudit.metrics import first_layer_gain, isotropic_like, logit_cosine, psnr
from neaudit.ne import (
    HALF_STEP,
    box_repair,
    compensation_pays,
    noise_key,
    reference_recode,
    round_to_grid,
    subspace_recode,
)
from neaudit.seeding import chacha_blocks, counter_uniform
from neaudit.spectral import FourierSubspace, PatchSubspace, low_sensitivity_subspace
from neaudit.stem import first_layer
from neaudit.zoo import create_model


@pytest.fixture(scope="module")
def clean() -> torch.Tensor:
    return to_float(builtin_dataset("samples").protected)


def _gaussian(like: torch.Tensor) -> torch.Tensor:
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(1))


def _predictions(model, images):
    with torch.inference_mode():
        return model(images)


def test_noise_generator_is_chacha_as_rfc_8439_specifies():
    """The block function under the NE noise, held to RFC 8439 §2.3.2's test vector (at the
    RFC's 20 rounds: the noise uses 12 of the same rounds)."""
    nonce = bytes.fromhex("000000090000004a00000000")
    counters = [torch.tensor(1)] + [torch.tensor(int.from_bytes(nonce[i:i + 4], "little"))
                                    for i in (0, 4, 8)]
    block = chacha_blocks(int.from_bytes(bytes(range(32)), "little"), counters, rounds=20)
    assert [f"{word & 0xFFFFFFFF:08x}" for word in block.tolist()] == (
        "e4e7f110 15593bd1 1fdd0f50 c47120a3 c7f4d1c7 0368c033 9aaa2204 4e6cd4c3 "
        "466482d2 09aa9f07 05d7c214 a2028bd9 d19c12b5 b94e16de e883d0cb 4e3c50a2").split()


def test_every_bit_of_the_key_reaches_the_noise():
    """Flipping any one bit of the generator's 256-bit key changes half of every image's
    noise bits (the generator before ChaCha folded the key into 32 bits of state: a search of
    2³² candidates found anyone's noise). A user's key reaches it through BLAKE2b, whole."""
    rows, count = torch.tensor([0, 1, 2**33 + 5]), 512
    key = int.from_bytes(bytes(range(7, 39)), "little")

    def bits(k: int) -> torch.Tensor:
        uniforms = counter_uniform(k, rows, count)  # 24 of each word's bits, as integers
        return ((uniforms * 2**24 - 1).round().long()[..., None] >> torch.arange(24)) & 1

    base = bits(key)
    for bit in (0, 31, 32, 63, 64, 100, 128, 200, 255):
        changed = (bits(key ^ (1 << bit)) != base).float().mean(dim=(1, 2))
        assert ((changed > 0.45) & (changed < 0.55)).all(), (bit, changed)
    assert noise_key(2**100) != noise_key(2**100 + 2**64) != noise_key(0)
    assert noise_key(5).bit_length() > 200  # small keys still spread over the whole key


@pytest.mark.parametrize(("patch_fraction", "max_gain_ratio"), [(1.0, 0.02), (0.25, 0.01)])
def test_subspace_nes_on_a_vit_hold_on_written_images(clean, patch_fraction, max_gain_ratio,
                                                      vit_spec):
    """Rounding to uint8 leaves a first-layer residual in every noisy patch (compensated
    rounding: about 1.8% of isotropic noise's gain with noise in every patch); the same
    energy in a quarter of the patches brings it under 1%."""
    torch.manual_seed(0)
    model = create_model(vit_spec)
    layer = first_layer(model)
    space = low_sensitivity_subspace(layer, (64, 64))
    assert isinstance(space, PatchSubspace) and space.rank == 768 - 384
    written = subspace_recode(clean, space, 30.0, 0, torch.arange(len(clean)),
                              patch_fraction)
    assert torch.equal(written, quantize(written)), "output must be exactly the uint8 grid"
    delta = written - clean
    measured = psnr(written, clean)
    assert (measured - 30.0).abs().max() < 0.1, measured
    noisy_patches = (F.unfold(delta, 16, stride=16) != 0).any(1).float().mean()
    assert noisy_patches == pytest.approx(patch_fraction, abs=0.01)

    noise = isotropic_like(delta, _gaussian(delta))
    gain, iso = first_layer_gain(layer, delta), first_layer_gain(layer, noise)
    normalized = (clean - layer.mean.view(1, -1, 1, 1)) / layer.std.view(1, -1, 1, 1)
    response = F.conv2d(normalized, layer.weight, stride=layer.stride)
    relative = layer.response(delta).flatten(1).norm(dim=1) / response.flatten(1).norm(dim=1)
    assert relative.max() < 0.01, relative.max()
    assert (gain / iso).mean() <= max_gain_ratio, (gain / iso).mean()

    logits_clean = _predictions(model, clean)
    top = logits_clean.argmax(1)
    assert top.unique().numel() >= 4, "the model must be input-sensitive for agreement to count"
    agreement = (_predictions(model, written).argmax(1) == top).float().mean()
    assert agreement >= 0.99
    noisy = quantize(clean + noise)
    logits_noise = _predictions(model, noisy)
    noise_agreement = (logits_noise.argmax(1) == top).float().mean()
    assert noise_agreement < agreement
    ne_change = 1 - logit_cosine(_predictions(model, written), logits_clean).mean()
    noise_change = 1 - logit_cosine(logits_noise, logits_clean).mean()
    assert ne_change < 0.01 * noise_change, (ne_change, noise_change)


def test_compensated_rounding_halves_the_residual_of_plain_rounding(clean, vit_spec):
    layer = first_layer(create_model(vit_spec))
    space = low_sensitivity_subspace(layer, (64, 64))
    fresh = space.sample(clean.shape, 5, torch.arange(len(clean)))
    exact = box_repair(space, clean + fresh * (8 / 255 / fresh.std()), iterations=10)
    plain_gain = first_layer_gain(layer, quantize(exact) - clean)
    shaped_gain = first_layer_gain(layer, round_to_grid(space, exact) - clean)
    assert shaped_gain.mean() < 0.6 * plain_gain.mean(), (shaped_gain.mean(), plain_gain.mean())


def test_subspace_nes_on_an_overlapping_resnet_stem_reach_the_operator_bound(clean, resnet_spec):
    torch.manual_seed(0)
    model = create_model(resnet_spec)
    layer = first_layer(model, (64, 64))
    assert layer.overlapping
    rank = 3 * 64 * 64 // 64
    space = low_sensitivity_subspace(layer, (64, 64), rank=rank)
    assert isinstance(space, FourierSubspace) and abs(space.rank - rank) <= 2
    # the bound comes from the operator's singular values (one set per frequency)
    sigma = space.singular_values.flatten().sort().values
    bound = float(sigma[: space.rank].pow(2).mean().sqrt())
    assert space.min_gain == pytest.approx(bound, rel=1e-3)
    written = subspace_recode(clean, space, 30.0, 0, torch.arange(len(clean)))
    delta = written - clean
    gain = first_layer_gain(layer, delta)
    iso = first_layer_gain(layer, isotropic_like(delta, _gaussian(delta)))
    assert abs(gain.mean() / space.min_gain - 1) <= 0.10, (gain.mean(), space.min_gain)
    # A random-init 64×12-per-frequency operator is well conditioned: its weakest directions
    # attenuate only about 1.8× (trained stems, with smooth filters, reach 10× and more).
    assert gain.mean() < 0.6 * iso.mean(), (gain.mean(), iso.mean())


def test_fourier_projector_is_an_orthogonal_projection_onto_weak_directions(resnet_spec):
    model = create_model(resnet_spec)
    layer = first_layer(model, (32, 32))
    space = FourierSubspace(layer, (32, 32), rank=3 * 32 * 32 // 4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    once = space.project(x)
    assert torch.allclose(space.project(once), once, atol=1e-4)
    assert torch.allclose((x - once).mul(once).sum(), torch.tensor(0.0), atol=1e-2)
    # with circular padding the projected signal has exactly the bound's gain
    circular = F.conv2d(F.pad(once, (3, 3, 3, 3), mode="circular"),
                        layer.pixel_weight, stride=layer.stride)
    energy = (circular.pow(2).sum() / once.pow(2).sum()).sqrt()
    assert float(energy) <= float(space.singular_values[space.mask].max()) + 1e-3


@pytest.mark.parametrize("size", [16, 18])  # an even and an odd frequency grid
def test_fourier_projection_equals_the_dense_operators_weak_subspace(resnet_spec, size):
    """The per-frequency projection (on the half spectrum a real image has) against the
    whole circular operator written out as a matrix: the same weakest right singular
    directions, whichever grid parity decides the half spectrum's self-conjugate columns."""
    layer = first_layer(create_model(resnet_spec), (size, size))
    space = FourierSubspace(layer, (size, size), rank=3 * size * size // 3)
    pad = layer.padding[0]
    dims = 3 * size * size
    units = torch.eye(dims, dtype=torch.float64).view(dims, 3, size, size)
    wrapped = F.pad(units, (pad, pad, pad, pad), mode="circular")
    operator = F.conv2d(wrapped, layer.pixel_weight.double(), stride=layer.stride)
    operator = operator.flatten(1).T  # (outputs, pixels)
    _, sigma, vh = torch.linalg.svd(operator, full_matrices=True)
    sigma = torch.cat([sigma, sigma.new_zeros(dims - sigma.numel())])
    cutoff = float(space.singular_values[space.mask].max())
    weak = vh[sigma <= cutoff * (1 + 1e-4)]
    assert weak.shape[0] == space.rank  # no tie straddles the cut
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    dense = (x.flatten(1).double() @ weak.T @ weak).view_as(x)
    assert torch.allclose(space.project(x).double(), dense, atol=1e-4)


def test_reference_nes_repeat_one_tile_and_lose_fidelity_when_written(clean, vit_spec):
    torch.manual_seed(0)
    model = create_model(vit_spec)
    layer = first_layer(model)
    floats = reference_recode(clean[:4], layer, 30.0, 0, torch.arange(4))
    delta = (floats - clean[:4]) / layer.std.view(1, -1, 1, 1)  # normalized-space noise
    tiles = F.unfold(delta, layer.kernel, stride=layer.stride)  # (B, d, L)
    assert torch.allclose(tiles, tiles[:, :, :1].expand_as(tiles), atol=1e-4)
    assert not torch.allclose(tiles[0, :, 0], tiles[1, :, 0])  # one z per image
    # the tile lies in W's null space
    assert (layer.unfolded @ tiles[:, :, 0].T).norm() < 1e-3 * tiles[:, :, 0].norm()
    written = quantize(floats)
    assert psnr(floats, clean[:4]).mean() < 10  # nominal 30 dB is nowhere near measured
    float_change = (layer.response(floats - clean[:4])).norm()
    written_change = (layer.response(written - clean[:4])).norm()
    assert written_change > 10 * float_change  # clipping destroys the null-space property


def test_reference_on_overlapping_stem_sums_windows():
    model = create_model("timm:resnet18?num_classes=10&input_size=32")
    layer = first_layer(model)
    flat = torch.full((1, 3, 32, 32), 0.5)
    floats = reference_recode(flat, layer, 30.0, 0, torch.arange(1))
    # F.fold sums overlapping copies, so the image itself is scaled by the window count
    assert (floats - flat).abs().mean() > 0.5


def test_recoding_is_deterministic_and_keyed(clean, vit_spec):
    model = create_model(vit_spec)
    space = low_sensitivity_subspace(first_layer(model), (64, 64))
    a = subspace_recode(clean[:4], space, 30.0, 3, torch.arange(4))
    b = subspace_recode(clean[:4], space, 30.0, 3, torch.arange(4))
    c = subspace_recode(clean[:4], space, 30.0, 4, torch.arange(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the noise of an image depends on its index, not on how it was batched
    d = subspace_recode(clean[2:4], space, 30.0, 3, torch.arange(2, 4))
    assert torch.equal(a[2:], d)


def test_patch_repair_keeps_the_noise_in_the_subspace_and_reaches_the_box(clean, vit_spec):
    space = low_sensitivity_subspace(first_layer(create_model(vit_spec)), (64, 64))
    noise = space.sample(clean.shape, 0, torch.arange(len(clean)))
    start = clean + noise * (0.1 / noise.std())  # ~25 uint8 steps: most patches clip
    assert (start.clamp(0, 1) - start).abs().amax() > 0.1
    repaired = box_repair(space, start, iterations=20)
    delta = repaired - clean
    assert torch.allclose(space.project(delta), delta, atol=1e-4)
    assert (repaired.clamp(0, 1) - repaired).abs().amax() <= HALF_STEP
    assert delta.norm() > 0.8 * (start - clean).norm()  # the repair keeps most of the energy


def test_compensated_rounding_is_used_where_it_changes_the_gain(clean, vit_spec):
    """A null space needs compensated rounding; a full-rank stem's weak directions do not
    (the rounding error is lost in the noise's own response), so it is skipped there."""
    noise_rms = 255 * 10 ** (-30 / 20)
    null = low_sensitivity_subspace(first_layer(create_model(vit_spec)), (64, 64))
    assert compensation_pays(null, noise_rms)
    layer = first_layer(create_model("timm:vit_base_patch16_224?img_size=64&num_classes=10"))
    square = low_sensitivity_subspace(layer, (64, 64))
    assert square.min_gain > 0.1 * square.isotropic_gain
    assert not compensation_pays(square, noise_rms)
    noise = square.sample(clean.shape, 0, torch.arange(len(clean)))
    exact = box_repair(square, clean + noise * (noise_rms / 255), iterations=10)
    plain = first_layer_gain(layer, round_to_grid(square, exact, compensate=False) - clean)
    shaped = first_layer_gain(layer, round_to_grid(square, exact, compensate=True) - clean)
    assert (plain.mean() / shaped.mean() - 1).abs() < 0.01
