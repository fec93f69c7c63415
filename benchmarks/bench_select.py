"""HSA page selection (hsa_select_pages: prep, logits, top-k) on a GPU, side by side for
one or more versions of rocketkv_vllm/kernels/triton_hsa.py: device time per call (median
of CUDA-graph replays) over one random paged cache per case. Llama-3.1-8B shapes (32 query
heads, 8 KV heads, head_dim 128, bf16), block 16, page 4, budget 2048 split as in the engine:
`rocketkv` scores the live pages after stage 1, `mt` every page of the context. Versions
and summary channel groups (kv_layout) are timed on the same bytes (the timing does not
depend on their values), so their chosen pages are not compared here (the kernel tests do).

    python benchmarks/bench_select.py --impl old_hsa.py --impl rocketkv_vllm/kernels/triton_hsa.py --groups 0,1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_kernels import Setup, bench  # noqa: E402
from bench_topk import load_impl  # noqa: E402

from rocketkv_vllm.algorithms.budget import split_budget  # noqa: E402
from rocketkv_vllm.kv_layout import KVLayout  # noqa: E402

CASES = ["rocketkv:1:131072", "rocketkv:8:131072", "mt:1:131072", "mt:8:131072", "mt:8:32768"]
SHAPES = SimpleNamespace(block_size=16, page_size=4, q_heads=32, kv_heads=8, head_dim=128, dtype="bfloat16")
BUDGET, WINDOW, DECODED = 2048, 32, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", action="append", help="triton_hsa.py files to compare (default: this tree's)")
    parser.add_argument("--cases", nargs="+", default=CASES, help="MODE:BATCH:CONTEXT")
    parser.add_argument("--groups", default="0,1",
                        help="summary channel groups to time, for versions that take one (0: row-major, 1: channel-major)")
    args = parser.parse_args()
    impls = args.impl or ["rocketkv_vllm/kernels/triton_hsa.py"]
    modules = {path: load_impl(path) for path in impls}
    dev = torch.device("cuda")
    for case in args.cases:
        mode, batch, context = case.split(":")
        batch, context = int(batch), int(context)
        torch.manual_seed(0)
        s = Setup(SHAPES, batch, context, dev)
        split = split_budget(context, 0, BUDGET, s.d, s.layout.block_size, window=WINDOW, evict=mode == "rocketkv",
                             page_size=s.layout.page_size)
        if mode == "rocketkv":
            s.keep.fill_(split.prompt_keep)
            s.gap.fill_(context - DECODED)
        r = torch.full((batch,), split.top_channels, dtype=torch.int32, device=dev)
        k = torch.full((batch,), split.top_k // s.layout.page_size, dtype=torch.int32, device=dev)
        row: dict = {"mode": mode, "batch": batch, "context": context, "top_channels": split.top_channels}
        for path, module in modules.items():
            grouped = hasattr(module, "summary_at")  # versions before channel groups read rows
            for group in [int(g) for g in args.groups.split(",")] if grouped else [None]:
                layout = KVLayout(s.layout.block_size, s.layout.page_size, group or 0)

                def select(module=module, layout=layout) -> None:
                    module.hsa_select_pages(s.query, s.kv, layout, s.table, s.seq, s.keep, s.gap, r, k)
                row[f"{path}{'' if group is None else f' group {group}'} ms"] = round(bench(select, dev, graph=True), 4)
        print(json.dumps(row), flush=True)
        del s
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
