"""Where subspace recoding spends its time on CUDA (ViT-B/16 and ResNet-50 stems, 224×224)."""

import time

import torch
from torch.profiler import ProfilerActivity, profile

from neaudit.data import builtin_dataset
from neaudit.imageio import to_float
from neaudit.ne import image_generators, subspace_recode
from neaudit.spectral import low_sensitivity_subspace
from neaudit.stem import first_layer
from neaudit.zoo import create_model

clean = to_float(builtin_dataset("samples", count=64, size=224).protected).cuda()
for spec in ("timm:vit_base_patch16_224", "timm:resnet50"):
    space = low_sensitivity_subspace(first_layer(create_model(spec)), (224, 224))
    gens = image_generators(0, torch.arange(64))
    subspace_recode(clean, space, 30.0, gens)
    torch.cuda.synchronize()
    start = time.perf_counter()
    subspace_recode(clean, space, 30.0, image_generators(0, torch.arange(64)))
    torch.cuda.synchronize()
    print(spec, f"{64 / (time.perf_counter() - start):.1f} img/s")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        subspace_recode(clean, space, 30.0, image_generators(0, torch.arange(64)))
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14))
