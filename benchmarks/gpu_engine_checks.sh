#!/usr/bin/env bash
# Engine-level checks on the GPU machine (after `source scripts/gpu_env.sh`), results in $1:
# decode speed against stock vLLM (FLASH_ATTN) side by side, then the engine and server
# tests on the GPU path (full CUDA graphs included); extra args go to bench_decode.py.
set -uo pipefail
out="${1:?usage: gpu_engine_checks.sh OUT_DIR [bench_decode args, e.g. --cases 32768x1 32768x8 --out 64]}"
shift
mkdir -p "$out"
timeout "${BENCH_LIMIT:-400}" python benchmarks/bench_decode.py --budget 2048 --json "$out/decode.json" "$@" > "$out/decode.txt" 2>&1
echo "exit $?" >> "$out/decode.txt"
{ timeout "${TEST_LIMIT:-170}" python -m pytest -q tests/test_vllm_engine.py tests/test_builder.py tests/test_openai_server.py 2>&1 | tail -n 15; } > "$out/pytest_engine.txt"
