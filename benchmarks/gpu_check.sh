#!/usr/bin/env bash
# The one prepared GPU session: the gpu-marked tests, then the GPU benchmark (under 8 minutes), then the
# model against the minimal reference on the GPU (last: a run cut short keeps the figures printed before it).
#   bash benchmarks/gpu_check.sh            (on a machine with a CUDA torch and one GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -m pytest -q -m gpu tests/gpu -p no:cacheprovider; tests_rc=$?
python benchmarks/gpu.py --steps 10 --rounds 3; bench_rc=$?
python benchmarks/model_vs_reference.py --device cuda --steps 20 --rounds 3; reference_rc=$?
echo "gpu tests rc=${tests_rc} benchmark rc=${bench_rc} model_vs_reference rc=${reference_rc}"
exit $(( tests_rc || bench_rc || reference_rc ))
