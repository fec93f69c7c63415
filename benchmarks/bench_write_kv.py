"""write_kv (CUDA C++ and Triton) over the page-summary layouts (kv_layout): rows (0),
groups of 8 and channel-major (1). Llama-3.1-8B KV shapes (8 KV heads, head_dim 128, bf16),
block 16, page 4; device microseconds per call (median of CUDA-graph replays) for one
8,192-token prefill chunk and one decode token of 8 and of 1 requests.

    python benchmarks/bench_write_kv.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_kernels import bench  # noqa: E402

from rocketkv_vllm.kernels import cuda_ops  # noqa: E402
from rocketkv_vllm.kernels import triton_ops as T  # noqa: E402
from rocketkv_vllm.kv_layout import KVLayout  # noqa: E402

KV_HEADS, HEAD_DIM, NUM_BLOCKS = 8, 128, 8 * 1024


def main() -> None:
    dev = torch.device("cuda")
    impls = {"triton": T.write_kv}
    if cuda_ops.available():
        impls["cuda"] = cuda_ops.write_kv
    for group in (0, 8, 1):
        layout = KVLayout(16, 4, group)
        kv = torch.randn(layout.cache_shape(NUM_BLOCKS, KV_HEADS, HEAD_DIM), dtype=torch.bfloat16, device=dev)
        row: dict = {"summary_group": group}
        for case, tokens in (("prefill 8192", 8192), ("decode B=8", 8), ("decode B=1", 1)):
            if tokens > 8:  # one request's consecutive slots
                slots = torch.arange(tokens, device=dev) + 16 * 64
            else:  # one token in each of `tokens` random blocks
                slots = torch.randperm(NUM_BLOCKS, device=dev)[:tokens] * 16 + 5
            key = torch.randn(tokens, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
            value = torch.randn_like(key)
            for name, write in impls.items():
                ms = bench(lambda: write(kv, layout, key, value, slots), dev, graph=True)
                row[f"{case} {name} us"] = round(1e3 * ms, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
