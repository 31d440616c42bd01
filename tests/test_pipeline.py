"""The files-to-files pipeline's writer: every image lands in its file, whichever way its
pixels travel to the writer processes."""

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
