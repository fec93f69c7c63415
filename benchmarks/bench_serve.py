"""Serving benchmark: `vllm serve` with stock attention and with RocketKV, driven by vLLM's own
`vllm bench serve` (random dataset, fixed seed, Poisson arrivals) over a sweep of request rates.

For each backend: start the server on the dummy-weights model (Llama-3.1-8B shape by default),
wait for /health, send one warm-up request, then for each rate run `vllm bench serve` while a
thread scrapes the server's /metrics (vllm:num_requests_running, vllm:num_requests_waiting,
vllm:kv_cache_usage_perc) every --scrape-every seconds. A rate of "inf" sends every prompt at
once (saturation). Collected per rate: output tok/s, request throughput, TTFT / TPOT / ITL p50
and p99, peak running and waiting requests, peak KV usage. JSON and two plots (output
throughput vs rate, TPOT p50 vs rate) are written beside --json.

Tokenizer: the random dataset needs one and a dummy-weights model ships none, so the model
directory gets a synthetic word-level tokenizer ("t<id>" for every id of the model's vocab,
bench_util.synthetic_tokenizer): no files, no network, prompt lengths exact, every sampled id
detokenizable. Both the server and the benchmark client load it from the model directory.

    python benchmarks/bench_serve.py --input-len 32768 --output-len 512 --rates 0.3 0.6 inf \
        --prompts 12 16 40 --json benchmarks/results/serve_32k.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rocketkv_vllm.config import MODES  # noqa: E402
from bench_util import LLAMA_8B_CONFIG, STOCK_BACKEND, compare, is_rocketkv, model_dir, plot_series, random_prompts, ratio, rocketkv_settings, write_json  # noqa: E402
from roofline import ModelShape, case_roofline, hbm_tb_s  # noqa: E402
from serve_steps import engine_steps, floor_duration, stalled_share, step_split  # noqa: E402

RUNNING, WAITING, KV_USAGE = "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"
GAUGES = (RUNNING, WAITING, KV_USAGE)
SERVED_NAME = "dummy"
CLI = [sys.executable, "-m", "vllm.entrypoints.cli.main"]  # the `vllm` command (no console script on the staged GPU machine)


def parse_rate(text: str) -> float:
    rate = float(text)
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"request rates must be > 0 (or inf), got {text!r}")
    return rate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=[STOCK_BACKEND, "rocketkv"])
    parser.add_argument("--input-len", type=int, default=32768)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--rates", type=parse_rate, nargs="+", default=[0.3, 0.6, math.inf], help="requests/s; inf = all at once")
    parser.add_argument("--prompts", type=int, nargs="+", default=[12, 16, 40], help="prompts per rate: one value, or one per --rates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=LLAMA_8B_CONFIG)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--mode", default="rocketkv", choices=MODES)
    parser.add_argument("--rocketkv-config", type=json.loads, default={},
                        help='further `rocketkv` server settings as JSON, e.g. \'{"page_size": 4, "dense_below": 0}\'')
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--hbm-tbs", type=float, default=None, help="HBM bandwidth for the bytes floor, TB/s (default: this GPU's, roofline.HBM_TB_S)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `vllm serve` argument (repeatable), e.g. --server-arg=--kv-cache-memory-bytes=1048576")
    parser.add_argument("--port", type=int, default=8031)
    parser.add_argument("--server-timeout", type=float, default=600, help="seconds to wait for /health")
    parser.add_argument("--bench-timeout", type=float, default=1800, help="seconds one rate may take")
    parser.add_argument("--scrape-every", type=float, default=0.5)
    parser.add_argument("--warmup-len", type=int, default=8192, help="prompt tokens of the warm-up request (0: none)")
    parser.add_argument("--work-dir", default=None, help="raw `vllm bench serve` results and server logs (default: beside --json)")
    parser.add_argument("--plot-from", default=None, help="only redraw the plots of this JSON result (beside it)")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="only merge these JSON results (one backend each, same protocol) into --json, with ratios and plots")
    parser.add_argument("--json", default="benchmarks/results/serve.json")
    return parser


def per_rate_prompts(args: argparse.Namespace) -> list[tuple[float, int]]:
    if len(args.prompts) not in (1, len(args.rates)):
        raise ValueError(f"--prompts takes one value or one per --rates ({len(args.rates)}), got {len(args.prompts)}")
    counts = args.prompts * len(args.rates) if len(args.prompts) == 1 else args.prompts
    if min(counts) < 1:
        raise ValueError("--prompts must be positive")
    return list(zip(args.rates, counts))


def server_command(args: argparse.Namespace, backend: str, model: str) -> list[str]:
    cmd = CLI + ["serve", model, "--load-format", "dummy", "--served-model-name", SERVED_NAME, "--port", str(args.port),
                 "--host", "127.0.0.1", "--dtype", args.dtype, "--max-model-len", str(args.input_len + args.output_len + 64),
                 "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--no-enable-prefix-caching",
                 "--attention-backend", backend, "--block-size", str(args.block_size)]
    if args.max_num_seqs:
        cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    if args.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.eager:
        cmd += ["--enforce-eager"]
    if is_rocketkv(backend):
        cmd += ["--additional-config", json.dumps({"rocketkv": rocketkv_settings(args)})]
    return cmd + args.server_arg


def bench_command(args: argparse.Namespace, model: str, rate: float, prompts: int, result_dir: str, result_file: str) -> list[str]:
    """`vllm bench serve` (flags as in vllm/benchmarks/serve.py of 0.26)."""
    return CLI + ["bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{args.port}",
                  "--model", model, "--served-model-name", SERVED_NAME, "--dataset-name", "random",
                  "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                  "--random-range-ratio", "0", "--num-prompts", str(prompts), "--request-rate", str(rate),
                  "--seed", str(args.seed), "--temperature", "0", "--ignore-eos",
                  "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
                  "--save-result", "--save-detailed", "--result-dir", result_dir, "--result-filename", result_file]


def metric_values(text: str) -> dict[str, float]:
    """The running / waiting / KV-usage gauges of a Prometheus /metrics page, summed over engines."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in GAUGES:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


