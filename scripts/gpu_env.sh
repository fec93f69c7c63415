# Source on the lent GPU machine (no network, vLLM staged by ../shared/gpu) from the repo root:
# puts the package on PYTHONPATH and declares its vLLM plugin entry point there, since
# pip cannot build into that machine's interpreter offline.
source /tmp/rkv-gpu/env.sh
export PYTHONPATH="$PWD:$PYTHONPATH"
_dist=/tmp/rkv-gpu/site/rocketkv_vllm-0.1.0.dist-info
mkdir -p "$_dist"
printf 'Metadata-Version: 2.1\nName: rocketkv_vllm\nVersion: 0.1.0\n' > "$_dist/METADATA"
printf '[vllm.general_plugins]\nrocketkv = rocketkv_vllm.vllm_glue.plugin:register\n' > "$_dist/entry_points.txt"
# the CUDA extension: prebuilt here from this csrc/ (scripts/prebuild_gpu_ext.sh, carried as .gpu/ext)
# where it imports, else built on this machine
if ! ls rocketkv_vllm/_C*.so >/dev/null 2>&1 && [ -f .gpu/ext/csrc.sha256 ] \
    && [ "$(cat csrc/* | sha256sum | cut -d' ' -f1)" = "$(cat .gpu/ext/csrc.sha256)" ]; then
  cp .gpu/ext/_C*.so .gpu/ext/_C_archs.txt rocketkv_vllm/
  python -c "import torch; from rocketkv_vllm import _C" 2>/dev/null || rm -f rocketkv_vllm/_C*.so rocketkv_vllm/_C_archs.txt
fi
ls rocketkv_vllm/_C*.so >/dev/null 2>&1 || ROCKETKV_BUILD_CUDA=1 PATH=/usr/local/cuda/bin:$PATH python setup.py -q build_ext --inplace >/dev/null
export ROCKETKV_OFFLINE=1
