#!/usr/bin/env bash
# the "after" side of ../before_after_s18/run.sh at this session's code (its "before" is
# ../before_after_s18/after.json, session 18's last code)
set -u
cd /work/main
timeout 2400 python -m rocketkv_vllm.eval --model /work/main/.models/SmolLM2-135M-Instruct \
  --tasks niah_single niah_multikey --lengths 2048 --samples 2 --budgets 256 1024 --methods rocketkv \
  --dtype float32 --engine-args '{"kv_cache_memory_bytes":1073741824,"max_num_seqs":16}' --no-progress \
  --out /tmp/acc19/after > /tmp/acc19/after.log 2>&1
