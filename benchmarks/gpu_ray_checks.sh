#!/usr/bin/env bash
# RocketKV under Ray on the GPU machine, one GPU: vLLM's Ray executor (examples/ray_executor.py) and
# a Ray Data batch job (examples/ray_data_batch.py), each with --check. Prints PASS or FAIL per check
# and a last line "PASS: gpu ray checks" or "FAIL: gpu ray checks"; exits non-zero on failure.
# Before it, on the warm machine (see ../shared/gpu/README.md): vLLM staged (stage.sh / install.sh),
# SmolLM2 staged (stage_model.sh / install_model.sh), Ray staged (benchmarks/stage_ray_gpu.sh, one
# call per part: bash .gpu/ray<i>/install_ray.sh). Then, from the repo root:
#     bash benchmarks/gpu_ray_checks.sh [MODEL] [all|executor|data]
# (both fit one 10-minute device call on the H200; executor and data split them in two)
set -uo pipefail
source scripts/gpu_env.sh
export PYTHONPATH=/tmp/rkv-gpu/ray-site:$PYTHONPATH RAY_USAGE_STATS_ENABLED=0
model="${1:-/tmp/rkv-gpu/models/SmolLM2-135M-Instruct}"
which="${2:-all}"
[ -f /tmp/rkv-gpu/ray-site/.ok ] || { echo "FAIL: ray is not staged (benchmarks/stage_ray_gpu.sh)"; exit 1; }
[ -f "$model/config.json" ] || { echo "FAIL: no model at $model"; exit 1; }
status=0
if [ "$which" != data ]; then
  echo "== vLLM Ray executor"
  timeout "${RAY_EXECUTOR_LIMIT:-240}" python examples/ray_executor.py "$model" --check 2>&1 | tail -n 25 || status=1
fi
if [ "$which" != executor ]; then
  echo "== Ray Data LLM processor"
  timeout "${RAY_DATA_LIMIT:-330}" python examples/ray_data_batch.py "$model" --check 2>&1 | tail -n 40 || status=1
fi
if [ "$status" = 0 ]; then echo "PASS: gpu ray checks"; else echo "FAIL: gpu ray checks"; fi
exit "$status"
