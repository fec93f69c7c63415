"""RocketKV's Prometheus series, from the scheduler (engine core) to vLLM's /metrics.

The facts live in the scheduler: RocketKVManager knows each request's plan, the tokens
stage 1 evicts and the blocks it frees, and every step's decode rows. They travel to the
frontend inside the SchedulerStats vLLM already ships each step (a `rocketkv` field added
to that dataclass before msgspec first sees it), so the same path works with the engine
core in-process or in its own process. In the frontend, RocketKVStatLogger (a vLLM stat
logger, added next to vLLM's own Prometheus logger) turns them into `vllm:rocketkv_*`
series: `vllm serve` exposes them on /metrics and `LLM.get_metrics()` returns them.
"""
from __future__ import annotations

import dataclasses
from collections import Counter as Tally
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, Counter, Histogram
from vllm.config import VllmConfig
from vllm.v1.metrics.loggers import AggregateStatLoggerBase
from vllm.v1.metrics.stats import IterationStats, MultiModalCacheStats, SchedulerStats

from rocketkv_vllm.config import RocketKVConfig
from rocketkv_vllm.plan import RequestPlan
from rocketkv_vllm.vllm_glue.logs import logger

PREFIX = "vllm:rocketkv_"
RATIO_BUCKETS = [1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512]


@dataclass
class RocketKVStats:
    """What one engine's scheduler did since its last stats message that reached the frontend.

    Token and page counts are per KV head (every head keeps and reads the same number).
    """

    prompt_tokens_evicted: int = 0  # by stage 1 (a preempted request that recomputes evicts again)
    kv_blocks_freed: int = 0  # blocks returned to the pool because they held only evicted tokens
    requests_by_mode: dict[str, int] = field(default_factory=dict)  # admitted requests (not re-admissions)
    compression_ratios: dict[str, list[float]] = field(default_factory=dict)  # by mode, one per admitted request
    decode_steps: int = 0  # request-steps that generated a token
    decode_tokens_live: int = 0  # KV tokens those rows hold (what exact attention reads)
    decode_tokens_read: int = 0  # KV tokens they attend over
    decode_pages_read: int = 0  # pages they attend over

    def admit(self, mode: str, plan: RequestPlan, config: RocketKVConfig) -> None:
        self.requests_by_mode[mode] = self.requests_by_mode.get(mode, 0) + 1
        ratio = compression_ratio(plan, config.page_size, config.attend_newest_page)
        self.compression_ratios.setdefault(mode, []).append(ratio)

    def decode_row(self, plan: RequestPlan, computed: int, config: RocketKVConfig) -> None:
        """A one-token row of a request whose prompt is done; `computed`: tokens before it."""
        live, pages, tokens = decode_reads(plan, computed, config.page_size, config.attend_newest_page)
        self.decode_steps += 1
        self.decode_tokens_live += live
        self.decode_pages_read += pages
        self.decode_tokens_read += tokens

    def add(self, other: "RocketKVStats") -> None:
        """Fold other into self (stats held back until a message with outputs)."""
        self.prompt_tokens_evicted += other.prompt_tokens_evicted
        self.kv_blocks_freed += other.kv_blocks_freed
        self.requests_by_mode = dict(Tally(self.requests_by_mode) + Tally(other.requests_by_mode))
        for mode, ratios in other.compression_ratios.items():
            self.compression_ratios.setdefault(mode, []).extend(ratios)
        self.decode_steps += other.decode_steps
        self.decode_tokens_live += other.decode_tokens_live
        self.decode_tokens_read += other.decode_tokens_read
        self.decode_pages_read += other.decode_pages_read

    def empty(self) -> bool:
        return self == RocketKVStats()


