"""Decode kernels on a GPU, one by one: device time of each kernel of select + attend (torch
profiler), and the select / attend time as the number of programs per (request, KV head)
and the logits kernel's tile change (CUDA-graph replay). Llama-3.1-8B shapes, rocketkv and/or mt
mode (as bench_kernels.py).

    python benchmarks/sweep_decode_kernels.py --batches 1,8 --contexts 32768,131072
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import Setup, bench  # noqa: E402

from rocketkv_vllm.algorithms.budget import split_budget  # noqa: E402
from rocketkv_vllm.kernels import triton_hsa  # noqa: E402
from rocketkv_vllm.kernels import triton_ops as T  # noqa: E402
from rocketkv_vllm.kernels.triton_common import num_sms  # noqa: E402


def kernel_times(fn, steps: int = 20) -> dict[str, float]:
    """Mean device microseconds per call of each kernel fn launches."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return {e.key: round(e.self_device_time_total / steps, 2) for e in prof.key_averages() if e.self_device_time_total > 0}


def sweep(args, batch: int, context: int, mode: str, device) -> dict:
    s = Setup(args, batch, context, device)
    evict = mode == "rocketkv"
    split = split_budget(context, 0, args.budget, s.d, args.block_size, window=32, evict=evict, page_size=args.page_size)
    if evict:  # the kept prompt pages of stage 1, then 64 decoded tokens
        s.keep.fill_(split.prompt_keep)
        s.gap.fill_(context - 64)
    channels = torch.full((batch,), split.top_channels, dtype=torch.int32, device=device)
    pages_k = torch.full((batch,), split.top_k // args.page_size, dtype=torch.int32, device=device)
    lay = s.layout

    def select(splits=None):
        return T.hsa_select_pages(s.query, s.kv, lay, s.table, s.seq, s.keep, s.gap, channels, pages_k, splits=splits)

    chosen = select()

    def attend(num_splits=None):
        return T.paged_sparse_attention(s.query, s.kv, lay, s.table, chosen.index, chosen.count, s.seq, s.keep, s.gap,
                                        s.scale, num_splits=num_splits)

    units = batch * s.hkv
    sms = num_sms(device)
    result = {"mode": mode, "top_channels": split.top_channels, "batch": batch, "context": context, "kernels_us": kernel_times(lambda: (select(), attend()))}
    result["select_ms_by_programs_per_sm"] = {
        f: bench(lambda f=f: select(-(-f * sms // units)), device, graph=True) for f in (1, 2, 3, 4, 8)
    }
    default_tile = triton_hsa.LOGIT_TILE
    result["select_ms_by_logit_tile"] = {}
    try:
        for tile in (16, 32):
            triton_hsa.LOGIT_TILE = tile
            result["select_ms_by_logit_tile"][tile] = bench(select, device, graph=True)
    finally:
        triton_hsa.LOGIT_TILE = default_tile
    result["attend_ms_by_programs_per_sm"] = {
        f: bench(lambda f=f: attend(-(-f * sms // units)), device, graph=True) for f in (1, 2, 4, 8)
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=lambda x: [int(v) for v in x.split(",")], default=[1, 8])
    p.add_argument("--contexts", type=lambda x: [int(v) for v in x.split(",")], default=[32768, 131072])
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--modes", type=lambda x: x.split(","), default=["rocketkv"], help="rocketkv and/or mt")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.q_heads, args.kv_heads, args.head_dim, args.dtype = 32, 8, 128, "bfloat16"
    args.block_size, args.page_size = 16, 4
    device = torch.device("cuda")
    torch.manual_seed(0)
    rows = [sweep(args, b, c, m, device) for m in args.modes for c in args.contexts for b in args.batches]
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
