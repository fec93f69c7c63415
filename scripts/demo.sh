#!/usr/bin/env bash
# Fresh machine -> RocketKV demo: install everything, build the default model, run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 scripts/fetch_model.py
python3 scripts/demo.py "$@"
