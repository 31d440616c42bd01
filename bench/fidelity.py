"""Fidelity of both NE constructions across stems, measured on the written uint8 images.

One row per (architecture, method) on the 32 built-in photo crops at 64×64, random-init
models; ``subspace¼`` puts the same energy into a quarter of the patches (patch stems only).
Run: ``python bench/fidelity.py``.
"""

from __future__ import annotations

import tempfile

import torch

from neaudit.protection import protect
from neaudit.stem import first_layer
from neaudit.zoo import create_model

ARCHITECTURES = [
    "timm:vit_small_patch16_224?img_size=64&num_classes=10",
    "timm:convnext_atto?num_classes=10&input_size=64",
    "timm:resnet50?num_classes=10&input_size=64",
    "timm:efficientnet_b0?num_classes=10&input_size=64",
]


def main() -> None:
    torch.set_num_threads(2)
    header = (f"{'model':<24} {'stem':<12} {'method':<9} {'gain':>7} {'iso':>7} {'ratio':>7} "
              f"{'rel.chg':>8} {'agree':>6} {'noise':>6} {'PSNR':>6} {'PSNRfl':>7} {'agr.fl':>6}")
    print(header)
    for spec in ARCHITECTURES:
        torch.manual_seed(0)
        model = create_model(spec)
        layer = first_layer(model)
        stem = f"{'overlap' if layer.overlapping else 'patch'} {layer.kernel[0]}/{layer.stride[0]}"
        variants = [("subspace", "subspace", 1.0), ("reference", "reference", 1.0)]
        if not layer.overlapping:
            variants.insert(1, ("subspace¼", "subspace", 0.25))
        for label, method, fraction in variants:
            with tempfile.TemporaryDirectory() as tmp:
                s = protect("builtin:samples", model, tmp, method=method,
                            patch_fraction=fraction).summary
            name = spec.split(":")[1].split("?")[0]
            print(f"{name:<24} {stem:<12} {label:<9} {s['gain']:>7.4f} "
                  f"{s['isotropic_gain']:>7.4f} {s['gain'] / s['isotropic_gain']:>7.4f} "
                  f"{s['relative_change']:>8.4f} {s['agreement']:>6.3f} "
                  f"{s['noise_agreement']:>6.3f} {s['psnr']:>6.2f} "
                  f"{s.get('psnr_float', float('nan')):>7.2f} "
                  f"{s.get('agreement_float', float('nan')):>6.3f}")


if __name__ == "__main__":
    main()
