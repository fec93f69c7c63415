"""Decode step time: RocketKV vs stock vLLM (FLASH_ATTN), same GPU, same run.

Llama-3.1-8B shape (llama31_8b_config.json beside this file), random weights
(load_format="dummy"), random token prompts, greedy, prefix caching off. Each backend runs in
its own subprocess (one engine per process), back to back.

Method: every (context, batch) case runs --repeats times (fresh prompts each time). In each
run the engine is stepped like LLM.generate does, and a decode step's time is the gap between
the engine core's timestamps of two consecutive steps in which all `batch` requests decode
(engine_steps.py): prefill, compaction and the first decode steps are outside it. Reported per
case: the median, min and max over repeats of the per-run median step time (= TPOT), decode
tokens/s, prefill time, and the bytes-moved floor of one step (roofline.py) at --hbm-tbs.

    python benchmarks/bench_decode.py --cases 8192x1 32768x1 32768x8 --out 256 --repeats 3 \
        --json benchmarks/results/decode.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_util import STOCK_BACKEND, add_engine_args, compare, engine_kwargs, is_rocketkv, json_rows, model_dir, plot_series, random_prompts, ratio, spread, write_json  # noqa: E402
from engine_steps import decode_step_times, prefill_seconds, run_steps  # noqa: E402
from roofline import ModelShape, case_roofline, hbm_tb_s  # noqa: E402


def parse_cases(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(context, batch) pairs: --cases CONTEXTxBATCH, else every --ctx with every --batch."""
    if args.cases:
        pairs = []
        for case in args.cases:
            parts = case.lower().split("x")
            if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"--cases entries must be CONTEXTxBATCH with positive integers, got {case!r}")
            pairs.append((int(parts[0]), int(parts[1])))
        return pairs
    return [(ctx, batch) for ctx in args.ctx for batch in args.batch]


def other_prefill_steps(ctx: int, batch: int, chunk_tokens: int) -> int:
    """Steps, at least, that prefill the other batch - 1 prompts after the first one's (chunk_tokens a step)."""
    return math.ceil((batch - 1) * ctx / chunk_tokens)


def steps_all_decoding(ctx: int, batch: int, out: int, chunk_tokens: int) -> int:
    """At most how many steps see all `batch` requests decoding: the first request's output
    tokens (its first comes from its prefill) less the other prompts' prefill steps."""
    return out - 1 - other_prefill_steps(ctx, batch, chunk_tokens)


def check_out_is_long_enough(args: argparse.Namespace, chunk_tokens: int) -> None:
    """Refuse a --out too short for any timed step (the first request would finish before the
    last prompt's prefill ends), naming the --out every case needs."""
    for ctx, batch in parse_cases(args):
        if steps_all_decoding(ctx, batch, args.out, chunk_tokens) <= args.skip_steps:
            need = args.skip_steps + 2 + other_prefill_steps(ctx, batch, chunk_tokens)
            raise SystemExit(f"--out {args.out} is too short for {ctx}x{batch}: the first request finishes before the "
                             f"other {batch - 1} prompts are prefilled ({chunk_tokens} tokens a step); use --out >= {need}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=[STOCK_BACKEND, "rocketkv"])
    parser.add_argument("--backend", help=argparse.SUPPRESS)  # set in the child process
    parser.add_argument("--ctx", type=int, nargs="+", default=[32768])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cases", nargs="+", default=None, help="CONTEXTxBATCH pairs instead of --ctx x --batch, e.g. 32768x8 130000x1")
    parser.add_argument("--out", type=int, default=256, help="decode tokens per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-steps", type=int, default=2, help="first all-decoding steps of each run left out")
    parser.add_argument("--warmup-ctx", type=int, default=8192, help="context of the warm-up run (batch up to 8, 16 tokens)")
    parser.add_argument("--hbm-tbs", type=float, default=None, help="HBM bandwidth for the roofline, TB/s (default: this GPU's, roofline.HBM_TB_S)")
    parser.add_argument("--plot-from", default=None, help="only redraw the plot of this JSON result (beside it, or at --plot)")
    parser.add_argument("--json", default=None, help="write all rows here")
    parser.add_argument("--plot", default=None, help="TPOT vs batch PNG (default: beside --json)")
    add_engine_args(parser)
    return parser


def measure_case(llm, args: argparse.Namespace, backend: str, ctx: int, batch: int, shape: ModelShape, progress) -> dict:
    """--repeats runs of batch prompts of ctx tokens: one row of step-time statistics."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=args.out, temperature=0, ignore_eos=True, detokenize=False)
    tpot_ms, prefill_s, steps_used = [], [], []
    for repeat in range(args.repeats):
        run = run_steps(llm, random_prompts(batch, ctx, shape.vocab, seed=repeat), params, tag=f"{ctx}x{batch}r{repeat}", progress=progress)
        times = decode_step_times(run.steps, batch, skip=args.skip_steps)
        tpot_ms.append(1e3 * statistics.median(times) if times else None)
        prefill_s.append(prefill_seconds(run.requests))
        steps_used.append(len(times))
    tpot = spread(tpot_ms)
    roof = case_roofline(shape, backend, ctx, batch, args.out, args.budget, args.mode, args.block_size, args.hbm_tbs,
                         args.rocketkv_config)
    row = {
        "backend": backend, "ctx": ctx, "batch": batch, "out": args.out, "repeats": args.repeats,
        "tpot_ms": tpot, "tpot_ms_runs": [None if t is None else round(t, 3) for t in tpot_ms],
        "decode_tok_s": spread([None if t is None else 1e3 * batch / t for t in tpot_ms], 1),
        "prefill_s": spread(prefill_s), "decode_steps_timed": steps_used, "roofline": roof,
        "floor_fraction": round(roof["floor_ms"] / tpot["median"], 3) if tpot["median"] else None,
    }
    if not any(steps_used):
        row["note"] = "never all requests decoding at once (KV capacity or --max-num-seqs)"
    return row


def run_backend(args: argparse.Namespace) -> None:
    """Child process: one engine, every case; prints one JSON row per case."""
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    backend = args.backend
    cases = parse_cases(args)
    shape = ModelShape.from_file(args.config)
    started = time.time()
    llm = LLM(model_dir(args.config), **engine_kwargs(
        args, backend, max_model_len=max(max(c for c, _ in cases), args.warmup_ctx) + args.out + 16,
        max_num_seqs=max(b for _, b in cases)))
    up = time.time() - started
    check_out_is_long_enough(args, llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)
    cache = llm.llm_engine.vllm_config.cache_config
    settings = {"engine_up_s": round(up, 1), "kv_cache_tokens": cache.num_gpu_blocks * args.block_size, "block_size": args.block_size,
                "eager": args.eager, "max_num_seqs": llm.llm_engine.vllm_config.scheduler_config.max_num_seqs,
                "budget": args.budget if is_rocketkv(backend) else None, "mode": args.mode if is_rocketkv(backend) else None}
    warm_batch = min(8, max(b for _, b in cases))
    run_steps(llm, random_prompts(warm_batch, min(args.warmup_ctx, min(c for c, _ in cases)), shape.vocab, seed=99),
              SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, detokenize=False), tag="warmup")
    total = sum(batch * args.out * args.repeats for _, batch in cases)
    with tqdm(total=total, desc=f"{backend} decode tokens", file=sys.stderr, dynamic_ncols=True) as bar:
        for ctx, batch in cases:
            row = measure_case(llm, args, backend, ctx, batch, shape, bar.update)
            print(json.dumps({**row, **settings}), flush=True)


def run_child(args: argparse.Namespace, backend: str) -> tuple[list[dict], list[str], int]:
    """One backend in its own process: its JSON rows, vLLM's CUDA-graph capture log lines, its exit code.
    The child's stderr (progress bar, tracebacks) passes through."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--backend", backend],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout: list[bytes] = []
    reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read()), daemon=True)
    reader.start()
    tail = b""
    for chunk in iter(lambda: proc.stderr.read1(65536), b""):
        sys.stderr.buffer.write(chunk)
        sys.stderr.buffer.flush()
        tail = (tail + chunk)[-400_000:]
    code = proc.wait()
    reader.join()
    out = b"".join(stdout).decode(errors="replace")
    # vLLM logs to stdout by default (VLLM_LOGGING_STREAM), tracebacks go to stderr: look in both
    text = out + "\n" + tail.decode(errors="replace")
    graph_lines = [line.strip() for line in text.splitlines() if "graph" in line.lower() and "captur" in line.lower()]
    return json_rows(out), graph_lines[-6:], code


