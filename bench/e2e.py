"""End-to-end throughput of the jobs users run, each beside its own limit measured in the
same process:

* ``protect``: image files in (224×224 PNGs, or with ``--inputs jpeg`` JPEGs of ImageNet's
  sizes to resize), PNG NEs out (ViT-B/16 stem at 224×224, protected images only), against
  the PNG-writing floor (the same images written by the same writers), the reading floor (the
  job's readers alone, and imagecodecs' own decoding rate), the recoding kernel alone and the
  fidelity measurement alone;
* ``audit``: a release at 224×224 against ImageNet-size models (ResNet-50 authorized,
  ConvNeXt-T, ViT-S/16) and a suite without training attacks, against a bare loop doing the
  same attacks and the same forwards (same precision, same device) with no engine around them;
* the device's matmul FLOP/s, for scale.

Run: ``python bench/e2e.py [--device cuda] [--images 512] [--suite standard]``. Prints ratios.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import pstats
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagecodecs
import numpy as np
import torch

from neaudit import pipeline, protection
from neaudit.attacks import AttackContext, get_attack, load_suite
from neaudit.auditing import audit, uses_reference
from neaudit.data import builtin_dataset, load_dataset
from neaudit.device import chunks, forward_precision, resolve_precision, retained_heap
from neaudit.fidelity import ModelPreview, measure
from neaudit.imageio import quantize, to_float, write_png
from neaudit.metrics import isotropic_gain
from neaudit.ne import subspace_recode
from neaudit.pipeline import PngWriter, read_ahead
from neaudit.protection import FIDELITY_IMAGES, protect
from neaudit.spectral import low_sensitivity_subspace
from neaudit.stem import first_layer
from neaudit.worker import reference_images
from neaudit.zoo import create_model

VIT_B = "timm:vit_base_patch16_224"
ZOO = ["timm:resnet50", "timm:convnext_tiny", "timm:vit_small_patch16_224"]


DISTINCT_CROPS = 4096


@functools.cache
def distinct_crops() -> np.ndarray:
    """:data:`DISTINCT_CROPS` 224×224 photo crops, made once per machine: a crop takes 3–6 ms
    in one thread, 11 s for all of them, and ``bench/gpu.sh`` starts this script three times
    on device time. Kept as ``.npy`` in the temporary folder, read back without pickle."""
    cache = Path(tempfile.gettempdir()) / f"neaudit-bench-crops-{DISTINCT_CROPS}.npy"
    if cache.is_file():
        return np.load(cache, allow_pickle=False)
    made = builtin_dataset("samples", count=DISTINCT_CROPS, size=224).protected
    partial = cache.with_suffix(f".{os.getpid()}.npy")
    np.save(partial, made)
    os.replace(partial, cache)
    return made


@functools.cache
def crops(count: int) -> np.ndarray:
    """``count`` 224×224 photo crops (N, H, W, 3 uint8): up to :data:`DISTINCT_CROPS`
    distinct ones, then the same again mirrored, shifted by a row each time (decoding and
    encoding cost the same on any of them)."""
    distinct = distinct_crops()
    out = np.empty((count, *distinct.shape[1:]), np.uint8)
    step = len(distinct)
    out[:step] = distinct[:count]
    for lo in range(step, count, step):  # each round from the last, written in place
        previous, block = out[lo - step:lo], out[lo:lo + step]
        block[:, 1:] = previous[:len(block), :-1, ::-1]
        block[:, 0] = previous[:len(block), -1, ::-1]
    return out


def photos(folder: Path, count: int, inputs: str = "png") -> Path:
    """Clean inputs as a user's folder holds them: ``png``, the 224×224 crops as compressed
    PNGs (a stored PNG, which ``protect`` writes by default, decodes 8× faster and would
    flatter the job); ``jpeg``, photos of ImageNet's sizes (375×500, 333×500, 427×320,
    400×400) as JPEGs of quality 90, which the job decodes and resizes to 224×224."""
    if inputs == "png":
        with PngWriter(compression="deflate") as writer:
            writer.write([folder / f"{i:05d}.png" for i in range(count)], crops(count)[:count])
        return folder
    from sklearn.datasets import load_sample_images

    sources, rng = load_sample_images().images, np.random.default_rng(0)
    sizes = [(375, 500), (333, 500), (427, 320), (400, 400)]
    folder.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        source, (height, width) = sources[i % 2], sizes[i % len(sizes)]
        top, left = (int(rng.integers(0, source.shape[k] - side + 1))
                     for k, side in ((0, height), (1, width)))
        crop = np.ascontiguousarray(source[top:top + height, left:left + width])
        (folder / f"{i:05d}.jpg").write_bytes(imagecodecs.jpeg8_encode(crop, level=90))

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write, range(count)))
    return folder


def decode_capacity(folder: Path, count: int = 2048) -> dict[int, float]:
    """Images a second that imagecodecs alone decodes from ``count`` of ``folder``'s images
    (bytes read beforehand) in 1 thread and in a thread per core: what the host's cores give
    reading, with no Python, torch, resizing or process around the decoder."""
    files = sorted(folder.iterdir())[:count]
    decode = imagecodecs.png_decode if files[0].suffix == ".png" else imagecodecs.jpeg8_decode
    blobs = [path.read_bytes() for path in files]
    rates = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(decode, blobs[:threads]))  # started and warm
            seconds = timed(lambda: list(pool.map(decode, blobs)))
        rates[threads] = len(blobs) / seconds
    return rates


PROFILE = False
READER_SWEEP = True


def timed(fn) -> float:
    """Seconds ``fn`` takes (device work included)."""
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def profiled(fn) -> None:
    """With ``--profile``, run ``fn`` once more under cProfile and print the main thread's top
    lines, by cumulative and by own time. Never the timed run: cProfile's per-call cost (about
    a microsecond on each of the audit's millions of Python calls) once made a profiled audit
    look 1.5× its bare loop on an H200 where the unprofiled one was 1.16×."""
    if not PROFILE:
        return
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("cumulative").print_stats(r"neaudit|threading|concurrent", 18)
    # where the thread feeding the device spends its own time (a GPU job is bound by it or
    # by its readers; on a CPU, by the kernels)
    stats.sort_stats("tottime").print_stats(12)


def batch_times(fn) -> tuple[float, list[float]]:
    """Seconds ``fn`` takes, and when (seconds from its start) the ``protect`` it runs handed
    each batch to the fidelity measurement, right after recoding it: the job's start-up, its
    pace and its end, apart."""
    stamps: list[float] = []
    measure_batch = protection.measure

    def stamped(*args, **kwargs):
        stamps.append(time.perf_counter())
        return measure_batch(*args, **kwargs)

    protection.measure = stamped
    try:
        start = time.perf_counter()
        seconds = timed(fn)
    finally:
        protection.measure = measure_batch
    return seconds, [stamp - start for stamp in stamps]


def protect_bench(tmp: Path, count: int, device: str, batch: int, writers: str,
                  compressions: list[str], inputs: str) -> None:
    for processes in {"both": (True, False), "processes": (True,), "threads": (False,)}[writers]:
        for compression in compressions:
            pipeline.WRITER_PROCESSES = processes
            print(f"PNG writers: {'processes' if processes else 'threads'}, PNG compression: "
                  f"{compression}")
            protect_once(tmp / f"writers-{processes}-{compression}", count, device, batch,
                         compression, inputs)
    pipeline.WRITER_PROCESSES = True


def protect_once(tmp: Path, count: int, device: str, batch: int, compression: str,
                 inputs: str) -> None:
    data = photos(tmp / "clean", count, inputs)
    # the shorter job previews as many images as the long one (the authorized model's three
    # forwards an image are a fixed cost, large on a CPU)
    shorter = max(batch, count // 8, FIDELITY_IMAGES)
    small = photos(tmp / "small", shorter, inputs)
    options = {"device": device, "batch_size": batch, "png_compression": compression}
    protect(photos(tmp / "warm", 8, inputs), VIT_B, tmp / "warm-out", **options)
    job, stamps = batch_times(lambda: protect(data, VIT_B, tmp / "ne", **options))
    profiled(lambda: protect(data, VIT_B, tmp / "ne-profiled", **options))
    # the same job on fewer images: the difference is the per-image rate once set up
    # (model, subspace, fidelity sample and worker start-up are paid once per job)
    short = timed(lambda: protect(small, VIT_B, tmp / "ne-small", **options))
    extra = job - short
    images = crops(count)  # the inputs' pixels

    def write_all() -> None:
        with PngWriter(compression=compression) as writer:
            writer.write([tmp / "floor" / f"{i:05d}.png" for i in range(len(images))], images)

    floor = timed(write_all)
    # the reading floor: the job's reader processes decoding the same inputs, nothing else
    def read_all(readers: int | None = None) -> float:
        return timed(lambda: sum(len(b.index) for b in read_ahead(
            load_dataset(data, resize=(224, 224)), batch, readers, pin_memory=device == "cuda",
            on_grid=True)))

    reading = read_all()
    # how reading scales with reader processes (each decodes with its share of the cores)
    sweep = {n: count / read_all(n) for n in (1, 2, 4, 8)
             if READER_SWEEP and n <= (os.cpu_count() or 1)}
    capacity = decode_capacity(data)
    model: torch.nn.Module | None = None

    def build() -> None:
        nonlocal model
        model = create_model(VIT_B).to(device)

    building = timed(build)
    layer = first_layer(model)
    space = low_sensitivity_subspace(layer, (224, 224))
    clean = quantize(to_float(images)).to(device)
    parts = chunks(clean)  # the job's own chunking (cache-sized on a CPU)
    subspace_recode(clean[parts[0]], space, 30.0, 0, torch.arange(count)[parts[0]])  # warm-up
    written: list[torch.Tensor] = []
    kernel = timed(lambda: written.extend(subspace_recode(clean[part], space, 30.0, 0,
                                                          torch.arange(count)[part])
                                          for part in parts))
    protected, gain = torch.cat(written), isotropic_gain(layer, (3, 224, 224))
    # the per-image fidelity the job measures on every batch (PSNR, SSIM, first-layer gains)
    measuring = timed(lambda: [measure(layer, gain, clean[lo:lo + batch],
                                       protected[lo:lo + batch], None)
                               for lo in range(0, count, batch)])
    # the job's fixed costs, each alone: writer processes started and ended around a few
    # files, and the authorized model's preview on its sampled images (three forwards each)
    def writers_alone() -> None:
        with PngWriter(compression=compression) as writer:
            writer.write([tmp / "fixed" / f"{i}.png" for i in range(8)], images[:8])

    writers = timed(writers_alone)
    sampled = torch.arange(min(FIDELITY_IMAGES, count))
    preview = ModelPreview(model, 0, sampled)
    preview.add(clean[sampled], protected[sampled], None, sampled)
    previewing = timed(preview.table)
    # where reading, recoding, measuring and writing share the same cores (a CPU job), they
    # cannot overlap into more than the cores give: the limit is the sum of an image's times
    bare = 1 / ((kernel + floor) / count)
    shared = 1 / ((reading + kernel + measuring + floor) / count)
    given = "224×224 PNGs" if inputs == "png" else "JPEGs of ImageNet's sizes, resized"
    print(f"protect ViT-B/16 224×224, {count} {given} in → PNG NEs out ({compression}), "
          f"batch {batch}, {device}:")
    print(f"  job {count / job:,.0f} img/s | reading floor {count / reading:,.0f} img/s | "
          f"PNG-writing floor {count / floor:,.0f} img/s | recoding kernel {count / kernel:,.0f}"
          f" img/s | measuring {count / measuring:,.0f} img/s | job / writing floor = "
          f"{floor / job:.2f} | job / slowest stage = {max(reading, floor, kernel) / job:.2f}")
    print(f"  on shared cores: recoding and writing {bare:,.0f} img/s at most; with reading "
          f"and the fidelity measurement {shared:,.0f} img/s at most")
    print("  reading floor by reader processes (job default "
          f"{pipeline.default_readers()}): " + ", ".join(f"{n}: {rate:,.0f} img/s"
                                                        for n, rate in sweep.items())
          + " | imagecodecs alone, threads: " + ", ".join(f"{n}: {rate:,.0f} img/s"
                                                        for n, rate in capacity.items()))
    print(f"  fixed costs alone: the model built and moved {building:.2f} s | writer processes "
          f"started and ended {writers:.2f} s | the model preview on {len(sampled)} images "
          f"{previewing:.2f} s")
    if len(stamps) > 2:
        pace = float(np.median(np.diff(stamps)))
        print(f"  the job's batches: the first recoded {stamps[0]:.2f} s after it started, then "
              f"one every {pace * 1e3:.0f} ms (median: {batch / pace:,.0f} img/s), the last "
              f"{job - stamps[-1]:.2f} s before it returned")
    if extra < 0.05 * job:
        print(f"  per image once set up: not measurable, fixed costs dominate ({count} images "
              f"took {job:.1f} s, {shorter} took {short:.1f} s)")
        return
    marginal = (count - shorter) / extra
    print(f"  per image once set up: {marginal:,.0f} img/s (job on {count} vs "
          f"{shorter} images; fixed cost {job - count / marginal:.1f} s) | "
          f"that / writing floor = {marginal * floor / count:.2f} | that / slowest stage = "
          f"{marginal * max(reading, floor, kernel) / count:.2f} | that / shared-core limit "
          f"with reading and measuring = {marginal / shared:.2f} (recoding and writing only: "
          f"{marginal / bare:.2f})")


def bare_loop(data: Path, entries, device: torch.device, batch: int,
              compile_models: bool = False) -> tuple[float, float]:
    """The same attacks and forwards as the audit (same precision, compiled when it is),
    nothing else: seconds to load the data and the models, as a user's loop would, and
    seconds for the loop itself (compiling included)."""
    start = time.perf_counter()
    dataset = load_dataset(data)
    precision = resolve_precision("auto", device)  # as the audit resolves its default
    zoo = {s: create_model(s).to(device, memory_format=torch.channels_last) for s in ZOO}
    models = list(zoo.values())
    if compile_models:
        models = [torch.compile(m, dynamic=True) for m in models]  # as the audit does
    # what the audit gives its attacks: clean in-distribution images (L2) and, in a dict that
    # also holds what they cache between batches, the public zoo (L3)
    reference = reference_images(dataset, None) if uses_reference(entries) else None
    extras = {"surrogates": zoo, "authorized": ZOO[0]}
    setup = time.perf_counter() - start

    def forward(images: torch.Tensor) -> None:
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), forward_precision(device, precision):
            torch.stack([m(images).argmax(1) for m in models]).cpu()

    def run() -> None:
        for shard in dataset.batches(batch):
            original, protected = shard.original.to(device), shard.protected.to(device)
            forward(original)
            forward(protected)
            for entry in entries:
                ctx = AttackContext(generator=torch.Generator().manual_seed(0), device=device,
                                    reference=reference, originals=original, extras=extras)
                forward(get_attack(entry.attack)(protected, ctx, **dict(entry.params)))

    return setup, timed(run)


def audit_bench(tmp: Path, count: int, device: str, suite: str, batch: int,
                compile_models: bool = False) -> None:
    data = tmp / "release"
    rng = np.random.default_rng(0)
    for i, crop in enumerate(crops(count)):
        noisy = np.clip(crop.astype(np.int16) + rng.integers(-4, 5, crop.shape), 0, 255)
        # the release as protect writes it; the originals as a user's folder holds them
        write_png(data / "protected" / f"{i:05d}.png", noisy.astype(np.uint8))
        write_png(data / "original" / f"{i:05d}.png", crop, "deflate")
    entries = [e for e in load_suite(suite)
               if e.attack != "learned_denoiser" and e.kind == "batch"]
    suite_file = tmp / "suite.toml"
    suite_file.write_text("".join(
        f'[[attack]]\nname = "{e.attack}"\n' + "".join(
            f"{k} = {list(v) if isinstance(v, tuple) else v}\n" for k, v in e.params) + "\n"
        for e in entries))
    torch_device = torch.device(device)
    # both measured warm: a whole first pass of each loads the kernels of every attack and
    # batch shape it uses (the job's nondeterminism re-run has a shape of its own) and fills
    # the caches; a cold process pays that once, which a long audit does not notice
    bare_loop(data, entries, torch_device, batch, compile_models)
    audit(data, ZOO[1:], authorized=ZOO[0], suite=suite_file, out=tmp / "warm", device=device,
          batch_size=batch, quiet=True, score="agreement", compile_models=compile_models)
    bare_setup, bare_body = bare_loop(data, entries, torch_device, batch, compile_models)
    bare = bare_setup + bare_body
    job = timed(lambda: audit(data, ZOO[1:], authorized=ZOO[0], suite=suite_file,
                              out=tmp / "run", device=device, batch_size=batch, quiet=True,
                              score="agreement", compile_models=compile_models))
    profiled(lambda: audit(data, ZOO[1:], authorized=ZOO[0], suite=suite_file,
                           out=tmp / "run-profiled", device=device, batch_size=batch,
                           quiet=True, score="agreement"))
    units = count * len(ZOO) * (len(entries) + 2)
    precision = json.loads((tmp / "run" / "config.json").read_text())["precision"]
    print(f"audit {count} images 224×224 × {len(ZOO)} models × {len(entries)} attacks "
          f"({suite} without training attacks), batch {batch}, {device}, forwards in {precision}"
          f"{', forwards compiled (job and bare loop)' if compile_models else ''}:")
    print(f"  job {job:.1f} s ({units / job:,.0f} image·model evaluations/s) | bare loop "
          f"{bare:.1f} s ({units / bare:,.0f}/s) | job / bare = {job / bare:.2f}")
    phases = json.loads((tmp / "run" / "run.json").read_text())["phases"]
    print("  job phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
          + f" | bare loop: setup {bare_setup:.1f} s, loop {bare_body:.1f} s | job tasks / bare "
          f"loop = {phases['tasks'] / bare_body:.2f}")


def flops(device: str) -> None:
    """The device's matmul rate in fp32 and, where it has bf16 units, in bf16 (the audit's
    forwards run in that by default)."""
    n = 4096 if device == "cuda" else 1024
    formats = {"fp32": torch.float32}
    if resolve_precision("auto", torch.device(device)) == "bf16":
        formats["bf16"] = torch.bfloat16
    for name, dtype in formats.items():
        a = torch.randn(n, n, device=device, dtype=dtype)
        a @ a
        seconds = timed(lambda a=a: [a @ a for _ in range(10)])
        print(f"matmul {n}×{n} {name} on {device}: {10 * 2 * n**3 / seconds / 1e12:.2f} "
              "TFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--audit-images", type=int)
    parser.add_argument("--suite", default="smoke")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--skip", choices=("protect", "audit"))
    parser.add_argument("--writers", choices=("both", "processes", "threads"), default="both",
                        help="PNG writer kinds to time protect with")
    parser.add_argument("--png-compression", nargs="+", default=["none"],
                        choices=("none", "deflate"), help="protect's PNG settings to time")
    parser.add_argument("--inputs", choices=("png", "jpeg"), default="png",
                        help="protect's clean inputs: 224×224 PNGs, or JPEGs of ImageNet's "
                             "sizes that the job resizes")
    parser.add_argument("--profile", action="store_true", help="cProfile the two jobs")
    parser.add_argument("--reader-sweep", action=argparse.BooleanOptionalAction, default=True,
                        help="time protect's reading floor with 1, 2, 4 and 8 reader processes")
    parser.add_argument("--compile-models", action="store_true",
                        help="time the audit with torch.compile'd forwards (bare loop too)")
    parser.add_argument("--zoo", help="comma-separated model specs for the audit, authorized "
                        "first (default: ResNet-50, ConvNeXt-T, ViT-S/16); small models on a "
                        "CPU show the engine's own overhead, as a fast GPU would")
    args = parser.parse_args()
    global PROFILE, READER_SWEEP, ZOO
    PROFILE, READER_SWEEP = args.profile, args.reader_sweep
    ZOO = args.zoo.split(",") if args.zoo else ZOO
    flops(args.device)
    # the jobs keep the memory they free (neaudit.device.retained_heap); their limits are
    # measured with the same allocator settings, in the same process
    with retained_heap(), tempfile.TemporaryDirectory() as tmp:
        if args.skip != "protect":
            protect_bench(Path(tmp), args.images, args.device, args.batch, args.writers,
                          args.png_compression, args.inputs)
        if args.skip != "audit":
            audit_bench(Path(tmp), args.audit_images or args.images, args.device, args.suite,
                        args.batch, args.compile_models)


if __name__ == "__main__":
    main()
