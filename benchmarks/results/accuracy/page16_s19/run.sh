#!/usr/bin/env bash
# mt and rocketkv requests at 2-token (default) and 16-token pages, CPU, SmolLM2, fp32
set -u
cd /work/main
for page in 2 16; do
  start=$SECONDS
  timeout 2400 python -m rocketkv_vllm.eval --model /work/main/.models/SmolLM2-135M-Instruct \
    --tasks niah_multikey multi_turn --lengths 2048 --samples 2 --budgets 256 1024 --methods rocketkv mt \
    --rocketkv-config "{\"page_size\": $page}" \
    --dtype float32 --engine-args '{"kv_cache_memory_bytes":1073741824,"max_num_seqs":16}' --no-progress \
    --out /tmp/acc16/page$page > /tmp/acc16/page$page.log 2>&1
  echo "page $page rc=$? $((SECONDS - start)) s" >> /tmp/acc16/status
done