def speedups(rows: list[dict]) -> list[dict]:
    """Stock TPOT / RocketKV TPOT per (context, batch), from the medians of the repeats."""
    return compare(rows, lambda r: f"{r['ctx']}x{r['batch']}",
                   {"tpot_speedup": lambda stock, ours: ratio(stock["tpot_ms"]["median"], ours["tpot_ms"]["median"])})


def plot_decode(rows: list[dict], path: str) -> bool:
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in sorted(rows, key=lambda r: r["batch"]):
        xs, ys = series.setdefault(f"{row['backend']} {row['ctx'] // 1024}K", ([], []))
        xs.append(row["batch"])
        ys.append(row["tpot_ms"]["median"])
    return plot_series(path, series, "batch (requests decoding)", "TPOT ms (median of repeats)", "Decode step time", xlog=True)


def main() -> None:
    args = build_parser().parse_args()
    if args.hbm_tbs is None:
        args.hbm_tbs = hbm_tb_s()
    if args.plot_from:
        with open(args.plot_from) as f:
            plot_decode(json.load(f)["rows"], args.plot or os.path.splitext(args.plot_from)[0] + ".png")
        return
    parse_cases(args)  # fail early on bad --cases
    if args.max_num_batched_tokens:  # else the engine's default, checked once it is up
        check_out_is_long_enough(args, args.max_num_batched_tokens)
    if args.backend:
        run_backend(args)
        return
    rows, graphs = [], {}
    for backend in args.backends:
        done, graph_lines, code = run_child(args, backend)
        rows += done
        graphs[backend] = graph_lines
        if code:
            print(f"[{backend}] exited with {code}", file=sys.stderr)
        if args.json:  # after each backend, so a time limit keeps what finished
            write_json(args.json, {"command": " ".join(sys.argv), "rows": rows, "speedups": speedups(rows), "cuda_graph_log": graphs})
    for row in rows:
        print(f"{row['backend']:>10} {row['ctx']:>7}x{row['batch']:<4} TPOT {row['tpot_ms']['median']} ms "
              f"[{row['tpot_ms']['min']}, {row['tpot_ms']['max']}]  floor {row['roofline']['floor_ms']} ms", flush=True)
    for pair in speedups(rows):
        print(f"{pair['key']}: RocketKV {pair['tpot_speedup']}x stock", flush=True)
    if args.json:
        plot_decode(rows, args.plot or os.path.splitext(args.json)[0] + ".png")


if __name__ == "__main__":
    main()
