from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from neaudit import device
from neaudit.data import load_dataset
from neaudit.errors import DataError
from neaudit.imageio import write_png


def test_imagefolder_with_originals_tree(image_folder: Path):
    dataset = load_dataset(image_folder)
    assert dataset.class_names == ["china", "flower"]
    assert len(dataset) == 12 and dataset.has_originals
    batches = list(dataset.batches(5))
    assert [len(b.index) for b in batches] == [5, 5, 2]
    first = batches[0]
    assert first.protected.shape == (5, 3, 64, 64) and first.protected.dtype == torch.float32
    assert 0.0 <= float(first.protected.min()) and float(first.protected.max()) <= 1.0
    # the originals were written flipped, so pairing is checkable
    assert torch.equal(first.original, first.protected.flip(-2))
    assert first.labels.tolist() == [dataset.labels[i] for i in range(5)]


def test_sibling_originals_and_explicit_originals(image_folder: Path):
    sibling = load_dataset(image_folder / "protected")
    assert sibling.has_originals
    explicit = load_dataset(image_folder / "protected", originals=image_folder / "original")
    assert explicit.names == sibling.names


def test_flat_folder_has_no_labels(tmp_path: Path, photos):
    for i in range(3):
        write_png(tmp_path / "flat" / f"{i}.png", photos[i])
    dataset = load_dataset(tmp_path / "flat")
    assert dataset.labels is None and not dataset.has_originals and len(dataset) == 3


