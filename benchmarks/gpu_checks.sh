#!/usr/bin/env bash
# Kernel-level checks on the GPU machine (after `source scripts/gpu_env.sh`), results in $1:
# the standalone CMake build, kernel tests natively (with that build), compute-sanitizer
# memcheck of the CUDA C++ kernel, and the kernel benchmark table.
set -uo pipefail
out="${1:?usage: gpu_checks.sh OUT_DIR [bench_kernels args]}"
shift
mkdir -p "$out"
# the CMake build writes rocketkv_vllm/_C*.so over the setup.py one: the tests below use it
rm -rf /tmp/rkv-cmake
{ cmake -S . -B /tmp/rkv-cmake -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc \
    -DCMAKE_PREFIX_PATH="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  && cmake --build /tmp/rkv-cmake -j 16; echo "exit $?"; } > "$out/cmake_build.txt" 2>&1
python -m pytest -q tests/test_kernels.py tests/test_algorithms.py tests/test_paged_reference.py 2>&1 | tail -n 15 > "$out/pytest_kernels.txt"
sanitizer=/usr/local/cuda/bin/compute-sanitizer
for tool in memcheck; do
  "$sanitizer" --tool "$tool" --error-exitcode 1 python -m pytest -q tests/test_kernels.py -k cuda_cpp -p no:cacheprovider \
    > "$out/sanitizer_$tool.txt" 2>&1
  echo "exit $?" >> "$out/sanitizer_$tool.txt"
done
python benchmarks/bench_kernels.py --out "$out/kernels.json" "$@" > "$out/kernels.md" 2> "$out/kernels.err"
