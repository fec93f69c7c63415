#!/usr/bin/env bash
# One GPU call after staging vLLM and SmolLM2 (shared/gpu/README.md), results in $1:
# the bf16 engine checks against FLASH_ATTN, the selection's workspace path and full-graph
# decode on the GPU, and the eager-vs-graph decode step (issue: every step as fast as the graph).
#   source scripts/gpu_env.sh && bash benchmarks/gpu_session_checks.sh $OUT
set -uo pipefail
out="${1:?usage: gpu_session_checks.sh OUT_DIR}"
model="${MODEL:-/tmp/rkv-gpu/models/SmolLM2-135M-Instruct}"
mkdir -p "$out" .models
ln -sfn "$model" .models/SmolLM2-135M-Instruct
export VLLM_WORKER_MULTIPROC_METHOD=spawn ROCKETKV_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt"
timeout "${BF16_LIMIT:-150}" python -m pytest -q -p no:logging --tb=short tests/test_gpu_bf16.py > "$out/pytest_bf16.txt" 2>&1
echo "exit $?" >> "$out/pytest_bf16.txt"
timeout "${KERNEL_LIMIT:-120}" python -m pytest -q -p no:logging --tb=short tests/test_builder.py tests/test_selection_plan.py \
  tests/test_newest_page.py tests/test_kernels.py -k "hsa or builder or plan or newest" > "$out/pytest_selection.txt" 2>&1
echo "exit $?" >> "$out/pytest_selection.txt"
timeout "${EAGER_LIMIT:-120}" python benchmarks/bench_eager_host.py --batch 3 --context 131072 --layers 32 --repeats 3 \
  > "$out/eager_host_h200.json" 2> "$out/eager_host.log"
echo "exit $?" >> "$out/eager_host.log"
