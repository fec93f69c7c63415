#!/usr/bin/env bash
# Runs ON the GPU machine as `bash .gpu/ray<i>/install_ray.sh` in each call that carries one part of
# the Ray wheel (benchmarks/stage_ray_gpu.sh): keeps the part in /tmp/rkv-gpu/ray-store (outside the
# work tree, kept while the machine stays warm) and, once all are there, installs Ray into
# /tmp/rkv-gpu/ray-site. Use it with: export PYTHONPATH=/tmp/rkv-gpu/ray-site:$PYTHONPATH
set -euo pipefail
SITE=/tmp/rkv-gpu/ray-site STORE=/tmp/rkv-gpu/ray-store
if [ -f "$SITE/.ok" ]; then echo "ray ready in $SITE"; exit 0; fi
mkdir -p "$STORE"
for d in .gpu/ray*; do
  [ -f "$d/part" ] || continue
  cp "$d/manifest" "$STORE/manifest"; mv "$d/part" "$STORE/${d##*/}.part"
done
read -r n sum name < "$STORE/manifest"
have=$(ls "$STORE"/ray*.part 2>/dev/null | wc -l)
if [ "$have" -lt "$n" ]; then echo "have $have of $n ray parts; carry the rest"; exit 0; fi
cat $(for ((i = 0; i < n; i++)); do echo "$STORE/ray$i.part"; done) > "/tmp/rkv-gpu/$name"
echo "$sum  /tmp/rkv-gpu/$name" | sha256sum -c - >/dev/null || { echo "checksum mismatch: re-stage" >&2; rm -rf "$STORE"; exit 1; }
mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "/tmp/rkv-gpu/$name"
rm -rf "$STORE" "/tmp/rkv-gpu/$name"
touch "$SITE/.ok"
echo "ray ready in $SITE; now: export PYTHONPATH=$SITE:\$PYTHONPATH"
