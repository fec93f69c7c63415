#!/usr/bin/env bash
# the same CPU accuracy command before (session 17's end) and after (this session's HEAD)
set -u
for side in before after; do
  dir=/tmp/before_wt; [ "$side" = after ] && dir=/work/main
  cd "$dir"
  start=$SECONDS
  PYTHONPATH="$dir" timeout 2400 python -m rocketkv_vllm.eval --model /work/main/.models/SmolLM2-135M-Instruct \
    --tasks niah_single niah_multikey --lengths 2048 --samples 2 --budgets 256 1024 --methods rocketkv \
    --dtype float32 --engine-args '{"kv_cache_memory_bytes":1073741824,"max_num_seqs":16}' --no-progress \
    --out /tmp/acc/$side > /tmp/acc/$side.log 2>&1
  echo "$side rc=$? $((SECONDS - start)) s" >> /tmp/acc/status
done
