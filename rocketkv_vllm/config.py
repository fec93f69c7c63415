"""RocketKV settings: server defaults (--additional-config) and per-request overrides (extra_args)."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from rocketkv_vllm.kv_layout import FEW_CHANNEL_GROUP

# Serving modes, then the paper's ablations (for accuracy studies: they run slower paths).
SERVING_MODES = ("rocketkv", "mt", "full")
ABLATION_MODES = ("snapkv", "quest", "oracle")
MODES = SERVING_MODES + ABLATION_MODES
BUDGET_KEY, MODE_KEY, OUTPUT_TOKENS_KEY = "rocketkv_budget", "rocketkv_mode", "rocketkv_output_tokens"
REQUEST_PREFIX = "rocketkv_"
# every integer setting fits an int32 (kernel arguments, index tensors) and stays a valid JSON number
MAX_INT = 2**31 - 1
# rocketkv requests whose kept context fits decode exactly by default (RocketKVConfig.dense_below)
DEFAULT_DENSE_BELOW = 16384
# page sizes (RocketKVConfig.page_size): SELECTION_PAGE where requests select pages by default,
# EXACT_SERVER_PAGE where they decode exactly (summaries take 2 of a 16-token block's 34 rows
# instead of 16 of 48: ~41% more tokens in the pool); past MAX_SELECTION_PAGE, pages are too
# coarse to select from (mt's accuracy collapses at 16 on SmolLM2), so every request decodes exactly
SELECTION_PAGE, EXACT_SERVER_PAGE, MAX_SELECTION_PAGE = 2, 16, 4
# the servers whose requests decode exactly by default (rocketkv: every kept context up to 128K at
# a 2048-token budget is under DEFAULT_DENSE_BELOW)
EXACT_DECODE_MODES = ("rocketkv", "snapkv", "full")


def _int_field(name: str, value: Any, minimum: int, maximum: int = MAX_INT) -> int:
    # bool is an int subclass, and JSON true must not read as 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


def _mode_field(name: str, value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in MODES:
        raise ValueError(f"{name} must be one of {', '.join(MODES)}, got {value!r}")
    return value.lower()


def _unknown_key_error(kind: str, key: str, known: Iterable[str]) -> ValueError:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {key!r}{hint} (known: {', '.join(known)})")


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
    page_size:    HSA page, the granularity of the stored key max/min summaries. Default (None):
                  EXACT_SERVER_PAGE (16) on servers whose requests decode exactly (mode rocketkv,
                  snapkv or full, dense_below not set), else SELECTION_PAGE (2). On a server with
                  pages over MAX_SELECTION_PAGE (4) tokens every request decodes exactly (mt ones
                  too, unless dense_below is set; quest ones are refused): serve mt with
                  `"mode": "mt"` (2-token pages).
    top_channels: fixed r (k1) instead of the adaptive one; top_k: fixed tokens (k2) per step.
    attend_newest_page: every decode step attends the page holding its newest tokens
                  (ops/newest_page.py), inside the same budget; False is the paper's HSA.
    summary_group: channels per stored group of the page summaries (kv_layout), 0 for whole
                  rows; by default FEW_CHANNEL_GROUP when the server's mode is mt (its
                  scoring reads few channels), else whole rows.
    dense_below:  a rocketkv or mt request whose decode context (the prompt tokens stage 1 keeps
                  plus its planned output) is at most this many tokens attends exactly over
                  all of it (stage 1 still evicts; no page selection, no page list); 0 always
                  runs HSA. Default (None): DEFAULT_DENSE_BELOW for rocketkv requests, 0 for mt;
                  no limit on servers with pages over MAX_SELECTION_PAGE tokens.
                  On the H200, rocketkv mode at a 2048-token budget (5-12.5K kept tokens, 8K-130K
                  prompts) attends faster dense than with page selection at every batch measured
                  (1-64): with 2-token pages the summaries that selection reads weigh as much as
                  the keys (benchmarks/results/NOTES.md, sessions 14-15). mt requests keep HSA:
                  their few-channel scoring reads far less, and they keep whole prompts.
    decode_graphs: steps that vLLM runs without a full CUDA graph (prefill chunks beside
                  decodes, uncaptured batch sizes, --enforce-eager) replay each layer's decode
                  attention as a CUDA graph captured per padded row count (kernels/layer_graphs.py);
                  False launches its kernels from Python.
    """

    budget: int = 2048
    mode: str = "rocketkv"
    output_tokens: int = 512
    window: int = 32
    pool_kernel: int = 63
    page_size: int | None = None
    top_channels: int | None = None
    top_k: int | None = None
    attend_newest_page: bool = True
    summary_group: int | None = None
    dense_below: int | None = None
    decode_graphs: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", _mode_field("rocketkv.mode", self.mode))
        if self.dense_below is not None:
            _int_field("rocketkv.dense_below", self.dense_below, 0)
        if self.page_size is None:
            exact = self.mode in EXACT_DECODE_MODES and self.dense_below is None
            object.__setattr__(self, "page_size", EXACT_SERVER_PAGE if exact else SELECTION_PAGE)
        for name in ("budget", "output_tokens", "window", "pool_kernel", "page_size"):
            _int_field(f"rocketkv.{name}", getattr(self, name), 1)
        for name in ("top_channels", "top_k"):
            if getattr(self, name) is not None:
                _int_field(f"rocketkv.{name}", getattr(self, name), 1)
        for name in ("attend_newest_page", "decode_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"rocketkv.{name} must be true or false, got {getattr(self, name)!r}")
        if self.pool_kernel % 2 == 0:
            raise ValueError(f"rocketkv.pool_kernel must be odd, got {self.pool_kernel}")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"rocketkv.page_size must be a power of two, got {self.page_size}")
        if self.summary_group is not None:
            group = _int_field("rocketkv.summary_group", self.summary_group, 0)
            if group & (group - 1):
                raise ValueError(f"rocketkv.summary_group must be 0 or a power of two, got {group}")
        if self.mode == "quest" and not self.selects_pages():
            raise ValueError(f"rocketkv.page_size {self.page_size}: mode quest selects pages, which needs pages of at "
                             f"most {MAX_SELECTION_PAGE} tokens (or dense_below set)")

    def selects_pages(self) -> bool:
        """Whether any request of this server may select pages. Not on pages over MAX_SELECTION_PAGE
        tokens with dense_below unset: its vLLM full graphs then launch no page selection."""
        return self.page_size <= MAX_SELECTION_PAGE or self.dense_below is not None

    def dense_below_for(self, mode: str) -> int:
        """The longest decode context a `mode` request reads whole (see dense_below)."""
        if self.dense_below is not None:
            return self.dense_below
        if not self.selects_pages():
            return MAX_INT
        return DEFAULT_DENSE_BELOW if mode == "rocketkv" else 0

    def layout_summary_group(self) -> int:
        """The summary group the KV cache is laid out with (see summary_group)."""
        if self.summary_group is not None:
            return self.summary_group
        return FEW_CHANNEL_GROUP if self.mode == "mt" else 0

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> "RocketKVConfig":
        """The `rocketkv` section of --additional-config; raises ValueError naming a bad field."""
        section = (additional_config or {}).get("rocketkv", {})
        if not isinstance(section, Mapping):
            raise ValueError(f"additional_config['rocketkv'] must be a JSON object, got {section!r}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in section:
            if key not in known:
                raise _unknown_key_error("setting", f"rocketkv.{key}", [f"rocketkv.{name}" for name in known])
        return cls(**section)


@dataclass(frozen=True)
class RequestSettings:
    budget: int
    mode: str
    output_tokens: int


# extra_args key -> (RequestSettings field, parser raising ValueError naming the key); the
# field's default is the server's RocketKVConfig attribute of the same name
REQUEST_KEYS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    BUDGET_KEY: ("budget", lambda key, value: _int_field(key, value, 1)),
    MODE_KEY: ("mode", _mode_field),
    OUTPUT_TOKENS_KEY: ("output_tokens", lambda key, value: _int_field(key, value, 1)),
}


