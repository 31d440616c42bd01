"""GPU benchmark, side by side with this machine's CPUs in one run: the full demo audit
(540 digits, 6 models, the standard suite) on CUDA and on the CPU, as images/s × models ×
attacks. Run by bench/gpu.sh."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from neaudit import demo_zoo
from neaudit.attacks import load_suite
from neaudit.demo import digits_test_set
from neaudit.engine import audit
from neaudit.protection import protect


def main() -> None:
    dataset = digits_test_set()
    others = [f"demo:{n}" for n in demo_zoo.ARCHITECTURES if f"demo:{n}" != demo_zoo.AUTHORIZED]
    attacks = len(load_suite("standard")) + 2
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        protect(dataset, demo_zoo.AUTHORIZED, Path(tmp) / "data", psnr_target=20,
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
