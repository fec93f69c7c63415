"""Per-request compression plan, a pure function shared by the scheduler and the workers.

The scheduler frees a request's evicted blocks from this plan alone, without waiting for
the GPU, so both sides must compute it from the same inputs.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from rocketkv_vllm.algorithms import split_budget
from rocketkv_vllm.config import RequestSettings, RocketKVConfig, request_settings

logger = logging.getLogger("vllm.rocketkv")  # vLLM's handler and format
_clamps_logged: set[str] = set()


def warn_clamped(reason: str, detail: str) -> None:
    """One WARNING per kind of clamp and process (plans are made per request, on every rank)."""
    if reason not in _clamps_logged:
        _clamps_logged.add(reason)
        logger.warning("RocketKV clamped a request's plan: %s (%s); later plans clamped so are not logged", reason, detail)


@dataclass(frozen=True)
class RequestPlan:
    """prompt_len: true prompt length (RoPE positions continue from it).
    keep:          prompt tokens each KV head keeps after stage 1 (== prompt_len: no eviction).
    sparse:        decode uses HSA (else exact attention over every live token).
    top_channels:  r, channels scored per KV group; top_pages: pages attended per KV head.
    oracle_tokens: > 0 only for the `oracle` ablation: decode attends the tokens with the
                   highest exact attention (torch reference path, no CUDA graph).
    """

    prompt_len: int
    keep: int
    sparse: bool
    top_channels: int
    top_pages: int
    oracle_tokens: int = 0

    @classmethod
    def exact(cls, prompt_len: int, head_dim: int) -> "RequestPlan":
        """No eviction, exact attention at decode."""
        return cls(prompt_len, prompt_len, False, head_dim, 0)

    @property
    def evicts(self) -> bool:
        return self.keep < self.prompt_len

    def first_freed_block(self, block_size: int) -> int:
        """Blocks [first_freed_block, last_freed_block) hold only evicted tokens once stage 1 ran."""
        return -(-self.keep // block_size)

    def last_freed_block(self, block_size: int) -> int:
        # the block holding position prompt_len also receives the first decode tokens
        return self.prompt_len // block_size if self.evicts else 0


def plan_request(
    settings: RequestSettings,
    config: RocketKVConfig,
    prompt_len: int,
    max_new_tokens: int,
    head_dim: int,
    block_size: int,
) -> RequestPlan:
    """The plan for a prompt of prompt_len tokens; stage 1 budgets for
    min(max_new_tokens, settings.output_tokens) output tokens."""
    mode, budget = settings.mode, settings.budget
    if mode == "full" or budget >= prompt_len:
        return RequestPlan.exact(prompt_len, head_dim)
    if mode == "snapkv":  # stage 1 alone: the budget is the kept prompt, read whole at decode
        if budget < config.window:
            warn_clamped("snapkv keeps at least the observation window", f"budget {budget} < window {config.window}")
        return RequestPlan(prompt_len, max(budget, min(config.window, prompt_len)), False, head_dim, 0)
    if mode == "oracle":  # exact top-k at zero estimation cost, as the paper grants it
        return RequestPlan(prompt_len, prompt_len, False, head_dim, 0, oracle_tokens=budget)
    planned_output = max(0, min(max_new_tokens, settings.output_tokens))
    split = split_budget(
        prompt_len,
        planned_output,
        budget,
        head_dim,
        block_size,
        window=config.window,
        evict=mode == "rocketkv",
        page_size=config.page_size,
    )
    if split.keep_floored:
        warn_clamped("stage 1 keeps at least max(window, budget) prompt tokens",
                     f"prompt {prompt_len}, budget {budget}, output {planned_output}")
    if mode in ("rocketkv", "mt") and split.prompt_keep + planned_output <= config.dense_below_for(mode):
        # short enough to read whole (config.dense_below); stage 1 still evicts
        return RequestPlan(prompt_len, split.prompt_keep, False, head_dim, 0)
    if not config.selects_pages():  # (request_settings refuses quest there; rocketkv and mt decode exactly)
        raise RuntimeError(f"a {mode} request would select pages on a server whose requests may not")
    if config.top_channels and config.top_channels > head_dim:
        warn_clamped("top_channels is capped at the head size", f"{config.top_channels} > {head_dim}")
    channels = head_dim if mode == "quest" else min(head_dim, config.top_channels or split.top_channels)
    top_k = config.top_k or split.top_k
    scored_pages = top_k // config.page_size - (1 if config.attend_newest_page else 0)  # + the newest page
    if scored_pages < 1:
        warn_clamped("decode scores at least one page besides the newest", f"{top_k} tokens < 2 pages of {config.page_size}")
    return RequestPlan(prompt_len, split.prompt_keep, True, channels, max(1, scored_pages))


cached_plan_request = functools.lru_cache(maxsize=16384)(plan_request)


def plan_for_params(params: Any, prompt_len: int, config: RocketKVConfig, head_dim: int, block_size: int) -> RequestPlan:
    """A request's plan from its SamplingParams (extra_args, max_tokens): the one call the
    scheduler and the workers both make, so they agree on what is evicted.

    max_tokens counts only up to the request's output_tokens setting (see RocketKVConfig); a
    request without one (vLLM's OpenAI server leaves it unset when the client omits it) is
    planned for output_tokens."""
    settings = request_settings(getattr(params, "extra_args", None), config)
    max_tokens = getattr(params, "max_tokens", None)
    if max_tokens is None:
        max_tokens = settings.output_tokens
    return cached_plan_request(settings, config, prompt_len, max_tokens, head_dim, block_size)
