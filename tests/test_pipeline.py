"""The files-to-files pipeline's writer: every image lands in its file, whichever way its
pixels travel to the writer processes."""

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from neaudit.imageio import read_image, sha256_file
from neaudit.pipeline import _RINGS, PngWriter


@pytest.mark.parametrize("processes", [True, False])
def test_the_writer_writes_every_image_through_reused_slots(tmp_path: Path, processes):
    """Two slots of three images for 20 images force each slot to be reused; a later, larger
    image does not fit a slot and travels with its task instead. The images come as a
    channels-last view of channels-first pixels, as ``protect`` hands them over."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (20, 3, 8, 8), dtype=np.uint8).transpose(0, 2, 3, 1)
    large = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    paths = [tmp_path / f"{i:02d}.png" for i in range(22)]
    with PngWriter(workers=2, chunk=3, pending=2, processes=processes) as writer:
        writer.write(paths[:11], small[:11])
        writer.write(paths[11:20], small[11:])
        writer.write(paths[20:], large)
    assert not _RINGS, "the shared ring is released when the writer closes"
    for path, image in zip(paths, [*small, *large], strict=True):
        assert np.array_equal(read_image(path, on_grid=True).permute(1, 2, 0).numpy(), image)
        assert writer.digests[path] == sha256_file(path)


def test_a_failed_write_is_raised_when_the_writer_closes(tmp_path: Path):
    (tmp_path / "taken.png").mkdir()  # a folder where a file should go
    images = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(OSError), PngWriter(workers=1, chunk=2, processes=True) as writer:
        writer.write([tmp_path / f"{i}.png" for i in range(3)] + [tmp_path / "taken.png"],
                     images)
    assert not _RINGS


def test_after_close_the_caller_works_while_the_writers_end(tmp_path: Path, monkeypatch):
    """``close`` hands the pool's shutdown to a thread and returns (here, while that shutdown
    is held); leaving the ``with`` block waits for it: every file is written and hashed, and
    no writer process is left."""
    release, ended = threading.Event(), threading.Event()
    shutdown = ProcessPoolExecutor.shutdown

    def held(pool, *args, **kwargs):
        release.wait(30)
        shutdown(pool, *args, **kwargs)
        ended.set()

    monkeypatch.setattr(ProcessPoolExecutor, "shutdown", held)
    images = np.random.default_rng(1).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    paths = [tmp_path / f"{i}.png" for i in range(6)]
    earlier = set(multiprocessing.active_children())
    with PngWriter(workers=2, chunk=2, processes=True) as writer:
        writer.write(paths, images)
        writer.close()
        returned_while_held = not release.is_set()
        release.set()
    assert returned_while_held and ended.is_set()
    assert not set(multiprocessing.active_children()) - earlier
    assert [writer.digests[path] for path in paths] == [sha256_file(path) for path in paths]


def test_batches_pin_every_tensor_and_keep_the_rest(monkeypatch):
    """A DataLoader pins what it is handed through the type's own ``pin_memory``; on a machine
    without CUDA, pinning is stood in for by a marked copy."""
    import torch

    from neaudit.dataset import Batch

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda self: pinned.append(self) or self.clone())
    batch = Batch(torch.arange(2), torch.rand(2, 3, 4, 4), None, torch.tensor([1, 0]),
                  ["a", "b"])
    out = batch.pin_memory()
    assert len(pinned) == 3 and out.original is None and out.names == ["a", "b"]
    assert all(torch.equal(getattr(out, name), getattr(batch, name))
               and getattr(out, name) is not getattr(batch, name)
               for name in ("index", "protected", "labels"))


def test_readers_fill_batches_in_shared_memory_with_what_one_file_reads(tmp_path: Path):
    """A reader process decodes straight into a batch in shared memory (nothing is copied to
    hand it over), and every batch holds what reading each file alone gives: 8-bit RGB
    (imagecodecs), grey (Pillow), 16-bit, and a larger photo resized, as floats and on the
    grid."""
    import torch
    from PIL import Image

    from neaudit.data import builtin_dataset, load_dataset
    from neaudit.dataset import _batch_buffer
    from neaudit.imageio import to_grid
    from neaudit.pipeline import read_ahead

    photos = builtin_dataset("samples", count=3, size=48).protected
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(photos[0][:32, :32]).save(folder / "0-rgb.png")
    Image.fromarray(photos[1][:32, :32, 0]).save(folder / "1-grey.png")
    Image.fromarray(photos[2][:32, :32, 1].astype(np.uint16) * 257).save(folder / "2-deep.png")
    Image.fromarray(photos[2]).save(folder / "3-large.jpg", quality=90)
    dataset = load_dataset(folder, resize=(32, 32))
    singles = torch.stack([dataset._fit_one(read_image(path), path)
                           for path in dataset.protected])

    floats = next(dataset.batches(4)).protected
    grid = next(dataset.batches(4, on_grid=True)).protected
    assert floats.dtype == torch.float32 and grid.dtype == torch.uint8
    assert torch.equal(floats, singles)
    assert torch.equal(grid, to_grid(singles))
    in_worker = torch.utils.data.DataLoader(
        [(2, 3, 8, 8)], batch_size=None, num_workers=1,
        collate_fn=lambda shape: _batch_buffer(shape, torch.uint8).is_shared())
    assert list(in_worker) == [True]
    assert not _batch_buffer((2, 3, 8, 8), torch.uint8).is_shared()
    for on_grid, expected in ((False, floats), (True, grid)):
        [batch] = list(read_ahead(dataset, 4, workers=1, on_grid=on_grid))
        assert torch.equal(batch.protected, expected)
