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
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from neaudit import demo_zoo
from neaudit.auditing import audit
from neaudit.demo import digits_test_set
from neaudit.protection import protect

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400, help="demo digits to protect")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="reports/bench-rx")
    parser.add_argument("--only", choices=["demo", "samples"], help="run one setting")
    args = parser.parse_args()
    frames = []
    for name, setting in settings(args.images).items():
        if args.only and name != args.only:
            continue
        for method in ("subspace", "reference"):
            out = Path(args.out) / f"{name}-{method}"
            protect(setting["data"], setting["authorized"], out / "data", method=method,
                    psnr=setting["psnr"], save_originals=True, device=args.device)
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
