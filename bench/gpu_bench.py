"""GPU benchmark, side by side with this machine's CPUs in one run: the full demo audit
(540 digits, 6 models, the standard suite) on CUDA and on the CPU, as images/s × models ×
attacks; and JPEG decoding of 224×224 photo crops with nvJPEG against libjpeg-turbo (PIL),
with how far their pixels differ. Run by bench/gpu.sh."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from neaudit import demo_zoo
from neaudit.attacks import load_suite
from neaudit.auditing import audit
from neaudit.data import builtin_dataset
from neaudit.demo import digits_test_set
from neaudit.imageio import read_image, read_jpegs_on
from neaudit.protection import protect


def decode_comparison(count: int = 512, batch: int = 64) -> None:
    from PIL import Image

    crops = builtin_dataset("samples", count=count, size=224).protected
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"{i:04d}.jpg" for i in range(count)]
        for path, crop in zip(paths, crops, strict=True):
            Image.fromarray(crop).save(path, quality=90)
        read_jpegs_on(paths[:batch], torch.device("cuda"))  # warm-up
        start = time.perf_counter()
        host = [read_image(p) for p in paths]
        host_s = time.perf_counter() - start
        start = time.perf_counter()
        device = [image for lo in range(0, count, batch)
                  for image in read_jpegs_on(paths[lo:lo + batch], torch.device("cuda"))]
        device_s = time.perf_counter() - start
    levels = (torch.stack(device) - torch.stack(host)).abs() * 255
    print(f"JPEG decode 224×224 q90: libjpeg-turbo (PIL, 1 thread) {count / host_s:,.0f} img/s, "
          f"nvJPEG batch {batch} {count / device_s:,.0f} img/s; pixel difference mean "
          f"{levels.mean():.3f} levels, {(levels > 4).float().mean():.2%} of values off by more "
          f"than 4, max {levels.max():.0f}")


def main() -> None:
    if torch.cuda.is_available():
        decode_comparison()
    dataset = digits_test_set()
    others = [f"demo:{n}" for n in demo_zoo.ARCHITECTURES if f"demo:{n}" != demo_zoo.AUTHORIZED]
    attacks = len(load_suite("standard")) + 2
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        protect(dataset, demo_zoo.AUTHORIZED, Path(tmp) / "data", psnr=20,
                save_originals=True)
        print(f"protect (CPU path) {len(dataset)} images: {time.perf_counter() - start:.2f} s")
        for device in ("cuda", "cpu"):
            if device == "cuda" and not torch.cuda.is_available():
                continue
            start = time.perf_counter()
            audit(Path(tmp) / "data", others, out=Path(tmp) / device, device=device,
                  suite="standard", score="accuracy", quiet=True, batch_size=256)
            seconds = time.perf_counter() - start
            units = len(dataset) * (len(others) + 1) * attacks
            print(f"audit on {device:<4} ({torch.get_num_threads()} CPU threads): {seconds:.2f} s, "
                  f"{units / seconds:,.0f} image·model·attack evaluations/s")


if __name__ == "__main__":
    main()
