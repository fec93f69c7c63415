"""RocketKV with vLLM's Ray executor (`distributed_executor_backend="ray"`), the executor vLLM
uses across machines: the RocketKV plugin loads in every Ray worker, each rank compresses its own
KV heads, and the scheduler frees the same blocks on every rank.

    python examples/ray_executor.py MODEL [--tensor-parallel-size 2] [--pipeline-parallel-size 2]
    python examples/ray_executor.py MODEL --check   # PASS/FAIL: exactness + compression

Needs Ray (`pip install -e .[ray]`) and a GPU per rank: vLLM's CPU platform refuses the Ray
executor ("current platform cpu does not support ray"). With --check it verifies, in the engine
it started, that a budget covering the prompt reproduces exact attention (rocketkv_mode "full")
token for token, and that a small budget returns blocks to the pool while requests decode.
"""
from __future__ import annotations

import argparse
import os

# the scheduler in this process, so --check can read the block pool (vLLM's own env variable)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPT = "Summarise the plot of a long novel in which " + "a traveller crosses mountains, rivers and cities; " * 150


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--budget", type=int, default=128, help="RocketKV token budget of the compressed requests")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--check", action="store_true", help="verify exactness and block freeing; exit 1 on failure")
    return parser.parse_args()


def free_blocks(llm) -> int:
    return llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def check(llm, sampling, budget: int) -> list[str]:
    """Failures (empty when all is well)."""
    failures = []
    exact = llm.generate([PROMPT], sampling(rocketkv_budget=4096), use_tqdm=False)[0].outputs[0].token_ids
    full = llm.generate([PROMPT], sampling(rocketkv_mode="full"), use_tqdm=False)[0].outputs[0].token_ids
    if list(exact) != list(full):
        failures.append(f"budget covering the prompt differs from exact attention: {list(exact)} vs {list(full)}")

    decoding_free = []  # free blocks in the last step before the request finishes (it is decoding)
    for name, extra in (("full", {"rocketkv_mode": "full"}), ("small", {"rocketkv_budget": budget})):
        llm.llm_engine.add_request(name, PROMPT, sampling(**extra))
        free = []
        while llm.llm_engine.has_unfinished_requests():
            llm.llm_engine.step()
            free.append(free_blocks(llm))
        decoding_free.append(free[-2])
        print(f"{name}: free blocks after each step {free}")
    if not decoding_free[1] > decoding_free[0]:
        failures.append(f"a small budget did not free blocks: {decoding_free[1]} free blocks while decoding, "
                        f"{decoding_free[0]} at full attention")
    return failures


def main() -> int:
    args = parse_args()
    from vllm import LLM, SamplingParams

    llm = LLM(
        args.model,
        attention_backend="rocketkv",
        additional_config={"rocketkv": {"budget": args.budget}},
        distributed_executor_backend="ray",
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=4096,
        enable_prefix_caching=False,
    )

    def sampling(**extra) -> SamplingParams:
        return SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True, extra_args=extra or None)

    output = llm.generate([PROMPT], sampling(), use_tqdm=False)[0]
    print(f"prompt {len(output.prompt_token_ids)} tokens, budget {args.budget}: {output.outputs[0].text!r}")
    if not args.check:
        return 0
    failures = check(llm, sampling, args.budget)
    for failure in failures:
        print("FAIL:", failure)
    print("FAIL: ray executor" if failures else "PASS: ray executor (exact at a covering budget, blocks freed at a small one)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
