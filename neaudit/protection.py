"""``neaudit protect``: recode a clean dataset into NEs for one authorized model and write it.

Writes ``OUT/protected/<relative path>.png`` (or ``OUT/protected.npz``), optionally the clean
originals under ``OUT/original/`` at the same relative paths, ``OUT/neaudit.json`` (the
authorized spec, the recoding parameters, the fidelity summary and a content digest) and
``OUT/hashes.sha256`` (``sha256sum -c`` format). Every fidelity figure is measured on the
uint8 images exactly as written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from neaudit._version import __version__
from neaudit.arguments import checked
from neaudit.bars import progress_bar
from neaudit.data import (
    HASHES,
    ORIGINAL_DIR,
    PROTECTED_DIR,
    SIDECAR,
    load_dataset,
)
from neaudit.dataset import ImageDataset
from neaudit.device import chunks, free_memory_short_of, resolve_device, retained_heap
from neaudit.errors import NeauditError
from neaudit.fidelity import Kept, ModelPreview, fidelity_sample, measure, measured_columns
from neaudit.imageio import (
    PNG_COMPRESSIONS,
    quantize,
    to_grid,
    to_uint8,
)
from neaudit.metrics import isotropic_gain
from neaudit.models import split_name
from neaudit.ne import METHODS, reference_recode, release_key, subspace_recode
from neaudit.paths import OutputTree, refuse_overlap
from neaudit.pipeline import PngWriter, on_device, read_ahead
from neaudit.progress import BatchRecord, Progress, key_tag
from neaudit.release import (
    existing_outputs,
    output_names,
    output_trees,
    write_npz,
    write_sidecar,
)
from neaudit.seeding import NOISE_GENERATOR
from neaudit.spectral import Subspace, low_sensitivity_subspace
from neaudit.stem import FirstLayer, first_layer
from neaudit.zoo import ImageClassifier, check_model, create_model

FIDELITY_IMAGES = 64
"""Images the authorized model is run on (three forwards each) to preview its agreement."""

UNREAD_EXAMPLES = 3
"""Item names kept as examples of each thing the inputs show and the NEs do not."""

CUDA_BATCH_SIZE = 256
"""Images a batch holds on CUDA unless told otherwise: the size ``bench/gpu.sh`` measures the
job at. Each batch costs the device thread a few synchronizations and a hand-over to the
writers, which 32-image batches (the CPU default: a CPU recodes in cache-sized chunks inside a
batch anyway) would pay eight times as often. The NEs written do not depend on it."""

MAX_PSNR = 55.0
"""Uint8 rounding alone is a 59 dB perturbation: a higher measured target cannot be written
(the published construction's *nominal* PSNR counts the image itself and has no such bound)."""

KEY_BITS = 128
"""Bits of a key ``protect`` draws. Every bit reaches the noise (a 256-bit generator key is
derived from it: :func:`neaudit.ne.noise_key`), so finding the noise means searching them all."""


@dataclass
class ProtectResult:
    """What ``protect`` returns: where it wrote, per-image fidelity and its summary, and how
    many images it found written by a stopped run of the same command."""

    out: Path
    per_image: pd.DataFrame
    summary: dict[str, float]
    sidecar: dict
    resumed: int = 0
    """Images an earlier run of the same command had written, kept as they were."""


@retained_heap()  # the job's batches reuse the memory the last one freed
@checked
def protect(data: str | Path | ImageDataset, authorized: str | ImageClassifier,
            out: str | Path, method: str = "subspace", psnr: float = 30.0,
            rank: int | None = None, threshold: float | None = None, seed: int = 0,
            key: int | None = None, store_key: bool = False, save_originals: bool = False,
            output_format: str = "png", batch_size: int | None = None, tau: float = 1e-2,
            patch_fraction: float = 1.0, l2: float | None = None,
            device: str = "auto", allow_outside: bool = False,
            fidelity_images: int = FIDELITY_IMAGES, png_compression: str = "none",
            quiet: bool = False) -> ProtectResult:
    """Recode ``data`` into NEs for ``authorized`` and write them under ``out``.

    ``key`` seeds the noise inside the subspace. It must stay secret: anyone who has it can
    regenerate each image's noise and subtract it. Without one, a fresh key is drawn from the
    operating system's random source (two runs then write different NEs; pass ``key`` to
    repeat a release). It is recorded in the sidecar only with ``store_key=True``; ``seed``
    (recorded) drives only the measurement's own draws. For ``reference``, ``psnr`` is the paper's
    *nominal* PSNR; the measured one is reported next to it. ``l2`` (``subspace``) sets the
    strength as the L2 norm of each written perturbation in [0, 1] pixel units instead, the
    convention of L2 robustness benchmarks. ``patch_fraction`` < 1 (``subspace``, patch
    stems) puts the noise into that share of each image's patches: the authorized model sees
    less of it, the other models more of the clean image. ``allow_outside`` reads input files
    outside the dataset's folder (see :mod:`neaudit.paths`); outputs always stay in ``out``.
    The authorized model's agreement and logit figures are measured on ``fidelity_images``
    evenly spaced images (a preview: the audit measures utility on every image); the pixel
    and first-layer figures on every image. ``png_compression``: ``none`` (the default: ten
    times faster to write, files a third larger) or ``deflate``
    (:data:`neaudit.imageio.PNG_COMPRESSIONS`); the pixels are the same either way, and for
    every ``batch_size`` (by default :data:`CUDA_BATCH_SIZE` on CUDA, 32 elsewhere). A progress
    bar on stderr counts the images recoded, unless ``quiet``.
    """
    _check_options(method, psnr, l2, rank, threshold, patch_fraction, output_format,
                   batch_size, png_compression)
    if fidelity_images < 1:
        raise NeauditError(f"--fidelity-images {fidelity_images}: must be at least 1.")
    dataset = (data if isinstance(data, ImageDataset)
               else load_dataset(data, allow_outside=allow_outside))
    out = Path(out)
    refuse_overlap(out, dataset.input_roots())
    names = output_names(dataset) if output_format == "png" else []
    trees = output_trees(out, names, save_originals)
    planned = {tree.path(name) for tree in trees.values() for name in names}
    written, leftovers = existing_outputs(out, [PROTECTED_DIR, ORIGINAL_DIR], planned)
    if isinstance(authorized, str):
        authorized = split_name(authorized)[1]  # a display name does not name the weights
    noise_key = secrets.randbits(KEY_BITS) if key is None else key
    progress = Progress(out, _identity(dataset, authorized, method, psnr, l2, rank, threshold,
                                       tau, patch_fraction, seed, key, store_key,
                                       save_originals, fidelity_images, png_compression),
                        noise_key if key is None and store_key else None) if names else None
    if progress is not None and progress.key is not None:
        noise_key = progress.key  # the stopped run's, which its sidecar will hold
    torch_device = resolve_device(device)
    if batch_size is None:
        batch_size = CUDA_BATCH_SIZE if torch_device.type == "cuda" else 32
    model = create_model(authorized, dataset.class_names).to(torch_device)
    size = tuple(model.input_size or dataset.image_shape)
    if tuple(dataset.image_shape) != size:  # recode at the resolution the stem sees
        dataset = replace(dataset, resize=size)
    if output_format == "npz":
        _check_npz_memory(len(dataset), size, save_originals)
    check_model(model, next(dataset.batches(min(4, len(dataset)))).protected)
    layer = first_layer(model, size)
    if l2 is not None:  # the PSNR of a perturbation with this norm: one target for every image
        psnr = _l2_psnr(l2, size)
    space = low_sensitivity_subspace(layer, size, rank, threshold) if method == "subspace" else None
    if patch_fraction < 1.0 and (space is None or layer.overlapping):
        raise NeauditError(f"--patch-fraction applies to the subspace method on a patch stem; "
                           f"{model.name} with --method {method} has none. Fix: drop the option.")
    salt = _noise_salt(dataset, model.name, method, psnr, space, threshold, tau,
                       patch_fraction, size)
    recoding = _Recoding(model, layer, space, method, psnr, release_key(noise_key, salt), seed,
                         tau, patch_fraction, fidelity_sample(len(dataset), fidelity_images),
                         isotropic_gain(layer, (3, *size)))
    done = progress.records(names, (3, *size), measured_columns(method == "reference"),
                            recoding.sampled.numpy(), written,
                            list(trees.values())) if progress else []
    for path in leftovers:  # checks passed: the work, and so the writing, starts
        os.unlink(path)
    for stale in (out / SIDECAR, out / HASHES):  # an earlier release's: they would vouch for
        stale.unlink(missing_ok=True)  # the files this run replaces, were it stopped
    if progress is not None:
        progress.begin()
    per_image, digests, unread = _recode_all(dataset, recoding, out, names, trees, batch_size,
                                             save_originals, output_format, png_compression,
                                             progress, done, quiet)
    summary = {col: float(per_image[col].mean()) for col in per_image.columns if col != "name"}
    summary["min_gain"] = space.min_gain if space is not None else float("nan")
    params = {
        "psnr": psnr, "psnr_is_nominal": method == "reference", "l2": l2,
        "rank": space.rank if space is not None else None,
        "rank_requested": rank, "threshold": threshold,
        "tau": tau if method == "reference" else None,
        "patch_fraction": patch_fraction if method == "subspace" else None,
        "seed": seed, "key": noise_key if store_key else None, "key_stored": store_key,
        "key_source": "random" if key is None else "given", "noise_generator": NOISE_GENERATOR,
        "noise_salt": salt,
        "key_bits": None if key is None else abs(key).bit_length(),
        "image_size": list(size), "fidelity_images": min(fidelity_images, len(dataset)),
        "png_compression": png_compression if output_format == "png" else None,
    }
    sidecar = write_sidecar(out, dataset, model, method, params, summary, names, digests, unread)
    if progress is not None:
        progress.finish()
    return ProtectResult(out, per_image, summary, sidecar,
                         resumed=sum(record.stop - record.start for record in done))


def _noise_salt(dataset: ImageDataset, spec: str, method: str, psnr: float,
                space: Subspace | None, threshold: float | None, tau: float,
                patch_fraction: float, size: tuple[int, ...]) -> str:
    """What binds a release's noise to its own settings and items (:func:`neaudit.ne.release_key`):
    a digest of every setting that shapes the NEs and of the item names, in their order. Public
    (the sidecar's ``noise_salt``): it separates releases, the key keeps each one secret."""
    settings = {
        "authorized": spec, "method": method, "psnr": psnr, "tau": tau,
        "rank": space.rank if space is not None else None, "threshold": threshold,
        "patch_fraction": patch_fraction, "image_size": list(size),
        "items": _items_digest(dataset),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def _items_digest(dataset: ImageDataset) -> str:
    """The item names, in their order (each item's number keys its noise)."""
    return hashlib.sha256(json.dumps(dataset.names).encode()).hexdigest()


def _identity(dataset: ImageDataset, authorized: str | ImageClassifier, method: str,
              psnr: float, l2: float | None, rank: int | None, threshold: float | None,
              tau: float, patch_fraction: float, seed: int, key: int | None, store_key: bool,
              save_originals: bool, fidelity_images: int, png_compression: str) -> dict:
    """What a stopped run must share with the one that resumes it (:mod:`neaudit.progress`):
    the items, every setting that shapes a written byte or a recorded figure, and the key as
    a tag (a given key) or as drawn (:class:`neaudit.progress.Progress` keeps a drawn key
    only when the sidecar will hold it anyway)."""
    spec = authorized if isinstance(authorized, str) else authorized.name
    return {
        "neaudit_version": __version__, "noise_generator": NOISE_GENERATOR,
        "source": str(dataset.source), "count": len(dataset),
        "items": _items_digest(dataset), "authorized": spec, "method": method, "psnr": psnr,
        "l2": l2, "rank": rank, "threshold": threshold, "tau": tau,
        "patch_fraction": patch_fraction, "seed": seed, "save_originals": save_originals,
        "fidelity_images": fidelity_images, "png_compression": png_compression,
        "key_stored": store_key,
        "key": key_tag(key) if key is not None else "drawn, stored" if store_key else "drawn",
    }


def _check_options(method: str, psnr: float, l2: float | None, rank: int | None,
                   threshold: float | None, patch_fraction: float, output_format: str,
                   batch_size: int | None, png_compression: str) -> None:
    """Refuse settings that would write something other than what was asked for."""
    if method not in METHODS:
        raise NeauditError(f"unknown method '{method}'. Fix: use one of {', '.join(METHODS)}.")
    highest = MAX_PSNR if method == "subspace" else math.inf  # reference: a nominal figure
    if not (math.isfinite(psnr) and 0 < psnr <= highest):
        raise NeauditError(f"--psnr {psnr}: the strength must be a finite PSNR in (0, "
                           f"{highest:g}] dB (above {MAX_PSNR:g} dB uint8 rounding alone is as "
                           "large as the noise). Fix: give e.g. --psnr 30.")
    if l2 is not None and (method != "subspace" or not (math.isfinite(l2) and l2 > 0)):
        raise NeauditError(f"--l2 {l2}: an L2 strength needs the subspace method and a positive "
                           "norm (the published construction sets its strength from a nominal "
                           "PSNR). Fix: use --method subspace with --l2 > 0, or --psnr.")
    for option, value in (("--rank", rank), ("--threshold", threshold)):
        if value is not None and method != "subspace":  # it would be recorded, not used
            raise NeauditError(f"{option} {value}: the {method} construction selects no "
                               f"subspace. Fix: drop {option}, or use --method subspace.")
    if png_compression != "none" and output_format == "npz":
        raise NeauditError(f"--png-compression {png_compression}: --format npz writes no PNG "
                           "(its arrays are zip-compressed). Fix: drop --png-compression, or "
                           "write PNGs.")
    if rank is not None and rank < 1:
        raise NeauditError(f"--rank {rank}: the subspace needs at least one dimension. Fix: "
                           "give a positive rank, or leave it out for the default.")
    if not 0.0 < patch_fraction <= 1.0:
        raise NeauditError(f"--patch-fraction {patch_fraction} is outside (0, 1]. Fix: give "
                           "the share of patches that carry noise, e.g. 0.25.")
    if output_format not in ("png", "npz"):
        raise NeauditError(f"unknown format '{output_format}'. Fix: use png or npz.")
    if batch_size is not None and batch_size < 1:
        raise NeauditError(f"--batch-size {batch_size}: must be at least 1.")
    if png_compression not in PNG_COMPRESSIONS:
        raise NeauditError(f"unknown --png-compression '{png_compression}'. Fix: use "
                           f"{' or '.join(PNG_COMPRESSIONS)}.")


def _check_npz_memory(count: int, size: tuple[int, int], save_originals: bool) -> None:
    """Refuse ``--format npz`` for a release larger than the host's free memory, which holds
    it whole until the one file is written (a process killed for memory says nothing)."""
    need = count * 3 * size[0] * size[1] * (2 if save_originals else 1)
    free = free_memory_short_of(need)
    if free is not None:
        what = "images and their originals" if save_originals else "images"
        raise NeauditError(f"--format npz: the release is held in memory until its one file is "
                           f"written, {need / 2**30:.1f} GiB for {count} {what} of "
                           f"{size[0]}×{size[1]}, and this machine has {free / 2**30:.1f} GiB "
                           "free. Fix: write PNGs (--format png, the default), which stream.")


def _l2_psnr(l2: float, size: tuple[int, int]) -> float:
    """The measured PSNR of an RGB perturbation with L2 norm ``l2`` on ``size`` images;
    refused outside (0, MAX_PSNR] like ``--psnr`` (a smaller norm than uint8 rounding allows
    would write copies of the originals)."""
    pixels = 3 * size[0] * size[1]
    psnr = 10 * math.log10(pixels / l2**2)
    if not 0 < psnr <= MAX_PSNR:
        low, high = math.sqrt(pixels / 10 ** (MAX_PSNR / 10)), math.sqrt(pixels)
        raise NeauditError(f"--l2 {l2:g}: on {size[0]}×{size[1]} images that is a PSNR of "
                           f"{psnr:.1f} dB, outside (0, {MAX_PSNR:g}] dB. Fix: give an L2 norm "
                           f"between {low:.3g} and {high:.3g} (below the first, uint8 rounding "
                           "alone is as large as the noise).")
    return psnr


@dataclass(frozen=True)
class _Recoding:
    """The recoding of one run: the authorized model, its stem and subspace, and settings."""

    model: ImageClassifier
    layer: FirstLayer
    space: Subspace | None
    method: str
    psnr: float
    key: int
    seed: int
    tau: float
    patch_fraction: float
    sampled: torch.Tensor  # the items the model preview runs on (:func:`fidelity_sample`)
    noise_gain: float  # the gain of isotropic noise, the fidelity table's control

    def __call__(self, clean: torch.Tensor, index: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The written NEs (on the uint8 grid) and, for ``reference``, the float output;
        recoded in cache-sized chunks on a CPU (:func:`neaudit.device.chunks`)."""
        parts = [self._recode(clean[part], index[part])
                 for part in chunks(clean)]
        protected = torch.cat([written for written, _ in parts])
        return protected, None if self.method == "subspace" else torch.cat(
            [floats for _, floats in parts])

    def _recode(self, clean: torch.Tensor, index: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.method == "subspace":
            return subspace_recode(clean, self.space, self.psnr, self.key, index,
                                   self.patch_fraction), None
        floats = reference_recode(clean, self.layer, self.psnr, self.key, index, self.tau)
        return quantize(floats), floats


def _recode_all(dataset: ImageDataset, recoding: _Recoding, out: Path,
                names: list[str], trees: dict[str, OutputTree], batch_size: int,
                save_originals: bool, output_format: str, png_compression: str,
                progress: Progress | None, done: list[BatchRecord], quiet: bool
                ) -> tuple[pd.DataFrame, list[str], dict[str, dict]]:
    """Recode and write every batch not ``done`` by a stopped run, the next batch decoded and
    the previous ones written while the device works on the current one, each checkpointed
    in ``progress`` once its files are written; returns the per-image fidelity table, the
    SHA-256 of each protected PNG, in the order of ``names``, and what the inputs show that
    the NEs do not (:func:`_unread`)."""
    device = recoding.model.mean.device
    preview = ModelPreview(recoding.model, recoding.seed, recoding.sampled)
    fidelity: dict[int, pd.DataFrame] = {}
    written: np.ndarray | None = None  # with --format npz: the release, and its originals
    originals: np.ndarray | None = None
    unread: dict[str, dict] = {}
    protected_tree, original_tree = trees[PROTECTED_DIR], trees.get(ORIGINAL_DIR)
    digests: dict[str, str] = {}
    covered = np.zeros(len(dataset), bool)
    for record in done:  # in item order, as the stopped run added them
        fidelity[record.start] = record.fidelity
        if len(record.preview_index):
            preview.keep(_restored(record, device))
        _unread(unread, record.unread)
        digests.update(zip([protected_tree.path(n) for n in names[record.start:record.stop]],
                           record.digests, strict=True))
        covered[record.start:record.stop] = True
    with (PngWriter(compression=png_compression) as writer,
          progress_bar(len(dataset), "protect", "img", quiet, int(covered.sum())) as advance):
        for batch in read_ahead(dataset, batch_size, pin_memory=device.type == "cuda",
                                on_grid=True, done=covered):
            _unread(unread, batch.unread)
            clean = on_device(batch.protected, device)
            protected, floats = recoding(clean, batch.index)
            start, stop = int(batch.index[0]), int(batch.index[-1]) + 1
            rows = fidelity[start] = measure(recoding.layer, recoding.noise_gain, clean,
                                             protected, floats)
            kept = preview.add(clean, protected, floats, batch.index)
            if advance is not None:
                advance(stop - start)
            images = to_uint8(protected)
            # the originals as read, already uint8 on the host: nothing copied back
            clean_images = batch.protected.permute(0, 2, 3, 1).numpy() if save_originals else None
            if output_format == "npz":  # kept to the end, each image copied once
                if written is None:
                    written = np.empty((len(dataset), *images.shape[1:]), np.uint8)
                    originals = np.empty_like(written) if save_originals else None
                written[start:stop] = images
                if originals is not None:
                    originals[start:stop] = clean_images
                continue
            paths = [protected_tree.path(name) for name in names[start:stop]]
            writer.write(paths, images)
            if save_originals:
                writer.write([original_tree.path(name) for name in names[start:stop]],
                             clean_images)
            if progress is not None:
                writer.then(functools.partial(_checkpoint, progress, writer.digests, paths,
                                              start, rows, kept, batch.unread,
                                              tuple(clean.shape[1:])))
        writer.close()  # every file written and recorded; the writers end while the preview runs
        previewed = preview.table()
    digests.update(writer.digests)
    per_image = pd.concat([fidelity[start] for start in sorted(fidelity)],
                          ignore_index=True).join(previewed)
    per_image.insert(0, "name", dataset.names)
    if output_format == "npz":
        write_npz(out, dataset, written, originals)
    return per_image, [digests[protected_tree.path(name)] for name in names], unread


def _checkpoint(progress: Progress, digests: dict[str, str], paths: list[str], start: int,
                rows: pd.DataFrame, kept: Kept | None, unread: dict[str, list[str]],
                image_shape: tuple[int, ...]) -> None:
    """Record one batch whose files are written (:meth:`PngWriter.then`); its preview items
    come back from the device only now, long after it computed them."""
    images = (np.zeros((0, 3, *image_shape), np.uint8) if kept is None else
              torch.stack([to_grid(part) for part in kept[1:4]], dim=1).cpu().numpy())
    progress.save(BatchRecord(
        start, start + len(paths), rows, [digests[path] for path in paths],
        np.zeros(0, np.int64) if kept is None else kept[0].numpy(), images,
        kept[4].cpu().numpy() if kept is not None and len(kept) > 4 else None, unread))


def _restored(record: BatchRecord, device: torch.device) -> Kept:
    """A record's preview items as :meth:`ModelPreview.add` kept them, bit for bit: the clean
    images as read (:func:`neaudit.pipeline.on_device`), the written NE and the noise control
    as the device computed them, levels divided by 255 there."""
    images = torch.from_numpy(record.preview_images)
    on_grid = images[:, 1:].to(device).float().div_(255.0)
    kept = (torch.from_numpy(record.preview_index), on_device(images[:, 0], device),
            on_grid[:, 0], on_grid[:, 1])
    floats = record.preview_floats
    return kept if floats is None else (*kept, torch.from_numpy(floats).to(device))


def _unread(tally: dict[str, dict], batch_unread: dict[str, list[str]]) -> None:
    """Add one batch's inputs that show what reading left out (transparency, an EXIF
    orientation: :data:`neaudit.imageio.UNREAD`) to ``tally``: a count and the first
    :data:`UNREAD_EXAMPLES` item names of each, for the sidecar and the command's notes."""
    for what, items in batch_unread.items():
        entry = tally.setdefault(what, {"count": 0, "examples": []})
        entry["count"] += len(items)
        entry["examples"] += items[:UNREAD_EXAMPLES - len(entry["examples"])]
