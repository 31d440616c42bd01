"""Audit throughput with the local executor and with 1 and 2 Ray workers on this machine,
side by side, with the scaling efficiency (2-worker speed-up / 2).
Run: ``pip install -e '.[ray,bench]' && python bench/scale.py [--images 256]``."""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import ray

from neaudit.auditing import audit
from neaudit.executors import RayExecutor

# the release and zoo of bench/audit.py, loaded from beside this file (bench/ is not a package)
_spec = importlib.util.spec_from_file_location("bench_audit", Path(__file__).with_name("audit.py"))
_bench_audit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench_audit)
ZOO, make_release = _bench_audit.ZOO, _bench_audit.make_release


def timed_audit(data: Path, out: Path, executor=None) -> float:
    start = time.perf_counter()
    audit(data, ZOO[1:], authorized=ZOO[0], suite="standard", out=out, batch_size=32,
          quiet=True, score="agreement", executor=executor)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_release(Path(tmp) / "release", args.images)
        local = timed_audit(data, Path(tmp) / "local")
        one = timed_audit(data, Path(tmp) / "ray1", RayExecutor(workers=1))
        two = timed_audit(data, Path(tmp) / "ray2", RayExecutor(workers=2))
    tasks_note = f"{args.images} images × {len(ZOO)} models × standard suite"
    print(f"{tasks_note}\n  local     {local:7.1f} s  {args.images / local:6.1f} img/s\n"
          f"  ray × 1   {one:7.1f} s  {args.images / one:6.1f} img/s\n"
          f"  ray × 2   {two:7.1f} s  {args.images / two:6.1f} img/s\n"
          f"  scaling efficiency (1→2 workers) {one / two / 2:.2f}; ray×1 vs local "
          f"{local / one:.2f}")


if __name__ == "__main__":
    main()
