"""RocketKV's `vllm:rocketkv_*` series through `LLM.get_metrics()` (engine in-process), checked
against the requests' plans and the block pool. The same stat logger serves `vllm serve`'s
/metrics (tests/test_soak_server.py reads them there, engine in its own process)."""
import functools
import gc

import pytest

from engine_utils import free_blocks, greedy, tiny_llama, token_prompt

from vllm import LLM
from vllm.v1.metrics.reader import Counter, Histogram

from rocketkv_vllm.config import RocketKVConfig, request_settings
from rocketkv_vllm.plan import RequestPlan, plan_request
from rocketkv_vllm.vllm_glue.metrics import compression_ratio, decode_reads

BLOCK, PAGE, HEAD_DIM = 16, 4, 32
NEWEST = RocketKVConfig().attend_newest_page  # the server's default: decode attends its newest page
greedy = functools.partial(greedy, detokenize=False)
CONFIG = {"budget": 64, "window": 16, "page_size": PAGE, "dense_below": 0}  # HSA rows
ENGINE_ARGS = dict(
    skip_tokenizer_init=True, attention_backend="rocketkv", dtype="float32", enforce_eager=True, max_model_len=1024,
    block_size=BLOCK, kv_cache_memory_bytes=1 << 20, max_num_batched_tokens=256, max_num_seqs=8,
    additional_config={"rocketkv": CONFIG}, disable_log_stats=False,
)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    engine = LLM(tiny_llama(str(tmp_path_factory.mktemp("tiny"))), **ENGINE_ARGS)
    yield engine
    del engine
    gc.collect()


def rocketkv_series(llm) -> dict:
    """{(name, mode label or None): Counter value or Histogram} of the vllm:rocketkv_* series."""
    series = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:rocketkv_"):
            key = (metric.name.removeprefix("vllm:rocketkv_"), metric.labels.get("mode"))
            series[key] = metric.value if isinstance(metric, Counter) else metric
    return series


def delta(after: dict, before: dict, name: str, mode: str | None = None) -> float:
    def value(series):
        item = series.get((name, mode), 0)
        return item.count if isinstance(item, Histogram) else item

    return value(after) - value(before)


def plan(prompt_len: int, max_tokens: int, budget: int, mode: str) -> RequestPlan:
    config = RocketKVConfig(**CONFIG)
    settings = request_settings({"rocketkv_budget": budget, "rocketkv_mode": mode}, config)
    return plan_request(settings, config, prompt_len, max_tokens, HEAD_DIM, BLOCK)


def expected_decode(p: RequestPlan, max_tokens: int) -> tuple[int, int, int, int]:
    """(steps, live, pages, tokens) summed over a request's decode rows: the first token comes
    from the prompt's last chunk, each later one from a decode row."""
    rows = [decode_reads(p, p.prompt_len + i, PAGE, NEWEST) for i in range(max_tokens - 1)]
    return len(rows), sum(r[0] for r in rows), sum(r[1] for r in rows), sum(r[2] for r in rows)


REQUESTS = [  # (prompt length, max_tokens, budget, mode)
    (600, 12, 64, "rocketkv"),
    (300, 9, 48, "rocketkv"),
    (300, 7, 64, "mt"),
    (200, 5, 64, "full"),
    (37, 6, 64, "rocketkv"),  # the budget covers it: exact
]


def test_counters_equal_the_plans_and_the_block_pool(llm):
    before = rocketkv_series(llm)
    prompts = [token_prompt(n, seed) for seed, (n, *_) in enumerate(REQUESTS)]
    params = [greedy(m, rocketkv_budget=b, rocketkv_mode=mode) for _, m, b, mode in REQUESTS]
    llm.generate(prompts, params, use_tqdm=False)
    after = rocketkv_series(llm)

    plans = [plan(n, m, b, mode) for n, m, b, mode in REQUESTS]
    assert plans[0].evicts and plans[1].evicts and plans[2].sparse and not plans[2].evicts and not plans[4].sparse
    assert delta(after, before, "prompt_tokens_evicted") == sum(p.prompt_len - p.keep for p in plans) > 0
    freed = sum(p.last_freed_block(BLOCK) - p.first_freed_block(BLOCK) for p in plans if p.evicts)
    assert delta(after, before, "kv_blocks_freed") == freed > 0
    for mode, count in (("rocketkv", 3), ("mt", 1), ("full", 1)):
        assert delta(after, before, "requests", mode) == count
        assert delta(after, before, "compression_ratio", mode) == count
    ratio = after[("compression_ratio", "rocketkv")].sum - getattr(before.get(("compression_ratio", "rocketkv")), "sum", 0)
    assert ratio == pytest.approx(sum(compression_ratio(p, PAGE, NEWEST) for p, r in zip(plans, REQUESTS) if r[3] == "rocketkv"))
    assert compression_ratio(plans[0], PAGE, NEWEST) > 4 and compression_ratio(plans[4], PAGE, NEWEST) == 1

    decode = [expected_decode(p, r[1]) for p, r in zip(plans, REQUESTS)]
    for i, name in enumerate(("decode_steps", "decode_tokens_live", "decode_pages_read", "decode_tokens_read")):
        assert delta(after, before, name) == sum(d[i] for d in decode), name
    assert delta(after, before, "decode_tokens_read") < delta(after, before, "decode_tokens_live")


