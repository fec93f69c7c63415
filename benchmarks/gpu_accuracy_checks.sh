#!/usr/bin/env bash
# Accuracy and engine checks on the GPU machine in one device call, lanes in parallel (each
# SmolLM2 engine uses a sliver of the H200): the bf16 engine test against stock FLASH_ATTN then
# the Ray checks (issue: beyond one GPU), and the accuracy harness at 2K and 4K tokens.
# Eval lanes fix their KV size (kv_cache_memory_bytes) so vLLM's start-up memory profiling of
# one engine is not upset by another engine's allocations. Before it (shared/gpu/README.md):
# vLLM, SmolLM2 and Ray staged; `.whl` (wonderwords) carried.
#   source scripts/gpu_env.sh && bash benchmarks/gpu_accuracy_checks.sh $OUT
# A device call brings back at most 8 files: everything goes into one archive in OUT_DIR, with the
# markdown tables and the check outputs beside it.
set -uo pipefail
dest="${1:?usage: gpu_accuracy_checks.sh OUT_DIR}"
out="$(mktemp -d /tmp/accuracy-checks-XXXX)"
model="${MODEL:-/tmp/rkv-gpu/models/SmolLM2-135M-Instruct}"
mkdir -p "$out" .models
ln -sfn "$model" .models/SmolLM2-135M-Instruct  # where the engine tests look for it
python3 -m pip install -q --no-index --no-deps --target /tmp/rkv-gpu/site .whl/*.whl 2>/dev/null
export VLLM_WORKER_MULTIPROC_METHOD=spawn ROCKETKV_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt"
kv='{"kv_cache_memory_bytes": 12000000000}'

checks() {
  timeout "${BF16_LIMIT:-250}" python -m pytest -q -p no:logging --tb=short tests/test_gpu_bf16.py > "$out/pytest_bf16.txt" 2>&1
  echo "exit $?" >> "$out/pytest_bf16.txt"
  RAY_EXECUTOR_LIMIT=150 RAY_DATA_LIMIT=170 bash benchmarks/gpu_ray_checks.sh "$model" > "$out/ray_checks.txt" 2>&1
}

evaluate() {  # NAME LENGTH ROCKETKV_CONFIG SAMPLES METHODS BUDGETS
  timeout "${EVAL_LIMIT:-550}" python -m rocketkv_vllm.eval --model "$model" --dtype bfloat16 --no-progress \
    --lengths "$2" --samples "$4" --methods $5 --budgets $6 --engine-args "$kv" \
    --rocketkv-config "$3" --out "$out/$1.json" > "$out/$1.log" 2>&1
  echo "eval exit $?" >> "$out/$1.log"
}

# CHECKS=0 skips the bf16 engine test and the Ray checks (Ray not staged)
[ "${CHECKS:-1}" = 1 ] && checks &
# session 17: the dense_below default (exact decode over kept contexts up to 16K) against HSA on
# every row ({"dense_below": 0}); sessions 10-13 ran page sizes and 7K
hsa='{"dense_below": 0}'
evaluate dense_default_2k 2048 '{}' 20 "full rocketkv" "128 256 512 1024" &
evaluate hsa_2k 2048 "$hsa" 20 "rocketkv" "128 256 512 1024" &
evaluate dense_default_4k 4096 '{}' 20 "full rocketkv" "128 256 512 1024" &
evaluate hsa_4k 4096 "$hsa" 20 "rocketkv" "128 256 512 1024" &
wait
tar -C "$out" -czf "$dest/gpu_accuracy_checks.tar.gz" .
cp "$out"/*.md "$out/pytest_bf16.txt" "$out/ray_checks.txt" "$dest"/ 2>/dev/null
ls "$dest"
