"""Scheduler side: RocketKV's KV cache spec and the block manager that frees evicted blocks.

After SnapKV++ compacts a request's kept prompt tokens into its first blocks, the blocks
that then hold only evicted tokens go back to vLLM's block pool (replaced by the null
block, the R-SWA way). Which blocks those are follows from the request's plan alone
(rocketkv_vllm.plan), so the scheduler frees them without waiting for the workers.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from rocketkv_vllm.config import RocketKVConfig, request_settings
from rocketkv_vllm.kv_layout import KVLayout
from rocketkv_vllm.plan import RequestPlan, plan_for_params
from rocketkv_vllm.vllm_glue.metrics import RocketKVStats
from rocketkv_vllm.vllm_glue.request_plans import PLAN_KEY, attach_plan

if TYPE_CHECKING:
    from vllm.v1.request import Request


@dataclass(frozen=True, kw_only=True)
class RocketKVSpec(FullAttentionSpec):
    """Full attention whose blocks also hold per-page key max/min summaries (kv_layout)."""

    rocketkv: RocketKVConfig

    @property
    def layout(self) -> KVLayout:
        return KVLayout(self.block_size, self.rocketkv.page_size)

    @property
    def real_page_size_bytes(self) -> int:
        kv_bytes = super().real_page_size_bytes
        return kv_bytes * self.layout.rows_per_block // (2 * self.block_size)

    @classmethod
    def merge(cls, specs: list["RocketKVSpec"]) -> "RocketKVSpec":
        if any(spec != specs[0] for spec in specs[1:]):
            raise ValueError("all RocketKV layers of a KV cache group must share one spec")
        return copy.deepcopy(specs[0])


class RocketKVManager(FullAttentionManager):
    """Full-attention block manager that frees the blocks stage 1 evicted.

    Requests that evict neither read nor publish prefix-cache hits: their blocks are
    rewritten in place by the compaction. RocketKV-MT and uncompressed requests keep
    prefix caching as usual. `stats` collects what the metrics report (vllm_glue.metrics);
    the scheduler drains it into each step's SchedulerStats.
    """

    def __init__(self, kv_cache_spec: RocketKVSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.rocketkv = kv_cache_spec.rocketkv
        self.head_dim = kv_cache_spec.head_size
        self._plans: dict[str, RequestPlan] = {}
        self._compacted: set[str] = set()  # requests whose stage 1 has run (since admission)
        self.stats = RocketKVStats()

    def track(self, request: "Request") -> RequestPlan:
        """Plan the request (once per admission), attach the plan for the workers to check
        (request_plans) and keep evicting requests off the prefix cache."""
        plan = self._plans.get(request.request_id)
        params = request.sampling_params
        # a streaming session's next input grows the prompt (sessions never evict): plan anew
        replan = plan is None or (not plan.evicts and plan.prompt_len != request.num_prompt_tokens)
        if replan:
            plan = plan_for_params(params, request.num_prompt_tokens, self.rocketkv, self.head_dim, self.block_size)
            self._plans[request.request_id] = plan
            if request.num_preemptions == 0:
                mode = request_settings(getattr(params, "extra_args", None), self.rocketkv).mode
                self.stats.admit(mode, plan, self.rocketkv)
        if params is not None and (replan or PLAN_KEY not in (params.extra_args or {})):
            attach_plan(params, plan)
        if plan.evicts:
            request.skip_reading_prefix_cache = True
        return plan

    def remove_skipped_blocks(
        self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None
    ) -> None:
        super().remove_skipped_blocks(request_id, processed_computed_tokens, num_prompt_tokens)
        plan = self._plans.get(request_id)
        # processed tokens count only finished steps: the compaction has run on the device
        if plan is not None and plan.evicts and processed_computed_tokens >= plan.prompt_len:
            first, last = plan.first_freed_block(self.block_size), plan.last_freed_block(self.block_size)
            compacting = request_id not in self._compacted  # later calls return at the first null block
            held = self._held_blocks(request_id, first, last) if compacting else 0
            self._remove_blocks_in_range(request_id, first, last)
            if compacting:
                self._compacted.add(request_id)
                self.stats.kv_blocks_freed += held - self._held_blocks(request_id, first, last)
                self.stats.prompt_tokens_evicted += plan.prompt_len - plan.keep

    def _held_blocks(self, request_id: str, first: int, last: int) -> int:
        return sum(block is not self._null_block for block in self.req_to_blocks.get(request_id, [])[first:last])

    def plan_of(self, request_id: str) -> RequestPlan | None:
        return self._plans.get(request_id)

    def cache_blocks(self, request: "Request", num_tokens: int, retention_interval: int | None = None) -> None:
        plan = self._plans.get(request.request_id)
        if plan is not None and plan.evicts:
            # keep the bookkeeping, publish no hashes: these blocks will be rewritten
            self.num_cached_block[request.request_id] = num_tokens // self.block_size
            return
        super().cache_blocks(request, num_tokens, retention_interval)

    def free(self, request_id: str) -> None:
        super().free(request_id)
        self._plans.pop(request_id, None)
        self._compacted.discard(request_id)
