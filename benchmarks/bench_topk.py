"""The HSA top-k kernel alone on a GPU: device time per call from random page logits
(median of CUDA-graph replays), for one or more implementations of
rocketkv_vllm/kernels/triton_hsa.py (A/B between versions: save the other version's file
anywhere in the tree and name it with --impl), and whether they choose the same pages.
Llama-3.1-8B group (4 query heads per KV head, 8 KV heads), 4-token pages, a 128K-token
block table (32,768 pages) as in the engine. Versions whose top-k takes the softmax
statistics from the logits kernel get them precomputed (one part), outside the timing.
--cuda-chunks also times the CUDA C++ top-k (csrc/hsa_topk.cu) at those chunk sizes.

    python benchmarks/bench_topk.py --impl rocketkv_vllm/kernels/triton_hsa.py --impl other_hsa.py
    python benchmarks/bench_topk.py --cuda-chunks 1024 2048 4096
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_kernels import bench  # noqa: E402

KV_HEADS, GROUP, PAGE, TOP_PAGES, TABLE_PAGES = 8, 4, 4, 256, 32768
CASES = ["1x3208", "8x3208", "1x8192", "8x8192", "1x32768", "8x32768"]  # batch x live pages


def load_impl(path: str):
    spec = importlib.util.spec_from_file_location(f"impl_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chosen_sets(index: torch.Tensor, count: torch.Tensor) -> list:
    return [[sorted(index[b, h, : int(count[b, h])].tolist()) for h in range(index.shape[1])] for b in range(index.shape[0])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", action="append", help="triton_hsa.py files to compare (default: this tree's)")
    parser.add_argument("--cases", nargs="+", default=CASES, help="BATCHxPAGES")
    parser.add_argument("--tied", action="store_true", help="all logits equal (every score ties)")
    parser.add_argument("--cuda-chunks", nargs="*", type=int, default=[], help="time the CUDA C++ top-k at these chunks")
    args = parser.parse_args()
    impls = args.impl or ["rocketkv_vllm/kernels/triton_hsa.py"]
    modules = {path: load_impl(path) for path in impls}
    dev = torch.device("cuda")
    for case in args.cases:
        batch, pages = (int(x) for x in case.split("x"))
        torch.manual_seed(0)
        logits = torch.randn(batch, KV_HEADS, GROUP, TABLE_PAGES, device=dev) * 3
        if args.tied:
            logits.zero_()
        seq = torch.full((batch,), pages * PAGE, dtype=torch.int32, device=dev)
        gap = torch.zeros_like(seq)
        k = torch.full((batch,), TOP_PAGES, dtype=torch.int32, device=dev)
        index = torch.empty(batch, KV_HEADS, TABLE_PAGES, dtype=torch.int32, device=dev)
        count = torch.empty(batch, KV_HEADS, dtype=torch.int32, device=dev)
        keys = torch.empty_like(index)
        live = logits[..., :pages]
        m = live.amax(-1)
        stats = torch.stack([m, (live - m[..., None]).exp().sum(-1)], dim=2)[:, :, None].contiguous()
        row: dict = {"batch": batch, "pages": pages, "tied": args.tied}
        first = None
        for path, module in modules.items():
            inputs = (logits, stats) if "stats" in inspect.signature(module.top_pages_from_logits).parameters else (logits,)

            def call(module=module, inputs=inputs) -> None:
                module.top_pages_from_logits(*inputs, seq, seq, gap, k, PAGE, index, count, keys)
            index.fill_(-1)
            row[f"{path} us"] = round(bench(call, dev, graph=True) * 1000, 2)
            sets = chosen_sets(index, count)
            first = first or sets
            row[f"{path} same pages"] = sets == first
        for chunk in args.cuda_chunks:
            from rocketkv_vllm.kernels import cuda_ops

            def call_cuda(chunk=chunk) -> None:
                cuda_ops.top_pages_from_logits(logits, stats, seq, seq, gap, k, PAGE, index, count, keys, chunk=chunk)
            index.fill_(-1)
            row[f"cuda chunk {chunk} us"] = round(bench(call_cuda, dev, graph=True) * 1000, 2)
            row[f"cuda chunk {chunk} same pages"] = chosen_sets(index, count) == first
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
