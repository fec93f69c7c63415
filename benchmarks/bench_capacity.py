"""Offline capacity: N long prompts submitted at once (the batch-job use), stock vs RocketKV.

For each context L: N random prompts of L tokens go into one engine together and run to the
end, stepped exactly as LLM.generate steps them (engine_steps.run_steps). Reported: output
tokens/s of the whole job (engine time from the first scheduling to the last token, prefill
included), the peak number of requests that got a token in one step (concurrent decodes), the
peak of vLLM's own gauges vllm:num_requests_running and vllm:kv_cache_usage_perc (sampled from
llm.get_metrics() every --gauge-every seconds), and the KV pool size the engine reports.
Each backend runs in its own subprocess, back to back.

    python benchmarks/bench_capacity.py --ctx 32768 --prompts 48 --out 512 --json benchmarks/results/capacity.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_util import STOCK_BACKEND, add_engine_args, compare, engine_kwargs, is_rocketkv, json_rows, model_dir, plot_series, random_prompts, ratio, spread, write_json  # noqa: E402
from engine_steps import KV_USAGE, RUNNING, Run, peak, prefill_seconds, run_steps  # noqa: E402
from roofline import ModelShape, rocketkv_plan  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=[STOCK_BACKEND, "rocketkv"])
    parser.add_argument("--backend", help=argparse.SUPPRESS)  # set in the child process
    parser.add_argument("--ctx", type=int, nargs="+", default=[32768], help="prompt lengths (tokens)")
    parser.add_argument("--prompts", type=int, nargs="+", default=[48], help="prompts per context: one value, or one per --ctx")
    parser.add_argument("--out", type=int, default=512, help="output tokens per request")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--gauge-every", type=float, default=0.25, help="seconds between samples of vLLM's gauges")
    parser.add_argument("--plot-from", default=None, help="only redraw the plot of this JSON result (beside it, or at --plot)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="output tok/s PNG (default: beside --json)")
    add_engine_args(parser)
    return parser


def cases(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(context, prompts) pairs."""
    if len(args.prompts) not in (1, len(args.ctx)):
        raise ValueError(f"--prompts takes one value or one per --ctx ({len(args.ctx)}), got {len(args.prompts)}")
    counts = args.prompts * len(args.ctx) if len(args.prompts) == 1 else args.prompts
    if min(counts) < 1 or min(args.ctx) < 1:
        raise ValueError("--ctx and --prompts must be positive")
    return list(zip(args.ctx, counts))


def tokens_held(args: argparse.Namespace, backend: str, shape: ModelShape, ctx: int) -> int:
    """KV tokens one request holds once decoding (after RocketKV's stage 1), in whole blocks."""
    held = ctx + args.out
    if is_rocketkv(backend):
        plan, _ = rocketkv_plan(shape, ctx, args.out, args.budget, args.mode, args.block_size, args.rocketkv_config)
        held = plan.keep + args.out
    return math.ceil(held / args.block_size) * args.block_size


def summarize(run: Run, prompts: int) -> dict:
    first = min(r["scheduled_ts"] for r in run.requests)
    last = max(r["last_token_ts"] for r in run.requests)
    kv = peak(run.gauges, KV_USAGE)
    return {
        "completed": len(run.requests), "prompts": prompts, "output_tokens": run.tokens,
        "output_tok_s": run.tokens / (last - first) if last > first else None,
        "job_s": last - first, "prefill_s": prefill_seconds(run.requests),
        "peak_decoding": max(s.rows for s in run.steps), "peak_running": peak(run.gauges, RUNNING),
        "peak_kv_usage": round(kv, 4) if kv is not None else None,
    }


