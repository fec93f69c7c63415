#!/usr/bin/env bash
# Kernel-level checks on the GPU machine (after `source scripts/gpu_env.sh`), results in $1:
# the standalone CMake build, kernel tests natively (with that build), compute-sanitizer
# memcheck of the decode kernels and of the CUDA C++ write_kv on each of its paths
# (decode_ops_once.py: memcheck over the pytest tests outlasts any sane limit), the per-kernel sweep and the
# kernel benchmark tables (BATCHES, default "1 8 32"). Each step has a time limit so that
# one slow step leaves the others' results.
set -uo pipefail
out="${1:?usage: gpu_checks.sh OUT_DIR [bench_kernels args, e.g. --contexts 32768,131072 --budgets 2048]}"
shift
mkdir -p "$out"
step() { local limit=$1; shift; timeout "$limit" "$@"; echo "exit $?" >&2; }  # status beside the step's errors
# the CMake build writes rocketkv_vllm/_C*.so over the setup.py one: the tests below use it
rm -rf /tmp/rkv-cmake
{ cmake -S . -B /tmp/rkv-cmake -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc \
    -DCMAKE_PREFIX_PATH="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  && cmake --build /tmp/rkv-cmake -j 16; echo "exit $?"; } > "$out/cmake_build.txt" 2>&1
step 150 python -m pytest -q tests/test_kernels.py tests/test_algorithms.py tests/test_paged_reference.py 2>&1 | tail -n 15 > "$out/pytest_kernels.txt"
sanitizer=/usr/local/cuda/bin/compute-sanitizer
step 90 "$sanitizer" --tool memcheck --error-exitcode 1 python benchmarks/decode_ops_once.py 8 32768 > "$out/sanitizer_decode.txt" 2>&1
step 120 python benchmarks/sweep_decode_kernels.py --modes rocketkv,mt --out "$out/sweep.json" > "$out/sweep.txt" 2>&1
# one process per batch size: a failure leaves the other tables
for batch in ${BATCHES:-1 8 32}; do
  step 90 python benchmarks/bench_kernels.py --batches "$batch" --out "$out/kernels_b$batch.json" "$@" > "$out/kernels_b$batch.md" 2> "$out/kernels_b$batch.err"
done
