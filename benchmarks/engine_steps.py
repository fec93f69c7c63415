"""Drive vLLM's LLMEngine step by step and record what each step produced.

`run_steps` is LLM.generate's own loop (add every request, then `llm_engine.step()` until none
is unfinished) with RequestOutputKind.DELTA, so each step returns the requests that got a token
in it. Each record carries the engine core's timestamp of that step's outputs (RequestOutput
.metrics.last_token_ts, a monotonic clock of the core process), so a decode step's time is the
gap between two consecutive steps' timestamps: no prefill and no host-side post-processing in it.
Needs the engine built with disable_log_stats=False (else RequestOutput.metrics is None).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

RUNNING, KV_USAGE = "vllm:num_requests_running", "vllm:kv_cache_usage_perc"


@dataclass
class Step:
    t: float | None  # engine-core timestamp of this step's outputs; None when it produced none
    rows: int = 0  # requests that got a token in this step
    first: int = 0  # ... of which it was the first (their prefill completed in this step)


@dataclass
class Run:
    steps: list[Step] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)  # per finished request, its metrics
    gauges: list[dict[str, float]] = field(default_factory=list)  # sampled vllm:* gauges

    @property
    def tokens(self) -> int:
        return sum(r["tokens"] for r in self.requests)


def request_metrics(output: Any) -> dict[str, Any]:
    """The timestamps vLLM keeps per request (RequestStateStats), from a finished RequestOutput."""
    m = output.metrics
    return {
        "prompt_len": len(output.prompt_token_ids or []),
        "tokens": m.num_generation_tokens, "scheduled_ts": m.scheduled_ts,
        "first_token_ts": m.first_token_ts, "last_token_ts": m.last_token_ts,
    }


def read_gauges(llm: Any) -> dict[str, float]:
    """vllm:num_requests_running and vllm:kv_cache_usage_perc, summed over engines."""
    values: dict[str, float] = {}
    for metric in llm.get_metrics():
        if metric.name in (RUNNING, KV_USAGE):
            values[metric.name] = values.get(metric.name, 0.0) + float(metric.value)
    return values


def run_steps(llm: Any, prompts: Sequence[list[int]], params: Any, tag: str, gauge_every_s: float | None = None,
              progress: Callable[[int], None] | None = None) -> Run:
    """Run prompts (token ids) to completion under params; progress(n) gets each step's token count."""
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = params.clone()
    params.output_kind = RequestOutputKind.DELTA
    engine = llm.llm_engine
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", TokensPrompt(prompt_token_ids=list(ids)), params)
    run, started = Run(), set()
    last_gauge = float("-inf")
    while engine.has_unfinished_requests():
        outputs = engine.step()
        step = Step(t=None)
        for out in outputs:
            new = len(out.outputs[0].token_ids) if out.outputs else 0
            if out.metrics is None:
                raise RuntimeError("RequestOutput.metrics is None: build the engine with disable_log_stats=False")
            if new:
                step.t = out.metrics.last_token_ts
                step.rows += 1
                step.first += out.request_id not in started
                started.add(out.request_id)
            if out.finished:
                run.requests.append(request_metrics(out))
        run.steps.append(step)
        if progress is not None:
            progress(step.rows)
        now = time.perf_counter()
        if gauge_every_s is not None and now - last_gauge >= gauge_every_s:
            run.gauges.append(read_gauges(llm))
            last_gauge = now
    return run


def decode_step_times(steps: Sequence[Step], batch: int, skip: int = 2) -> list[float]:
    """Seconds of each step in which all `batch` requests decoded and none was prefilling
    (every row had its first token before), measured from the previous step's outputs.
    The first `skip` such steps are dropped (first use of the decode path after prefill)."""
    times = []
    for prev, cur in zip(steps, steps[1:]):
        if prev.t is not None and cur.t is not None and cur.rows == batch and cur.first == 0:
            times.append(cur.t - prev.t)
    return times[skip:]


def prefill_seconds(requests: Sequence[dict[str, Any]]) -> float | None:
    """From the first request's scheduling to the last first token (the batch's prefill)."""
    if not requests:
        return None
    return max(r["first_token_ts"] for r in requests) - min(r["scheduled_ts"] for r in requests)


def peak(values: Sequence[dict[str, float]], name: str) -> float | None:
    seen = [v[name] for v in values if name in v]
    return max(seen) if seen else None
