import math

import pytest

from rocketkv_vllm.algorithms import round_page_size, split_budget


@pytest.mark.parametrize("prompt,new,budget", [(32768 - 256, 256, 256), (131072 - 256, 256, 256), (131072 - 2048, 2048, 2048)])
def test_split_follows_published_formula(prompt, new, budget):
    plan = split_budget(prompt, new, budget, head_dim=128, block_size=16)
    total = prompt + new
    c = total / budget
    alpha = min(0.2 + 0.06 * math.log2(c), 0.8)
    cap = total / c**alpha
    assert plan.compress
    assert plan.prompt_keep == round(cap) - new
    c2 = cap / budget
    raw = min(math.floor(c2), math.ceil(math.sqrt(c2)))
    assert plan.page_size == 2 ** round(math.log2(raw))
    assert plan.top_channels == round(128 * plan.page_size / c2)
    assert plan.top_k == budget // 2


def test_published_example_keep_sizes():
    # RocketKV notes: S=32K, t=256 keeps ~1618 tokens in total (prompt part = cap - max_new).
    plan = split_budget(32768 - 256, 256, 256, head_dim=128, block_size=16)
    assert abs(plan.prompt_keep + 256 - 1618) < 10


def test_budget_covering_prompt_means_no_compression():
    plan = split_budget(500, 100, 500, head_dim=64, block_size=16)
    assert not plan.compress and plan.prompt_keep == 500


def test_mt_mode_keeps_everything():
    plan = split_budget(8000, 100, 256, head_dim=64, block_size=16, evict=False)
    assert plan.compress and plan.prompt_keep == 8000 and plan.top_k == 128


def test_keep_never_below_window_or_budget():
    plan = split_budget(4000, 100000, 64, head_dim=64, block_size=16, window=32)
    assert plan.prompt_keep == 64


def test_page_override_and_rounding():
    assert split_budget(8000, 100, 512, 64, 16, page_size=8).page_size == 8
    assert round_page_size(3, 16) == 4 and round_page_size(1, 16) == 1 and round_page_size(100, 16) == 16
    assert round_page_size(1, 32, min_page_size=4) == 4


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(budget=0), "budget"),
        (dict(budget=-5), "budget"),
        (dict(budget=2.5), "budget"),
        (dict(budget=True), "budget"),
        (dict(prompt_len=0), "prompt_len"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(block_size=24), "block_size"),
        (dict(page_size=3), "page_size"),
    ],
)
def test_invalid_arguments(kwargs, field):
    args = dict(prompt_len=1000, max_new_tokens=10, budget=100, head_dim=64, block_size=16) | kwargs
    with pytest.raises(ValueError, match=field):
        split_budget(**args)


def test_prompt_shorter_than_window_is_kept_whole():
    plan = split_budget(20, 500, 8, head_dim=64, block_size=16, window=32)
    assert plan.compress and plan.prompt_keep == 20