def test_npz_round_trip(tmp_path: Path, photos):
    path = tmp_path / "set.npz"
    np.savez(path, protected=photos[:6], original=photos[:6], labels=np.arange(6) % 2,
             class_names=np.array(["a", "b"]))
    dataset = load_dataset(path)
    batch = next(dataset.batches(4))
    assert batch.protected.shape == (4, 3, 64, 64)
    assert torch.allclose(batch.protected[0] * 255, torch.from_numpy(photos[0]).permute(2, 0, 1)
                          .float())
    assert dataset.class_names == ["a", "b"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest(tmp_path: Path, photos, suffix):
    for i in range(4):
        write_png(tmp_path / "p" / f"{i}.png", photos[i])
        write_png(tmp_path / "o" / f"{i}.png", photos[i])
    table = pd.DataFrame({"path": [f"p/{i}.png" for i in range(4)],
                          "original_path": [f"o/{i}.png" for i in range(4)],
                          "label": ["cat", "dog", "cat", "dog"]})
    path = tmp_path / f"manifest{suffix}"
    table.to_csv(path, index=False) if suffix == ".csv" else table.to_parquet(path)
    dataset = load_dataset(path)
    assert dataset.class_names == ["cat", "dog"] and dataset.labels.tolist() == [0, 1, 0, 1]
    assert dataset.has_originals


def test_streaming_reads_only_the_requested_batch(image_folder: Path, monkeypatch):
    import neaudit.dataset as data

    calls = []
    real = data.read_pixels
    monkeypatch.setattr(data, "read_pixels", lambda p: calls.append(p) or real(p))
    dataset = load_dataset(image_folder / "protected")
    next(dataset.batches(3))
    assert len(calls) == 6  # 3 protected + 3 originals, nothing more


def test_a_dataset_reads_under_inference_mode(image_folder: Path):
    """As a user's loop calls it: the decoding threads write into the batch outside that
    mode, which once refused an inference tensor."""
    dataset = load_dataset(image_folder)
    plain = next(dataset.batches(8))
    with torch.inference_mode():
        inside = next(dataset.batches(8))
    assert torch.equal(inside.protected, plain.protected)
    assert torch.equal(inside.original, plain.original)


def test_unreadable_image_names_the_file(tmp_path: Path, photos):
    write_png(tmp_path / "d" / "good.png", photos[0])
    (tmp_path / "d" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"bad\.png: cannot read this image.*Fix"):
        list(load_dataset(tmp_path / "d").batches(8))


def test_mismatched_pairs_name_the_missing_original(image_folder: Path):
    (image_folder / "original" / "china" / "00.png").unlink()
    with pytest.raises(DataError, match=r"no original.*00\.png.*Fix"):
        load_dataset(image_folder)


def test_mixed_sizes_need_a_resize_policy(tmp_path: Path, photos):
    write_png(tmp_path / "d" / "a.png", photos[0])
    write_png(tmp_path / "d" / "b.png", photos[1][:32])
    with pytest.raises(DataError, match=r"b\.png: size \(32, 64\).*--resize"):
        list(load_dataset(tmp_path / "d").batches(8))
    resized = load_dataset(tmp_path / "d", resize=(48, 48))
    assert next(resized.batches(8)).protected.shape == (2, 3, 48, 48)


def test_npz_layouts_and_types(tmp_path: Path, photos):
    """uint8 arrays read the same channels-last or channels-first; integer types of unknown
    scale are refused by name rather than read as floats."""
    np.savez(tmp_path / "nhwc.npz", protected=photos[:3])
    np.savez(tmp_path / "nchw.npz", protected=photos[:3].transpose(0, 3, 1, 2).copy())
    nhwc, nchw = (next(load_dataset(tmp_path / f"{n}.npz").batches(3)).protected
                  for n in ("nhwc", "nchw"))
    assert nhwc.shape == (3, 3, 64, 64) and torch.equal(nhwc, nchw)
    for kind in (np.int16, np.uint16, np.bool_):
        np.savez(tmp_path / "ints.npz", protected=photos[:3].astype(kind))
        with pytest.raises(DataError, match=rf"ints\.npz: 'protected' holds {np.dtype(kind)}"):
            load_dataset(tmp_path / "ints.npz")


def test_an_npz_that_unpacks_beyond_free_memory_is_refused_unread(tmp_path: Path, photos,
                                                                 monkeypatch):
    """Sized from the archive's directory, before any array is read: a few MB of zeros can
    declare gigabytes."""
    np.savez_compressed(tmp_path / "d.npz", protected=photos[:4])
    declared = 4 * photos[0].nbytes
    reads = []
    monkeypatch.setattr(np, "load", lambda *a, **k: reads.append(a))
    monkeypatch.setattr(device, "available_memory", lambda: declared // 2)
    with pytest.raises(DataError) as refused:
        load_dataset(tmp_path / "d.npz")
    assert str(refused.value).startswith(f"{tmp_path / 'd.npz'}: its arrays unpack to ")
    assert "GiB free. Fix: give" in str(refused.value) and not reads


def test_npz_labels_are_indices_or_names_never_rounded(tmp_path: Path, photos):
    cases = {"whole floats": ([0.0, 1.0, 1.0], [0, 1, 1], None),
             "names": (["cat", "dog", "cat"], [0, 1, 0], ["cat", "dog"]),
             "fractions": ([0.5, 1.5, 0.5], [0, 1, 0], ["0.5", "1.5"])}
    for given, indices, names in cases.values():
        np.savez(tmp_path / "set.npz", protected=photos[:3], labels=np.array(given))
        dataset = load_dataset(tmp_path / "set.npz")
        assert dataset.labels.tolist() == indices and dataset.class_names == names
    np.savez(tmp_path / "both.npz", protected=photos[:3], labels=np.array(["a", "b", "a"]),
             class_names=np.array(["x", "y"]))
    with pytest.raises(DataError, match=r"both\.npz: 'labels' holds names"):
        load_dataset(tmp_path / "both.npz")
    np.savez(tmp_path / "flat.npz", protected=photos[:3], labels=np.zeros((3, 2)))
    with pytest.raises(DataError, match=r"flat\.npz: 'labels' has shape \(3, 2\)"):
        load_dataset(tmp_path / "flat.npz")


def test_empty_folder(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no images found"):
        load_dataset(tmp_path / "empty")


def test_label_class_mismatch(tmp_path: Path, photos):
    path = tmp_path / "set.npz"
    np.savez(path, protected=photos[:4], labels=np.array([0, 1, 2, 3]),
             class_names=np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"label 2 of item '2' is outside the 2 class names"):
        load_dataset(path)


def test_nan_in_array(tmp_path: Path):
    images = np.full((2, 3, 8, 8), 0.5, dtype=np.float32)
    images[1, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", protected=images)
    with pytest.raises(DataError, match=r"nan\.npz.*NaN"):
        list(load_dataset(tmp_path / "nan.npz").batches(2))


def test_wrong_shape_and_unknown_type(tmp_path: Path):
    np.savez(tmp_path / "flat.npz", protected=np.zeros((4, 64), dtype=np.uint8))
    with pytest.raises(DataError, match=r"flat\.npz: 'protected' has shape \(4, 64\)"):
        load_dataset(tmp_path / "flat.npz")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'"):
        load_dataset(tmp_path / "x.txt")


def test_reading_on_the_grid_equals_quantizing_what_is_read(tmp_path):
    """protect's reader hands over uint8: for 8-bit files, 16-bit files and resized images
    alike it is exactly quantize() of the float read, as integers."""
    import numpy as np
    from PIL import Image

    from neaudit.data import load_dataset
    from neaudit.imageio import quantize

    rng = np.random.default_rng(0)
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 65536, (20, 24), dtype=np.uint16)).save(folder / "b.png")
    Image.fromarray(rng.integers(0, 256, (30, 28, 3), dtype=np.uint8)).save(folder / "c.png")
    dataset = load_dataset(folder, resize=(20, 24))
    floats = next(dataset.batches(3)).protected
    grid = next(dataset.batches(3, on_grid=True)).protected
    assert grid.dtype == torch.uint8
    assert torch.equal(grid.float() / 255, quantize(floats))


def test_rgb_pngs_read_as_pillow_reads_them(tmp_path):
    """The fast libpng path for RGB PNGs gives Pillow's pixels; PNGs it does not take
    (palette, transparency, grey) still read through Pillow, as before."""
    import numpy as np
    from PIL import Image

    from neaudit.imageio import read_image

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    images = {"rgb": Image.fromarray(rgb), "rgba": Image.fromarray(
        np.dstack([rgb, rng.integers(0, 256, (9, 11), dtype=np.uint8)])),
        "palette": Image.fromarray(rgb).convert("P"), "grey": Image.fromarray(rgb[..., 0])}
    for name, image in images.items():
        path = tmp_path / f"{name}.png"
        image.save(path)
        expected = np.asarray(Image.open(path).convert("RGB"))
        got = read_image(path, on_grid=True).permute(1, 2, 0).numpy()
        assert np.array_equal(got, expected), name
        assert torch.equal(read_image(path), read_image(path, on_grid=True).float() / 255)


def test_jpegs_read_as_pillow_reads_them(tmp_path):
    """RGB JPEGs decode through imagecodecs' libjpeg-turbo with Pillow's pixels, whatever the
    chroma subsampling, progressive or not, odd sizes; grey and CMYK JPEGs, which it does not
    take, still read through Pillow."""
    import numpy as np
    from PIL import Image

    from neaudit.data import builtin_dataset
    from neaudit.imageio import _rgb_decoded, read_image

    photo = builtin_dataset("samples", count=1, size=64).protected[0][:61, :57]
    rgb = Image.fromarray(photo)
    variants = {
        "q75_420": (rgb, {"quality": 75}),
        "q95_444": (rgb, {"quality": 95, "subsampling": 0}),
        "q50_422": (rgb, {"quality": 50, "subsampling": 1}),
        "progressive": (rgb, {"quality": 85, "progressive": True, "optimize": True}),
        "grey": (rgb.convert("L"), {"quality": 90}),
        "cmyk": (rgb.convert("CMYK"), {"quality": 90}),
    }
    for name, (image, options) in variants.items():
        path = tmp_path / f"{name}.jpg"
        image.save(path, "JPEG", **options)
        assert (_rgb_decoded(path, "JPEG") is not None) == (image.mode == "RGB"), name
        expected = np.asarray(Image.open(path).convert("RGB"))
        got = read_image(path, on_grid=True).permute(1, 2, 0).numpy()
        assert np.array_equal(got, expected), name


def test_written_pngs_are_lossless_for_pillow_and_for_neaudit(tmp_path):
    """The fast PNG settings (run-length matching after the Paeth filter) stay lossless:
    Pillow and neaudit's reader get back every value, noise and photo alike."""
    import numpy as np
    from PIL import Image

    from neaudit.data import builtin_dataset
    from neaudit.imageio import read_image, write_png

    photo = builtin_dataset("samples", count=1, size=64).protected[0]
    noise = np.random.default_rng(2).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    for name, image in (("photo", photo), ("noise", noise)):
        write_png(tmp_path / f"{name}.png", image)
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"{name}.png")), image)
        back = read_image(tmp_path / f"{name}.png", on_grid=True).permute(1, 2, 0).numpy()
        assert np.array_equal(back, image)


