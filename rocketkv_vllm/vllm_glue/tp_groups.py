"""Tensor parallelism with more ranks than KV heads (replicated KV heads).

vLLM then keeps each KV head on tp / num_kv_heads ranks (rank r holds KV head
r // replicas) and splits the head's GQA group of query heads among those ranks. RocketKV's
selections aggregate over the whole group (SnapKV++ sums the window's attention over it, HSA
picks channels and ranks pages by its mean), so a rank that scored with its own query heads
only would keep and read other tokens than its replicas, and the output would depend on the TP
degree. Before selecting, each rank therefore gathers the queries of every rank in its TP group
and scores with its KV head's full group: every replica makes the selection one rank would.
When every rank owns whole groups (tp <= num_kv_heads) nothing is gathered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size, get_tp_group


def replicated_group_heads(num_heads: int, tp_size: int, tp_rank: int, total_num_kv_heads: int) -> slice | None:
    """Which of the TP group's gathered query heads (rank-major, num_heads per rank) form the GQA
    group of this rank's KV head; None when no KV head is replicated."""
    if tp_size <= total_num_kv_heads:
        return None
    if tp_size % total_num_kv_heads:
        raise ValueError(f"tensor parallel size ({tp_size}) must be a multiple of the KV heads ({total_num_kv_heads})")
    group = num_heads * tp_size // total_num_kv_heads
    kv_head = tp_rank // (tp_size // total_num_kv_heads)
    return slice(kv_head * group, (kv_head + 1) * group)


@dataclass(frozen=True)
class FullGroupQueries:
    """The queries a selection scores with, on a rank whose KV head is replicated."""

    heads: slice

    def __call__(self, query: torch.Tensor) -> torch.Tensor:
        """[N, local query heads, D] -> [N, group, D]. A collective: every rank of the TP group
        calls it at the same point of the step (their batches and metadata are the same)."""
        return get_tp_group().all_gather(query.contiguous(), dim=1)[:, self.heads]


def _own_queries(query: torch.Tensor) -> torch.Tensor:
    return query


def _group_heads(num_heads: int, vllm_config: VllmConfig) -> slice | None:
    return replicated_group_heads(num_heads, get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank(),
                                  vllm_config.model_config.get_total_num_kv_heads())


def selection_queries(num_heads: int, num_kv_heads: int,
                      vllm_config: VllmConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """What an attention layer built in a vLLM worker (num_heads, num_kv_heads: this rank's) selects
    with: its own queries, or its KV head's full group where KV heads are replicated."""
    heads = _group_heads(num_heads, vllm_config)
    if heads is None:
        return _own_queries
    if num_kv_heads != 1:
        raise ValueError(f"a rank with replicated KV heads holds one KV head, this one {num_kv_heads}")
    return FullGroupQueries(heads)


def gathers_queries(num_heads: int, vllm_config: VllmConfig) -> bool:
    """Whether a layer with this rank's num_heads gathers its group's queries across ranks to
    select (a collective, so only vLLM's own CUDA graphs may capture its decode)."""
    return _group_heads(num_heads, vllm_config) is not None


def selection_num_heads(num_heads: int, vllm_config: VllmConfig) -> int:
    """How many query heads the page selections of a layer with this rank's num_heads score with."""
    heads = _group_heads(num_heads, vllm_config)
    return num_heads if heads is None else heads.stop - heads.start
