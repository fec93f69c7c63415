"""CPU smoke tests of the end-to-end benchmark scripts (benchmarks/bench_decode.py,
bench_capacity.py, bench_serve.py and their helpers): argument parsing, the step-time and
statistics arithmetic, the bytes roofline against the figures recorded in results/NOTES.md,
the `vllm` CLI flags they pass (parsed by vLLM 0.26's own parsers), the offline tokenizer for
`vllm bench serve`, JSON and plot writing. A real engine run of bench_decode and bench_capacity
on a tiny model takes minutes on a loaded CPU: set ROCKETKV_BENCH_ENGINE=1 to run it."""
from __future__ import annotations

import http.server
import json
import math
import os
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import bench_capacity  # noqa: E402
import bench_decode  # noqa: E402
import bench_eager_host  # noqa: E402
import bench_serve  # noqa: E402
import saturation_bound  # noqa: E402
import serve_steps  # noqa: E402
import sweep_dense_attention  # noqa: E402
from bench_util import LLAMA_8B_CONFIG, UNKNOWN_WORD, json_rows, model_dir, plot_series, spread, synthetic_tokenizer, write_json  # noqa: E402
from engine_steps import Run, Step, decode_step_times, peak, prefill_seconds  # noqa: E402
from rocketkv_vllm.config import RocketKVConfig  # noqa: E402
from roofline import ModelShape, case_roofline, hbm_tb_s, rocketkv_step_bytes, stock_step_bytes  # noqa: E402

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "hidden_act": "silu",
    "vocab_size": 512, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def llama8b() -> ModelShape:
    return ModelShape.from_file(LLAMA_8B_CONFIG)


# --- argument parsing ---------------------------------------------------------------------

def test_decode_cases_from_pairs_or_product():
    parser = bench_decode.build_parser()
    args = parser.parse_args(["--cases", "32768x8", "130000X1"])
    assert bench_decode.parse_cases(args) == [(32768, 8), (130000, 1)]
    args = parser.parse_args(["--ctx", "8192", "32768", "--batch", "1", "4"])
    assert bench_decode.parse_cases(args) == [(8192, 1), (8192, 4), (32768, 1), (32768, 4)]
    for bad in (["32768"], ["32768x0"], ["ax2"], ["1x2x3"]):
        with pytest.raises(ValueError, match="--cases"):
            bench_decode.parse_cases(parser.parse_args(["--cases", *bad]))


def test_decode_refuses_an_out_too_short_for_all_requests_to_decode_at_once():
    """Session 15's first 64 x 32K run (--out 128) timed no step: the first request finished
    while the last prompts were still being prefilled, 4 steps each."""
    assert bench_decode.steps_all_decoding(32768, 64, 128, 8192) < 0
    assert bench_decode.steps_all_decoding(32768, 64, 448, 8192) == 448 - 1 - 252
    assert bench_decode.steps_all_decoding(32768, 1, 16, 8192) == 15  # one request: every step after its prefill
    parser = bench_decode.build_parser()
    short = parser.parse_args(["--cases", "32768x8", "32768x64", "--out", "128"])
    with pytest.raises(SystemExit, match=r"--out 128 is too short for 32768x64: .*use --out >= 256"):
        bench_decode.check_out_is_long_enough(short, 8192)
    bench_decode.check_out_is_long_enough(parser.parse_args(["--cases", "32768x64", "--out", "256"]), 8192)


def test_decode_defaults_and_both_paths():
    args = bench_decode.build_parser().parse_args(["--eager", "--max-num-seqs", "16", "--mode", "mt", "--budget", "1024"])
    assert (args.eager, args.max_num_seqs, args.mode, args.budget, args.repeats) == (True, 16, "mt", 1024, 3)
    assert args.backends == ["FLASH_ATTN", "rocketkv"]
    from bench_util import engine_kwargs

    stock = engine_kwargs(args, "FLASH_ATTN", max_model_len=4096, max_num_seqs=8)
    ours = engine_kwargs(args, "rocketkv", max_model_len=4096, max_num_seqs=8)
    assert "additional_config" not in stock and stock["max_num_seqs"] == 16 and stock["enforce_eager"]
    assert ours["additional_config"] == {"rocketkv": {"budget": 1024, "mode": "mt"}}
    assert not ours["disable_log_stats"]  # engine_steps reads RequestOutput.metrics


def test_capacity_cases():
    parser = bench_capacity.build_parser()
    assert bench_capacity.cases(parser.parse_args(["--ctx", "32768", "130000", "--prompts", "48"])) == [(32768, 48), (130000, 48)]
    assert bench_capacity.cases(parser.parse_args(["--ctx", "32768", "130000", "--prompts", "48", "10"])) == [(32768, 48), (130000, 10)]
    with pytest.raises(ValueError, match="--prompts"):
        bench_capacity.cases(parser.parse_args(["--ctx", "1", "2", "3", "--prompts", "4", "5"]))