def test_the_resolver_agrees_with_path_resolve(tmp_path):
    """One realpath per folder gives what resolving each file gives, for plain files, files
    behind symlinked folders, symlinked files and '..' parts."""
    from neaudit.paths import Resolver

    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for folder in ("root/sub", "elsewhere"):
        (tmp_path / folder / "a.png").write_bytes(b"x")
    (tmp_path / "root" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "root" / "sub" / "b.png").symlink_to(tmp_path / "elsewhere" / "a.png")
    (tmp_path / "root" / "sub" / "c.png").symlink_to(tmp_path / "root" / "sub" / "a.png")
    root = tmp_path / "root"
    paths = [root / "sub" / "a.png", root / "linked" / "a.png", root / "sub" / "b.png",
             root / "sub" / "c.png", root / "sub" / ".." / "sub" / "a.png",
             root / "linked" / ".." / "root" / "sub" / "a.png"]
    resolve = Resolver()
    assert [resolve(p) for p in paths] == [p.resolve() for p in paths]
    assert [resolve.inside(p, root) for p in paths] == [True, False, False, True, True, True]


def test_folder_listing_order_links_and_hidden_files(tmp_path):
    """Files come sorted as paths (which is not string order: 'a/…' before 'a-b/…'), hidden
    files and other suffixes are skipped, a folder named like an image is walked, a second
    link to a folder already seen adds nothing, and a link out of the folder is counted."""
    from neaudit.data import _list_images

    root = tmp_path / "data"
    for name in ("a/b.png", "a-b/c.png", "a b/d.jpg", "A/e.PNG", "dir.png/f.png", ".git/h.png",
                 ".hidden.png", "notes.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "g.png").write_bytes(b"x")
    (root / "link").symlink_to(root / "a")
    (root / "out").symlink_to(tmp_path / "elsewhere")
    files, outside = _list_images(root)
    expected = ["A/e.PNG", "a/b.png", "a b/d.jpg", "a-b/c.png", "dir.png/f.png", ".git/h.png",
                "out/g.png"]
    assert [Path(f) for f in files] == sorted(root / name for name in expected)
    assert outside == 1
    files, outside = _list_images(root, exclude={"a", "link", "out"})
    assert [Path(f) for f in files] == sorted(
        root / name for name in ("A/e.PNG", "a b/d.jpg", "a-b/c.png", "dir.png/f.png",
                                 ".git/h.png"))
    assert outside == 0


def test_a_broken_exif_block_leaves_the_image_readable(tmp_path, monkeypatch):
    """EXIF is read only for the orientation note: where Pillow's parser fails on it, the
    pixels are read all the same and nothing is noted."""
    from PIL import Image

    from neaudit.imageio import read_pixels

    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "turned.jpg", quality=95, exif=exif)
    assert read_pixels(tmp_path / "turned.jpg")[1] == ("orientation",)

    def broken(self):
        raise SyntaxError("not a TIFF file")  # what Pillow's parser raises on some bytes

    monkeypatch.setattr(Image.Image, "getexif", broken)
    image, unread = read_pixels(tmp_path / "turned.jpg")
    assert unread == () and image.shape == (3, 8, 8)


