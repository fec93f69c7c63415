"""RocketKV settings: server defaults (--additional-config) and per-request overrides (extra_args)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from rocketkv_vllm.kv_layout import FEW_CHANNEL_GROUP

# Serving modes, then the paper's ablations (for accuracy studies: they run slower paths).
SERVING_MODES = ("rocketkv", "mt", "full")
ABLATION_MODES = ("snapkv", "quest", "oracle")
MODES = SERVING_MODES + ABLATION_MODES
BUDGET_KEY, MODE_KEY, OUTPUT_TOKENS_KEY = "rocketkv_budget", "rocketkv_mode", "rocketkv_output_tokens"


def _int_field(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _mode_field(name: str, value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in MODES:
        raise ValueError(f"{name} must be one of {', '.join(MODES)}, got {value!r}")
    return value.lower()


@dataclass(frozen=True)
class RocketKVConfig:
    """Server-wide defaults, from --additional-config '{"rocketkv": {...}}'.

    budget:       token budget t per request (KV reads per decode step, see algorithms.budget).
    mode:         rocketkv (evict + HSA), mt (HSA only, no eviction), full (exact attention);
                  ablations: snapkv (stage 1 alone, keeps `budget` prompt tokens, exact decode),
                  quest (page selection on every channel), oracle (exact top-k tokens).
    output_tokens: output length stage 1 plans for: S = prompt + min(max_tokens, output_tokens).
                  OpenAI clients that omit max_tokens get max_model_len - prompt from vLLM;
                  planning with that would evict far more than the same request with a
                  small max_tokens. Tokens generated past it are kept all the same.
    window:       SnapKV++ observation window (last prompt queries).
    pool_kernel:  SnapKV++ max-pooling kernel (odd; shrunk to fit short prompts).
    page_size:    HSA page, the granularity of the stored key max/min summaries.
    top_channels: fixed r (k1) instead of the adaptive one; top_k: fixed tokens (k2) per step.
    attend_newest_page: every decode step attends the page holding its newest tokens
                  (ops/newest_page.py), inside the same budget; False is the paper's HSA.
    summary_group: channels per stored group of the page summaries (kv_layout), 0 for whole
                  rows; by default FEW_CHANNEL_GROUP when the server's mode is mt (its
                  scoring reads few channels), else whole rows.
    """

    budget: int = 2048
    mode: str = "rocketkv"
    output_tokens: int = 512
    window: int = 32
    pool_kernel: int = 63
    page_size: int = 4
    top_channels: int | None = None
    top_k: int | None = None
    attend_newest_page: bool = True
    summary_group: int | None = None

    def __post_init__(self) -> None:
        for name in ("budget", "output_tokens", "window", "pool_kernel", "page_size"):
            _int_field(f"rocketkv.{name}", getattr(self, name), 1)
        for name in ("top_channels", "top_k"):
            if getattr(self, name) is not None:
                _int_field(f"rocketkv.{name}", getattr(self, name), 1)
        object.__setattr__(self, "mode", _mode_field("rocketkv.mode", self.mode))
        if not isinstance(self.attend_newest_page, bool):
            raise ValueError(f"rocketkv.attend_newest_page must be true or false, got {self.attend_newest_page!r}")
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"rocketkv.pool_kernel must be odd, got {self.pool_kernel}")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"rocketkv.page_size must be a power of two, got {self.page_size}")
        if self.summary_group is not None:
            group = _int_field("rocketkv.summary_group", self.summary_group, 0)
            if group & (group - 1):
                raise ValueError(f"rocketkv.summary_group must be 0 or a power of two, got {group}")

    def layout_summary_group(self) -> int:
        """The summary group the KV cache is laid out with (see summary_group)."""
        if self.summary_group is not None:
            return self.summary_group
        return FEW_CHANNEL_GROUP if self.mode == "mt" else 0

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> "RocketKVConfig":
        section = (additional_config or {}).get("rocketkv", {})
        if not isinstance(section, Mapping):
            raise ValueError(f"additional_config['rocketkv'] must be a mapping, got {section!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(section) - known
        if unknown:
            raise ValueError(f"unknown rocketkv settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**section)


@dataclass(frozen=True)
class RequestSettings:
    budget: int
    mode: str
    output_tokens: int


def request_settings(extra_args: Mapping[str, Any] | None, defaults: RocketKVConfig) -> RequestSettings:
    """A request's budget, mode and planned output length: its extra_args (rocketkv_budget,
    rocketkv_mode, rocketkv_output_tokens) over the defaults.

    Raises ValueError naming the offending field.
    """
    extra = extra_args or {}
    budget = _int_field(BUDGET_KEY, extra[BUDGET_KEY], 1) if BUDGET_KEY in extra else defaults.budget
    mode = _mode_field(MODE_KEY, extra[MODE_KEY]) if MODE_KEY in extra else defaults.mode
    output_tokens = (_int_field(OUTPUT_TOKENS_KEY, extra[OUTPUT_TOKENS_KEY], 1) if OUTPUT_TOKENS_KEY in extra
                     else defaults.output_tokens)
    return RequestSettings(budget, mode, output_tokens)
