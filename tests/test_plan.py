"""The per-request plan: the output length stage 1 budgets for, the ablation modes, chunk alignment."""
import pytest

from rocketkv_vllm.config import (
    DEFAULT_DENSE_BELOW,
    EXACT_DECODE_MODES,
    EXACT_SERVER_PAGE,
    MAX_SELECTION_PAGE,
    SELECTION_PAGE,
    RequestSettings,
    RocketKVConfig,
    request_settings,
)
from rocketkv_vllm.plan import plan_for_params, plan_request
from rocketkv_vllm.vllm_glue.window_alignment import aligned_chunk


class Params:
    def __init__(self, max_tokens, **extra):
        self.max_tokens = max_tokens
        self.extra_args = extra or None


def plan(config, prompt_len, max_tokens, **extra):
    return plan_for_params(Params(max_tokens, **extra), prompt_len, config, head_dim=64, block_size=16)


def test_omitted_max_tokens_plans_like_the_output_tokens_setting():
    # vLLM's OpenAI layer turns an omitted max_tokens into max_model_len - prompt
    config = RocketKVConfig(budget=256, output_tokens=300)
    from_server_default = plan(config, 4000, 32768 - 4000)
    assert from_server_default == plan(config, 4000, 300) == plan(config, 4000, None)  # None: left unset
    assert from_server_default.keep > plan(RocketKVConfig(budget=256, output_tokens=30000), 4000, 32768 - 4000).keep


def test_small_max_tokens_still_plans_with_itself():
    config = RocketKVConfig(budget=256, output_tokens=512)
    assert plan(config, 4000, 16) != plan(config, 4000, 512)
    assert plan(config, 4000, 16).keep > plan(config, 4000, 512).keep


def test_request_overrides_output_tokens():
    config = RocketKVConfig(budget=256)
    assert plan(config, 4000, 10**6, rocketkv_output_tokens=100) == plan(config, 4000, 100)
    with pytest.raises(ValueError, match="rocketkv_output_tokens"):
        request_settings({"rocketkv_output_tokens": 0}, config)


@pytest.mark.parametrize("budget", [128, 1024])
def test_ablation_plans_at_equal_budget(budget):
    config = RocketKVConfig(budget=budget, page_size=SELECTION_PAGE)
    snap = plan(config, 4000, 128, rocketkv_mode="snapkv")
    assert (snap.keep, snap.sparse, snap.oracle_tokens) == (budget, False, 0)
    oracle = plan(config, 4000, 128, rocketkv_mode="oracle")
    assert (oracle.keep, oracle.sparse, oracle.oracle_tokens) == (4000, False, budget)
    quest, mt = plan(config, 4000, 128, rocketkv_mode="quest"), plan(config, 4000, 128, rocketkv_mode="mt")
    assert quest.keep == mt.keep == 4000 and quest.sparse and mt.sparse
    assert quest.top_channels == 64 >= mt.top_channels and quest.top_pages == mt.top_pages == budget // 2 // config.page_size - 1  # + the newest page


@pytest.mark.parametrize("mode", ["rocketkv", "mt", "snapkv", "quest", "oracle"])
def test_budget_covering_the_prompt_is_exact_in_every_mode(mode):
    p = plan(RocketKVConfig(budget=4000, page_size=SELECTION_PAGE), 4000, 128, rocketkv_mode=mode)
    assert (p.keep, p.sparse, p.oracle_tokens) == (4000, False, 0)


def test_snapkv_never_keeps_less_than_the_window():
    assert plan(RocketKVConfig(budget=8, window=32), 4000, 16, rocketkv_mode="snapkv").keep == 32


@pytest.mark.parametrize(
    "start,n,prompt,window,expected",
    [
        (0, 256, 1000, 32, 256),      # far from the window
        (768, 216, 1000, 32, 200),    # would end inside [968, 1000): ends at 968
        (768, 232, 1000, 32, 232),    # completes the prompt: whole window inside
        (768, 240, 1000, 32, 232),    # runs past the prompt (recomputed after preemption): ends with it
        (1000, 40, 1000, 32, 40),     # the recomputed outputs, after the prompt
        (968, 10, 1000, 32, 10),      # starts at the window: the final chunks
        (700, 268, 1000, 32, 268),    # ends exactly where the window begins
        (0, 5, 20, 32, 5),            # prompt shorter than the window
    ],
)
def test_chunks_never_end_inside_the_observation_window_and_end_with_the_prompt(start, n, prompt, window, expected):
    assert aligned_chunk(start, n, prompt, window) == expected


def test_a_clamped_plan_warns_once():
    import logging

    import rocketkv_vllm.plan as plan_module

    plan_module._clamps_logged.clear()
    caught: list[logging.LogRecord] = []
    handler = logging.Handler()  # on the logger itself: vLLM's logging config may stop propagation
    handler.emit = caught.append
    plan_module.logger.addHandler(handler)
    try:
        config = RocketKVConfig(budget=64, output_tokens=100000)
        for prompt_len in (4000, 4001):  # the formula's keep falls below the budget: raised to it
            assert plan(config, prompt_len, 10**6).keep == 64
        plan(RocketKVConfig(budget=8, top_k=4, page_size=4, dense_below=0), 4000, 16)  # fewer than two pages: one scored page
        messages = [r.getMessage() for r in caught]
        assert sum("at least max(window, budget)" in m for m in messages) == 1
        assert sum("at least one page besides the newest" in m for m in messages) == 1
        caught.clear()
        plan(RocketKVConfig(budget=256), 4000, 128)
        assert not caught
    finally:
        plan_module.logger.removeHandler(handler)


