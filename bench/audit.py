"""Audit engine benchmarks, each measured side by side in one run.

1. Engine overhead: ``neaudit.audit`` vs a bare loop doing the same attack transforms and
   model forwards on the same data (target: overhead ≤ 20%).
2. Streaming: peak RSS of an audit over 1k and 8k images (each in a fresh subprocess).
3. Purification throughput: neaudit's batched attacks vs ART's preprocessors
   (JpegCompression, SpatialSmoothing, TotalVarMin) on the same batch.

Run: ``pip install -e '.[bench]' && python bench/audit.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from neaudit.attacks import AttackContext, get_attack, load_suite
from neaudit.auditing import audit
from neaudit.data import builtin_dataset, load_dataset
from neaudit.device import forward_precision, resolve_precision, retained_heap
from neaudit.imageio import to_float, write_png
from neaudit.zoo import create_model

ZOO = ["timm:resnet18?num_classes=10&input_size=32",
       "timm:convnext_atto?num_classes=10&input_size=32",
       "timm:vit_tiny_patch16_224?img_size=32&patch_size=4&num_classes=10"]


def make_release(root: Path, count: int, size: int = 32) -> Path:
    """A paired release of ``count`` real photo crops (protected = original + small noise)."""
    photos = builtin_dataset("samples", count=64, size=size).protected
    rng = np.random.default_rng(0)
    for i in range(count):
        image = photos[i % len(photos)]
        noisy = np.clip(image.astype(np.int16) + rng.integers(-3, 4, image.shape), 0, 255)
        write_png(root / "protected" / f"{i:05d}.png", noisy.astype(np.uint8))
        write_png(root / "original" / f"{i:05d}.png", image)
    return root


def bare_loop(data: Path, suite: str, batch_size: int) -> float:
    """The same attacks and forwards as the audit, in its precision and layout (CPU)."""
    dataset = load_dataset(data)
    cpu = torch.device("cpu")
    precision = resolve_precision("auto", cpu)
    models = [create_model(s).to(memory_format=torch.channels_last) for s in ZOO]
    entries = load_suite(suite)

    def forward(images: torch.Tensor) -> None:
        images = images.contiguous(memory_format=torch.channels_last)
        with forward_precision(cpu, precision):
            for model in models:
                model(images).argmax(1)

    start = time.perf_counter()
    with torch.inference_mode():
        for batch in dataset.batches(batch_size):
            for images in (batch.original, batch.protected):
                forward(images)
            for entry in entries:
                ctx = AttackContext(generator=torch.Generator().manual_seed(0))
                forward(get_attack(entry.attack)(batch.protected, ctx, **dict(entry.params)))
    return time.perf_counter() - start


def overhead(tmp: Path, count: int, suite: str) -> None:
    data = make_release(tmp / "release", count)
    bare = bare_loop(data, suite, 64)
    start = time.perf_counter()
    audit(data, ZOO[1:], authorized=ZOO[0], suite=suite, out=tmp / "run", batch_size=64,
          quiet=True, score="agreement")
    engine = time.perf_counter() - start
    print(f"engine overhead ({count} images, {len(ZOO)} models, suite {suite}): audit "
          f"{engine:.2f} s vs bare loop {bare:.2f} s → {100 * (engine / bare - 1):+.1f}%")


def peak_rss(tmp: Path, count: int) -> float:
    data = make_release(tmp / f"rss{count}", count)
    # Imports dominate the process peak, so the peak (VmHWM) is reset after them through
    # /proc/self/clear_refs and read again after the audit: the audit's own high-water mark.
    code = (
        "import re, neaudit.auditing as e, open_clip, timm, kornia\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        f"e.audit({str(data)!r}, {ZOO[1:]!r}, authorized={ZOO[0]!r}, suite='smoke', "
        f"out={str(tmp / f'out{count}')!r}, quiet=True, score='agreement')\n"
        "status = open('/proc/self/status').read()\n"
        "print(re.search(r'VmHWM:\\s+(\\d+)', status).group(1))\n")
    run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(run.stdout.split()[-1]) / 1024


def purify_throughput() -> None:
    from art.defences.preprocessor import JpegCompression, SpatialSmoothing, TotalVarMin

    images = to_float(builtin_dataset("samples", count=32, size=224).protected)
    ctx = AttackContext(generator=torch.Generator().manual_seed(0))
    numpy_nhwc = images.permute(0, 2, 3, 1).numpy()
    pairs = [
        ("jpeg q50", lambda: get_attack("jpeg")(images, ctx, quality=50),
         lambda: JpegCompression(clip_values=(0, 1), quality=50)(numpy_nhwc), 32),
        ("median 3×3", lambda: get_attack("median")(images, ctx, kernel=3),
         lambda: SpatialSmoothing(window_size=3)(numpy_nhwc), 32),
        ("TV denoise", lambda: get_attack("tv_denoise")(images[:4], ctx, weight=0.05, steps=10),
         lambda: TotalVarMin(max_iter=10)(numpy_nhwc[:4]), 4),
    ]
    print(f"{'purification (224×224)':<24} {'neaudit img/s':>14} {'ART img/s':>10} {'ratio':>7}")
    for name, ours, theirs, n in pairs:
        ours()  # warm-up
        t_ours = _best_of(ours)
        t_art = _best_of(theirs, repeats=1 if name == "TV denoise" else 3)
        print(f"{name:<24} {n / t_ours:>14.1f} {n / t_art:>10.1f} {t_art / t_ours:>6.1f}×")


def _best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--suite", default="smoke")
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        with retained_heap():  # as the audit keeps it, for the bare loop too
            overhead(Path(tmp), args.images, args.suite)
        if not args.skip_rss:
            small, large = peak_rss(Path(tmp), 1000), peak_rss(Path(tmp), 8000)
            print(json.dumps({"peak_rss_mb_1k": round(small, 1), "peak_rss_mb_8k": round(large, 1),
                              "ratio": round(large / small, 3)}))
    purify_throughput()


if __name__ == "__main__":
    main()
