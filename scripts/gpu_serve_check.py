"""GPU check: `vllm serve --attention-backend rocketkv` on a Llama-3.1-8B-shaped dummy model at 32K.

Starts the server, sends a 30K-token completion (budget from --budget) and a bad request
(expects HTTP 400), then a second good one, and prints status codes and latencies.
usage: python scripts/gpu_serve_check.py [--ctx 32768] [--prompt 30000] [--budget 2048]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import requests

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, default=32768)
    parser.add_argument("--prompt", type=int, default=30000)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args()
    model = tempfile.mkdtemp()
    shutil.copy(os.path.join(HERE, "..", "benchmarks", "llama31_8b_config.json"), os.path.join(model, "config.json"))
    # the `vllm` console script: python -m vllm.entrypoints.cli.main (no script on the staged GPU machine)
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, "--load-format", "dummy", "--skip-tokenizer-init", "--attention-backend", "rocketkv",
           "--max-model-len", str(args.ctx), "--port", str(args.port), "--served-model-name", "llama-8b-dummy",
           "--additional-config", json.dumps({"rocketkv": {"budget": args.budget}})]
    print(" ".join(cmd), flush=True)
    server = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{args.port}"
    try:
        started = time.time()
        while time.time() - started < 400:
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(2)
        print(f"server up in {time.time() - started:.0f}s", flush=True)
        prompt = list(range(1000, 1000 + args.prompt))
        for name, xargs in [("good", {"rocketkv_budget": args.budget}), ("bad", {"rocketkv_budget": -1}), ("good-mt", {"rocketkv_mode": "mt"})]:
            t = time.time()
            r = requests.post(f"{base}/v1/completions", json={
                "model": "llama-8b-dummy", "prompt": prompt, "max_tokens": 64, "temperature": 0, "ignore_eos": True,
                "detokenize": False, "vllm_xargs": xargs}, timeout=300)
            body = r.json()
            detail = body.get("usage") if r.ok else body.get("error", {}).get("message", "")[:200]
            print(json.dumps({"request": name, "status": r.status_code, "seconds": round(time.time() - t, 2), "detail": detail}), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
