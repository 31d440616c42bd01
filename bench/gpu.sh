#!/usr/bin/env bash
# One prepared GPU run: install what the device image lacks (wheels carried in .whl/), run the
# GPU-marked tests, then the recoding kernels, then the end-to-end benchmarks beside their bare
# loops and floors, then the reconstruction attacks (costs and the old-vs-new table), then the
# audit with compiled forwards beside its compiled bare loop.
# Usage on a GPU machine, from the repository root: bash bench/gpu.sh [quick]
set -uo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
# each step prints when it starts, so a run cut short by the device budget shows what it reached
step() { echo "== $(date +%T) $*"; "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cpus', __import__('os').cpu_count())"
step python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -W ignore::DeprecationWarning
# recoding kernels alone: ViT-B/16 (target 10,000 img/s) and ResNet-50 (3,000)
step python3 bench/protect.py --device cuda --images 4096 --batch 256 --skip-writing
step python3 bench/e2e.py --device cuda --images 4096 --audit-images 512 --suite standard --batch 256 \
  --writers processes --png-compression none --profile
# protect on a longer job (fixed costs amortized as on a release): 16,384 images, stored PNGs;
# its timeline line and the profile's own-time lines say whether the thread feeding the device
# or the readers bind it
step python3 bench/e2e.py --device cuda --images 16384 --batch 256 --skip audit \
  --writers processes --png-compression none --no-reader-sweep --profile
# protect on photos of ImageNet's sizes as JPEGs, decoded and resized by the readers
step python3 bench/e2e.py --device cuda --images 4096 --batch 256 --skip audit \
  --writers processes --png-compression none --inputs jpeg
if [ "${1:-}" != quick ]; then
  step python3 bench/e2e.py --device cuda --images 4096 --batch 256 --skip audit \
    --writers processes --png-compression deflate
  step python3 bench/reconstruction.py --costs --size 224 --device cuda
  step python3 bench/reconstruction.py --device cuda --out /tmp/bench-rx
  # last: compiling three ImageNet-size models takes minutes
  step python3 bench/e2e.py --device cuda --skip protect --audit-images 512 --suite standard \
    --batch 256 --compile-models
fi
