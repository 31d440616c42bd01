"""The report's sample grid, drawn from the arrays an audit stored (``samples.npz``): one row
per image, columns original | protected | amplified difference | worst image-level attack."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from neaudit.imageio import write_png

DIFFERENCE_GAIN = 10
"""The protected − original difference is shown as 0.5 + DIFFERENCE_GAIN · δ."""

PADDING = 2
THUMBNAIL = 96
"""Smaller images are enlarged (nearest neighbour) to about this many pixels a side, so that
the perturbation is visible."""
HEADER = 16
"""Height of the band with the column titles."""


def write_sample_grid(run_dir: Path) -> dict | None:
    """Write ``samples.png`` from ``samples.npz`` and return what the report says about it
    (the attack shown and the difference gain), or None where the run stored no samples."""
    arrays_path, meta_path = run_dir / "samples.npz", run_dir / "samples.json"
    if not arrays_path.is_file():
        return None
    with np.load(arrays_path, allow_pickle=False) as arrays:
        original, protected, attacked = (arrays[k].astype(np.float32) / 255.0
                                         for k in ("original", "protected", "attacked"))
    difference = np.clip(0.5 + DIFFERENCE_GAIN * (protected - original), 0.0, 1.0)
    columns = [original, protected, difference, attacked]
    count, height, width, _ = original.shape
    zoom = max(1, math.ceil(THUMBNAIL / max(height, width)))  # small images, enlarged
    height, width = height * zoom, width * zoom
    step_y, step_x = height + PADDING, width + PADDING
    grid = np.ones((HEADER + PADDING + count * step_y, PADDING + 4 * step_x, 3), np.float32)
    for row in range(count):
        for col, images in enumerate(columns):
            top, left = HEADER + PADDING + row * step_y, PADDING + col * step_x
            grid[top:top + height, left:left + width] = images[row].repeat(zoom, 0).repeat(
                zoom, 1)
    picture = Image.fromarray(np.round(grid * 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    titles = ("original", "protected", f"difference x{DIFFERENCE_GAIN}", "worst attack")
    for col, title in enumerate(titles):
        draw.text((PADDING + col * step_x + 2, 4), title, fill=(0, 0, 0))
    # deflate: the report embeds it, and a zoomed grid compresses well
    write_png(run_dir / "samples.png", np.asarray(picture), "deflate")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return {"gain": DIFFERENCE_GAIN, "attack": meta.get("attack", "–")}