def decode_reads(plan: RequestPlan, computed: int, page_size: int, newest_page: bool) -> tuple[int, int, int]:
    """(live tokens, pages read, tokens read) per KV head for the decode row after `computed`
    tokens: the metadata builder's and impl's rule, estimated from the plan without the device.
    A sparse row attends its top_pages best pages, plus its newest page where the server attends
    it (ops/newest_page.py); an exact row reads every live page."""
    live = computed + 1
    if plan.evicts and computed >= plan.prompt_len:
        live -= plan.prompt_len - plan.keep
    live_pages = -(-live // page_size)
    if not (plan.sparse and computed >= plan.prompt_len):
        return live, live_pages, live
    if not newest_page:
        pages = min(plan.top_pages, live_pages)
        return live, pages, min(pages * page_size, live)
    scored = min(plan.top_pages, live_pages - 1)
    newest_tokens = computed % page_size + 1  # the page being filled
    return live, scored + 1, min(scored * page_size + newest_tokens, live)


def compression_ratio(plan: RequestPlan, page_size: int, newest_page: bool) -> float:
    """The context at the request's first decode step over the KV tokens that step attends to
    (>= 1; 1: exact)."""
    _, _, tokens = decode_reads(plan, plan.prompt_len, page_size, newest_page)
    return (plan.prompt_len + 1) / tokens


def add_stats_field() -> None:
    """Give vLLM's SchedulerStats a `rocketkv: RocketKVStats | None` field.

    msgspec serialises the dataclass by its fields and caches them on first use, so this
    runs from the general plugin, which vLLM loads in every process before any engine.
    The field is not an __init__ argument: vLLM's own constructions are unchanged.
    """
    if "rocketkv" in SchedulerStats.__dataclass_fields__:
        return
    if "__msgspec_cache__" in SchedulerStats.__dict__:  # too late for a separate engine-core process
        logger.warning("RocketKV: the plugin loaded after vLLM first sent scheduler stats: the vllm:rocketkv_* "
                       "series stay empty when the engine core runs in its own process")
    spec = dataclasses.field(default=None, init=False)
    spec.name, spec.type = "rocketkv", RocketKVStats | None
    spec._field_type = dataclasses._FIELD  # what dataclasses.fields() and msgspec look for
    SchedulerStats.__dataclass_fields__["rocketkv"] = spec
    SchedulerStats.__annotations__["rocketkv"] = RocketKVStats | None
    SchedulerStats.rocketkv = None


class RocketKVStatLogger(AggregateStatLoggerBase):
    """vLLM stat logger exporting the `vllm:rocketkv_*` series, labelled like vLLM's own
    (model_name, engine). Create it after vLLM's PrometheusStatLogger, which unregisters
    every `vllm:` collector when it starts."""

    def __init__(self, vllm_config: VllmConfig, engine_indexes: list[int]) -> None:
        self.labels = {idx: {"model_name": vllm_config.model_config.served_model_name, "engine": str(idx)}
                       for idx in engine_indexes}
        names = ["model_name", "engine"]
        _unregister_previous()
        self.evicted = _counter("prompt_tokens_evicted", "Prompt tokens evicted by SnapKV++ (per KV head).", names)
        self.blocks_freed = _counter("kv_blocks_freed", "KV cache blocks returned to the pool after stage 1.", names)
        self.requests = _counter("requests", "Requests admitted, by RocketKV mode.", names + ["mode"])
        self.decode_steps = _counter("decode_steps", "Request decode steps (one per request per generated token).", names)
        self.tokens_live = _counter("decode_tokens_live", "KV tokens the decode rows hold (what exact attention reads), per KV head.", names)
        self.tokens_read = _counter("decode_tokens_read", "KV tokens the decode rows attend over, per KV head.", names)
        self.pages_read = _counter("decode_pages_read", "KV pages the decode rows attend over, per KV head.", names)
        self.ratio = _track(Histogram(
            PREFIX + "compression_ratio",
            "Per request: prompt tokens over the KV tokens its first decode step attends to (1: exact).",
            names + ["mode"], buckets=RATIO_BUCKETS,
        ))

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        mm_cache_stats: MultiModalCacheStats | None = None,
        engine_idx: int = 0,
    ) -> None:
        stats = getattr(scheduler_stats, "rocketkv", None)
        if stats is None:
            return
        labels = self.labels[engine_idx]
        for counter, value in (
            (self.evicted, stats.prompt_tokens_evicted), (self.blocks_freed, stats.kv_blocks_freed),
            (self.decode_steps, stats.decode_steps), (self.tokens_live, stats.decode_tokens_live),
            (self.tokens_read, stats.decode_tokens_read), (self.pages_read, stats.decode_pages_read),
        ):
            if value:
                counter.labels(**labels).inc(value)
        for mode, count in stats.requests_by_mode.items():
            self.requests.labels(**labels, mode=mode).inc(count)
        for mode, ratios in stats.compression_ratios.items():
            histogram = self.ratio.labels(**labels, mode=mode)
            for ratio in ratios:
                histogram.observe(ratio)

    def log_engine_initialized(self) -> None:
        pass


_registered: list = []


def _track(metric):
    _registered.append(metric)
    return metric


def _counter(name: str, documentation: str, labelnames: list[str]) -> Counter:
    return _track(Counter(PREFIX + name, documentation, labelnames))


def _unregister_previous() -> None:
    """A later engine in the same process re-creates the series (vLLM's logger does the same)."""
    while _registered:
        try:
            REGISTRY.unregister(_registered.pop())
        except KeyError:  # vLLM's PrometheusStatLogger already removed it
            pass


class StatsShipper:
    """Scheduler side: counts each step's decode rows and hands the managers' stats to the
    step's SchedulerStats. Stats go only into messages that carry request outputs, the ones
    every frontend records (LLMEngine drops the others); until then they wait here."""

    def __init__(self) -> None:
        self.pending = RocketKVStats()

    def count_decode_rows(self, managers: list, scheduler_output) -> None:
        """Before the step's outputs are applied (a request finishing now still has its plan)."""
        manager = managers[0]  # request-level facts are the same in every RocketKV group
        computed = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
        cached = scheduler_output.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            plan = manager.plan_of(req_id)
            if num_tokens == 1 and plan is not None and computed.get(req_id, -1) >= plan.prompt_len:
                manager.stats.decode_row(plan, computed[req_id], manager.rocketkv)

    def ship(self, managers: list, engine_core_outputs: dict, log_stats: bool) -> None:
        primary, *others = managers
        self.pending.add(primary.stats)
        for manager in others:  # blocks are per group; requests were counted by the primary
            self.pending.kv_blocks_freed += manager.stats.kv_blocks_freed
        for manager in managers:
            manager.stats = RocketKVStats()
        if not log_stats:
            self.pending = RocketKVStats()
            return
        eco = next((eco for eco in engine_core_outputs.values() if eco.scheduler_stats is not None), None)
        if eco is not None and eco.outputs and not self.pending.empty():
            eco.scheduler_stats.rocketkv, self.pending = self.pending, RocketKVStats()