def test_dense_below_reads_short_kept_contexts_whole_and_still_evicts():
    """A rocketkv/mt request whose kept prompt plus planned output fits dense_below decodes
    exactly over it (no page selection) and stage 1 keeps the same tokens (the scheduler frees
    the same blocks); a longer one, or dense_below 0, runs HSA; the ablations never change."""
    hsa = RocketKVConfig(budget=256, dense_below=0)
    sparse = plan(hsa, 4000, 100)
    assert sparse.sparse and sparse.evicts
    live = sparse.keep + 100
    for dense_below in (live, live + 1, 10**6):
        dense = plan(RocketKVConfig(budget=256, dense_below=dense_below), 4000, 100)
        assert (dense.keep, dense.sparse, dense.top_channels, dense.top_pages) == (sparse.keep, False, 64, 0)
    assert plan(RocketKVConfig(budget=256, dense_below=live - 1), 4000, 100) == sparse
    # the planned output counts up to output_tokens (what the plan's S counts), not max_tokens
    capped = RocketKVConfig(budget=256, output_tokens=100, dense_below=live)
    assert not plan(capped, 4000, 10**5).sparse
    config = RocketKVConfig(budget=256, dense_below=4100)
    mt = plan(config, 4000, 100, rocketkv_mode="mt")
    assert (mt.keep, mt.sparse) == (4000, False) and plan(config, 4001, 100, rocketkv_mode="mt").sparse
    for mode in ("quest", "snapkv", "oracle", "full"):
        assert plan(config, 4000, 100, rocketkv_mode=mode) == plan(hsa, 4000, 100, rocketkv_mode=mode)


def test_with_selection_pages_rocketkv_requests_read_kept_contexts_up_to_16k_whole_and_mt_requests_select():
    """With 2-token pages (an mt server's default) and dense_below unset: rocketkv requests whose
    kept prompt plus planned output is at most DEFAULT_DENSE_BELOW decode exactly over it, longer
    ones and every mt request run HSA."""
    for default in (RocketKVConfig(budget=2048, page_size=SELECTION_PAGE), RocketKVConfig(budget=2048, mode="mt")):
        assert default.page_size == SELECTION_PAGE
        assert default.dense_below_for("rocketkv") == DEFAULT_DENSE_BELOW and default.dense_below_for("mt") == 0
        for prompt_len in (8192, 32768, 131072 - 600):  # kept 5-12.5K at a 2048 budget
            ours = plan(default, prompt_len, 512, rocketkv_mode="rocketkv")
            assert ours.evicts and not ours.sparse and ours.keep + 512 <= DEFAULT_DENSE_BELOW
            assert ours.keep == plan(RocketKVConfig(budget=2048, dense_below=0), prompt_len, 512).keep
            assert plan(default, prompt_len, 512, rocketkv_mode="mt").sparse


def test_exact_decoding_servers_default_to_16_token_pages_and_never_select():
    """A server whose requests decode exactly by default (rocketkv, snapkv, full; dense_below
    unset) lays its summaries out in 16-token pages; on pages that coarse no rocketkv or mt
    request selects pages, however long its kept context, unless dense_below says otherwise.
    Servers that select by default (mt, the selecting ablations, dense_below set) keep 2."""
    for mode in EXACT_DECODE_MODES:
        assert RocketKVConfig(mode=mode).page_size == EXACT_SERVER_PAGE
    for settings in ({"mode": "mt"}, {"mode": "quest"}, {"mode": "oracle"}, {"dense_below": 0}, {"dense_below": 9000}):
        assert RocketKVConfig(**settings).page_size == SELECTION_PAGE
    default = RocketKVConfig(budget=2048)
    for prompt_len in (8192, 131072 - 600):
        for mode in ("rocketkv", "mt"):
            ours = plan(default, prompt_len, 512, rocketkv_mode=mode)
            assert not ours.sparse and ours.evicts == (mode == "rocketkv")
    big_budget = plan(default, 131072 - 600, 512, rocketkv_budget=16384)  # keeps far more than 16K tokens
    assert big_budget.keep + 512 > DEFAULT_DENSE_BELOW and not big_budget.sparse
    assert plan(RocketKVConfig(budget=2048, page_size=8), 131072 - 600, 512, rocketkv_mode="mt").sparse is False
    assert plan(RocketKVConfig(budget=2048, page_size=16, dense_below=0), 8192, 512, rocketkv_mode="mt").sparse
    assert plan(RocketKVConfig(budget=2048, page_size=MAX_SELECTION_PAGE), 8192, 512, rocketkv_mode="mt").sparse


def test_quest_needs_pages_it_may_select():
    """Where no request may select pages (pages over 4 tokens, dense_below unset) the full graphs
    hold no page selection, so quest, which always selects, is refused naming the field."""
    assert not RocketKVConfig().selects_pages()
    for settings in ({"page_size": 4}, {"mode": "mt"}, {"page_size": 16, "dense_below": 0}):
        assert RocketKVConfig(**settings).selects_pages()
    with pytest.raises(ValueError, match="rocketkv_mode quest selects pages.*16-token pages"):
        request_settings({"rocketkv_mode": "quest"}, RocketKVConfig())
    with pytest.raises(ValueError, match="rocketkv.page_size 16: mode quest"):
        RocketKVConfig(mode="quest", page_size=16)
    assert request_settings({"rocketkv_mode": "quest"}, RocketKVConfig(mode="mt")).mode == "quest"
    for mode in ("rocketkv", "mt", "full", "snapkv", "oracle"):  # (oracle selects tokens exactly, not pages)
        assert request_settings({"rocketkv_mode": mode}, RocketKVConfig()).mode == mode
    with pytest.raises(RuntimeError, match="quest request would select pages"):  # (past request_settings)
        plan_request(RequestSettings(256, "quest", 512), RocketKVConfig(), 4000, 128, 64, 16)


