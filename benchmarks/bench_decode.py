"""End-to-end decode speed: RocketKV vs stock vLLM (FLASH_ATTN), same GPU, same run.

Llama-3.1-8B shape (llama31_8b_config.json beside this file), random weights
(load_format="dummy"), random token prompts, greedy, prefix caching off. For each backend
and (context, batch): prefill (+ warm-up) time, decode time, TPOT, decode tokens/s, and the KV cache
capacity the engine reports. Each backend runs in its own subprocess (one engine per
process), results go to one JSON file.

    python benchmarks/bench_decode.py --ctx 32768 --batch 1 8 --budget 2048 --out benchmarks/results/decode_h100.json
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

HERE = os.path.dirname(os.path.abspath(__file__))
WARM_STEPS = 8  # decode steps in both timed runs


def cases(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(context, batch) pairs: --cases, else every --ctx with every --batch."""
    if args.cases:
        return [tuple(int(v) for v in case.lower().split("x")) for case in args.cases]
    return [(ctx, batch) for ctx in args.ctx for batch in args.batch]


def run_backend(args: argparse.Namespace) -> list[dict]:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir = tempfile.mkdtemp()
    shutil.copy(os.path.join(HERE, "llama31_8b_config.json"), os.path.join(model_dir, "config.json"))
    extra = {}
    if args.backend.lower() == "rocketkv":
        extra["additional_config"] = {"rocketkv": {"budget": args.budget, "mode": args.mode}}
    started = time.time()
    llm = LLM(
        model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
        max_model_len=max(ctx for ctx, _ in cases(args)) + WARM_STEPS + args.out + 16,
        max_num_seqs=max(batch for _, batch in cases(args)), enforce_eager=args.eager,
        gpu_memory_utilization=0.9, enable_prefix_caching=False, attention_backend=args.backend,
        block_size=args.block_size, **extra,
    )
    up = time.time() - started
    kv_tokens = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks * args.block_size
    generator = torch.Generator().manual_seed(0)
    rows = []
    for ctx, batch in cases(args):
        prompts = [TokensPrompt(prompt_token_ids=torch.randint(1000, 120000, (ctx,), generator=generator).tolist()) for _ in range(batch)]
        # TPOT is the difference of two runs that differ only in their number of decode steps,
        # so prefill, compaction and each request's first decode steps cancel out; a first
        # run of the short one warms up every kernel (Triton compiles on first use)
        few = SamplingParams(max_tokens=WARM_STEPS + 1, temperature=0, ignore_eos=True, detokenize=False)
        many = SamplingParams(max_tokens=WARM_STEPS + args.out + 1, temperature=0, ignore_eos=True, detokenize=False)
        llm.generate(prompts, few, use_tqdm=False)
        t0 = time.time()
        llm.generate(prompts, few, use_tqdm=False)
        t1 = time.time()
        llm.generate(prompts, many, use_tqdm=False)
        t2 = time.time()
        prefill, decode = t1 - t0, (t2 - t1) - (t1 - t0)
        rows.append({
            "backend": args.backend, "budget": args.budget if args.backend.lower() == "rocketkv" else None,
            "mode": args.mode if args.backend.lower() == "rocketkv" else None,
            "ctx": ctx, "batch": batch, "prefill_and_warm_s": round(prefill, 3), "decode_s": round(decode, 3),
            "tpot_ms": round(1000 * decode / args.out, 3), "decode_tok_s": round(batch * args.out / decode, 1),
            "kv_cache_tokens": kv_tokens, "engine_up_s": round(up, 1), "block_size": args.block_size,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["FLASH_ATTN", "rocketkv"])
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--ctx", type=int, nargs="+", default=[32768])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cases", nargs="+", default=None, help="CONTEXTxBATCH pairs instead of --ctx x --batch, e.g. 32768x8 131072x1")
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--mode", default="rocketkv", choices=["rocketkv", "mt"], help="the RocketKV server's mode")
    parser.add_argument("--out", type=int, default=128, help="decode tokens per request")
    parser.add_argument("--block-size", type=int, default=16, help="vLLM's KV block size (tokens)")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--json", default=None, help="write all rows here")
    args = parser.parse_args()
    if args.backend:  # child process: one engine
        run_backend(args)
        return
    rows = []
    for backend in args.backends:
        cmd = [sys.executable, __file__, "--backend", backend, "--budget", str(args.budget), "--mode", args.mode, "--out", str(args.out),
               "--block-size", str(args.block_size), "--ctx", *map(str, args.ctx), "--batch", *map(str, args.batch)] + (["--cases", *args.cases] if args.cases else []) + (["--eager"] if args.eager else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        done = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        print("\n".join(json.dumps(row) for row in done), flush=True)
        rows += done
        # which CUDA-graph modes the engine captured, as vLLM logs them
        graph_lines = [line for line in proc.stderr.splitlines() if "graph" in line.lower() and "captur" in line.lower()]
        print(f"[{backend}] " + f"\n[{backend}] ".join(graph_lines[-6:]), file=sys.stderr)
        if proc.returncode:
            print(proc.stderr[-4000:], file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
