"""Shared pieces of the end-to-end benchmarks (bench_decode, bench_capacity, bench_serve):
the dummy-weights model directory, engine arguments, statistics, JSON and plots."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from typing import Any, Callable, Iterable, Sequence

from rocketkv_vllm.config import MODES

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA_8B_CONFIG = os.path.join(HERE, "llama31_8b_config.json")
STOCK_BACKEND = "FLASH_ATTN"  # vLLM's default on Hopper; the CPU's is CPU_ATTN


def is_rocketkv(backend: str) -> bool:
    return backend.lower() == "rocketkv"


def model_dir(config_path: str, with_tokenizer: bool = False, root: str | None = None) -> str:
    """A model directory for load_format="dummy": config.json copied from config_path and,
    with_tokenizer, a synthetic tokenizer covering the whole vocabulary (see synthetic_tokenizer)."""
    path = tempfile.mkdtemp(prefix="bench-model-", dir=root)
    shutil.copy(config_path, os.path.join(path, "config.json"))
    if with_tokenizer:
        with open(config_path) as f:
            synthetic_tokenizer(json.load(f)["vocab_size"]).save_pretrained(path)
    return path


# Token 0's word: longer than any "t<id>" word with its separating space, because vLLM refuses
# (HTTP 400) a prompt text longer than max_input_tokens x the vocab's longest word before it
# tokenizes it. With "t128255 " at 8 characters a token and a longest word of 7, about half the
# 32K random prompts of a 33K-token server were refused; this word puts the bound at 16 a token.
UNKNOWN_WORD = "t0-unknown-word!"


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer whose token i is the word "t<i>", for every id of the model's vocab
    (token 0: UNKNOWN_WORD, which also stands for any unknown word).

    `vllm bench serve`'s random dataset needs a tokenizer, and a dummy-weights model has none.
    Borrowing a real one (SmolLM2's 49,152 tokens) would keep prompts inside a small part of a
    128,256-token vocab and leave the server unable to detokenize most sampled ids; this one
    round-trips any id sequence exactly (decode joins words with spaces, encode splits on them),
    so prompt lengths are exact, and it needs no files or network.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(1, vocab_size)} | {UNKNOWN_WORD: 0}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN_WORD))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token=UNKNOWN_WORD)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine settings common to the offline benchmarks."""
    parser.add_argument("--config", default=LLAMA_8B_CONFIG, help="HF config.json of the dummy-weights model (default: Llama-3.1-8B shape)")
    parser.add_argument("--budget", type=int, default=2048, help="RocketKV token budget")
    parser.add_argument("--mode", default="rocketkv", choices=MODES, help="RocketKV server mode")
    parser.add_argument("--block-size", type=int, default=16, help="vLLM KV block size (tokens)")
    parser.add_argument("--eager", action="store_true", help="enforce_eager: no CUDA graphs")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="scheduler's max running requests")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="scheduler's token budget per step")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="fixed KV pool size (CPU tests)")
    parser.add_argument("--rocketkv-config", type=json.loads, default={},
                        help='more RocketKV server settings, JSON (e.g. \'{"decode_graphs": false}\')')


def engine_kwargs(args: argparse.Namespace, backend: str, max_model_len: int, max_num_seqs: int) -> dict[str, Any]:
    """LLM(...) keyword arguments for one backend; prefix caching off (random prompts share
    nothing, and RocketKV does not publish compacted blocks)."""
    kwargs: dict[str, Any] = dict(
        load_format="dummy", skip_tokenizer_init=True, dtype=args.dtype, max_model_len=max_model_len,
        max_num_seqs=args.max_num_seqs or max_num_seqs, enforce_eager=args.eager,
        gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False,
        attention_backend=backend, block_size=args.block_size, disable_log_stats=False,
    )
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.kv_cache_memory_bytes:
        kwargs["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    if is_rocketkv(backend):
        kwargs["additional_config"] = {"rocketkv": rocketkv_settings(args)}
    return kwargs


def rocketkv_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"budget": args.budget, "mode": args.mode, **getattr(args, "rocketkv_config", {})}


def random_prompts(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """count prompts of length random token ids, clear of the low ids a real vocab reserves."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    low = min(1000, vocab_size // 4)
    return [torch.randint(low, vocab_size, (length,), generator=generator).tolist() for _ in range(count)]


def spread(values: Iterable[float], digits: int = 3) -> dict[str, Any]:
    """Median, min and max of repeated measurements (None entries, failed repeats, are left out)."""
    kept = [v for v in values if v is not None]
    if not kept:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": round(statistics.median(kept), digits), "min": round(min(kept), digits),
            "max": round(max(kept), digits), "n": len(kept)}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def compare(rows: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], Any],
            metrics: dict[str, Callable[[dict[str, Any], dict[str, Any]], float | None]]) -> list[dict[str, Any]]:
    """Pairs each RocketKV row with the stock row of the same key: {"key": ..., name: metric(stock, ours)}."""
    stock = {key(r): r for r in rows if not is_rocketkv(r["backend"]) and "error" not in r}
    pairs = []
    for ours in rows:
        if is_rocketkv(ours["backend"]) and "error" not in ours and key(ours) in stock:
            pairs.append({"key": key(ours), **{name: f(stock[key(ours)], ours) for name, f in metrics.items()}})
    return pairs


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def json_rows(text: str) -> list[dict[str, Any]]:
    """The JSON objects a child process printed, one per line, among its other output."""
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def pyplot(path: str):
    """matplotlib's pyplot on the Agg backend, or None (saying that `path` is not written) where
    matplotlib is missing, so a GPU run without it still keeps its JSON."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib missing: {path} not written", flush=True)
        return None
    return plt


def save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_series(path: str, series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
                title: str, xlog: bool = False) -> bool:
    """One line per series {label: (xs, ys)} into a PNG. Returns False (and writes nothing)
    when matplotlib is missing."""
    plt = pyplot(path)
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        points = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if xlog:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend()
    save_figure(fig, path)
    return True
