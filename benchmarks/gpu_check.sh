#!/usr/bin/env bash
# The one prepared GPU session: the gpu-marked tests, then the GPU benchmark (well under 10 minutes).
#   bash benchmarks/gpu_check.sh            (on a machine with a CUDA torch and one GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -m pytest -q -m gpu tests/gpu -p no:cacheprovider; tests_rc=$?
python benchmarks/gpu.py --steps 10 --rounds 3; bench_rc=$?
echo "gpu tests rc=${tests_rc} benchmark rc=${bench_rc}"
exit $(( tests_rc || bench_rc ))
