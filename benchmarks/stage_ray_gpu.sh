#!/usr/bin/env bash
# Stage Ray for the lent GPU machine (no network there). Runs HERE, in the repo root, after
# ../shared/gpu/stage.sh (vLLM). Ray 2.58.1 is the Ray whose `ray[llm]` pins vllm 0.26.0 (Ray Data's
# vLLM processor is written against that vLLM). Only its wheel travels: what Ray and Ray Data import
# (click filelock jsonschema msgpack packaging protobuf pyyaml requests; numpy pandas pyarrow fsspec)
# is on the machine already or comes with vLLM's staged dependencies.
# The wheel (cp312 manylinux2014_x86_64, 75 MiB) is over a call's 64 MiB, so it travels in parts of
# <= PART_MB MiB: .gpu/ray0, .gpu/ray1 (git-ignored). Then on the warm machine, one call per part:
#     carry: [".gpu/ray<i>"]   command: bash .gpu/ray<i>/install_ray.sh
# and later calls: source scripts/gpu_env.sh && export PYTHONPATH=/tmp/rkv-gpu/ray-site:$PYTHONPATH
set -euo pipefail
RAY_VERSION="${RAY_VERSION:-2.58.1}"
PART_MB="${PART_MB:-50}"
CACHE="${GPU_STAGE_CACHE:-/tmp/gpu-stage-cache}/ray"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$CACHE" .gpu
exclude="$(git rev-parse --git-path info/exclude)"
grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CACHE" "ray==$RAY_VERSION"
wheel=$(ls "$CACHE"/ray-"$RAY_VERSION"-cp312-*.whl)
rm -rf .gpu/ray[0-9]*
split -b "${PART_MB}M" -d -a 1 "$wheel" "$CACHE/part."
n=$(ls "$CACHE"/part.* | wc -l)
sum=$(sha256sum "$wheel" | cut -d' ' -f1)
for i in $(seq 0 $((n - 1))); do
  mkdir -p ".gpu/ray$i"
  mv "$CACHE/part.$i" ".gpu/ray$i/part"
  echo "$n $sum $(basename "$wheel")" > ".gpu/ray$i/manifest"
  cp "$HERE/install_ray_gpu.sh" ".gpu/ray$i/install_ray.sh"
done
echo "$n parts of <= $PART_MB MiB in .gpu/ray0 .. .gpu/ray$((n - 1)) ($(du -m "$wheel" | cut -f1) MiB wheel)."
echo "On the warm GPU machine, one call per part: carry ['.gpu/ray<i>'], command 'bash .gpu/ray<i>/install_ray.sh'"
