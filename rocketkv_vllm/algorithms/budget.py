"""Adaptive split of a token budget between SnapKV++ (stage 1) and HSA (stage 2).

The published rule (RocketKV, Sec. 4.3): with S = prompt + max new tokens and budget t,
total compression c = S / t is shared as c = c1 * c2 with c1 = c ** alpha and
alpha = min(0.2 + 0.06 * log2(c), 0.8). Stage 1 keeps S / c1 tokens; stage 2 reads
t/2 tokens of K/V plus t/2 tokens' worth of page summaries, which fixes the page size
and the number of head-dim channels used to score pages.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BudgetSplit:
    """Per-request compression plan.

    compress:      False when the budget covers the prompt (exact attention, no eviction).
    prompt_keep:   prompt tokens kept per KV head after stage 1 (== prompt_len if none evicted).
    page_size:     tokens per HSA page (power of two dividing the KV block size).
    top_channels:  r, head-dim channels used for approximate page scores.
    top_k:         tokens attended per KV head at each decode step (whole pages).
    keep_floored:  the formula's prompt_keep fell below max(window, budget) and was raised to it.
    """

    compress: bool
    prompt_keep: int
    page_size: int
    top_channels: int
    top_k: int
    keep_floored: bool = False


def _check_positive_int(name: str, value: object, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def round_page_size(raw_page: float, block_size: int, min_page_size: int = 1) -> int:
    """Nearest power of two (in log scale) to raw_page, within [min_page_size, block_size]."""
    if not _is_power_of_two(block_size):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if not _is_power_of_two(min_page_size) or min_page_size > block_size:
        raise ValueError(
            f"min_page_size must be a power of two <= block_size ({block_size}), got {min_page_size}")
    page = 1 << round(math.log2(max(raw_page, 1.0)))
    return min(max(page, min_page_size), block_size)


def split_budget(
    prompt_len: int,
    max_new_tokens: int,
    budget: int,
    head_dim: int,
    block_size: int,
    window: int = 32,
    evict: bool = True,
    min_page_size: int = 1,
    page_size: int | None = None,
) -> BudgetSplit:
    """Compression plan for one request.

    evict=False is RocketKV-MT: nothing is evicted, HSA alone spends the budget.
    A budget >= prompt_len turns compression off for the request.
    page_size fixes the page (a serving engine stores summaries at one granularity);
    the channel count r is then derived for that page.
    """
    _check_positive_int("prompt_len", prompt_len)
    _check_positive_int("max_new_tokens", max_new_tokens, allow_zero=True)
    _check_positive_int("budget", budget)
    _check_positive_int("head_dim", head_dim)
    _check_positive_int("window", window)
    if budget >= prompt_len:
        return BudgetSplit(False, prompt_len, page_size or min_page_size, head_dim, budget)

    total = prompt_len + max_new_tokens
    compression = max(1.0, total / budget)
    alpha = min(0.2 + 0.06 * math.log2(compression), 0.8) if evict else 0.0
    stage1_cap = total / compression**alpha
    floored = False
    if evict:
        floor = min(prompt_len, max(window, budget))
        formula_keep = round(stage1_cap) - max_new_tokens
        prompt_keep = min(prompt_len, max(floor, formula_keep))
        floored = formula_keep < floor
    else:
        prompt_keep = prompt_len

    stage2_compression = max(1.0, stage1_cap / budget)
    raw_page = min(math.floor(stage2_compression), math.ceil(math.sqrt(stage2_compression)))
    page = round_page_size(raw_page if page_size is None else page_size, block_size, min_page_size)
    if page_size is not None and page != page_size:
        raise ValueError(f"page_size must be a power of two dividing block_size ({block_size}), got {page_size}")
    channels = min(head_dim, max(1, round(head_dim * page / stage2_compression)))
    top_k = max(page, (budget // 2) // page * page)
    return BudgetSplit(True, prompt_keep, page, channels, top_k, floored)
