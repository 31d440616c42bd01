"""``neaudit protect``: files written, fidelity measured on them, inputs untouched."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from neaudit import device
from neaudit.cli import main
from neaudit.data import load_dataset
from neaudit.errors import NeauditError
from neaudit.imageio import read_image, sha256_file
from neaudit.ne import noise_key, release_key
from neaudit.protection import protect
from neaudit.spectral import low_sensitivity_subspace
from neaudit.stem import first_layer
from neaudit.zoo import create_model


def test_protect_writes_pngs_sidecar_and_measures_what_it_wrote(image_folder: Path, tmp_path,
                                                                vit_spec, snapshot):
    before = snapshot(image_folder)
    out = tmp_path / "ne"
    result = protect(image_folder / "original", vit_spec, out, save_originals=True, key=11,
                     store_key=True)
    assert snapshot(image_folder) == before, "the input folder must not change"
    sidecar = json.loads((out / "neaudit.json").read_text())
    assert sidecar["authorized"] == vit_spec and sidecar["params"]["key"] == 11
    assert sidecar["count"] == 12 and sidecar["method"] == "subspace"
    # the hashes file verifies every written PNG
    for line in (out / "hashes.sha256").read_text().splitlines():
        digest, name = line.split("  ")
        assert sha256_file(out / name) == digest
    # fidelity is the PSNR of the files as read back
    reloaded = load_dataset(out)
    assert reloaded.class_names == ["china", "flower"] and reloaded.has_originals
    batch = next(reloaded.batches(12))
    file_psnr = 10 * torch.log10(1 / (batch.protected - batch.original).pow(2).flatten(1).mean(1))
    by_name = dict(zip(result.per_image["name"], result.per_image["psnr"], strict=True))
    for name, value in zip(batch.names, file_psnr.tolist(), strict=True):
        assert value == pytest.approx(by_name[name], abs=1e-3)
    assert abs(result.summary["psnr"] - 30) < 0.1
    assert result.summary["agreement"] >= result.summary["noise_agreement"]


def test_the_noise_key_is_secret_unless_given(tmp_path, vit_spec, monkeypatch):
    """Without a key every run draws its own and records none; a given key repeats the
    release and is recorded only when asked. Whoever holds the key regenerates each image's
    noise: the written perturbations point along it (another key's noise is orthogonal), which
    is why the audit fails a release whose neaudit.json gives the key away."""
    import secrets

    from neaudit import protection

    monkeypatch.setattr(protection, "secrets", secrets)  # the OS draw, not the tests' key 0
    drawn = [protect("builtin:samples", vit_spec, tmp_path / name, fidelity_images=2)
             for name in ("a", "b")]
    assert all(r.sidecar["params"]["key"] is None and r.sidecar["params"]["key_source"] ==
               "random" for r in drawn)
    assert (tmp_path / "a" / "hashes.sha256").read_text() != (
        tmp_path / "b" / "hashes.sha256").read_text()
    given = [protect("builtin:samples", vit_spec, tmp_path / name, key=5, fidelity_images=2,
                     save_originals=True) for name in ("c", "d")]
    params = given[0].sidecar["params"]
    assert params["key"] is None and not params["key_stored"] and params["key_source"] == "given"
    assert params["key_bits"] == 3 and drawn[0].sidecar["params"]["key_bits"] is None
    assert (tmp_path / "c" / "hashes.sha256").read_text() == (
        tmp_path / "d" / "hashes.sha256").read_text()

    batch = next(load_dataset(tmp_path / "c").batches(64))
    delta = (batch.protected - batch.original).flatten(1)
    space = low_sensitivity_subspace(first_layer(create_model(vit_spec)), (64, 64))
    # the item numbers the noise was keyed by: the files' order in hashes.sha256
    listed = [line.split("  ")[1].removeprefix("protected/")
              for line in (tmp_path / "c" / "hashes.sha256").read_text().splitlines()]
    index = torch.tensor([listed.index(name) for name in batch.names])

    salt = given[0].sidecar["params"]["noise_salt"]

    def alignment(key: int) -> torch.Tensor:
        noise = space.sample(batch.protected.shape, noise_key(release_key(key, salt)), index)
        return torch.nn.functional.cosine_similarity(delta, noise.flatten(1), dim=1)

    assert alignment(5).mean() > 0.5 and alignment(6).abs().mean() < 0.1


def test_a_key_given_again_for_other_settings_or_items_draws_independent_noise(tmp_path,
                                                                              vit_spec):
    """A publisher who re-runs with the same --key at another strength, or on a dataset with
    other items, must not publish the same noise twice: the difference of two releases
    would show it (scaled) and both could be cleaned. Each release's noise is bound to its
    settings and items (``noise_salt``); the same ones repeat the release byte for byte."""
    from neaudit.data import builtin_dataset

    dataset = builtin_dataset("samples", count=16, size=64)

    def perturbations(name: str, data=dataset, **settings) -> torch.Tensor:
        """The written perturbations of the 16 items every run shares, in one order."""
        result = protect(data, vit_spec, tmp_path / name, key=2**90 + 7, fidelity_images=2,
                         save_originals=True, **settings)
        batch = next(load_dataset(result.out).batches(64))
        rows = [batch.names.index(name) for name in sorted(batch.names)
                if name.split("/")[-1] < "016"]
        return (batch.protected - batch.original).flatten(1)[rows]

    first = perturbations("a", psnr=30)
    assert torch.equal(first, perturbations("again", psnr=30))
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(first, perturbations("stronger", psnr=25), dim=1).abs().mean() < 0.1
    more = builtin_dataset("samples", count=17, size=64)  # the same 16 items and one more
    assert cosine(first, perturbations("more", data=more), dim=1).abs().mean() < 0.1


def test_npz_output_and_reference_method(tmp_path, vit_spec):
    result = protect("builtin:samples", vit_spec, tmp_path / "r", method="reference",
                     output_format="npz", save_originals=True)
    arrays = np.load(tmp_path / "r" / "protected.npz")
    assert arrays["protected"].dtype == np.uint8 and arrays["protected"].shape == (32, 64, 64, 3)
    assert arrays["labels"].tolist() == [i % 2 for i in range(32)]
    summary = result.summary
    # measured far below nominal, and materializing as uint8 changes what the model sees
    assert summary["psnr_float"] < 10 and summary["psnr"] > summary["psnr_float"]
    assert result.sidecar["params"]["psnr_is_nominal"]
    # the release folder loads as the arrays it holds, with its sidecar, as the .npz itself
    release, archive = load_dataset(tmp_path / "r"), load_dataset(tmp_path / "r" / "protected.npz")
    assert release.sidecar["format"] == "npz" and release.has_originals
    assert np.array_equal(release.protected, archive.protected)
    assert release.sidecar == archive.sidecar


def test_npz_holds_the_png_release_and_is_refused_beyond_free_memory(tmp_path, vit_spec,
                                                                    monkeypatch, capsys):
    """Batch by batch into one array, the .npz holds the pixels a PNG release of the same key
    writes, originals too; a release larger than the free memory is refused before any work."""
    options = {"key": 3, "batch_size": 5, "save_originals": True}
    protect("builtin:samples", vit_spec, tmp_path / "png", **options)
    protect("builtin:samples", vit_spec, tmp_path / "npz", output_format="npz", **options)
    with np.load(tmp_path / "npz" / "protected.npz", allow_pickle=False) as arrays:
        held = {kind: arrays[kind] for kind in ("protected", "original")}
    folders = load_dataset(tmp_path / "png")  # class folders: another order than the items'
    order = np.argsort([Path(name).stem for name in folders.names])
    release = next(folders.batches(32, on_grid=True))
    for kind, pixels in (("protected", release.protected), ("original", release.original)):
        assert np.array_equal(held[kind], pixels[order].permute(0, 2, 3, 1).numpy()), kind
    monkeypatch.setattr(device, "available_memory", lambda: 700_000)  # 32 × 64² × 3 × 2
    argv = ["protect", "builtin:samples", "--authorized", vit_spec, "--out",
            str(tmp_path / "big"), "--format", "npz", "--save-originals", "-q"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "0.0 GiB free" in err and "--format png" in err
    assert not (tmp_path / "big").exists() or not any((tmp_path / "big").iterdir())


def test_protect_refuses_to_write_into_its_input(image_folder: Path, vit_spec):
    with pytest.raises(ValueError, match="never writes into its input"):
        protect(image_folder, vit_spec, image_folder / "out")


def test_cli_protect_and_bad_input_exit_codes(tmp_path, capsys, vit_spec):
    code = main(["protect", "builtin:samples", "--authorized", vit_spec, "--out",
                 str(tmp_path / "cli"), "--psnr", "28"])
    out = capsys.readouterr().out
    assert code == 0 and "agreement" in out and "wrote 32 NEs" in out
    assert (tmp_path / "cli" / "protected" / "china" / "000.png").is_file()
    assert read_image(tmp_path / "cli" / "protected" / "china" / "000.png").shape == (3, 64, 64)

    (tmp_path / "empty").mkdir()
    assert main(["protect", str(tmp_path / "empty"), "--authorized", vit_spec, "--out",
                 str(tmp_path / "x")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["protect", "builtin:samples", "--authorized", "timm:not_a_model", "--out",
                 str(tmp_path / "y")]) == 2
    assert "timm has no model 'not_a_model'" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_patch_fraction_is_recorded_and_refused_where_it_has_no_meaning(tmp_path, vit_spec):
    result = protect("builtin:samples", vit_spec, tmp_path / "sparse", patch_fraction=0.25)
    assert result.sidecar["params"]["patch_fraction"] == 0.25
    assert result.summary["gain"] <= 0.01 * result.summary["isotropic_gain"]
    with pytest.raises(NeauditError, match="outside \\(0, 1\\]"):
        protect("builtin:samples", vit_spec, tmp_path / "zero", patch_fraction=0.0)
    with pytest.raises(NeauditError, match="patch stem"):
        protect("builtin:samples", "timm:resnet18?num_classes=10", tmp_path / "overlap",
                patch_fraction=0.5)
    assert not (tmp_path / "zero").exists() and not (tmp_path / "overlap").exists()


def test_strength_as_an_l2_norm(tmp_path, vit_spec):
    result = protect("builtin:samples", vit_spec, tmp_path / "l2", l2=2.0)
    assert result.per_image["l2"].between(1.98, 2.02).all(), result.per_image["l2"].describe()
    assert result.sidecar["params"]["l2"] == 2.0
    with pytest.raises(NeauditError, match="needs the subspace method"):
        protect("builtin:samples", vit_spec, tmp_path / "ref", method="reference", l2=2.0)
    with pytest.raises(SystemExit):
        main(["protect", "builtin:samples", "--authorized", vit_spec, "--out", str(tmp_path / "c"),
              "--psnr", "30", "--l2", "2"])


def test_protect_keeps_the_memory_its_batches_free_while_it_runs(tmp_path, vit_spec,
                                                               monkeypatch):
    """It runs inside device.retained_heap, and leaves it when it returns."""
    import neaudit.protection

    depths = []
    measure = neaudit.protection.measure
    monkeypatch.setattr(neaudit.protection, "measure",
                        lambda *args: depths.append(device._heap_jobs) or measure(*args))
    protect("builtin:samples", vit_spec, tmp_path / "out")
    assert depths and set(depths) == {1} and device._heap_jobs == 0


def test_uint8_batches_reach_the_device_as_exactly_the_quantized_floats():
    """The protect pipeline's uint8 hand-over gives bit for bit the floats quantize() gives
    (the values every device must recode alike)."""
    from neaudit.imageio import quantize
    from neaudit.pipeline import on_device

    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    expected = quantize(levels.float() / 255.0)
    assert torch.equal(on_device(levels, torch.device("cpu")), expected)
    assert torch.equal(on_device(levels, torch.device("cpu")).view(-1)[:256],
                       torch.arange(256, dtype=torch.float32) / 255.0)


def test_written_nes_and_fidelity_do_not_depend_on_the_batch_size(image_folder: Path, tmp_path,
                                                                   vit_spec, monkeypatch):
    """Batches, the CPU's cache-sized chunks inside them and the batches the authorized model
    previews only change how the work is cut: the same files and figures come out."""
    from neaudit import device, fidelity

    monkeypatch.setattr(device, "CPU_CHUNK_VALUES", 2 * 3 * 64 * 64)  # chunks of two images
    monkeypatch.setattr(fidelity, "PREVIEW_BATCH", 2)
    assert [len(range(5)[p]) for p in device.chunks(torch.zeros(5, 3, 64, 64))] == [2, 2, 1]
    small = protect(image_folder / "original", vit_spec, tmp_path / "small", batch_size=5,
                    fidelity_images=5, key=3)
    monkeypatch.undo()
    assert len(device.chunks(torch.zeros(12, 3, 64, 64))) == 1
    large = protect(image_folder / "original", vit_spec, tmp_path / "large", batch_size=12,
                    fidelity_images=5, key=3)
    assert (small.out / "hashes.sha256").read_text() == (large.out / "hashes.sha256").read_text()
    pd.testing.assert_frame_equal(small.per_image, large.per_image, rtol=1e-5)
    assert small.per_image["agreement"].notna().sum() == 5


def test_png_compression_changes_the_bytes_not_the_pixels(image_folder: Path, tmp_path,
                                                           vit_spec, capsys):
    """Both settings write lossless PNGs of the same NEs; ``deflate`` files are smaller on NE
    noise, the choice is recorded, and an unknown one is refused before anything is written."""
    stored = protect(image_folder / "original", vit_spec, tmp_path / "none", key=5)
    packed = protect(image_folder / "original", vit_spec, tmp_path / "deflate", key=5,
                     png_compression="deflate")
    assert stored.sidecar["params"]["png_compression"] == "none"
    assert packed.sidecar["params"]["png_compression"] == "deflate"
    files = sorted((stored.out / "protected").rglob("*.png"))
    assert len(files) == 12
    sizes = {"none": 0, "deflate": 0}
    for path in files:
        twin = packed.out / path.relative_to(stored.out)
        assert torch.equal(read_image(path), read_image(twin))
        sizes["none"] += path.stat().st_size
        sizes["deflate"] += twin.stat().st_size
    assert sizes["deflate"] < 0.95 * sizes["none"]
    with pytest.raises(NeauditError, match="unknown --png-compression 'zstd'"):
        protect(image_folder / "original", vit_spec, tmp_path / "bad", png_compression="zstd")
    assert not (tmp_path / "bad").exists()
    assert main(["protect", str(image_folder / "original"), "--authorized", vit_spec, "--out",
                 str(tmp_path / "cli"), "--png-compression", "fast"]) == 2
    assert "Fix: use none or deflate" in capsys.readouterr().err


def test_photos_of_mixed_sizes_are_recoded_at_the_size_the_model_takes(tmp_path, vit_spec):
    """A folder of photos in several sizes (as ImageNet's are), for a model with a fixed input
    size: every image is resized to it, from the model check on, and written at that size."""
    from PIL import Image

    from neaudit.data import builtin_dataset

    photo = builtin_dataset("samples", count=1, size=96).protected[0]
    for i, (height, width) in enumerate([(75, 96), (96, 80), (64, 64)]):
        Image.fromarray(photo[:height, :width]).save(tmp_path / f"{i}.jpg", quality=90)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = protect(tmp_path, vit_spec, tmp_path.parent / "mixed-out", key=1)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # inputs untouched
    written = sorted((result.out / "protected").glob("*.png"))
    assert [Image.open(p).size for p in written] == [(64, 64)] * 3
    assert result.sidecar["params"]["image_size"] == [64, 64]


def test_files_left_in_out_by_another_run_are_found_at_any_depth(tmp_path):
    """``protect`` refuses an ``--out`` whose image folders hold files it would not write,
    in class folders too; links to folders are not followed and dangling links are no files.
    The planned files there are returned (a resumed run's), and so is a killed writer's
    temporary file beside a planned one, for the run to remove; another hidden file is
    refused."""
    from neaudit.errors import NeauditError
    from neaudit.release import existing_outputs

    out = tmp_path / "out"
    names = ["a/1.png", "b/2.png", "3.png"]
    for name in names:
        (out / "protected" / name).parent.mkdir(parents=True, exist_ok=True)
        (out / "protected" / name).write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "9.png").write_bytes(b"x")
    (out / "protected" / "linked").symlink_to(tmp_path / "elsewhere")
    (out / "protected" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (out / "protected" / "b" / ".2.png.k3_x9zq1.tmp").write_bytes(b"half")
    planned = {f"{out}/protected/{name}" for name in names}
    folders = ["protected", "original"]
    # planned files and links: accepted; the temporary file is named, not yet removed
    assert existing_outputs(out, folders, planned) == (
        planned, [f"{out}/protected/b/.2.png.k3_x9zq1.tmp"])
    (out / "protected" / ".3.png.k3_x9zq1.tmp.keep").write_bytes(b"x")
    with pytest.raises(NeauditError, match=r"protected/ already holds 1 file.*3\.png\.k3_"):
        existing_outputs(out, folders, planned)
    (out / "protected" / ".3.png.k3_x9zq1.tmp.keep").unlink()
    (out / "original" / "b").mkdir(parents=True)
    (out / "original" / "b" / "stale.png").write_bytes(b"x")
    with pytest.raises(NeauditError, match=r"original/ already holds 1 file.*b/stale\.png"):
        existing_outputs(out, folders, planned)


def test_transparency_and_exif_orientation_are_noted_not_silently_dropped(tmp_path, capsys,
                                                                          vit_spec, snapshot):
    """Inputs whose viewer shows what their pixels as read do not — transparency that some
    pixel uses, an EXIF orientation, frames after the first — are named in a note on stderr
    (even with --quiet) and counted in neaudit.json; opaque alpha, orientation 1, one-frame
    files and plain files are not."""
    from PIL import Image

    from neaudit.data import builtin_dataset

    photos = builtin_dataset("samples", count=6, size=64).protected
    alpha = np.full((64, 64, 1), 255, np.uint8)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(photos[0]).save(folder / "a-plain.png")
    Image.fromarray(np.dstack([photos[1], alpha])).save(folder / "b-opaque.png")
    see_through = alpha.copy()
    see_through[:8] = 0
    Image.fromarray(np.dstack([photos[2], see_through])).save(folder / "c-transparent.png")
    keyed = Image.fromarray(photos[3]).convert("P")  # a palette entry some pixels use
    keyed.save(folder / "d-keyed.png", transparency=int(np.asarray(keyed)[0, 0]))
    for name, orientation, photo in (("e-upright", 1, photos[4]), ("f-turned", 6, photos[5])):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(photo).save(folder / f"{name}.jpg", quality=90, exif=exif)
    first, *more = [Image.fromarray(p) for p in photos[:3]]
    first.save(folder / "g-animated.webp", save_all=True, append_images=more, lossless=True)
    first.save(folder / "h-pages.tif", save_all=True, append_images=more)
    first.save(folder / "i-one-page.tif")
    from PIL import ImageCms

    for name, space in (("j-srgb", "sRGB"), ("k-other-space", "XYZ")):  # only the second noted
        profile = ImageCms.ImageCmsProfile(ImageCms.createProfile(space)).tobytes()
        Image.fromarray(photos[0]).save(folder / f"{name}.png", icc_profile=profile)

    before = snapshot(folder)
    assert main(["protect", str(folder), "--authorized", vit_spec, "--out",
                 str(tmp_path / "out"), "--quiet", "--fidelity-images", "2"]) == 0
    assert snapshot(folder) == before  # inputs untouched, metadata and all
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == ["note: 2 input(s) have transparency, which the pixels read (and PNG NEs "
                     "written) do not keep (e.g. c-transparent.png, d-keyed.png)",
                     "note: 1 input(s) have an EXIF orientation tag, not applied: the pixels "
                     "are read as stored (e.g. f-turned.jpg)",
                     "note: 2 input(s) have more than one frame (an animation or pages), of "
                     "which only the first is read (and protected) (e.g. g-animated.webp, "
                     "h-pages.tif)",
                     "note: 1 input(s) have a colour profile other than sRGB, not applied: the "
                     "pixels are read (and PNG NEs written) as stored, so colour-managed "
                     "viewers show the NEs in other colours than the originals (e.g. "
                     "k-other-space.png)"]
    unread = json.loads((tmp_path / "out" / "neaudit.json").read_text())["unread"]
    assert unread == {"alpha": {"count": 2, "examples": ["c-transparent.png", "d-keyed.png"]},
                      "orientation": {"count": 1, "examples": ["f-turned.jpg"]},
                      "frames": {"count": 2, "examples": ["g-animated.webp", "h-pages.tif"]},
                      "colour_profile": {"count": 1, "examples": ["k-other-space.png"]}}
    # the pixels read are Pillow's RGB, as stored
    for path in sorted(folder.iterdir()):
        assert np.array_equal(read_image(path, on_grid=True).permute(1, 2, 0).numpy(),
                              np.asarray(Image.open(path).convert("RGB"))), path.name
