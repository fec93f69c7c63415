"""One plan per request, made by the scheduler and checked by the workers.

The scheduler frees a request's evicted blocks from its plan; the workers compact and mask
from theirs. They must be the same plan: the scheduler attaches its plan to the request's
sampling params (a private extra_args key, which travels to the workers with the request's
first scheduling), and each worker recomputes the plan and refuses to run when the two
differ, rather than attend over blocks the scheduler has freed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from rocketkv_vllm.config import RocketKVConfig
from rocketkv_vllm.plan import RequestPlan, plan_for_params

# Not a `rocketkv_` key: users set those; this one is written by the scheduler only.
PLAN_KEY = "_rocketkv_plan"
# per-row plan columns of the metadata builder, in this order
PROMPT_LEN, KEEP, EVICTS, SPARSE, TOP_CHANNELS, TOP_PAGES, ORACLE_TOKENS = range(7)
NUM_COLUMNS = 7


def attach_plan(params: Any, plan: RequestPlan) -> None:
    """Ship the scheduler's plan with the request. A new dict: requests made from one
    SamplingParams may share the original extra_args (vLLM's shallow clone)."""
    params.extra_args = {**(params.extra_args or {}), PLAN_KEY: dataclasses.asdict(plan)}


def shipped_plan(params: Any) -> RequestPlan | None:
    fields = (getattr(params, "extra_args", None) or {}).get(PLAN_KEY)
    return None if fields is None else RequestPlan(**fields)


def checked_plan(state: Any, config: RocketKVConfig, head_dim: int, block_size: int) -> RequestPlan:
    """The scheduler's plan of a worker's request state, once the worker's own agrees."""
    params = state.sampling_params
    if params is None:  # pooling: nothing travels, both sides plan from the defaults alone
        return plan_for_params(None, state.num_prompt_tokens, config, head_dim, block_size)
    shipped = shipped_plan(params)
    if shipped is None:
        raise RuntimeError(
            f"RocketKV: request {state.req_id} reached the worker without the scheduler's plan "
            f"(extra_args[{PLAN_KEY!r}]); its freed blocks are unknown"
        )
    own = plan_for_params(params, state.num_prompt_tokens, config, head_dim, block_size)
    if own != shipped:
        raise RuntimeError(f"RocketKV: the scheduler's and the worker's plans of request {state.req_id} differ: {shipped} vs {own}")
    return shipped


def plan_columns(plan: RequestPlan) -> np.ndarray:
    row = np.empty(NUM_COLUMNS, dtype=np.int32)
    row[[PROMPT_LEN, KEEP, EVICTS, SPARSE, TOP_CHANNELS, TOP_PAGES, ORACLE_TOKENS]] = (
        plan.prompt_len, plan.keep, plan.evicts, plan.sparse, plan.top_channels, plan.top_pages, plan.oracle_tokens,
    )
    return row


class PlanTable:
    """The plan columns of each request a worker runs, checked once per request and kept
    while it runs, so that a step gathers them instead of planning every row."""

    def __init__(self, config: RocketKVConfig, head_dim: int, block_size: int) -> None:
        self.config, self.head_dim, self.block_size = config, head_dim, block_size
        self._rows: dict[str, tuple[Any, int, np.ndarray]] = {}

    def columns(self, states: Sequence[Any]) -> np.ndarray:
        """[len(states), NUM_COLUMNS] int32; raises RuntimeError on a missing state or plan."""
        rows = self._rows
        columns = [
            cached[2] if state is not None and (cached := rows.get(state.req_id)) is not None
            and cached[0] is state.sampling_params and cached[1] == state.num_prompt_tokens
            else self._check(i, state)
            for i, state in enumerate(states)
        ]
        if len(rows) > 4 * len(states) + 64:  # forget finished requests now and then
            live = {state.req_id for state in states}
            self._rows = {req_id: v for req_id, v in rows.items() if req_id in live}
        return np.stack(columns) if columns else np.empty((0, NUM_COLUMNS), dtype=np.int32)

    def _check(self, row: int, state: Any) -> np.ndarray:
        if state is None:  # guessing "exact" would read the freed gap of an evicting request
            raise RuntimeError(f"RocketKV: batch row {row} has no request state")
        plan = checked_plan(state, self.config, self.head_dim, self.block_size)
        columns = plan_columns(plan)
        self._rows[state.req_id] = (state.sampling_params, state.num_prompt_tokens, columns)
        return columns
