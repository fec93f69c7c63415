#!/usr/bin/env bash
# Accuracy on the GPU machine, after staging vLLM and SmolLM2 there (shared/gpu/README.md),
# results in $1: the bf16 engine checks against stock FLASH_ATTN (FA3 prefill, CUDA/Triton
# decode, full CUDA graphs), then the accuracy harness in full (every task, method, budget).
#   source scripts/gpu_env.sh && bash benchmarks/gpu_accuracy_checks.sh $OUT
set -uo pipefail
out="${1:?usage: gpu_accuracy_checks.sh OUT_DIR}"
model="${MODEL:-/tmp/rkv-gpu/models/SmolLM2-135M-Instruct}"
mkdir -p "$out" .models
ln -sfn "$model" .models/SmolLM2-135M-Instruct  # where the engine tests look for it
export VLLM_WORKER_MULTIPROC_METHOD=spawn ROCKETKV_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt"
{ timeout "${TEST_LIMIT:-200}" python -m pytest -q -rA tests/test_gpu_bf16.py tests/test_newest_page.py 2>&1 | tail -n 40; } > "$out/pytest_bf16.txt"
timeout "${EVAL_LIMIT:-330}" python -m rocketkv_vllm.eval --model "$model" --dtype bfloat16 --no-progress \
  --samples "${SAMPLES:-20}" --lengths ${LENGTHS:-2048 4096 7168} --out "$out/accuracy_smollm2_h200.json" \
  > "$out/eval.log" 2>&1
echo "eval exit $?" >> "$out/eval.log"
