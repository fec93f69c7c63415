"""Dense decode attention (every live page of a row, no selection) against FlashAttention 3
over as many tokens, with the split kernel's launch settings swept.

With the default dense_below, every rocketkv request up to 128K at a 2048-token budget decodes
exactly over what stage 1 kept, through the split kernel (triton_attention.py). Session 17's
timings put it at ~1.4-1.6x FA3's time per token over long rows (16K x 8 whole contexts: 6.52
vs 4.36 ms for 32 layers), close to FA3 over short page lists. This times, per shape (tokens
kept x batch, a 1,000-token gap, then 256 decoded tokens; Llama-3.1-8B heads), CUDA-graph
replays of enough layers that their caches exceed L2:

- the split kernel as launched today (default splits, 64 tokens an iteration, 4 warps, 2 stages),
- every combination of --split-factors (x the default split count, at most 128), --tokens,
  --warps and --stages,
- FA3 (vLLM's flash_attn_varlen_func, the stock decode kernel) over the same number of tokens,

as microseconds per layer (median and range of --repeats) and the bandwidth that implies over
the K/V bytes read. JSON on stdout.

    python benchmarks/sweep_dense_attention.py --shapes 5000x1 9400x1 12500x3 9400x8 16384x8 9400x48
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_eager_host import captured, timed  # noqa: E402

from rocketkv_vllm.kernels import triton_attention  # noqa: E402
from rocketkv_vllm.kernels.triton_common import num_sms  # noqa: E402
from rocketkv_vllm.kv_layout import KVLayout  # noqa: E402
from rocketkv_vllm.ops.reference import EVERY_PAGE  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK, PAGE = 32, 8, 128, 16, 2
GAP, DECODED = 1000, 256


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["5000x1", "9400x1", "12500x3", "9400x8", "16384x8", "9400x48"],
                   help="kept tokens x batch")
    p.add_argument("--split-factors", type=float, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 128])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--l2-bytes", type=float, default=256e6, help="layers are added until their K/V exceed this")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


class Rows:
    """`batch` rows of one evicted shape: kept prompt tokens, a gap, decoded tokens; one KV cache
    per layer (random blocks), so that replays of all layers read HBM, not L2."""

    def __init__(self, kept: int, batch: int, l2_bytes: float, device: torch.device) -> None:
        self.layout = KVLayout(BLOCK, PAGE)
        self.kept, self.batch = kept, batch
        prompt = kept + GAP
        seq = prompt + DECODED
        self.live_tokens = batch * (kept + DECODED)
        self.bytes_per_layer = self.live_tokens * KV_HEADS * HEAD_DIM * 2 * 2  # K and V, bf16
        self.layers = max(1, math.ceil(l2_bytes / self.bytes_per_layer))
        width = -(-seq // BLOCK)
        full = lambda v: torch.full((batch,), v, dtype=torch.int32, device=device)  # noqa: E731
        self.seq, self.keep, self.gap = full(seq), full(kept), full(prompt)
        self.table = (torch.randperm(batch * width, device=device).int().view(batch, width) + 1).contiguous()
        shape = self.layout.cache_shape(batch * width + 1, KV_HEADS, HEAD_DIM)
        self.kv = [torch.randn(shape, dtype=torch.bfloat16, device=device) for _ in range(self.layers)]
        self.query = torch.randn(batch, Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device)
        self.out = torch.empty_like(self.query)
        self.top_pages = full(EVERY_PAGE)
        # (dense rows read no page list)
        self.index = torch.zeros(batch, KV_HEADS, 1, dtype=torch.int32, device=device)
        self.count = torch.zeros(batch, KV_HEADS, dtype=torch.int32, device=device)

    def split_kernel(self, **launch) -> None:
        for kv in self.kv:
            triton_attention.paged_sparse_attention(
                self.query, kv, self.layout, self.table, self.index, self.count, self.seq, self.keep, self.gap,
                HEAD_DIM ** -0.5, out=self.out, top_pages=self.top_pages, **launch)

    def fa3(self):
        """FlashAttention 3 over as many tokens per row (a gap-free row of kept + decoded tokens
        in the same blocks), None without vLLM."""
        try:
            from vllm.vllm_flash_attn import flash_attn_varlen_func
        except ImportError:
            return None
        device = self.query.device
        cu_q = torch.arange(self.batch + 1, dtype=torch.int32, device=device)
        used = torch.full((self.batch,), self.kept + DECODED, dtype=torch.int32, device=device)

        def run() -> None:
            for kv in self.kv:
                flash_attn_varlen_func(
                    q=self.query, k=self.layout.keys(kv).transpose(1, 2), v=self.layout.values(kv).transpose(1, 2),
                    max_seqlen_q=1, cu_seqlens_q=cu_q, max_seqlen_k=self.kept + DECODED, seqused_k=used,
                    softmax_scale=HEAD_DIM ** -0.5, causal=True, block_table=self.table, fa_version=3, out=self.out)
        return run


def per_layer_us(run, rows: Rows, steps: int, repeats: int) -> dict:
    """A CUDA-graph replay of run() timed as bench_eager_host times its modes, per layer."""
    step = timed(captured(run).replay, steps, repeats)
    us = {key: step[f"step_ms_{key}"] * 1e3 / rows.layers for key in ("median", "min", "max")}
    return {"us_median": round(us["median"], 2), "us_min": round(us["min"], 2), "us_max": round(us["max"], 2),
            "tb_per_s": round(rows.bytes_per_layer / us["median"] / 1e6, 2)}


def main() -> None:
    args = parse()
    device = torch.device("cuda")
    sms = num_sms(device)
    report = {"gpu": torch.cuda.get_device_name(device), "sms": sms, "shapes": []}
    for shape in args.shapes:
        kept, batch = (int(v) for v in shape.split("x"))
        rows = Rows(kept, batch, args.l2_bytes, device)
        default_splits = triton_attention.default_splits(batch * KV_HEADS, sms)
        entry = {"kept": kept, "batch": batch, "layers": rows.layers, "mb_per_layer": round(rows.bytes_per_layer / 1e6, 1),
                 "default_splits": default_splits}
        entry["default"] = per_layer_us(rows.split_kernel, rows, args.steps, args.repeats)
        reference = rows.out.clone()
        fa3 = rows.fa3()
        if fa3 is not None:
            entry["fa3_same_tokens"] = per_layer_us(fa3, rows, args.steps, args.repeats)
        variants = []
        for factor, tokens, warps, stages in itertools.product(args.split_factors, args.tokens, args.warps, args.stages):
            splits = min(128, max(1, round(default_splits * factor)))
            launch = dict(num_splits=splits, tokens_per_iter=tokens, num_warps=warps, num_stages=stages)
            try:
                timing = per_layer_us(lambda: rows.split_kernel(**launch), rows, args.steps, args.repeats)
            except Exception as exc:  # (a launch that does not fit the SM's shared memory or registers)
                variants.append({**launch, "error": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            same = torch.allclose(rows.out.float(), reference.float(), rtol=2e-2, atol=2e-2)
            variants.append({**launch, **timing, "matches_default": same})
        timed = [v for v in variants if "us_median" in v]
        entry["best"] = min(timed, key=lambda v: v["us_median"]) if timed else None
        entry["variants"] = variants
        report["shapes"].append(entry)
        print(json.dumps({k: entry[k] for k in ("kept", "batch", "default", "best") if k in entry}
                         | {"fa3": entry.get("fa3_same_tokens")}), file=sys.stderr, flush=True)
        del rows
        torch.cuda.empty_cache()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
