#!/usr/bin/env bash
# One prepared GPU run: install what the device image lacks (wheels carried in .whl/), run the
# GPU-marked tests, then the GPU benchmark beside the same machine's CPUs.
# Usage on a GPU machine, from the repository root: bash bench/gpu.sh
set -uo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
python3 bench/gpu_bench.py
python3 bench/protect.py --images 256 --batch 64 --device cuda --threads 16
python3 bench/protect.py --images 64 --batch 32 --device cpu --threads 16
