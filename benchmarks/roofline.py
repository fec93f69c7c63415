"""Bytes one decode step must read from HBM, and the step time that floor allows.

Stock (dense) attention reads every weight once per step plus K and V of every context token
of every request. RocketKV reads the weights, then per request, layer and KV head: the page
summaries (key max and min) of the live pages, scored on r channels (the algorithm's floor;
the implementation reads whole rows when r exceeds its gather limit: `summary_rows_bytes`),
and K and V of the selected pages' tokens (top_pages scored, plus the newest page). Live tokens are the prompt tokens
stage 1 keeps plus those decoded so far (on average half of the output).
"""
from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass

ELEMENT_BYTES = 2  # bf16
# HBM bandwidth (TB/s) by GPU name; the floors of a run take the one of the GPU it ran on
HBM_TB_S = {"H200": 4.8, "H100": 3.35}
DEFAULT_HBM_TB_S = HBM_TB_S["H200"]


def hbm_tb_s(gpu_name: str | None = None) -> float:
    """HBM bandwidth of `gpu_name` (default: this machine's first GPU, from nvidia-smi, which
    leaves CUDA uninitialised for vLLM's workers); DEFAULT_HBM_TB_S where unknown."""
    if gpu_name is None:
        try:
            gpu_name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                      text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            gpu_name = ""
    return next((tbs for name, tbs in HBM_TB_S.items() if name in gpu_name), DEFAULT_HBM_TB_S)


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        heads = config["num_attention_heads"]
        return cls(
            layers=config["num_hidden_layers"], hidden=config["hidden_size"], intermediate=config["intermediate_size"],
            heads=heads, kv_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads, vocab=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_file(cls, path: str) -> "ModelShape":
        with open(path) as f:
            return cls.from_config(json.load(f))

    def weight_bytes(self) -> int:
        """Weights read per decode step: every layer and the LM head; the input embedding is
        gathered (a few rows), not streamed, unless it is the LM head too."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate + 2 * h
        return ELEMENT_BYTES * (self.layers * per_layer + self.vocab * h + h)

    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return ELEMENT_BYTES * 2 * self.layers * self.kv_heads * self.head_dim


def stock_step_bytes(shape: ModelShape, ctx: int, batch: int, out: int) -> int:
    return shape.weight_bytes() + batch * (ctx + out // 2) * shape.kv_bytes_per_token()


def rocketkv_plan(shape: ModelShape, ctx: int, out: int, budget: int, mode: str, block_size: int,
                  settings: dict | None = None):
    """The plan the backend computes for such a request (rocketkv_vllm.plan) on a server with
    these further `rocketkv` settings (page_size, ...; the defaults otherwise)."""
    from rocketkv_vllm.config import RocketKVConfig, request_settings
    from rocketkv_vllm.plan import plan_request

    config = RocketKVConfig(budget=budget, mode=mode, **(settings or {}))
    return plan_request(request_settings(None, config), config, ctx, out, shape.head_dim, block_size), config


def rocketkv_step_bytes(shape: ModelShape, ctx: int, batch: int, out: int, budget: int, mode: str, block_size: int,
                        settings: dict | None = None) -> dict:
    """Per-step bytes of a RocketKV decode: {total, summary, summary_rows_total, attend, plan}."""
    plan, config = rocketkv_plan(shape, ctx, out, budget, mode, block_size, settings)
    live = plan.keep + out // 2
    heads = batch * shape.layers * shape.kv_heads
    row = shape.head_dim * ELEMENT_BYTES
    if not plan.sparse:  # exact attention over the live tokens
        attend = heads * live * 2 * row
        summary = summary_rows = 0
    else:
        pages = math.ceil(live / config.page_size)
        summary = heads * pages * 2 * plan.top_channels * ELEMENT_BYTES
        summary_rows = heads * pages * 2 * row
        pages_attended = plan.top_pages + (1 if config.attend_newest_page else 0)  # the newest page rides along
        attend = heads * pages_attended * config.page_size * 2 * row
    weights = shape.weight_bytes()
    return {
        "total": weights + summary + attend, "summary_rows_total": weights + summary_rows + attend,
        "summary": summary, "attend": attend,
        "plan": {"keep": plan.keep, "sparse": plan.sparse, "top_channels": plan.top_channels,
                 "top_pages": plan.top_pages, "page_size": config.page_size},
    }


def case_roofline(shape: ModelShape, backend: str, ctx: int, batch: int, out: int, budget: int, mode: str,
                  block_size: int, hbm_tb_s: float, settings: dict | None = None) -> dict:
    """Bytes per step and the floor step time at hbm_tb_s (TB/s) for one benchmark case
    (settings: the RocketKV server's further settings)."""
    if backend.lower() == "rocketkv":
        parts = rocketkv_step_bytes(shape, ctx, batch, out, budget, mode, block_size, settings)
        total = parts["total"]
        extra = {"summary_gb": round(parts["summary"] / 1e9, 3), "attend_gb": round(parts["attend"] / 1e9, 3),
                 "floor_ms_summary_rows": round(1e3 * parts["summary_rows_total"] / (hbm_tb_s * 1e12), 3),
                 "plan": parts["plan"]}
    else:
        total = stock_step_bytes(shape, ctx, batch, out)
        extra = {"kv_gb": round((total - shape.weight_bytes()) / 1e9, 3)}
    return {"bytes": total, "bytes_gb": round(total / 1e9, 3), "weights_gb": round(shape.weight_bytes() / 1e9, 3),
            "floor_ms": round(1e3 * total / (hbm_tb_s * 1e12), 4), "hbm_tb_s": hbm_tb_s, **extra}
