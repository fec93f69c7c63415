#!/usr/bin/env bash
# Here (nvcc and torch 2.11+cu130 present, no GPU needed): build rocketkv_vllm._C for the lent GPU
# machine's Python 3.12 and an H100/H200 (sm_90 + PTX) into .gpu/ext, with the hash of csrc/ it was
# built from. Carry ".gpu/ext" in the first device call that sources scripts/gpu_env.sh: it uses
# the prebuilt module when the hash matches and it imports, and builds there otherwise (~1 min
# of device time saved).
set -euo pipefail
cd "$(dirname "$0")/.."
PY312="${PY312:-$HOME/.pyenv/versions/3.12.1/bin/python3.12}"
out=.gpu/ext
work="$(mktemp -d)"
torch_dir="$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')"
includes=(-I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" -I/usr/local/cuda/include
          -I"$("$PY312" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')")
defines=(-DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C)
for cu in csrc/*.cu; do  # the flags torch's CUDAExtension passes (setup.py)
  nvcc -c "$cu" -o "$work/$(basename "$cu" .cu).o" "${includes[@]}" "${defines[@]}" -std=c++17 -O3 --use_fast_math \
    -lineinfo --expt-relaxed-constexpr --compiler-options -fPIC -D__CUDA_NO_HALF_OPERATORS__ \
    -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
    -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90 &
done
g++ -c csrc/bindings.cpp -o "$work/bindings.o" -fPIC -O3 -std=c++17 "${includes[@]}" "${defines[@]}"
wait
mkdir -p "$out"
g++ -pthread -shared "$work"/*.o -L"$torch_dir/lib" -L/usr/local/cuda/lib -L/usr/local/cuda/lib64 \
  -lc10 -ltorch -ltorch_cpu -ltorch_python -lcudart -lc10_cuda -ltorch_cuda -o "$out/_C.cpython-312-x86_64-linux-gnu.so"
echo "9.0+PTX" > "$out/_C_archs.txt"
cat csrc/* | sha256sum | cut -d' ' -f1 > "$out/csrc.sha256"
rm -rf "$work"
echo "built $out ($(cat "$out/csrc.sha256"))"
