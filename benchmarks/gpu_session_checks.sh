#!/usr/bin/env bash
# One GPU call after staging vLLM and SmolLM2 (shared/gpu/README.md), results in $1:
# the per-layer decode graphs and the bf16 engine checks against FLASH_ATTN, the selection's workspace path and full-graph
# decode on the GPU, the eager-vs-graph decode step (issue: every step as fast as the graph), and the
# decode attention at batch 1 against stock's kernel (where a dense path would win).
#   source scripts/gpu_env.sh && bash benchmarks/gpu_session_checks.sh $OUT
set -uo pipefail
out="${1:?usage: gpu_session_checks.sh OUT_DIR}"
model="${MODEL:-/tmp/rkv-gpu/models/SmolLM2-135M-Instruct}"
mkdir -p "$out" .models
ln -sfn "$model" .models/SmolLM2-135M-Instruct
export VLLM_WORKER_MULTIPROC_METHOD=spawn ROCKETKV_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt"
# the per-layer graphs first, in their own process (a failed capture must not leave the next tests a
# broken CUDA generator), with whole tracebacks
timeout "${GRAPHS_LIMIT:-120}" python -m pytest -q -p no:logging --tb=long -rfE tests/test_decode_graphs.py \
  > "$out/pytest_graphs.txt" 2>&1
echo "exit $?" >> "$out/pytest_graphs.txt"
if [ "${BF16_LIMIT:-200}" != 0 ]; then
  timeout "${BF16_LIMIT:-200}" python -m pytest -q -p no:logging --tb=short tests/test_gpu_bf16.py > "$out/pytest_bf16.txt" 2>&1
  echo "exit $?" >> "$out/pytest_bf16.txt"
fi
if [ "${KERNEL_LIMIT:-120}" != 0 ]; then
  timeout "${KERNEL_LIMIT:-120}" python -m pytest -q -p no:logging --tb=short tests/test_builder.py tests/test_selection_plan.py \
    tests/test_newest_page.py tests/test_kernels.py -k "hsa or builder or plan or newest or every_page or paged_sparse or topk" \
    > "$out/pytest_selection.txt" 2>&1
  echo "exit $?" >> "$out/pytest_selection.txt"
fi
if [ "${EAGER_LIMIT:-120}" != 0 ]; then
  timeout "${EAGER_LIMIT:-120}" python benchmarks/bench_eager_host.py --batch 3 --context 131072 --layers 32 --repeats 3 \
    > "$out/eager_host_h200.json" 2> "$out/eager_host.log"
  echo "exit $?" >> "$out/eager_host.log"
fi
# where sparsity cannot win: batch 1 (and 8 at 32K), the selection + sparse attention against the
# attention kernel alone over every kept page and against stock's FlashAttention 3 over the whole
# context (one archive: the device tool brings back at most 8 files); DENSE_BELOW=N plans the
# rows with rocketkv.dense_below N (exact decode over every kept page, no selection)
if [ "${CROSSOVER_LIMIT:-240}" != 0 ]; then
  mkdir -p "$out/crossover"
  end=$((SECONDS + ${CROSSOVER_LIMIT:-240}))
  for shape in ${CROSSOVER_SHAPES:-8192x1 32768x1 131072x1 32768x8}; do
    left=$((end - SECONDS)); [ "$left" -gt 10 ] || break
    timeout "$left" python benchmarks/bench_eager_host.py --context "${shape%x*}" --batch "${shape#*x}" --layers 32 \
      --repeats 3 --dense-below "${DENSE_BELOW:-0}" > "$out/crossover/eager_host_$shape.json" \
      2> "$out/crossover/eager_host_$shape.log"
    echo "exit $?" >> "$out/crossover/eager_host_$shape.log"
  done
  tar -C "$out" -czf "$out/crossover.tar.gz" crossover && rm -rf "$out/crossover"
fi
