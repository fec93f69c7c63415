#!/usr/bin/env bash
# The test suite: CPU tests everywhere, GPU tests too where a CUDA device is present.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m pytest -q tests "$@"