def run_backend(args: argparse.Namespace) -> None:
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    backend, pairs = args.backend, cases(args)
    shape = ModelShape.from_file(args.config)
    started = time.time()
    llm = LLM(model_dir(args.config), **engine_kwargs(args, backend, max_model_len=max(c for c, _ in pairs) + args.out + 16,
                                                     max_num_seqs=max(n for _, n in pairs)))
    up = time.time() - started
    kv_tokens = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks * args.block_size
    params = SamplingParams(max_tokens=args.out, temperature=0, ignore_eos=True, detokenize=False)
    total = sum(n * args.out * args.repeats for _, n in pairs)
    with tqdm(total=total, desc=f"{backend} output tokens", file=sys.stderr, dynamic_ncols=True) as bar:
        for ctx, n in pairs:
            runs = [summarize(run_steps(llm, random_prompts(n, ctx, shape.vocab, seed=r), params, tag=f"{ctx}n{n}r{r}",
                                        gauge_every_s=args.gauge_every, progress=bar.update), n) for r in range(args.repeats)]
            held = tokens_held(args, backend, shape, ctx)
            row = {
                "backend": backend, "ctx": ctx, "prompts": n, "out": args.out, "repeats": args.repeats,
                "output_tok_s": spread([r["output_tok_s"] for r in runs], 1),
                "peak_decoding": spread([r["peak_decoding"] for r in runs], 0),
                "peak_running": spread([r["peak_running"] for r in runs], 0),
                "peak_kv_usage": spread([r["peak_kv_usage"] for r in runs], 4),
                "prefill_s": spread([r["prefill_s"] for r in runs]), "job_s": spread([r["job_s"] for r in runs]),
                "completed": [r["completed"] for r in runs],
                "kv_cache_tokens": kv_tokens, "tokens_held_per_request": held, "fits_at_once": kv_tokens // held,
                "engine_up_s": round(up, 1), "budget": args.budget if is_rocketkv(backend) else None,
                "mode": args.mode if is_rocketkv(backend) else None, "block_size": args.block_size, "eager": args.eager,
            }
            print(json.dumps(row), flush=True)


def ratios(rows: list[dict]) -> list[dict]:
    """RocketKV over stock per context: job throughput and peak concurrent decodes."""
    return compare(rows, lambda r: r["ctx"], {
        "throughput_ratio": lambda stock, ours: ratio(ours["output_tok_s"]["median"], stock["output_tok_s"]["median"]),
        "peak_decoding_stock": lambda stock, ours: stock["peak_decoding"]["median"],
        "peak_decoding_rocketkv": lambda stock, ours: ours["peak_decoding"]["median"]})


def plot_capacity(rows: list[dict], path: str) -> bool:
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in sorted(rows, key=lambda r: r["ctx"]):
        xs, ys = series.setdefault(row["backend"], ([], []))
        xs.append(row["ctx"])
        ys.append(row["output_tok_s"]["median"])
    return plot_series(path, series, "prompt tokens", "output tok/s (whole job)", "Offline batch throughput", xlog=True)


def main() -> None:
    args = build_parser().parse_args()
    if args.plot_from:
        with open(args.plot_from) as f:
            plot_capacity(json.load(f)["rows"], args.plot or os.path.splitext(args.plot_from)[0] + ".png")
        return
    cases(args)  # fail early on bad sizes
    if args.backend:
        run_backend(args)
        return
    rows = []
    for backend in args.backends:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--backend", backend], stdout=subprocess.PIPE, text=True)
        rows += json_rows(proc.stdout)
        if proc.returncode:
            print(f"[{backend}] exited with {proc.returncode}", file=sys.stderr)
        if args.json:  # after each backend, so a time limit keeps what finished
            write_json(args.json, {"command": " ".join(sys.argv), "rows": rows, "ratios": ratios(rows)})
    for row in rows:
        print(f"{row['backend']:>10} {row['ctx']:>7} x {row['prompts']:<4} {row['output_tok_s']['median']} tok/s, "
              f"peak decoding {row['peak_decoding']['median']}, fits {row['fits_at_once']}", flush=True)
    for pair in ratios(rows):
        print(f"{pair['key']}: RocketKV {pair['throughput_ratio']}x stock throughput", flush=True)
    if args.json:
        plot_capacity(rows, args.plot or os.path.splitext(args.json)[0] + ".png")


if __name__ == "__main__":
    main()
