"""Reconstruction attacks old and new, side by side: leakage and reconstruction quality per
attack and threat level, for `subspace` and `reference` NEs, on two settings.

* ``demo``: the demo digits (32×32) protected for ``demo:patch_cnn`` at 20 dB, audited
  against the five other shipped models (accuracy).
* ``samples``: ``builtin:samples`` (64×64) protected for a random-init timm ViT-S/16 at 30 dB,
  audited against random-init ConvNeXt-atto, ResNet-18 and DeiT-tiny (agreement with each
  model's clean predictions).

Each setting runs the ``reconstruction`` suite (plus ``none``) through ``neaudit.audit`` and
prints, per attack: its threat level, the mean and worst leakage over the unauthorized
models, the authorized model's utility retention, and the PSNR/SSIM of the attacker's output
to the clean originals, with the seconds the audit took.

    python bench/reconstruction.py [--images 400] [--device auto] [--out reports/bench-rx]
    python bench/reconstruction.py --costs --size 224 --device cuda   # training costs only
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from neaudit import demo_zoo
from neaudit.attacks import AttackContext, get_attack
from neaudit.attacks.adaptive import known_subspace
from neaudit.attacks.purify import train_denoiser
from neaudit.attacks.reconstruct import train_ddpm, train_restorer
from neaudit.auditing import audit
from neaudit.data import builtin_dataset
from neaudit.demo import digits_test_set
from neaudit.imageio import quantize, to_float
from neaudit.ne import subspace_recode
from neaudit.protection import protect
from neaudit.zoo import create_model

VIT = "timm:vit_small_patch16_224?img_size=64&num_classes=10"
SAMPLES_ZOO = ["timm:convnext_atto?num_classes=10&input_size=64",
               "timm:resnet18?num_classes=10&input_size=64",
               "timm:deit_tiny_patch16_224?img_size=64&num_classes=10"]


def settings(images: int) -> dict[str, dict]:
    demo_others = [f"demo:{name}" for name in demo_zoo.ARCHITECTURES
                   if f"demo:{name}" != demo_zoo.AUTHORIZED]
    return {
        "demo": dict(data=digits_test_set(images), authorized=demo_zoo.AUTHORIZED, psnr=20.0,
                     zoo=demo_others, score="accuracy"),
        "samples": dict(data="builtin:samples", authorized=VIT, psnr=30.0, zoo=SAMPLES_ZOO,
                        score="agreement"),
    }


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """One row per attack: threat, leakage (mean and worst), retention, PSNR, SSIM."""
    rows = table[table.attack != "clean"]
    value = rows.pivot_table(index=["attack", "threat"], columns="metric", values="value",
                             aggfunc="mean")
    leak = rows[rows.metric == "leakage"].groupby("attack").value
    return pd.DataFrame({
        "threat": value.index.get_level_values("threat"),
        "leakage_mean": leak.mean().reindex(value.index.get_level_values("attack")).values,
        "leakage_worst": leak.max().reindex(value.index.get_level_values("attack")).values,
        "retention": value["utility_retention"].values,
        "psnr_db": value["psnr"].values,
        "ssim": value["ssim"].values,
    }, index=value.index.get_level_values("attack")).sort_values(["threat", "attack"])


def costs(device: str, size: int, images: int = 256) -> None:
    """Seconds each trained network takes to train at its defaults, and each attack takes
    per 64 images once trained, for a ViT-S/16 release at ``size``×``size``."""
    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                else "cpu" if device == "auto" else device)
    spec = f"timm:vit_small_patch16_224?img_size={size}&num_classes=10"
    model = create_model(spec).to(torch_device)
    reference = to_float(builtin_dataset("samples", count=images, size=size).protected)
    ctx = AttackContext(generator=torch.Generator().manual_seed(0), device=torch_device,
                        reference=reference, extras={"surrogates": {spec: model},
                                                     "authorized": spec})
    clean = quantize(reference[:64]).to(torch_device)
    _, space = known_subspace(clean, ctx, "bench")
    release = subspace_recode(clean, space, 30.0, 7, torch.arange(64, device=torch_device))

    def seconds(work) -> float:
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    print(f"\n## training costs at {size}×{size}, {images} reference images, {torch_device}\n")
    trainings = {
        "learned_denoiser (150 steps)": lambda: train_denoiser(reference, 0.03, 150, 0, ctx),
        "simulate_invert (400 steps)": lambda: train_restorer(release, ctx, space, 400, 64, 32,
                                                              0.0, spec),
        "diffusion_purify (400 steps)": lambda: train_ddpm(ctx, release, 400, 64, 32),
    }
    for label, train in trainings.items():
        print(f"{label:<36} {seconds(train):7.1f} s to train")
    for name in ("simulate_invert_known", "subspace_prior", "diffusion_purify",
                 "known_model_projection"):
        attack = get_attack(name)
        attack(release, ctx)  # trains (cached in ctx.extras) or warms up
        print(f"{name + ' on 64 images':<36} {seconds(lambda a=attack: a(release, ctx)):7.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400, help="demo digits to protect")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="reports/bench-rx")
    parser.add_argument("--only", choices=["demo", "samples"], help="run one setting")
    parser.add_argument("--costs", action="store_true", help="time the training only")
    parser.add_argument("--size", type=int, default=64, help="image size for --costs")
    args = parser.parse_args()
    if args.costs:
        costs(args.device, args.size)
        return
    frames = []
    for name, setting in settings(args.images).items():
        if args.only and name != args.only:
            continue
        for method in ("subspace", "reference"):
            out = Path(args.out) / f"{name}-{method}"
            protect(setting["data"], setting["authorized"], out / "data", method=method,
                    psnr=setting["psnr"], save_originals=True, device=args.device,
                    key=0)  # a fixed key: the table repeats run to run
            started = time.perf_counter()
            result = audit(out / "data", [setting["authorized"], *setting["zoo"]],
                           suite="reconstruction", out=out / "audit", score=setting["score"],
                           device=args.device, quiet=True)
            seconds = time.perf_counter() - started
            summary = summarize(result.table)
            print(f"\n## {name}, {method} NEs at {setting['psnr']:g} dB "
                  f"(audit {seconds:.0f} s, device {args.device})\n")
            print(summary.round(3).to_string())
            frames.append(summary.assign(setting=name, method=method))
    pd.concat(frames).to_csv(Path(args.out) / "reconstruction.csv")


if __name__ == "__main__":
    main()