def test_serve_rates_and_prompts():
    parser = bench_serve.build_parser()
    args = parser.parse_args(["--rates", "0.5", "inf", "--prompts", "8", "20"])
    assert bench_serve.per_rate_prompts(args) == [(0.5, 8), (math.inf, 20)]
    assert bench_serve.per_rate_prompts(parser.parse_args(["--rates", "1", "2", "--prompts", "5"])) == [(1.0, 5), (2.0, 5)]
    with pytest.raises(SystemExit):
        parser.parse_args(["--rates", "0"])
    with pytest.raises(ValueError, match="--prompts"):
        bench_serve.per_rate_prompts(parser.parse_args(["--rates", "1", "2", "3", "--prompts", "5", "6"]))


def test_serve_commands_parse_with_vllm_026_parsers():
    """Every flag bench_serve passes exists in the installed vLLM's `serve` and `bench serve`."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = bench_serve.build_parser().parse_args(["--max-num-seqs", "64", "--eager", "--budget", "1024"])
    serve = bench_serve.server_command(args, "rocketkv", "/tmp/model")
    assert serve[:4] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(serve[4:])
    assert parsed.attention_backend == "rocketkv" and parsed.load_format == "dummy" and parsed.max_num_seqs == 64
    assert parsed.enable_prefix_caching is False and parsed.enforce_eager
    assert json.loads(serve[serve.index("--additional-config") + 1]) == {"rocketkv": {"budget": 1024, "mode": "rocketkv"}}
    assert "--additional-config" not in bench_serve.server_command(args, "FLASH_ATTN", "/tmp/model")
    paged = bench_serve.build_parser().parse_args(["--rocketkv-config", '{"page_size": 4, "dense_below": 0}'])
    serve = bench_serve.server_command(paged, "rocketkv", "/tmp/model")
    assert json.loads(serve[serve.index("--additional-config") + 1])["rocketkv"] == {
        "budget": 2048, "mode": "rocketkv", "page_size": 4, "dense_below": 0}
    # the bytes floor follows the server's settings: HSA on 4-token pages reads less than the exact default
    exact = bench_serve.build_parser().parse_args([])
    assert bench_serve.step_floor(paged, "rocketkv")(48) < bench_serve.step_floor(exact, "rocketkv")(48)

    bench = bench_serve.bench_command(args, "/tmp/model", math.inf, 40, "/tmp/out", "r.json")
    assert bench[3:5] == ["bench", "serve"]
    client = FlexibleArgumentParser()
    add_cli_args(client)
    parsed = client.parse_args(bench[5:])
    assert (parsed.dataset_name, parsed.random_input_len, parsed.random_output_len, parsed.num_prompts) == ("random", 32768, 512, 40)
    assert math.isinf(parsed.request_rate) and parsed.seed == 0 and parsed.save_result and parsed.ignore_eos
    assert parsed.metric_percentiles == "50,99" and "tpot" in parsed.percentile_metrics
    assert parsed.save_detailed  # (the per-request errors that failure_reasons counts)


def test_serve_row_counts_failures_by_reason():
    result = {"completed": 3, "failed": 2, "output_throughput": 10.0,
              "errors": ["", "Never received a valid chunk", "", "Never received a valid chunk", ""]}
    row = bench_serve.rate_row("rocketkv", math.inf, 5, result, {"vllm:num_requests_running": 4.0})
    assert row["errors"] == {"Never received a valid chunk": 2}
    assert (row["rate"], row["failed"], row["peak_running"]) == ("inf", 2, 4.0)
    assert bench_serve.rate_row("rocketkv", 1.0, 5, {"completed": 5}, {})["errors"] == {}


def test_serve_row_puts_the_decode_steps_at_their_floor():
    args = bench_serve.build_parser().parse_args(["--input-len", "32768", "--output-len", "2048"])
    result = detailed_result(SERVE_STEPS, [0.0, 0.2])
    floor = bench_serve.step_floor(args, "rocketkv")
    row = bench_serve.rate_row("rocketkv", math.inf, 2, result, {}, floor)
    assert row["duration_at_floor_s"] == round(1.5 + 5 * floor(1) + 8 * floor(2), 1)
    assert bench_serve.step_floor(args, "FLASH_ATTN")(8) > floor(8)  # stock reads every token
    assert bench_serve.rate_row("rocketkv", math.inf, 2, result, {})["duration_at_floor_s"] is None


def test_serve_row_measures_decode_time_lost_to_prefill_steps():
    # two requests: 10 ms decode steps, and one 500 ms step (another request's prefill chunk)
    result = {"completed": 2, "itls": [[0.010, 0.010, 0.500, 0.010], [0.012, 0.010]]}
    row = bench_serve.rate_row("rocketkv", math.inf, 2, result, {})
    assert row["decode_time_in_stalled_steps"] == round(0.5 / 0.552, 3)
    assert bench_serve.rate_row("rocketkv", 1.0, 2, {"completed": 2}, {})["decode_time_in_stalled_steps"] is None


def test_serve_merges_one_backend_per_call(tmp_path):
    def part(backend, tok_s, tpot, output_len=2048):
        row = {"backend": backend, "rate": "inf", "output_tok_s": tok_s, "tpot_p50_ms": tpot, "ttft_p50_ms": 1000.0,
               "request_throughput": 0.1}
        path = tmp_path / f"{backend}.json"
        path.write_text(json.dumps({"command": f"run {backend}", "input_len": 32768, "output_len": output_len,
                                    "budget": 2048, "mode": "rocketkv", "backends": [{"backend": backend, "rows": [row]}],
                                    "rows": [row], "ratios": []}))
        return str(path)

    out = tmp_path / "merged.json"
    merged = bench_serve.merge_results([part("rocketkv", 900.0, 40.0), part("FLASH_ATTN", 450.0, 80.0)], str(out))
    assert merged["ratios"] == [{"key": "inf", "output_tok_s_ratio": 2.0, "tpot_p50_speedup": 2.0, "ttft_p50_ratio": 1.0,
                                  "decode_steps_output_tok_s_ratio": None, "stock_duration_over_floor": None}]
    assert json.loads(out.read_text())["rows"] == merged["rows"] and len(merged["backends"]) == 2
    with pytest.raises(ValueError, match="another protocol"):
        bench_serve.merge_results([part("rocketkv", 900.0, 40.0), part("FLASH_ATTN", 450.0, 80.0, output_len=512)],
                                  str(out))


# --- step times and statistics ------------------------------------------------------------

def test_decode_step_times_only_full_decode_steps():
    steps = [Step(None), Step(1.0, 1, 1), Step(None), Step(2.0, 2, 1),  # prefill: one, then the second request
             Step(2.1, 2), Step(2.3, 2), Step(2.6, 2), Step(3.0, 2),  # both decoding
             Step(3.2, 1), Step(None)]  # one finished
    assert decode_step_times(steps, batch=2, skip=0) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert decode_step_times(steps, batch=2, skip=2) == pytest.approx([0.3, 0.4])
    assert decode_step_times(steps, batch=3, skip=0) == []  # never all three at once
    # a step where a request gets its first token is not a decode step, even with every row filled
    assert decode_step_times([Step(1.0, 2, 1), Step(1.5, 2, 1)], batch=2, skip=0) == []


def test_spread_peak_prefill():
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert spread([None, 4.0]) == {"median": 4.0, "min": 4.0, "max": 4.0, "n": 1}
    assert spread([None])["median"] is None
    assert peak([{"a": 1.0}, {"a": 3.0, "b": 1.0}, {}], "a") == 3.0 and peak([{}], "a") is None
    reqs = [{"scheduled_ts": 10.0, "first_token_ts": 11.0}, {"scheduled_ts": 10.5, "first_token_ts": 12.5}]
    assert prefill_seconds(reqs) == 2.5 and prefill_seconds([]) is None


def test_capacity_summary():
    run = Run(steps=[Step(1.0, 1, 1), Step(2.0, 2, 1), Step(2.5, 2), Step(3.0, 1)],
              requests=[{"prompt_len": 8, "tokens": 3, "scheduled_ts": 0.0, "first_token_ts": 1.0, "last_token_ts": 2.5},
                        {"prompt_len": 8, "tokens": 3, "scheduled_ts": 0.5, "first_token_ts": 2.0, "last_token_ts": 3.0}],
              gauges=[{"vllm:num_requests_running": 2.0, "vllm:kv_cache_usage_perc": 0.5}, {"vllm:kv_cache_usage_perc": 0.75}])
    got = bench_capacity.summarize(run, prompts=2)
    assert got["output_tok_s"] == pytest.approx(6 / 3.0) and got["peak_decoding"] == 2 and got["peak_running"] == 2.0
    assert got["peak_kv_usage"] == 0.75 and got["prefill_s"] == 2.0 and got["completed"] == 2


def test_capacity_tokens_held(llama8b):
    args = bench_capacity.build_parser().parse_args(["--out", "512"])
    stock = bench_capacity.tokens_held(args, "FLASH_ATTN", llama8b, 32768)
    ours = bench_capacity.tokens_held(args, "rocketkv", llama8b, 32768)
    assert stock == 32768 + 512 and stock % 16 == 0
    assert ours % 16 == 0 and 2048 < ours < stock / 3  # stage 1 keeps ~9K of 32K at t=2048
    # the H200 pools (README of ../shared/gpu): 891,392 and 712,752 tokens -> 26 vs ~74 at once
    assert 891_392 // stock == 26 and 712_752 // ours >= 70


# --- roofline -------------------------------------------------------------------------------

def test_roofline_weights_and_kv_of_llama8b(llama8b):
    # 8.03B parameters less the 0.525B-parameter input embedding (gathered, not streamed), bf16
    assert llama8b.weight_bytes() == 2 * 7_504_924_672
    assert llama8b.kv_bytes_per_token() == 131_072  # 2 x 32 layers x 8 heads x 128 x 2 bytes
    assert stock_step_bytes(llama8b, 32768, 8, 0) == llama8b.weight_bytes() + 8 * 32768 * 131_072


@pytest.mark.parametrize("ctx,batch,notes_kv_gb", [(32768, 1, 0.44), (32768, 8, 3.64), (131072, 1, 0.54), (131072, 8, 4.44)])
def test_roofline_rocketkv_matches_notes(llama8b, ctx, batch, notes_kv_gb):
    """results/NOTES.md (session 2) floors, whole summary rows, t=2048: RocketKV GB minus 16.06 GB of weights."""
    parts = rocketkv_step_bytes(llama8b, ctx, batch, 128, 2048, "rocketkv", 16, {"page_size": 4, "dense_below": 0})  # (session 2's pages, HSA)
    assert (parts["summary_rows_total"] - llama8b.weight_bytes()) / 1e9 == pytest.approx(notes_kv_gb, rel=0.03)
    assert parts["total"] <= parts["summary_rows_total"]  # r channels <= whole rows


def test_roofline_follows_the_servers_page_size(llama8b):
    default = rocketkv_step_bytes(llama8b, 131072, 1, 128, 2048, "rocketkv", 16, {"dense_below": 0})
    assert default["plan"]["page_size"] == RocketKVConfig(dense_below=0).page_size == 2
    assert rocketkv_step_bytes(llama8b, 131072, 1, 128, 2048, "rocketkv", 16)["plan"]["page_size"] == 16
    four = rocketkv_step_bytes(llama8b, 131072, 1, 128, 2048, "rocketkv", 16, {"page_size": 4, "dense_below": 0})
    # twice the pages to summarize: whole summary rows cost twice, so the budget's split scores them on fewer channels
    assert default["summary_rows_total"] > four["summary_rows_total"]
    assert default["plan"]["top_channels"] < four["plan"]["top_channels"]


def test_roofline_bandwidth_follows_the_gpu_name():
    assert hbm_tb_s("NVIDIA H100 80GB HBM3") == 3.35 and hbm_tb_s("NVIDIA H200") == 4.8
    assert hbm_tb_s("some other GPU") == hbm_tb_s("") == 4.8  # (the H200, where unknown)


def test_roofline_full_mode_is_dense(llama8b):
    dense = rocketkv_step_bytes(llama8b, 32768, 2, 64, 2048, "full", 16)
    assert dense["total"] == stock_step_bytes(llama8b, 32768, 2, 64) and not dense["plan"]["sparse"]
    row = case_roofline(llama8b, "FLASH_ATTN", 32768, 8, 256, 2048, "rocketkv", 16, hbm_tb_s=4.8)
    assert row["floor_ms"] == pytest.approx(1e3 * row["bytes"] / 4.8e12, abs=1e-3)
    ours = case_roofline(llama8b, "rocketkv", 32768, 8, 256, 2048, "rocketkv", 16, hbm_tb_s=4.8, settings={"dense_below": 0})
    assert ours["floor_ms"] < row["floor_ms"] / 2 and ours["plan"]["keep"] < 32768
    # by default a 32K prompt's kept tokens are read whole (dense_below): weights + every kept token
    kept = rocketkv_step_bytes(llama8b, 32768, 8, 256, 2048, "rocketkv", 16)
    assert not kept["plan"]["sparse"] and kept["plan"]["keep"] < 32768
    assert kept["total"] == llama8b.weight_bytes() + 8 * (kept["plan"]["keep"] + 128) * llama8b.kv_bytes_per_token()


# --- the saturation ceiling -------------------------------------------------------------------

def test_saturation_ceiling_inverts_and_bounds_the_measured_runs(llama8b, tmp_path):
    """The ceiling is the prefill alone when a row reads nothing, row_bytes_for inverts it, and
    at 32K / 2K on the H200 it lies above what each server measured (session 17: stock 521.3,
    RocketKV 923.4 output tok/s) while the default exact decode's stays below 2.5x stock."""
    assert saturation_bound.ceiling_tok_s(0, 32768, 2048, 26000, 4.8) == pytest.approx(2048 / (32768 / 26000))
    allowed = saturation_bound.row_bytes_for(1000.0, 32768, 2048, 26000, 4.8)
    assert saturation_bound.ceiling_tok_s(allowed, 32768, 2048, 26000, 4.8) == pytest.approx(1000.0)
    assert saturation_bound.row_bytes_for(2000.0, 32768, 2048, 26000, 4.8) is None  # past the prefill alone
    out = tmp_path / "bound.json"
    got = saturation_bound.main(["--budgets", "2048", "--stock-tok-s", "521.3", "--json", str(out)])
    assert json.loads(out.read_text()) == got
    exact, channels, rows = got["rows"]
    assert 521.3 < exact["stock_ceiling_tok_s"] and 923.4 < exact["ceiling_tok_s"] < 2.5 * 521.3
    assert channels["row_tokens_read"] < rows["row_tokens_read"] < got["goal_row_tokens"] < exact["row_tokens_read"]
    assert rows["ceiling_tok_s"] > 2.5 * 521.3


