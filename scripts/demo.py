"""RocketKV vs full attention on one long prompt, through vLLM's offline API.

Runs SmolLM2-135M-Instruct (built by fetch_model.py) with the RocketKV backend and
prints, for full attention and for RocketKV at a few token budgets, the greedy answer
and the KV cache blocks the request holds while it decodes.
usage: python scripts/demo.py [--model DIR] [--budgets 256 512] [--repeats 60]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read the block pool in-process
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def passkey_prompt(passkey: int, repeats: int) -> str:
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * repeats
    return f"{filler} The pass key is {passkey}. Remember it. {passkey} is the pass key. {filler} What is the pass key? The pass key is"


def run(llm, prompt: str, extra_args: dict) -> tuple[str, int]:
    """Greedy answer and the most KV blocks held during decode."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    pool = engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    engine.add_request("demo", prompt, SamplingParams(max_tokens=12, temperature=0, extra_args=extra_args))
    text, peak_decode_blocks, steps = "", 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            steps += bool(out.outputs[0].token_ids)
        if steps > 1:  # decoding: prefill done, stage 1 has freed its blocks
            peak_decode_blocks = max(peak_decode_blocks, pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
    return text, peak_decode_blocks


def main() -> None:
    import torch
    from fetch_model import DEFAULT_OUT, fetch
    from vllm import LLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_OUT)
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    # 2048-token prefill chunks: vLLM's start-up runs the model over a whole chunk's worth of
    # tokens; float32 on CPUs, most of which have no bfloat16 arithmetic (torch emulates it, slowly)
    llm = LLM(fetch(args.model), attention_backend="rocketkv", block_size=16, max_model_len=8192,
              max_num_batched_tokens=2048, kv_cache_memory_bytes=1 << 30, enforce_eager=True,
              enable_prefix_caching=False, dtype="auto" if torch.cuda.is_available() else "float32")
    prompt = passkey_prompt(71432, args.repeats)
    prompt_len = len(llm.get_tokenizer().encode(prompt))
    print(f"\nprompt: {prompt_len} tokens, a pass key (71432) hidden in the middle; block size 16")
    print(f"{'attention':<24} {'KV blocks in decode':>20}  answer")
    rows = [("full", {"rocketkv_mode": "full"})]
    rows += [(f"RocketKV budget {b}", {"rocketkv_budget": b}) for b in args.budgets]
    rows += [(f"RocketKV-MT budget {b}", {"rocketkv_budget": b, "rocketkv_mode": "mt"}) for b in args.budgets[:1]]
    for name, extra in rows:
        text, blocks = run(llm, prompt, extra)
        print(f"{name:<24} {blocks:>20}  {text!r}")


if __name__ == "__main__":
    main()
