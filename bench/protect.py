"""NE recoding throughput at 224×224 for ViT-B/16 and ResNet-50 stems (random init).

Prints images/s for ``subspace`` and ``reference``, split into recoding (noise, repair,
quantization) and encoding + writing PNGs, side by side in one process; and, for scale, the
noise alone (the ChaCha8 keystream, Box–Muller and the spread over the subspace: the part of
``subspace`` recoding that :meth:`Subspace.sample` does).
Run: ``python bench/protect.py [--images 64] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from neaudit.data import builtin_dataset
from neaudit.device import chunks, retained_heap
from neaudit.imageio import quantize, to_float, to_uint8, write_png
from neaudit.ne import noise_key, reference_recode, subspace_recode
from neaudit.spectral import low_sensitivity_subspace
from neaudit.stem import first_layer
from neaudit.zoo import create_model

STEMS = {"ViT-B/16": "timm:vit_base_patch16_224", "ResNet-50": "timm:resnet50"}


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def recode(method: str, space, layer, batch: torch.Tensor, offset: int) -> torch.Tensor:
    """One batch of NEs on the uint8 grid, in the job's chunks (cache-sized on a CPU),
    finished on the device before returning."""
    index = torch.arange(offset, offset + len(batch))
    parts = chunks(batch)
    if method == "subspace":
        written = torch.cat([subspace_recode(batch[p], space, 30.0, 0, index[p]) for p in parts])
    else:
        written = torch.cat([quantize(reference_recode(batch[p], layer, 30.0, 0, index[p]))
                             for p in parts])
    if batch.device.type == "cuda":
        torch.cuda.synchronize()
    return written


def noise_seconds(space, clean: torch.Tensor, batch: int) -> float:
    """Seconds the subspace's noise takes for every image, in the job's chunks."""
    def run() -> None:
        for lo in range(0, len(clean), batch):
            images = clean[lo:lo + batch]
            index = torch.arange(lo, lo + len(images), device=images.device)
            for part in chunks(images):
                space.sample(images[part].shape, noise_key(0), index[part])
        if clean.device.type == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up
    return timed(run)[0]


@retained_heap()  # as protect keeps the memory it frees
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-writing", action="store_true",
                        help="time recoding only (on a GPU, the one-thread PNG writing of this "
                        "bench is not the job's; bench/e2e.py times that)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clean = to_float(builtin_dataset("samples", count=args.images, size=224).protected).to(device)
    print(f"{args.images} images 224×224, batch {args.batch}, {args.threads} threads, {device}")
    print(f"{'stem':<10} {'method':<10} {'recode img/s':>13} {'write img/s':>12} "
          f"{'end-to-end img/s':>17}")
    for label, spec in STEMS.items():
        model = create_model(spec)
        layer = first_layer(model)
        space_time, space = timed(lambda: low_sensitivity_subspace(layer, (224, 224)))  # noqa: B023
        for method in ("subspace", "reference"):
            recode(method, space, layer, clean[: args.batch], 0)  # warm-up: caches, kernels
            recode_s = write_s = 0.0
            with tempfile.TemporaryDirectory() as tmp:
                for lo in range(0, args.images, args.batch):
                    batch = clean[lo:lo + args.batch]
                    seconds, written = timed(
                        lambda: recode(method, space, layer, batch, lo))  # noqa: B023
                    recode_s += seconds

                    def write(images=written, offset=lo):
                        for i, image in enumerate(to_uint8(images)):
                            write_png(Path(tmp) / f"{offset + i}.png", image)

                    if not args.skip_writing:
                        write_s += timed(write)[0]
            n = args.images
            writing = (f"{'-':>12} {'-':>17}" if args.skip_writing else
                       f"{n / write_s:>12.1f} {n / (recode_s + write_s):>17.1f}")
            print(f"{label:<10} {method:<10} {n / recode_s:>13.1f} {writing}")
        print(f"{'':<10} (subspace built once in {space_time:.2f} s, rank {space.rank}; the "
              f"noise alone {args.images / noise_seconds(space, clean, args.batch):,.0f} img/s)")


if __name__ == "__main__":
    main()