def test_blocks_freed_match_the_block_pool_delta(llm):
    """One evicting request, stepped by hand: the blocks the pool gets back when stage 1 has run
    are the blocks the counter reports."""
    before = rocketkv_series(llm)
    engine = llm.llm_engine
    engine.add_request("one", token_prompt(600, 9), greedy(8, rocketkv_budget=64))
    free = [free_blocks(llm)]
    while engine.has_unfinished_requests():
        engine.step()
        free.append(free_blocks(llm))
    released_mid_flight = max(b - a for a, b in zip(free, free[1:-1]))  # the compaction step, before finishing
    p = plan(600, 8, 64, "rocketkv")
    assert released_mid_flight == p.last_freed_block(BLOCK) - p.first_freed_block(BLOCK)
    assert delta(rocketkv_series(llm), before, "kv_blocks_freed") == released_mid_flight


def test_one_token_request_has_no_decode_row(llm):
    """A request that finishes at its first token has no decode row and frees no blocks early."""
    before = rocketkv_series(llm)
    llm.generate([token_prompt(300, 4)], greedy(1, rocketkv_budget=64), use_tqdm=False)
    after = rocketkv_series(llm)
    assert delta(after, before, "decode_steps") == 0
    assert delta(after, before, "requests", "rocketkv") == 1
    # one token only: stage 1 ran, but the request finished before the scheduler freed blocks
    assert delta(after, before, "kv_blocks_freed") == 0


def test_decode_reads_follow_the_plan():
    sparse = RequestPlan(prompt_len=100, keep=40, sparse=True, top_channels=8, top_pages=5)
    assert decode_reads(sparse, 100, PAGE, False) == (41, 5, 20)  # 40 kept + 1 new token, 5 pages of 4
    assert decode_reads(sparse, 100, PAGE, True) == (41, 6, 21)  # + the newest page, holding 1 token
    assert decode_reads(sparse, 99, PAGE, True) == (100, 25, 100)  # still the prompt: exact, nothing evicted yet
    tiny = RequestPlan(prompt_len=10, keep=6, sparse=True, top_channels=8, top_pages=5)
    assert decode_reads(tiny, 10, PAGE, False) == decode_reads(tiny, 10, PAGE, True) == (7, 2, 7)  # all live pages
    exact = RequestPlan.exact(30, HEAD_DIM)
    assert decode_reads(exact, 35, PAGE, True) == (36, 9, 36)
    assert compression_ratio(sparse, PAGE, True) == pytest.approx(101 / 21)


def test_stats_wait_for_a_message_with_outputs():
    """LLMEngine records only stats messages that carry request outputs: the rest wait."""
    from types import SimpleNamespace

    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats

    from rocketkv_vllm.vllm_glue.metrics import RocketKVStats, StatsShipper, add_stats_field

    add_stats_field()  # what the plugin does in every process
    manager = SimpleNamespace(stats=RocketKVStats(kv_blocks_freed=3))
    shipper = StatsShipper()
    idle = {0: EngineCoreOutputs(scheduler_stats=SchedulerStats())}
    shipper.ship([manager], idle, log_stats=True)
    assert idle[0].scheduler_stats.rocketkv is None and manager.stats.empty()
    manager.stats.kv_blocks_freed = 2
    busy = {0: EngineCoreOutputs(outputs=[object()], scheduler_stats=SchedulerStats())}
    shipper.ship([manager], busy, log_stats=True)
    assert busy[0].scheduler_stats.rocketkv.kv_blocks_freed == 5 and shipper.pending.empty()