class MetricsScraper(threading.Thread):
    """Polls /metrics until stopped; keeps the peak of each gauge."""

    def __init__(self, url: str, every_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.every_s = url, every_s
        self.peaks: dict[str, float] = {}
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    values = metric_values(response.read().decode())
                self.samples += 1
                for name in GAUGES:
                    if name in values:
                        self.peaks[name] = max(values[name], self.peaks.get(name, values[name]))
            except (urllib.error.URLError, OSError, ValueError):
                pass
            self._halt.wait(self.every_s)

    def stop(self) -> dict[str, float]:
        self._halt.set()
        self.join(timeout=10)
        return self.peaks


def wait_healthy(base: str, server: subprocess.Popen, timeout_s: float) -> float:
    started = time.time()
    while time.time() - started < timeout_s:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode} before /health answered")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return time.time() - started
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(2)
    raise TimeoutError(f"/health did not answer within {timeout_s:.0f} s")


def warm_up(base: str, tokens: int, vocab: int) -> float:
    """One completion of `tokens` prompt ids (first use of every kernel, Triton compiles)."""
    body = {"model": SERVED_NAME, "prompt": random_prompts(1, tokens, vocab, seed=99)[0], "max_tokens": 16,
            "temperature": 0, "ignore_eos": True}
    request = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.time()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"warm-up request failed: HTTP {e.code} {e.read()[:500]!r}") from e
    return time.time() - started


def rate_row(backend: str, rate: float, prompts: int, result: dict, peaks: dict[str, float],
             step_floor_s: Callable[[int], float] | None = None) -> dict:
    """One sweep point from `vllm bench serve`'s saved result and the scraped gauge peaks; with
    step_floor_s (a decode step's bytes floor in seconds by batch size), the run's duration had every
    pure decode step run at it."""
    def ms(key: str) -> float | None:
        value = result.get(key)
        return round(value, 2) if isinstance(value, (int, float)) else None

    steps = engine_steps(result)
    floor_s = floor_duration(steps, step_floor_s) if step_floor_s else None

    return {
        "backend": backend, "rate": "inf" if math.isinf(rate) else rate, "prompts": prompts,
        "completed": result.get("completed"), "failed": result.get("failed"), "duration_s": ms("duration"),
        "output_tok_s": ms("output_throughput"), "request_throughput": ms("request_throughput"),
        "ttft_p50_ms": ms("median_ttft_ms"), "ttft_p99_ms": ms("p99_ttft_ms"),
        "tpot_p50_ms": ms("median_tpot_ms"), "tpot_p99_ms": ms("p99_tpot_ms"),
        "itl_p50_ms": ms("median_itl_ms"), "itl_p99_ms": ms("p99_itl_ms"),
        "max_concurrent_requests_client": result.get("max_concurrent_requests"),
        "peak_running": peaks.get(RUNNING), "peak_waiting": peaks.get(WAITING),
        "peak_kv_usage": round(peaks[KV_USAGE], 4) if KV_USAGE in peaks else None,
        "errors": failure_reasons(result),
        "decode_time_in_stalled_steps": stalled_share(result),
        **step_split(steps),
        "duration_at_floor_s": None if floor_s is None else round(floor_s, 1),
    }


