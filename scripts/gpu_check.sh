#!/usr/bin/env bash
# Every GPU check of this repo in one call, for a machine lent for a few minutes (it keeps nothing: results go
# to $OUT when set, else /tmp/gpu_check): the CUDA-only tests (graph capture of plain, speculative and sampled
# steps, the serving engine on captured steps), the Triton kernel tests compiled for the GPU instead of
# interpreted, then scripts/gpu_bench.py (step times, gaps between kernels, bandwidth, end-to-end tok/s).
#
#     bash scripts/gpu_check.sh                 # about 8 minutes on an H100/H200
#     BENCH_ARGS="--moe-layers 8 --batch 1 --steps 20" bash scripts/gpu_check.sh      # quicker bench
#
# Needs a python3 with torch (CUDA), triton, transformers and pytest; this checkout is put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || { echo "no NVIDIA GPU here (nvidia-smi failed)"; exit 2; }
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print(torch.__version__, torch.cuda.get_device_name())" || exit 2

status=0
echo "== CUDA tests"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/runtime/test_graphs.py 2>&1 | tee "$OUT/cuda_tests.log" || status=1
echo "== Triton kernels compiled on the GPU"
TRITON_INTERPRET=0 timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_triton.py 2>&1 \
    | tee "$OUT/triton_tests.log" || status=1
echo "== gpu_bench"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
timeout 420 "$PY" scripts/gpu_bench.py --output-dir "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_bench.log" || status=1
exit $status