def check_request_keys(extra_args: Mapping[str, Any]) -> None:
    """Unknown rocketkv_* keys are errors (a typo would otherwise be ignored)."""
    server_fields = {f.name for f in dataclasses.fields(RocketKVConfig)}
    for key in extra_args:
        if not (isinstance(key, str) and key.startswith(REQUEST_PREFIX)) or key in REQUEST_KEYS:
            continue
        name = key[len(REQUEST_PREFIX):]
        if name in server_fields:
            raise ValueError(f"unknown request setting {key!r}: rocketkv.{name} is a server setting "
                             f"(--additional-config); requests set {', '.join(REQUEST_KEYS)}")
        raise _unknown_key_error("request setting", key, REQUEST_KEYS)


def request_settings(extra_args: Mapping[str, Any] | None, defaults: RocketKVConfig) -> RequestSettings:
    """A request's settings: its extra_args (REQUEST_KEYS) over the server's defaults.

    Raises ValueError naming the offending key.
    """
    extra = extra_args or {}
    if not isinstance(extra, Mapping):
        raise ValueError(f"extra_args must be a mapping, got {type(extra).__name__}")
    check_request_keys(extra)
    settings = {field: getattr(defaults, field) for field, _ in REQUEST_KEYS.values()}
    for key, (field, parse) in REQUEST_KEYS.items():
        if key in extra:
            settings[field] = parse(key, extra[key])
    if settings["mode"] == "quest" and not defaults.selects_pages():
        raise ValueError(f"{MODE_KEY} quest selects pages, which this server's {defaults.page_size}-token pages do not "
                         f"allow (start it with rocketkv.page_size <= {MAX_SELECTION_PAGE})")
    return RequestSettings(**settings)
