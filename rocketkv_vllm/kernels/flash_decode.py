"""Decode attention over each dense row's kept prompt with vLLM's FlashAttention 3.

A dense decode row (top_pages EVERY_PAGE: a rocketkv request under dense_below, an uncompressed
one) attends every token stage 1 kept, positions [0, keep), and those decoded after the evicted
gap, [gap_end, seq_len). FlashAttention reads the first range, the bulk, as stock vLLM's decode
does, and returns it with its log-sum-exp; paged_sparse_attention then attends the decoded
tokens and merges both in its reduce (kept_partial). Rows that select pages get no kept range
(seqused_k 0): FlashAttention skips them. The split kernel alone took 1.3-1.5x FlashAttention
3's time per token over long rows on the H200 (benchmarks/results/NOTES.md, sessions 15 and 17).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rocketkv_vllm.kernels import flash_prefill
from rocketkv_vllm.kv_layout import KVLayout

# FA3's split count is an upper bound fixed at launch, so that CUDA graphs replay it whatever the
# step's lengths (its own heuristic, num_splits=0, is not graph-safe): vLLM's default
# (attention_config.flash_attn_max_num_splits_for_cuda_graph). FA3 only: FA2's kernel, when it runs
# one split, writes an empty row's lse where a decode row's belongs.
FA3_MAX_SPLITS = 32


@dataclass
class KeptPromptRows:
    """A decode batch's FlashAttention part (the metadata builder's, fixed addresses for CUDA graphs)."""

    kept: torch.Tensor  # [rows] int32: tokens [0, kept) of each row (0: none, rows that select pages)
    cu_seqlens_q: torch.Tensor  # [rows + 1] int32: 0, 1, ..., rows (one query token a row)
    max_kept: int  # a bound on kept, fixed per block-table width (the launch never depends on the step)


def attend_kept_prompt(query: torch.Tensor, kv_cache: torch.Tensor, layout: KVLayout, block_table: torch.Tensor,
                       rows: KeptPromptRows, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, Hq, D] -> (out [B, Hq, D], lse [Hq, B] float32) over each row's kept prompt
    tokens; rows without any have lse +-inf (and any output)."""
    if flash_prefill.version(query.device, kv_cache.dtype, query.shape[-1]) != 3:
        raise RuntimeError(f"flash_decode needs FlashAttention 3 for {kv_cache.dtype} caches on {query.device}")
    keys = layout.keys(kv_cache).transpose(1, 2)
    values = layout.values(kv_cache).transpose(1, 2)
    out, lse = flash_prefill._flash_attn_varlen_func()(
        q=query, k=keys, v=values, max_seqlen_q=1, cu_seqlens_q=rows.cu_seqlens_q, max_seqlen_k=rows.max_kept,
        seqused_k=rows.kept, softmax_scale=scale, causal=False, block_table=block_table, return_softmax_lse=True,
        num_splits=FA3_MAX_SPLITS, fa_version=3,
    )
    return out, lse
