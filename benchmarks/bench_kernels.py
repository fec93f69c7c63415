"""Benchmark RocketKV's kernels on a GPU: time, bytes-moved floor, achieved bandwidth.

Shapes default to Llama-3.1-8B (32 query heads, 8 KV heads, head_dim 128, bf16), block 16,
page 4, batch 1/8/32, context 32K/128K, token budget 256/1024/2048. Decode kernels run in
both modes: `rocketkv` (the live pages after stage 1: the kept prompt tokens of the
budget split plus 64 decode tokens) and `mt` (no eviction: every page of the context is
scored); HSA picks the split's top_k / page_size pages and r channels per KV head.

For every kernel: median time, the minimal bytes it must move, and the achieved GB/s
against the device-to-device copy bandwidth measured at start (the roofline ceiling).
Decode kernels are timed inside a CUDA graph (triton.testing.do_bench_cudagraph: device
time without launch gaps, and proof that they capture). paged_sparse_attention is
compared with vLLM's FlashAttention-3 (vllm.vllm_flash_attn.flash_attn_varlen_func, when
importable) decoding over (a) a dense context as long as the sparse selection and (b) the
full context; the selection time is reported as a fraction of the attention step.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels_h100.json
    python benchmarks/bench_kernels.py --batches 1 --contexts 32768 --budgets 1024   # quick

`--smoke` runs tiny shapes on CPU under the Triton interpreter (checks the script only).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rocketkv_vllm.algorithms.budget import split_budget  # noqa: E402
from rocketkv_vllm.config import RocketKVConfig  # noqa: E402
from rocketkv_vllm.kernels import triton_ops as T  # noqa: E402
from rocketkv_vllm.kernels import cuda_ops  # noqa: E402
from rocketkv_vllm.kernels.triton_hsa import gather_channels  # noqa: E402
from rocketkv_vllm.kv_layout import KVLayout  # noqa: E402


def bench(fn, device, warmup=10, rep=50, graph=False) -> float:
    """Median milliseconds (graph=True: replayed from a CUDA graph)."""
    if device.type == "cuda":
        import triton.testing

        if graph:
            # do_bench_cudagraph runs fn on a fresh stream: inputs made on this one must be ready
            torch.cuda.synchronize()
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device, nbytes=1 << 30) -> float:
    """Device-to-device copy GB/s (read + write counted)."""
    if device.type != "cuda":
        nbytes = 1 << 24
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


class Setup:
    """A paged cache holding B requests of `context` tokens (random contents)."""

    def __init__(self, args, batch, context, device):
        self.layout = KVLayout(args.block_size, args.page_size)
        self.batch, self.context = batch, context
        self.hq, self.hkv, self.d = args.q_heads, args.kv_heads, args.head_dim
        self.dtype = getattr(torch, args.dtype)
        self.elt = torch.finfo(self.dtype).bits // 8
        bs = args.block_size
        # one spare block per request for the decode token
        self.blocks_per_req = context // bs + 1
        num_blocks = batch * self.blocks_per_req
        self.kv = torch.empty(self.layout.cache_shape(num_blocks, self.hkv, self.d), dtype=self.dtype, device=device)
        self.kv.normal_()
        perm = torch.randperm(num_blocks, device=device, dtype=torch.int64).int()
        self.table = perm.view(batch, self.blocks_per_req).contiguous()
        self.seq = torch.full((batch,), context, dtype=torch.int32, device=device)
        self.keep = self.seq.clone()
        self.gap = self.seq.clone()
        self.query = torch.randn(batch, self.hq, self.d, device=device).to(self.dtype)
        self.scale = self.d**-0.5


def bench_config(args, batch, context, device, copy_bw, fa_func):
    s = Setup(args, batch, context, device)
    layout, elt, hkv, d = s.layout, s.elt, s.hkv, s.d
    ps, bs = layout.page_size, layout.block_size
    rows = []

    def record(kernel, budget, ms, nbytes, **extra):
        bw = gbps(nbytes, ms)
        rows.append(dict(kernel=kernel, batch=batch, context=context, budget=budget, ms=ms, bytes=nbytes,
                         gbps=bw, frac_of_copy_bw=bw / copy_bw, **extra))

    # --- write_kv (one decode token per request) ---------------------------------------
    pos = s.seq.long()
    slots = s.table.gather(1, (pos // bs)[:, None].int()).long()[:, 0] * bs + pos % bs
    k_new = torch.randn(batch, hkv, d, device=device).to(s.dtype)
    v_new = torch.randn_like(k_new)
    # K/V in, K/V rows out, page summary read (+write): per token and head
    wbytes = batch * hkv * d * elt * (2 + 2 + 4)
    ms = bench(lambda: T.write_kv(s.kv, layout, k_new, v_new, slots), device)
    record("write_kv[triton] decode", None, ms, wbytes)
    if cuda_ops.available():
        ms = bench(lambda: cuda_ops.write_kv(s.kv, layout, k_new, v_new, slots), device)
        record("write_kv[cuda] decode", None, ms, wbytes)
    # a prefill chunk of one request (many tokens per page)
    chunk = min(args.prefill_chunk, context)
    cpos = torch.arange(chunk, device=device)
    cslots = s.table[0, cpos // bs].long() * bs + cpos % bs
    kc = torch.randn(chunk, hkv, d, device=device).to(s.dtype)
    vc = torch.randn_like(kc)
    pbytes = chunk * hkv * d * elt * 4 + (chunk // ps) * hkv * d * elt * 2
    ms = bench(lambda: T.write_kv(s.kv, layout, kc, vc, cslots), device)
    record(f"write_kv[triton] prefill{chunk}", None, ms, pbytes)
    if cuda_ops.available():
        ms = bench(lambda: cuda_ops.write_kv(s.kv, layout, kc, vc, cslots), device)
        record(f"write_kv[cuda] prefill{chunk}", None, ms, pbytes)

    # --- HSA selection + sparse attention per budget and mode ---------------------------
    for budget in args.budgets:
        for mode in ("rocketkv", "mt"):
            split = split_budget(context, 0, budget, d, bs, window=args.window, evict=mode == "rocketkv", page_size=ps)
            decoded = 64  # tokens generated since stage 1
            s.keep.fill_(split.prompt_keep)
            s.gap.fill_(context - decoded)
            live_pages = -(-split.prompt_keep // ps) + -(-decoded // ps)
            if mode == "mt":
                s.keep.fill_(context)
                live_pages = -(-context // ps)
            k_pages = split.top_k // ps
            top_channels = torch.full((batch,), split.top_channels, dtype=torch.int32, device=device)
            top_pages = torch.full((batch,), k_pages, dtype=torch.int32, device=device)
            tag = dict(mode=mode, top_pages=k_pages, top_channels=split.top_channels, live_pages=live_pages)

            # the summary layout a server in this mode uses (row-major, or channel groups for mt)
            mode_layout = KVLayout(bs, ps, RocketKVConfig(mode=mode).layout_summary_group())

            def select():
                return T.hsa_select_pages(s.query, s.kv, mode_layout, s.table, s.seq, s.keep, s.gap, top_channels,
                                          top_pages)

            # floor: every live page's max/min on the channels the logits kernel needs (the
            # chosen ones on its few-channel path, else all)
            grouped = mode_layout.summary_channels(d) < d
            read_channels = split.top_channels if split.top_channels <= gather_channels(d, grouped) else d
            sel_bytes = batch * hkv * live_pages * 2 * read_channels * elt
            ms_sel = bench(select, device, graph=True)
            record("hsa_select_pages", budget, ms_sel, sel_bytes, **tag)
            pages = select()
            tokens = k_pages * ps
            attn_bytes = batch * hkv * tokens * 2 * d * elt + 2 * batch * s.hq * d * elt
            ms_attn = bench(lambda: T.paged_sparse_attention(s.query, s.kv, layout, s.table, pages.index, pages.count,
                                                             s.seq, s.keep, s.gap, s.scale), device, graph=True)
            record("paged_sparse_attention", budget, ms_attn, attn_bytes, tokens=tokens,
                   selection_fraction=ms_sel / (ms_sel + ms_attn), **tag)
            if fa_func is not None and mode == "rocketkv":
                for label, n_tok in (("same_tokens", tokens), ("dense_context", context)):
                    if label == "dense_context" and budget != args.budgets[0]:
                        continue  # independent of the budget
                    try:
                        ms_fa, fa_bytes = bench_fa3(fa_func, s, n_tok, device)
                        record(f"fa3[{label}]", budget if label == "same_tokens" else None, ms_fa, fa_bytes,
                               tokens=n_tok, sparse_attention_ms=ms_attn)
                    except Exception as exc:  # keep benchmarking the rest
                        rows.append(dict(kernel=f"fa3[{label}]", batch=batch, context=context, error=repr(exc)[:300]))
                    torch.cuda.empty_cache()
    s.keep.copy_(s.seq)
    s.gap.copy_(s.seq)

    # --- stage 1: SnapKV window scores and compaction (one request) ---------------------
    if batch == args.batches[0]:
        w = args.window
        keys = s.kv[:, :, :bs].transpose(1, 2)[s.table[0].long()].reshape(-1, hkv, d)[:context].contiguous()
        wq = torch.randn(w, s.hq, d, device=device).to(s.dtype)
        ms = bench(lambda: T.snapkv_window_scores(wq, keys, context), device, warmup=3, rep=10)
        record("snapkv_window_scores", None, ms, context * hkv * d * elt + w * s.hq * d * elt + hkv * context * 4,
               window=w, flops=4.0 * w * s.hq * context * d)
        del keys
        keep = context // 4
        kept = torch.stack([torch.randperm(context, device=device)[:keep].sort().values for _ in range(hkv)])
        cbytes = 2 * 2 * keep * hkv * d * elt * 2 + (keep // ps) * hkv * 2 * d * elt  # via scratch, + summaries

        def compact():
            T.compact_kept_tokens(s.kv, layout, s.table[0], kept, context + 1)

        ms = bench(compact, device, warmup=2, rep=10)
        record("compact_kept_tokens", None, ms, cbytes, keep=keep)
    del s
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def bench_fa3(fa_func, s, n_tok, device):
    """vLLM FA3 decode of B requests over n_tok dense tokens in a paged [NB, 16, Hkv, D] cache."""
    bs = 16
    blocks = -(-n_tok // bs)
    nb = s.batch * blocks
    k_cache = torch.empty(nb, bs, s.hkv, s.d, dtype=s.dtype, device=device).normal_()
    v_cache = torch.empty_like(k_cache).normal_()
    table = torch.randperm(nb, device=device).int().view(s.batch, blocks)
    seqused = torch.full((s.batch,), n_tok, dtype=torch.int32, device=device)
    cu_q = torch.arange(s.batch + 1, dtype=torch.int32, device=device)
    out = torch.empty_like(s.query)

    def run():
        fa_func(q=s.query, k=k_cache, v=v_cache, max_seqlen_q=1, cu_seqlens_q=cu_q, max_seqlen_k=n_tok,
                seqused_k=seqused, softmax_scale=s.scale, causal=True, block_table=table, out=out, fa_version=3)

    ms = bench(run, device, graph=True)
    nbytes = s.batch * n_tok * s.hkv * 2 * s.d * s.elt + 2 * s.batch * s.hq * s.d * s.elt
    del k_cache, v_cache
    return ms, nbytes


def markdown(rows, copy_bw) -> str:
    lines = [f"Device-to-device copy ceiling: {copy_bw:.0f} GB/s", "",
             "| kernel | B | context | budget | ms | MB moved (floor) | GB/s | % of copy BW | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['batch']} | {r['context']} | | | | | | error: {r['error'][:80]} |")
            continue
        notes = []
        if "mode" in r:
            notes.append(f"{r['mode']}: {r['live_pages']} live pages, k={r['top_pages']}, r={r['top_channels']}")
        if "selection_fraction" in r:
            notes.append(f"selection = {100 * r['selection_fraction']:.0f}% of select+attend")
        if "sparse_attention_ms" in r:
            notes.append(f"{r['tokens']} tok; sparse attn {r['sparse_attention_ms']:.4f} ms")
        if "flops" in r:
            notes.append(f"{r['flops'] / (r['ms'] * 1e-3) / 1e12:.1f} TFLOP/s")
        budget = "" if r.get("budget") is None else r["budget"]
        lines.append(f"| {r['kernel']} | {r['batch']} | {r['context']} | {budget} | {r['ms']:.4f} | "
                     f"{r['bytes'] / 1e6:.2f} | {r['gbps']:.0f} | {100 * r['frac_of_copy_bw']:.0f}% | {'; '.join(notes)} |")
    return "\n".join(lines)


def selection_summary(rows, context) -> str:
    out = [f"", f"Selection time as a fraction of the attention step (hsa_select_pages + paged_sparse_attention) at {context}:",
           "", "| mode | B | budget | select ms | attend ms | selection share | FA3 dense full-context ms |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("kernel") != "paged_sparse_attention" or r["context"] != context:
            continue
        sel = next(x for x in rows if x.get("kernel") == "hsa_select_pages" and x["batch"] == r["batch"]
                   and x["context"] == context and x["budget"] == r["budget"] and x["mode"] == r["mode"])
        dense = next((x["ms"] for x in rows if x.get("kernel") == "fa3[dense_context]" and "ms" in x
                      and x["batch"] == r["batch"] and x["context"] == context), None)
        dense_s = f"{dense:.4f}" if dense is not None else "n/a"
        out.append(f"| {r['mode']} | {r['batch']} | {r['budget']} | {sel['ms']:.4f} | {r['ms']:.4f} | "
                   f"{100 * r['selection_fraction']:.0f}% | {dense_s} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/bench_kernels.json")
    p.add_argument("--batches", type=lambda x: [int(v) for v in x.split(",")], default=[1, 8, 32])
    p.add_argument("--contexts", type=lambda x: [int(v) for v in x.split(",")], default=[32768, 131072])
    p.add_argument("--budgets", type=lambda x: [int(v) for v in x.split(",")], default=[256, 1024, 2048])
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--page-size", type=int, default=4)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=8192)
    p.add_argument("--no-fa3", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run under the Triton interpreter")
    args = p.parse_args()
    if args.smoke:
        device = torch.device("cpu")
        args.batches, args.contexts, args.budgets = [2], [512], [64]
        args.q_heads, args.kv_heads, args.head_dim, args.prefill_chunk, args.window = 8, 2, 32, 64, 8
        args.dtype = "float32"
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_kernels.py needs a CUDA GPU (or --smoke)")
        device = torch.device("cuda")
    torch.manual_seed(0)

    fa_func = None
    fa_note = "skipped (--no-fa3)" if args.no_fa3 else None
    if device.type == "cuda" and not args.no_fa3:
        try:
            from vllm.vllm_flash_attn import flash_attn_varlen_func as fa_func  # type: ignore
            fa_note = "vllm.vllm_flash_attn.flash_attn_varlen_func (fa_version=3)"
        except Exception as exc:  # vLLM absent or built without FA3
            fa_note = f"not importable: {exc!r}"[:200]
    copy_bw = copy_bandwidth(device)

    rows = []
    for context in args.contexts:
        for batch in args.batches:
            t0 = time.time()
            rows += bench_config(args, batch, context, device, copy_bw, fa_func)
            print(f"# B={batch} context={context} done in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)

    table = markdown(rows, copy_bw)
    summary = selection_summary(rows, max(args.contexts))
    print(table)
    print(summary)
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "cuda_cpp_write_kv": cuda_ops.available(),
        "fa3": fa_note,
        "copy_bandwidth_gbps": copy_bw,
        "args": vars(args),
        "notes": "bytes = minimal traffic floor; gbps = bytes / median time; frac_of_copy_bw vs measured D2D copy.",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
