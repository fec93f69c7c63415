"""Where a RocketKV decode step spends its time (GPU): torch profiler over a few decode steps.

Llama-3.1-8B-shaped dummy model, one request; prints the top host and device ops.
usage: python benchmarks/profile_decode.py [--ctx 8192] [--steps 16] [--budget 2048]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # profile the worker in-process

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--host", action="store_true", help="wall time per step and a cProfile of the host side")
    args = parser.parse_args()
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model = tempfile.mkdtemp()
    shutil.copy(os.path.join(HERE, "llama31_8b_config.json"), os.path.join(model, "config.json"))
    llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", max_model_len=args.ctx + 64,
              attention_backend="rocketkv", enable_prefix_caching=False, gpu_memory_utilization=0.85,
              additional_config={"rocketkv": {"budget": args.budget}})
    engine = llm.llm_engine
    prompt = TokensPrompt(prompt_token_ids=list(range(1000, 1000 + args.ctx)))
    engine.add_request("p", prompt, SamplingParams(max_tokens=3 * args.steps + 8, ignore_eos=True, detokenize=False))
    for _ in range(6):  # prefill (and compaction) plus warm-up decode steps
        engine.step()
    torch.cuda.synchronize()
    if args.host:
        import cProfile
        import pstats
        import time
        started = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        print(f"wall per decode step: {1000 * (time.perf_counter() - started) / args.steps:.2f} ms")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            engine.step()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    print(averages.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=70))


if __name__ == "__main__":
    main()
