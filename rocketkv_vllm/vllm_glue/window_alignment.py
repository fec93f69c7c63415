"""Scheduler hook: the chunk that completes an evicting prompt holds its whole observation window
and ends with the prompt.

SnapKV++ scores the prompt with the queries of its last `window` tokens, and the workers see
only the queries of the chunk they run. With chunked prefill a chunk may end inside the
window (positions prompt_len - window .. prompt_len - 1): the next, final chunk would then
carry fewer window queries. The scheduler instead ends such a chunk where the window
begins, so the final chunk always starts at or before it:

    prompt:  [ .......................... | window (W) ]
    chunks:  [ chunk k ...........]        <- would end inside the window
             [ chunk k ..........]|[ final chunk holds all W queries ]

vLLM calls `_mamba_block_aligned_split` on every prefill chunk it schedules when
`need_mamba_block_aligned_split` is set (hybrid Mamba models, which align chunks to
blocks); RocketKV sets it and runs vLLM's own alignment first where the model needs it.
"""
from __future__ import annotations

import functools

from rocketkv_vllm.config import RocketKVConfig


def aligned_chunk(start: int, num_new_tokens: int, prompt_len: int, window: int) -> int:
    """Tokens to schedule from `start` so that no chunk ends inside the last `window` prompt tokens,
    and a chunk that completes the prompt ends with it: a request recomputed after preemption
    (its prompt and outputs prefilled again) then runs stage 1 before its outputs, which attend
    what it kept, as they did when they were decoded."""
    window_start = prompt_len - window
    end = start + num_new_tokens
    if start < window_start < end < prompt_len:
        return window_start - start
    if start < prompt_len < end:
        return prompt_len - start
    return num_new_tokens


def install() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    from rocketkv_vllm.vllm_glue.kv_manager import RocketKVManager
    from rocketkv_vllm.vllm_glue.plugin import _uses_rocketkv, _wrap

    def make_init(original):
        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            self._rocketkv_managers = []
            if _uses_rocketkv(self.vllm_config):
                self._rocketkv_window = RocketKVConfig.from_additional_config(self.vllm_config.additional_config).window
                self._rocketkv_managers = [
                    m for m in self.kv_cache_manager.coordinator.single_type_managers if isinstance(m, RocketKVManager)
                ]
                self._rocketkv_model_split = self.need_mamba_block_aligned_split
                self.need_mamba_block_aligned_split = True

        return __init__

    def make_split(original):
        @functools.wraps(original)
        def split(self, request, num_new_tokens, num_new_local_computed_tokens=0, num_external_computed_tokens=0):
            if not self._rocketkv_managers:
                return original(self, request, num_new_tokens, num_new_local_computed_tokens, num_external_computed_tokens)
            if self._rocketkv_model_split:
                num_new_tokens = original(
                    self, request, num_new_tokens, num_new_local_computed_tokens, num_external_computed_tokens)
            if not any(m.track(request).evicts for m in self._rocketkv_managers):
                return num_new_tokens
            start = request.num_computed_tokens + num_new_local_computed_tokens + num_external_computed_tokens
            return aligned_chunk(start, num_new_tokens, request.num_prompt_tokens, self._rocketkv_window)

        return split

    _wrap(Scheduler, "__init__", make_init)
    _wrap(Scheduler, "_mamba_block_aligned_split", make_split)
