#!/usr/bin/env bash
# session 20's "after" with session 18's command (the "before": ../before_after_s19/after.json,
# session 19's last code); rocketkv alone, so the server takes this session's default 16-token pages
set -u
cd /work/main
mkdir -p /tmp/acc20
timeout 2400 python -m rocketkv_vllm.eval --model /work/main/.models/SmolLM2-135M-Instruct \
  --tasks niah_single niah_multikey --lengths 2048 --samples 2 --budgets 256 1024 --methods rocketkv \
  --dtype float32 --engine-args '{"kv_cache_memory_bytes":1073741824,"max_num_seqs":16}' --no-progress \
  --out /tmp/acc20/after > /tmp/acc20/after.log 2>&1