def step_floor(args: argparse.Namespace, backend: str) -> Callable[[int], float]:
    """A pure decode step's bytes floor (roofline.py) in seconds, by batch size, for this protocol."""
    shape = ModelShape.from_file(args.config)
    backend = "rocketkv" if is_rocketkv(backend) else backend
    tb_s = args.hbm_tbs or hbm_tb_s()

    def seconds(rows: int) -> float:
        return case_roofline(shape, backend, args.input_len, rows, args.output_len, args.budget, args.mode,
                             args.block_size, tb_s, args.rocketkv_config)["floor_ms"] / 1e3
    return seconds


def failure_reasons(result: dict) -> dict[str, int]:
    """Failed requests by error text (from --save-detailed), so a run with failures says why."""
    reasons: dict[str, int] = {}
    for error in result.get("errors") or []:
        if error:
            reasons[error[:300]] = reasons.get(error[:300], 0) + 1
    return reasons


def run_backend(args: argparse.Namespace, backend: str, model: str, work_dir: str, vocab: int, save) -> dict:
    """Start the server, sweep the rates (calling save(info) after each), stop the server."""
    base = f"http://127.0.0.1:{args.port}"
    log_path = os.path.join(work_dir, f"server_{backend}.log")
    cmd = server_command(args, backend, model)
    print(" ".join(cmd), flush=True)
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    info: dict = {"backend": backend, "server_command": " ".join(cmd), "rows": []}
    try:
        info["server_up_s"] = round(wait_healthy(base, server, args.server_timeout), 1)
        if args.warmup_len:
            info["warmup_s"] = round(warm_up(base, min(args.warmup_len, args.input_len), vocab), 1)
        for rate, prompts in per_rate_prompts(args):
            name = f"{backend}_rate{rate}.json"
            scraper = MetricsScraper(f"{base}/metrics", args.scrape_every)
            scraper.start()
            cmd = bench_command(args, model, rate, prompts, work_dir, name)
            print(f"[{backend}] rate {rate}: {prompts} prompts", flush=True)
            try:
                bench = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=args.bench_timeout)
                output = bench.stdout
            except subprocess.TimeoutExpired as e:
                output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
                output += f"\n[bench_serve] timed out after {args.bench_timeout:.0f} s"
            peaks = scraper.stop()
            with open(os.path.join(work_dir, f"{backend}_rate{rate}.txt"), "w") as f:
                f.write(output)
            result_path = os.path.join(work_dir, name)
            if not os.path.exists(result_path):
                print(output[-3000:], file=sys.stderr)
                info["rows"].append({"backend": backend, "rate": "inf" if math.isinf(rate) else rate, "prompts": prompts,
                                     "error": "no result (see the .txt beside it)"})
                continue
            with open(result_path) as f:
                row = rate_row(backend, rate, prompts, json.load(f), peaks, step_floor(args, backend))
            info["rows"].append(row)
            save(info)
            print(json.dumps(row), flush=True)
    except (RuntimeError, TimeoutError, urllib.error.URLError, OSError) as e:
        info["error"] = str(e)
        print(f"[{backend}] {e}", file=sys.stderr)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    if "error" in info:
        with open(log_path) as f:
            print(f.read()[-4000:], file=sys.stderr)
    return info


