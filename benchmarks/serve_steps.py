"""Engine steps of a `vllm bench serve` run, rebuilt from the client's per-token times, and how the
run's time splits between steps that ran a prefill chunk and pure decode steps.

vLLM's token counters cannot give this split: a prompt's tokens are counted when its first output
token is produced, not as its chunks run, so scraping /metrics sees the four chunk steps of a 32K
prompt as one instant. The client's detailed result (`--save-detailed`) has every token of every
request: the tokens of one engine step reach it within a few ms of each other, so clustering their
arrival times gives the steps, and a step far longer than the median one ran a prefill chunk.

    python benchmarks/serve_steps.py STOCK_RAW.json ROCKETKV_RAW.json --input-len 32768 --output-len 2048

prints both runs' split and what each run would take with its decode steps at the bytes floor
(`roofline.py`, each step at its batch size): the most a faster decode kernel could give.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# a step longer than this many times the median step ran (or waited on) a prefill chunk: pure
# decode steps of one run vary far less
STALL_FACTOR = 3.0
# tokens of one step arrive this close together at most (the API server streams them one by one)
MAX_SPREAD_S = 0.005


@dataclass(frozen=True)
class Step:
    end: float  # when its first token reached the client
    seconds: float  # since the previous step's first token (the first step: since the first request), idle time left out
    tokens: int  # output tokens it produced: one per request that decoded in it


def request_tokens(result: dict) -> list[tuple[float, list[float]]]:
    """(start, arrival time of each output token) of every request that succeeded."""
    requests = []
    errors = result.get("errors") or [""] * len(result.get("ttfts") or [])
    for start, ttft, itls, error in zip(result.get("start_times") or [], result.get("ttfts") or [],
                                        result.get("itls") or [], errors):
        if error or not ttft:
            continue
        times = [start + ttft]
        for gap in itls:
            times.append(times[-1] + gap)
        requests.append((start, times))
    return requests


def in_flight(requests: list[tuple[float, list[float]]]) -> list[tuple[float, float]]:
    """The union of the requests' spans (sent to last token), as sorted disjoint intervals: the
    server had work then; the rest of a run at a low request rate is idle."""
    union: list[tuple[float, float]] = []
    for start, end in sorted((start, times[-1]) for start, times in requests):
        if union and start <= union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], end))
        else:
            union.append((start, end))
    return union


def busy_seconds(union: list[tuple[float, float]], starts: list[float], start: float, end: float) -> float:
    """How much of [start, end] the union covers (starts: its intervals' starts)."""
    i = max(0, bisect.bisect_right(starts, start) - 1)
    busy = 0.0
    while i < len(union) and union[i][0] < end:
        busy += max(0.0, min(end, union[i][1]) - max(start, union[i][0]))
        i += 1
    return busy


def engine_steps(result: dict) -> list[Step]:
    """The run's engine steps as the client saw them, each timed over the span in which some request
    was in flight (empty when the result has no per-token times)."""
    requests = request_tokens(result)
    times = sorted(t for _, tokens in requests for t in tokens)
    gaps = [gap for request in result.get("itls") or [] for gap in request]
    if not times or not gaps:
        return []
    spread = min(MAX_SPREAD_S, statistics.median(gaps) / 4)
    groups = [[times[0], 1, times[0]]]  # first arrival, tokens, last arrival
    for t in times[1:]:
        if t - groups[-1][2] <= spread:
            groups[-1][1] += 1
            groups[-1][2] = t
        else:
            groups.append([t, 1, t])
    union = in_flight(requests)
    starts = [a for a, _ in union]
    previous = union[0][0]
    steps = []
    for first, tokens, _ in groups:
        steps.append(Step(end=first, seconds=busy_seconds(union, starts, previous, first), tokens=tokens))
        previous = first
    return steps


def decode_steps(steps: list[Step]) -> list[Step]:
    """The pure decode steps: not the first (it ends the first prefill) nor any over STALL_FACTOR x the median."""
    if len(steps) < 2:
        return []
    cut = STALL_FACTOR * statistics.median(s.seconds for s in steps[1:])
    return [s for s in steps[1:] if s.seconds <= cut]


def step_split(steps: list[Step]) -> dict[str, float | int | None]:
    """Seconds in steps that ran a prefill chunk (the decodes beside them included) and in pure decode
    steps, the output tok/s of the latter, and their median time and batch size."""
    decode = decode_steps(steps)
    if not decode:
        return {"prefill_steps_s": None, "decode_steps_s": None, "decode_steps": 0,
                "decode_steps_output_tok_s": None, "decode_step_ms_p50": None, "decode_step_rows_p50": None}
    decode_s = sum(s.seconds for s in decode)
    return {
        "prefill_steps_s": round(sum(s.seconds for s in steps) - decode_s, 1),
        "decode_steps_s": round(decode_s, 1), "decode_steps": len(decode),
        "decode_steps_output_tok_s": round(sum(s.tokens for s in decode) / decode_s, 1),
        "decode_step_ms_p50": round(1e3 * statistics.median(s.seconds for s in decode), 2),
        "decode_step_rows_p50": statistics.median(s.tokens for s in decode),
    }


def stalled_share(result: dict) -> float | None:
    """The share of the requests' decode time (their summed inter-token gaps) spent in gaps over
    STALL_FACTOR x the median gap: how much of TPOT is prefill interference that no decode speed-up removes."""
    gaps = [gap for request in result.get("itls") or [] for gap in request]
    if not gaps:
        return None
    cut = STALL_FACTOR * statistics.median(gaps)
    return round(sum(gap for gap in gaps if gap > cut) / sum(gaps), 3)


def floor_duration(steps: list[Step], step_floor_s: Callable[[int], float]) -> float | None:
    """The run's duration with its prefill steps as measured and every pure decode step at
    step_floor_s(batch size): what the fastest possible decode kernel would leave."""
    decode = decode_steps(steps)
    if not decode:
        return None
    return sum(s.seconds for s in steps) - sum(s.seconds for s in decode) + sum(step_floor_s(s.tokens) for s in decode)


def plot_steps(path: str, runs: dict[str, list[Step]]) -> bool:
    """Output tokens so far and each step's duration against time, one colour a run (False, and no
    file, without matplotlib)."""
    from bench_util import pyplot, save_figure

    plt = pyplot(path)
    if plt is None:
        return False
    fig, (tokens_ax, step_ax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name, steps in runs.items():
        if not steps:
            continue
        start = steps[0].end - steps[0].seconds
        times = [s.end - start for s in steps]
        done, total = [], 0
        for s in steps:
            total += s.tokens
            done.append(total)
        tokens_ax.plot(times, done, label=name)
        step_ax.plot(times[1:], [1e3 * s.seconds for s in steps[1:]], ".", markersize=2, label=name)
    tokens_ax.set_ylabel("output tokens so far")
    tokens_ax.set_title("engine steps seen by the client")
    step_ax.set_yscale("log")
    step_ax.set_ylabel("step ms (prefill chunks: the upper band)")
    step_ax.set_xlabel("seconds since the first request")
    for ax in (tokens_ax, step_ax):
        ax.grid(True, alpha=0.3)
        ax.legend()
    save_figure(fig, path)
    return True


def main() -> int:
    from roofline import ModelShape, case_roofline
    from bench_util import LLAMA_8B_CONFIG

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stock", help="stock backend's `vllm bench serve` detailed result (JSON)")
    parser.add_argument("rocketkv", help="RocketKV's, same protocol")
    parser.add_argument("--input-len", type=int, required=True)
    parser.add_argument("--output-len", type=int, required=True)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--mode", default="rocketkv")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--config", default=LLAMA_8B_CONFIG)
    parser.add_argument("--hbm-tbs", type=float, default=4.8, help="HBM bandwidth, TB/s (H200 4.8, H100 3.35)")
    parser.add_argument("--rocketkv-config", action="append", default=[],
                        help="a further floor for RocketKV with these server settings (JSON), e.g. '{\"dense_below\": 0}'")
    parser.add_argument("--plot", default=None, help="PNG of both runs' steps against time")
    args = parser.parse_args()
    shape = ModelShape.from_file(args.config)

    def floor_of(backend: str, settings: dict | None, key: str):
        def step_floor_s(rows: int) -> float:
            return case_roofline(shape, backend, args.input_len, rows, args.output_len, args.budget, args.mode,
                                 args.block_size, args.hbm_tbs, settings)[key] / 1e3
        return step_floor_s

    results, steps = {}, {}
    for name, path in (("stock", args.stock), ("rocketkv", args.rocketkv)):
        with open(path) as f:
            results[name] = json.load(f)
        steps[name] = engine_steps(results[name])
    stock_s = results["stock"]["duration"]
    if args.plot:
        plot_steps(args.plot, steps)
    floors = [("stock", "FLASH_ATTN", None), ("rocketkv", "rocketkv", None)]
    floors += [("rocketkv", "rocketkv", json.loads(text)) for text in args.rocketkv_config]
    for name, result in results.items():
        print(json.dumps({"run": name, "duration_s": round(result["duration"], 1), **step_split(steps[name])}))
    for name, backend, settings in floors:
        # page selection's floor reading only the scored channels of the summaries, and reading whole rows
        for key in ("floor_ms", "floor_ms_summary_rows") if name == "rocketkv" else ("floor_ms",):
            floor_s = floor_duration(steps[name], floor_of(backend, settings, key))
            print(json.dumps({"run": name, "settings": settings, "floor": key, "duration_at_floor_s": round(floor_s, 1),
                              "stock_duration_over_it": round(stock_s / floor_s, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