# --- the offline tokenizer for `vllm bench serve` -------------------------------------------

def test_synthetic_tokenizer_random_dataset(tmp_path):
    """vLLM's random dataset, sampled with the synthetic tokenizer the served model directory
    holds: exact prompt lengths, ids over the model's whole vocab, all detokenizable."""
    from transformers import AutoTokenizer
    from vllm.benchmarks.datasets import RandomDataset

    config = dict(TINY_CONFIG, vocab_size=1000)
    (tmp_path / "config.json").write_text(json.dumps(config))
    path = model_dir(str(tmp_path / "config.json"), with_tokenizer=True, root=str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.vocab_size == 1000 and tokenizer.num_special_tokens_to_add() == 0
    assert tokenizer.decode([999, 0, 5]) == f"t999 {UNKNOWN_WORD} t5"
    assert tokenizer.encode(f"t999 {UNKNOWN_WORD} t5", add_special_tokens=False) == [999, 0, 5]
    samples = RandomDataset(random_seed=0).sample(tokenizer, num_requests=3, input_len=300, output_len=7, range_ratio=0.0)
    for sample in samples:
        ids = tokenizer.encode(sample.prompt, add_special_tokens=False)
        assert sample.prompt_len == 300 and len(ids) == 300 and max(ids) < 1000 and sample.expected_output_len == 7
    assert synthetic_tokenizer(128_256).vocab_size == 128_256  # the Llama-3.1 vocab, every id


def test_synthetic_prompts_pass_vllms_prompt_length_guard():
    """vLLM refuses (HTTP 400) a prompt text longer than max_input_tokens x its tokenizer's
    max_chars_per_token before tokenizing it: the longest-worded prompt of a full context must
    pass (with 7-character words it did not, and bench_serve lost half its 32K requests)."""
    from vllm.tokenizers.hf import get_cached_tokenizer

    tokenizer = get_cached_tokenizer(synthetic_tokenizer(128_256))
    longest = tokenizer.decode(list(range(128_256 - 32_768, 128_256)))  # every word 7 characters
    assert len(longest) > 32_768 * 7  # (the old bound)
    assert len(longest) <= 32_768 * tokenizer.max_chars_per_token


# --- /metrics scraping and result rows ------------------------------------------------------

METRICS_PAGE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="dummy"} 7.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="dummy"} 3.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="dummy"} 0.625
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="dummy"} 1234.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="dummy"} 56.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="length",model_name="dummy"} 2.0
"""


def test_metric_values():
    assert bench_serve.metric_values(METRICS_PAGE) == {
        "vllm:num_requests_running": 7.0, "vllm:num_requests_waiting": 3.0, "vllm:kv_cache_usage_perc": 0.625}


def detailed_result(steps: list[tuple[float, list[int]]], starts: list[float], errors: list[str] | None = None) -> dict:
    """A `vllm bench serve --save-detailed` result whose requests got their tokens in these engine
    steps (time, requests that produced a token); the k-th request of a step reaches the client
    k ms later, as the API server streams one request after another."""
    arrivals: dict[int, list[float]] = {r: [] for r in range(len(starts))}
    for time, requests in steps:
        for k, r in enumerate(requests):
            arrivals[r].append(time + 0.001 * k)
    return {"start_times": starts, "ttfts": [a[0] - s for a, s in zip(arrivals.values(), starts)],
            "itls": [[b - a for a, b in zip(t, t[1:])] for t in arrivals.values()],
            "errors": errors or [""] * len(starts), "duration": steps[-1][0] - min(starts)}


# request 0's prefill ends at 1.0 s, it decodes alone every 20 ms; a 500-ms step runs request 1's
# prefill (request 0's token beside it); then both decode together every 25 ms
SERVE_STEPS = ([(1.0, [0])] + [(1.0 + 0.02 * i, [0]) for i in range(1, 6)] + [(1.6, [0, 1])]
               + [(1.6 + 0.025 * i, [0, 1]) for i in range(1, 9)])


def test_engine_steps_cluster_the_tokens_of_one_step():
    steps = serve_steps.engine_steps(detailed_result(SERVE_STEPS, [0.0, 0.2]))
    assert [s.tokens for s in steps] == [len(requests) for _, requests in SERVE_STEPS]
    assert steps[0].seconds == pytest.approx(1.0) and steps[6].seconds == pytest.approx(0.5)
    assert [round(s.seconds, 3) for s in steps[7:]] == [0.025] * 8
    assert serve_steps.engine_steps({"start_times": [0.0], "ttfts": [1.0], "itls": [[]]}) == []


def test_idle_time_between_requests_is_left_out():
    # request 1 is sent 3.9 s after request 0's last token: only its own 1-s prefill counts
    steps = [(1.0, [0])] + [(1.0 + 0.02 * i, [0]) for i in range(1, 6)] + [(6.0, [1])] + [(6.0 + 0.02 * i, [1]) for i in range(1, 6)]
    split = serve_steps.step_split(serve_steps.engine_steps(detailed_result(steps, [0.0, 5.0])))
    assert split["prefill_steps_s"] == 2.0 and split["decode_steps"] == 10 and split["decode_steps_s"] == 0.2


def test_step_split_separates_prefill_steps_from_pure_decode():
    split = serve_steps.step_split(serve_steps.engine_steps(detailed_result(SERVE_STEPS, [0.0, 0.2])))
    # prefill: the first 1.0 s and the 0.5-s step; decode: 5 steps of 20 ms (1 token) and 8 of 25 ms (2)
    assert split == {"prefill_steps_s": 1.5, "decode_steps_s": 0.3, "decode_steps": 13,
                     "decode_steps_output_tok_s": round(21 / 0.3, 1), "decode_step_ms_p50": 25.0, "decode_step_rows_p50": 2}
    # a failed request's tokens are not counted
    failed = serve_steps.step_split(serve_steps.engine_steps(
        detailed_result(SERVE_STEPS, [0.0, 0.2], errors=["", "Never received a valid chunk"])))
    assert failed["decode_step_rows_p50"] == 1 and failed["decode_steps"] == 13
    assert serve_steps.step_split(serve_steps.engine_steps({"completed": 0}))["decode_steps"] == 0


def test_floor_duration_keeps_prefill_steps_and_floors_decode_steps():
    steps = serve_steps.engine_steps(detailed_result(SERVE_STEPS, [0.0, 0.2]))
    assert serve_steps.floor_duration(steps, lambda rows: 0.001 * rows) == pytest.approx(1.5 + 5 * 0.001 + 8 * 0.002)
    assert serve_steps.floor_duration([], lambda rows: 1.0) is None


def test_serve_steps_cli_prints_splits_floors_and_a_plot(tmp_path):
    for name, starts in (("stock", [0.0, 0.2]), ("rocketkv", [0.0, 0.1])):
        (tmp_path / f"{name}.json").write_text(json.dumps(detailed_result(SERVE_STEPS, starts)))
    cmd = [sys.executable, os.path.join(BENCH, "serve_steps.py"), str(tmp_path / "stock.json"), str(tmp_path / "rocketkv.json"),
           "--input-len", "32768", "--output-len", "2048", "--rocketkv-config", '{"dense_below": 0}', "--plot", str(tmp_path / "s.png")]
    lines = [json.loads(line) for line in subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()]
    assert [line["run"] for line in lines] == ["stock", "rocketkv", "stock", "rocketkv", "rocketkv", "rocketkv", "rocketkv"]
    assert lines[1]["prefill_steps_s"] == 1.5 and lines[1]["decode_steps"] == 13
    floors = lines[2:]
    assert floors[1]["duration_at_floor_s"] < floors[0]["duration_at_floor_s"]  # the stock floor reads every token
    assert floors[3]["settings"] == {"dense_below": 0} and floors[3]["floor"] == "floor_ms"
    if os.path.exists(tmp_path / "s.png"):  # (matplotlib installed)
        assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_metrics_scraper_keeps_peaks():
    pages = iter([METRICS_PAGE, METRICS_PAGE.replace(" 7.0", " 12.0").replace("0.625", "0.5")] + [METRICS_PAGE] * 1000)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = next(pages).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        scraper = bench_serve.MetricsScraper(f"http://127.0.0.1:{server.server_port}/metrics", every_s=0.01)
        scraper.start()
        while scraper.samples < 3:
            threading.Event().wait(0.01)
        peaks = scraper.stop()
    finally:
        server.shutdown()
    assert peaks == {"vllm:num_requests_running": 12.0, "vllm:num_requests_waiting": 3.0, "vllm:kv_cache_usage_perc": 0.625}


def test_rate_row_reads_vllm_result_keys():
    result = {"duration": 50.0, "completed": 40, "failed": 0, "output_throughput": 409.6, "request_throughput": 0.8,
              "median_ttft_ms": 1000.0, "p99_ttft_ms": 3000.0, "median_tpot_ms": 20.0, "p99_tpot_ms": 25.0,
              "median_itl_ms": 19.0, "p99_itl_ms": 40.0, "p50_ttft_ms": 1000.0, "max_concurrent_requests": 40}
    row = bench_serve.rate_row("rocketkv", math.inf, 40, result, {"vllm:num_requests_running": 33.0, "vllm:kv_cache_usage_perc": 0.91})
    assert row["rate"] == "inf" and row["output_tok_s"] == 409.6 and row["tpot_p50_ms"] == 20.0 and row["itl_p99_ms"] == 40.0
    assert row["peak_running"] == 33.0 and row["peak_kv_usage"] == 0.91 and row["peak_waiting"] is None


def test_ratios_against_stock():
    serve_rows = [
        {"backend": "FLASH_ATTN", "rate": 0.5, "output_tok_s": 200.0, "tpot_p50_ms": 30.0, "ttft_p50_ms": 1000.0},
        {"backend": "FLASH_ATTN", "rate": "inf", "output_tok_s": 400.0, "tpot_p50_ms": 60.0, "ttft_p50_ms": 9000.0,
         "decode_steps_output_tok_s": 800.0, "duration_s": 100.0},
        {"backend": "rocketkv", "rate": "inf", "output_tok_s": 1000.0, "tpot_p50_ms": 20.0, "ttft_p50_ms": 9900.0,
         "decode_steps_output_tok_s": 1600.0, "duration_s": 40.0, "duration_at_floor_s": 32.0},
        {"backend": "rocketkv", "rate": 0.5, "error": "no result"},
    ]
    assert bench_serve.ratios(serve_rows) == [
        {"key": "inf", "output_tok_s_ratio": 2.5, "tpot_p50_speedup": 3.0, "ttft_p50_ratio": 1.1,
         "decode_steps_output_tok_s_ratio": 2.0, "stock_duration_over_floor": 3.125}]
    decode_rows = [{"backend": b, "ctx": 32768, "batch": 8, "tpot_ms": {"median": t}} for b, t in [("FLASH_ATTN", 18.0), ("rocketkv", 7.2)]]
    decode_rows.append({"backend": "rocketkv", "ctx": 32768, "batch": 64, "tpot_ms": {"median": 9.0}})  # no stock row
    assert bench_decode.speedups(decode_rows) == [{"key": "32768x8", "tpot_speedup": 2.5}]
    capacity_rows = [{"backend": b, "ctx": 32768, "output_tok_s": {"median": t}, "peak_decoding": {"median": p}}
                     for b, t, p in [("FLASH_ATTN", 500.0, 26), ("rocketkv", 1250.0, 32)]]
    assert bench_capacity.ratios(capacity_rows) == [
        {"key": 32768, "throughput_ratio": 2.5, "peak_decoding_stock": 26, "peak_decoding_rocketkv": 32}]


# --- JSON and plots -------------------------------------------------------------------------

def test_json_rows_and_write_json(tmp_path):
    text = 'INFO starting\n{"a": 1}\n{broken\n(EngineCore) {"b": 2}\n{"c": [3]}\n'
    assert json_rows(text) == [{"a": 1}, {"c": [3]}]
    path = tmp_path / "sub" / "x.json"
    write_json(str(path), {"rows": [1]})
    assert json.loads(path.read_text()) == {"rows": [1]}


def test_plots_written(tmp_path):
    pytest.importorskip("matplotlib")
    png = b"\x89PNG"
    assert plot_series(str(tmp_path / "p.png"), {"a": ([1, 2], [3, None])}, "x", "y", "t", xlog=True)
    assert (tmp_path / "p.png").read_bytes()[:4] == png
    decode_rows = [{"backend": b, "ctx": 32768, "batch": n, "tpot_ms": {"median": t}} for b, n, t in
                   [("FLASH_ATTN", 1, 7.9), ("FLASH_ATTN", 8, 18.0), ("rocketkv", 1, 6.0), ("rocketkv", 8, None)]]
    assert bench_decode.plot_decode(decode_rows, str(tmp_path / "d.png"))
    capacity_rows = [{"backend": "rocketkv", "ctx": 32768, "output_tok_s": {"median": 1030.0}}]
    assert bench_capacity.plot_capacity(capacity_rows, str(tmp_path / "c.png"))
    serve_rows = [{"backend": "FLASH_ATTN", "rate": 0.5, "request_throughput": 0.5, "output_tok_s": 256.0, "tpot_p50_ms": 20.0},
                  {"backend": "FLASH_ATTN", "rate": "inf", "request_throughput": 0.9, "output_tok_s": 400.0, "tpot_p50_ms": 30.0}]
    written = bench_serve.plot_serve(serve_rows, str(tmp_path / "s"))
    assert [os.path.basename(p) for p in written] == ["s_throughput.png", "s_tpot.png"]
    assert all(open(p, "rb").read(4) == png for p in written)


def test_plot_from_saved_json(tmp_path):
    """The plots can be redrawn here from a GPU run's JSON (the GPU machine may lack matplotlib)."""
    pytest.importorskip("matplotlib")
    rows = [{"backend": "rocketkv", "ctx": 32768, "batch": 8, "tpot_ms": {"median": 7.0}}]
    write_json(str(tmp_path / "decode.json"), {"rows": rows})
    subprocess.run([sys.executable, os.path.join(BENCH, "bench_decode.py"), "--plot-from", str(tmp_path / "decode.json")], check=True)
    assert (tmp_path / "decode.png").read_bytes()[:4] == b"\x89PNG"