def ratios(rows: list[dict]) -> list[dict]:
    """Per request rate, against stock: output throughput (RocketKV / stock), TPOT p50 (stock /
    RocketKV: > 1 is better) and TTFT p50 (RocketKV / stock: <= 1.1 is the goal)."""
    return compare(rows, lambda r: r["rate"], {
        "output_tok_s_ratio": lambda stock, ours: ratio(ours["output_tok_s"], stock["output_tok_s"]),
        "tpot_p50_speedup": lambda stock, ours: ratio(stock["tpot_p50_ms"], ours["tpot_p50_ms"]),
        "ttft_p50_ratio": lambda stock, ours: ratio(ours["ttft_p50_ms"], stock["ttft_p50_ms"]),
        "decode_steps_output_tok_s_ratio": lambda stock, ours: ratio(ours.get("decode_steps_output_tok_s"),
                                                                     stock.get("decode_steps_output_tok_s")),
        # the most this run could gain with RocketKV's decode steps at their bytes floor
        "stock_duration_over_floor": lambda stock, ours: ratio(stock.get("duration_s"), ours.get("duration_at_floor_s"))})


def plot_serve(rows: list[dict], prefix: str) -> list[str]:
    """Output tok/s vs rate and TPOT p50 vs rate; saturation ("inf") is drawn at its achieved request rate."""
    def x_of(row: dict) -> float:
        return row["request_throughput"] if row["rate"] == "inf" else row["rate"]

    written = []
    for key, ylabel, suffix in [("output_tok_s", "output tok/s", "_throughput.png"), ("tpot_p50_ms", "TPOT p50 ms", "_tpot.png")]:
        series: dict[str, tuple[list[float], list[float]]] = {}
        for row in sorted((r for r in rows if r.get(key) is not None), key=x_of):
            xs, ys = series.setdefault(row["backend"], ([], []))
            xs.append(x_of(row))
            ys.append(row[key])
        if plot_series(prefix + suffix, series, "request rate (req/s; saturation at its achieved rate)", ylabel, f"{ylabel} vs request rate"):
            written.append(prefix + suffix)
    return written


def merge_results(paths: list[str], out: str) -> dict:
    """Results of one protocol run a backend per call (a device call holds one server run at 32K / 2K
    out) as one result: backends and rows side by side, ratios against stock, plots beside `out`."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    protocol = {key: parts[0][key] for key in ("input_len", "output_len", "budget", "mode")}
    for path, part in zip(paths, parts):
        if {key: part[key] for key in protocol} != protocol:
            raise ValueError(f"{path} ran another protocol than {paths[0]}: {protocol}")
    rows = [row for part in parts for row in part["rows"]]
    merged = {"command": [part["command"] for part in parts], **protocol,
              "backends": [b for part in parts for b in part["backends"]], "rows": rows, "ratios": ratios(rows)}
    write_json(out, merged)
    plot_serve([r for r in rows if "error" not in r], os.path.splitext(out)[0])
    return merged


def main() -> int:
    """Exit status 1 when a backend failed (its error is in the JSON), so scripts see it."""
    args = build_parser().parse_args()
    if args.merge:
        for pair in merge_results(args.merge, args.json)["ratios"]:
            print(json.dumps(pair), flush=True)
        return 0
    if args.plot_from:
        with open(args.plot_from) as f:
            plot_serve([r for r in json.load(f)["rows"] if "error" not in r], os.path.splitext(args.plot_from)[0])
        return 0
    per_rate_prompts(args)  # fail early on bad sizes
    prefix = os.path.splitext(args.json)[0]
    work_dir = args.work_dir or prefix + "_raw"
    os.makedirs(work_dir, exist_ok=True)
    with open(args.config) as f:
        vocab = json.load(f)["vocab_size"]
    model = model_dir(args.config, with_tokenizer=True)
    # a time limit (`timeout`) ends us with SIGTERM: unwind, so the server is stopped and what was measured kept
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    backends: list[dict] = []

    def save(current: dict | None = None) -> list[dict]:
        done = backends + ([current] if current is not None and current not in backends else [])
        rows = [row for b in done for row in b["rows"]]
        write_json(args.json, {"command": " ".join(sys.argv), "input_len": args.input_len, "output_len": args.output_len,
                               "budget": args.budget, "mode": args.mode, "rocketkv_config": args.rocketkv_config,
                               "backends": done, "rows": rows, "ratios": ratios(rows)})
        return rows

    for backend in args.backends:
        backends.append(run_backend(args, backend, model, work_dir, vocab, save))
    rows = save()
    measured = [r for r in rows if "error" not in r]
    if measured:
        plot_serve(measured, prefix)
    for row in rows:
        print(json.dumps(row), flush=True)
    for pair in ratios(rows):
        print(json.dumps(pair), flush=True)
    failed = [b["backend"] for b in backends if "error" in b or any("error" in r for r in b["rows"])]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