def test_a_spread_subset_covers_every_class(tmp_path: Path, photos):
    """--max-images audits items evenly spread over the dataset: in name order a class-folder
    dataset is grouped by class, and its first items would all be of the first classes."""
    for i in range(12):
        write_png(tmp_path / "set" / f"class{i // 4}" / f"{i}.png", photos[i])
    dataset = load_dataset(tmp_path / "set")
    assert dataset.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    subset = dataset.spread(6)
    assert subset.labels.tolist() == [0, 0, 1, 1, 2, 2] and len(set(subset.names)) == 6
    batch = next(subset.batches(6))
    for name, image in zip(batch.names, batch.protected, strict=True):
        assert torch.equal(image, next(dataset.batches(1, dataset.names.index(name))).protected[0])
    assert dataset.spread(12) is dataset and dataset.spread(50) is dataset
    arrays = tmp_path / "set.npz"
    np.savez(arrays, protected=photos[:10], labels=np.arange(10) // 5)
    assert load_dataset(arrays).spread(4).labels.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("mode, value, says", [("F", 2.0, "floating-point pixels outside [0, 1]"),
                                               ("F", float("nan"), "not finite"),
                                               ("I", 70000, "integer pixel values outside")])
def test_high_depth_values_out_of_range_are_refused_in_their_own_words(tmp_path, mode, value,
                                                                        says):
    """Nothing is clipped silently; the refusal is one sentence with one fix, not wrapped in
    'cannot read this image'."""
    from PIL import Image

    from neaudit.imageio import read_image

    path = tmp_path / "deep.tif"
    dtype = np.float32 if mode == "F" else np.int32
    Image.fromarray(np.full((4, 5), value, dtype), mode=mode).save(path)
    with pytest.raises(DataError) as refused:
        read_image(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and says in message
    assert message.count("Fix:") == 1 and "cannot read" not in message


def test_free_memory_is_the_host_s_or_the_container_limit_s_whichever_is_lower(tmp_path,
                                                                               monkeypatch):
    """A pod with a memory limit sees the node's memory in /proc/meminfo and is killed at its
    limit: the cgroup's limit less its usage (reclaimable page cache counted free) bounds what
    the .npz checks take as free."""

    def write(name: str, text: str) -> str:
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    gib = 1 << 30
    meminfo = write("meminfo", f"MemTotal: 1 kB\nMemAvailable: {8 * gib // 1024} kB\n")
    monkeypatch.setattr(device, "MEMINFO", meminfo)
    v2 = (write("v2.max", f"{2 * gib}\n"), write("v2.current", f"{3 * gib // 2}\n"),
          write("v2.stat", f"anon 5\ninactive_file {gib // 4}\n"), "inactive_file")
    v1 = (write("v1.limit", f"{4 * gib}\n"), write("v1.usage", f"{gib}\n"),
          write("v1.stat", "total_inactive_file 0\n"), "total_inactive_file")
    monkeypatch.setattr(device, "CGROUP_MEMORY", (v2, v1))
    assert device.available_memory() == 3 * gib // 4
    monkeypatch.setattr(device, "CGROUP_MEMORY", ((str(tmp_path / "absent"), *v2[1:]), v1))
    assert device.available_memory() == 3 * gib  # cgroup v1's limit, where v2 has none
    write("v2.max", "max\n")
    monkeypatch.setattr(device, "CGROUP_MEMORY", (v2, v1))
    assert device.available_memory() == 8 * gib  # no limit: the host's figure


def test_16_bit_rgb_pngs_keep_every_level(tmp_path):
    """As 16-bit grey PNGs are: scaled by 1/65535, not cut to each value's high byte (what
    Pillow reads), in a file read alone and through a dataset."""
    import imagecodecs

    from neaudit.imageio import quantize, read_image

    values = np.random.default_rng(2).integers(0, 65536, (6, 7, 3), dtype=np.uint16)
    path = tmp_path / "deep" / "rgb48.png"
    path.parent.mkdir()
    path.write_bytes(imagecodecs.png_encode(values))
    expected = torch.from_numpy((values / 65535.0).astype(np.float32)).permute(2, 0, 1)
    assert torch.equal(read_image(path), expected)
    assert torch.equal(read_image(path, on_grid=True).float() / 255, quantize(expected))
    assert torch.equal(next(load_dataset(path.parent).batches(1)).protected[0], expected)


def test_a_parquet_manifest_of_more_rows_than_memory_holds_is_refused_unread(tmp_path,
                                                                            monkeypatch):
    """Counted from its footer before a row is read: dictionary encoding lets 30 KB declare
    ten million rows, each a path string and a name string once loaded."""
    import neaudit.data

    pd.DataFrame({"path": ["a.png"] * 1000}).to_parquet(tmp_path / "m.parquet")
    reads = []
    monkeypatch.setattr(pd, "read_parquet", lambda *a, **k: reads.append(a))
    monkeypatch.setattr(device, "available_memory",
                        lambda: 1000 * neaudit.data.MANIFEST_ROW_BYTES - 1)
    with pytest.raises(DataError) as refused:
        load_dataset(tmp_path / "m.parquet")
    assert str(refused.value).startswith(f"{tmp_path / 'm.parquet'}: lists 1,000 rows, ")
    assert "Fix: split the manifest" in str(refused.value) and not reads


_HEAP_CHECK = """
import ctypes, numpy as np
from neaudit import device

class Mallinfo2(ctypes.Structure):  # glibc's struct mallinfo2; hblkhd: bytes in mapped blocks
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2

def mapped_for(nbytes):
    before = libc.mallinfo2().hblkhd
    block = np.ones(nbytes, np.uint8)
    return libc.mallinfo2().hblkhd - before

size = 64 << 20
seen = [mapped_for(size)]
with device.retained_heap():
    with device.retained_heap():  # the demo's protect and audit, inside the demo
        seen.append(mapped_for(size))
    seen.append(mapped_for(size))
seen.append(mapped_for(size))
print(*[int(s >= size) for s in seen])
"""


@pytest.mark.skipif(device._glibc() is None, reason="tunes glibc's allocator")
def test_jobs_keep_the_memory_they_free_until_the_last_one_ends():
    """Inside a job a large block comes from the heap, where the next batch finds it again,
    not from a fresh mapping it would page-fault through; the setting holds until the
    outermost job ends, and glibc's defaults are back after it. In a fresh process: after a
    job, a large block may come from the free chunks it left in the heap."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _HEAP_CHECK], capture_output=True, text=True,
                         check=True)
    assert run.stdout.split() == ["1", "0", "0", "1"]  # mapped, kept, kept, mapped again