def test_session_script_is_valid_bash():
    subprocess.run(["bash", "-n", os.path.join(BENCH, "gpu_bench_session.sh")], check=True)


# --- a real engine run (opt-in: minutes on a loaded CPU) ------------------------------------

@pytest.mark.skipif(os.environ.get("ROCKETKV_BENCH_ENGINE") != "1", reason="set ROCKETKV_BENCH_ENGINE=1 (slow on CPU)")
@pytest.mark.parametrize("script,extra", [
    ("bench_decode.py", ["--cases", "512x1", "512x2", "--out", "12", "--repeats", "2", "--warmup-ctx", "256"]),
    ("bench_capacity.py", ["--ctx", "512", "--prompts", "3", "--out", "8"]),
])
def test_engine_run_tiny_model(tmp_path, script, extra):
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "result.json"
    cmd = [sys.executable, os.path.join(BENCH, script), "--config", str(tmp_path / "config.json"), "--backends", "CPU_ATTN", "rocketkv",
           "--budget", "64", "--dtype", "float32", "--eager", "--kv-cache-memory-bytes", str(4 << 20), "--json", str(out), *extra]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, env=env, timeout=900, stdout=subprocess.DEVNULL)
    rows = json.loads(out.read_text())["rows"]
    assert [r["backend"] for r in rows][::len(rows) // 2] == ["CPU_ATTN", "rocketkv"]
    for row in rows:
        if script == "bench_decode.py":
            assert row["tpot_ms"]["n"] == 2 and row["tpot_ms"]["median"] > 0 and min(row["decode_steps_timed"]) >= 12 - 1 - 2
        else:
            assert row["completed"] == [3] and row["peak_decoding"]["median"] == 3 and row["output_tok_s"]["median"] > 0


def test_all_live_pages_attend_like_exact_attention_over_the_kept_tokens():
    """bench_eager_host's dense floor: the attention kernel over every live page of an evicted
    layout (kept prompt pages, gap skipped, decode pages) is exact attention over the live tokens."""
    import torch

    from rocketkv_vllm.kernels import get_ops
    from rocketkv_vllm.kv_layout import KVLayout
    from rocketkv_vllm.ops import reference

    torch.manual_seed(0)
    layout, kv_heads, ctx = KVLayout(16, 2), 2, 100
    blocks = -(-(ctx + 3) // 16)
    kv = torch.randn(layout.cache_shape(2 * blocks + 1, kv_heads, 16))
    table = (torch.randperm(2 * blocks).int().view(2, blocks) + 1)
    seq = torch.tensor([ctx + 1, ctx + 3], dtype=torch.int32)
    keep, gap = torch.tensor([37, 50], dtype=torch.int32), torch.full((2,), ctx, dtype=torch.int32)
    index, count = bench_eager_host.all_live_pages(seq, keep, gap, layout.page_size, kv_heads)
    assert count.tolist() == [[20, 20], [27, 27]]  # 19 / 25 kept pages, then page 50 / pages 50 and 51
    query = torch.randn(2, 4, 16)
    out = get_ops("cpu").paged_sparse_attention(query, kv, layout, table, index, count, seq, keep, gap, 0.25)
    for row in range(2):
        exact = reference.paged_causal_attention(query[row : row + 1], kv, layout, table[row], int(seq[row]),
                                                 int(keep[row]), int(gap[row]), 0.25)
        torch.testing.assert_close(out[row], exact[0])


@pytest.mark.parametrize("script", ["sweep_dense_attention.py", "bench_eager_host.py"])
def test_gpu_session_scripts_parse_their_arguments(script):
    """The GPU lease's attention benchmarks import and parse on any machine (a broken script
    would cost device time to find out)."""
    run = subprocess.run([sys.executable, os.path.join(BENCH, script), "--help"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == 0 and "usage" in run.stdout, run.stderr[-2000:]


def test_sweep_rows_attend_their_kept_and_decoded_tokens():
    """sweep_dense_attention's rows (kept tokens, an evicted gap, decoded tokens): the split kernel
    over them, as the sweep times it, is exact attention over exactly those tokens."""
    import torch

    from rocketkv_vllm.ops import reference

    torch.manual_seed(1)
    rows = sweep_dense_attention.Rows(kept=40, batch=2, l2_bytes=0, device=torch.device("cpu"))
    gap, decoded = sweep_dense_attention.GAP, sweep_dense_attention.DECODED
    assert rows.layers == 1 and rows.live_tokens == 2 * (40 + decoded)
    assert rows.keep.tolist() == [40, 40] and rows.gap.tolist() == [40 + gap] * 2
    assert rows.seq.tolist() == [40 + gap + decoded] * 2
    rows.query, rows.kv = rows.query.float(), [kv.float() for kv in rows.kv]
    rows.out = rows.query.clone()
    rows.split_kernel(num_splits=3)
    for b in range(2):
        exact = reference.paged_causal_attention(
            rows.query[b : b + 1], rows.kv[0], rows.layout, rows.table[b], int(rows.seq[b]), int(rows.keep[b]),
            int(rows.gap[b]), sweep_dense_attention.HEAD_DIM ** -0.5)
        torch.testing.assert_close(rows.out[b], exact[0], rtol=1e-4, atol=1e-4)
