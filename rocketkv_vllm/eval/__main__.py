"""Accuracy of RocketKV against full attention and the paper's ablations, on your model.

    python -m rocketkv_vllm.eval --model PATH [--lengths 2048 4096] [--samples 20]
        [--methods full rocketkv mt snapkv quest oracle] [--budgets 128 256 512 1024 2048 4096]
        [--tasks niah_single ... multi_turn] [--out results.json]

RULER-style synthetic tasks (rocketkv_vllm.eval.tasks) at prompt lengths counted in the
model's own tokens, chat template applied, greedy decoding, RULER's string-match scores.
Writes a JSON (every score and prediction), a markdown table and a plot of score vs budget
per method next to it. Ablation modes run the torch reference where needed and, for
`oracle`, without CUDA graphs: the engine here is built with enforce_eager.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from rocketkv_vllm.config import SELECTION_PAGE, RocketKVConfig
from rocketkv_vllm.eval.runner import build_samples, configs, markdown_table, plot, rows_as_dicts, run, summary
from rocketkv_vllm.eval.tasks import TASKS
from rocketkv_vllm.vllm_glue.logs import exact_decode

DEFAULT_BUDGETS = [128, 256, 512, 1024, 2048, 4096]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rocketkv_vllm.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model directory or name vLLM can load")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 7168], help="prompt + output tokens")
    parser.add_argument("--samples", type=int, default=20, help="samples per task and length")
    parser.add_argument("--methods", nargs="+", default=["full", "rocketkv", "mt", "snapkv", "quest", "oracle"])
    parser.add_argument("--budgets", nargs="+", type=int, default=DEFAULT_BUDGETS)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rocketkv-config", default="{}", help="server settings, JSON (as --additional-config's rocketkv)")
    parser.add_argument("--engine-args", default="{}", help="more vLLM engine arguments, JSON")
    parser.add_argument("--out", default="rocketkv_eval.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    bad = [b for b in args.budgets if b <= 0]
    if bad or args.samples <= 0 or any(n <= 0 for n in args.lengths):
        parser.error("--budgets, --samples and --lengths must be positive")
    return args


# methods that select pages: the eval measures them at the selection page size unless told otherwise
# (a rocketkv server's default 16-token pages would make mt requests decode exactly)
SELECTING_METHODS = ("mt", "quest", "oracle")


def server_settings(args: argparse.Namespace) -> dict:
    settings = json.loads(args.rocketkv_config)
    if any(method in SELECTING_METHODS for method in args.methods):
        settings.setdefault("page_size", SELECTION_PAGE)
    return settings


def make_engine(args: argparse.Namespace):
    from vllm import LLM

    engine = dict(
        model=args.model, attention_backend="rocketkv", dtype=args.dtype, block_size=args.block_size,
        max_model_len=max(args.lengths) + 64, enforce_eager="oracle" in args.methods, enable_prefix_caching=True,
        additional_config={"rocketkv": server_settings(args)},
    )
    engine.update(json.loads(args.engine_args))
    return LLM(**engine), engine


def write_results(args: argparse.Namespace, engine: dict, rows: list, predictions: list, seconds: float) -> str:
    """JSON (every score and prediction), markdown table and plot; returns the table."""
    # which rocketkv / mt requests decode exactly over what stage 1 kept instead of running HSA
    settings = RocketKVConfig.from_additional_config(engine["additional_config"])
    exact_up_to = {mode: settings.dense_below_for(mode) for mode in ("rocketkv", "mt")}
    result = {
        "model": args.model, "args": vars(args), "engine": engine, "seconds": round(seconds, 1),
        "exact_decode_up_to": exact_up_to,
        "summary": summary(rows), "rows": rows_as_dicts(rows), "predictions": predictions,
    }
    base = os.path.splitext(args.out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    lengths = sorted({r.length for r in rows})
    table = markdown_table(rows)
    with open(base + ".md", "w") as f:
        f.write(f"Score (RULER string match, %), average over {', '.join(args.tasks)} at {lengths} tokens, "
                f"{args.samples} samples each; model {os.path.basename(args.model.rstrip('/'))}; "
                f"{exact_decode(settings)}\n\n{table}\n")
    plot(rows, base + ".png", f"{os.path.basename(args.model.rstrip('/'))}: score vs budget")
    return table


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    llm, engine = make_engine(args)
    cfgs = configs(args.methods, args.budgets)
    rows, predictions, started = [], [], time.time()
    for length in args.lengths:  # results are written after each length: a long run keeps what it did
        samples = build_samples(llm.get_tokenizer(), args.tasks, [length], args.samples, args.seed)
        more_rows, more_predictions = run(llm, samples, cfgs, progress=not args.no_progress)
        rows, predictions = rows + more_rows, predictions + more_predictions
        table = write_results(args, engine, rows, predictions, time.time() - started)
        print(f"after length {length}:\n{table}", flush=True)
    print(f"wrote {args.out} and its .md and .png")
    with open(args.out) as f:
        return json.load(f)


if __name__ == "__main__":
    main()
