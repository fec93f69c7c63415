"""Exact causal attention for prefill chunks with vLLM's FlashAttention over RocketKV's cache.

RocketKV's block stores [Hkv, rows, D]; its key/value rows viewed as [blocks, block_size,
Hkv, D] are a strided ("HND") paged cache that FlashAttention's paged kernel reads directly.
The version is vLLM's own choice for the GPU (get_flash_attn_version: 3 on Hopper, 2 on
Ampere and Ada); where it picks a version whose kernels take other cache layouts (4, CuTe DSL,
on Blackwell), FA2.
"""
from __future__ import annotations

import functools

import torch

from rocketkv_vllm.kv_layout import KVLayout

STRIDED_CACHE_VERSIONS = (2, 3)  # vllm_flash_attn's C++ kernels: any block stride


@functools.lru_cache(maxsize=1)
def _flash_attn_varlen_func():
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _vllm_version(head_size: int) -> int | None:
    """vLLM's FlashAttention version for this GPU, or 2 where it picks one whose kernels take
    other cache layouts (4 on Blackwell) and FA2 runs; None where it has none."""
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version, is_fa_version_supported
    except ImportError:
        return None
    chosen = get_flash_attn_version(head_size=head_size)
    if chosen is None or chosen in STRIDED_CACHE_VERSIONS:
        return chosen
    return 2 if is_fa_version_supported(2) else None


def version(device: torch.device, dtype: torch.dtype, head_size: int) -> int | None:
    """The FlashAttention version prefill runs for fp16/bf16 caches on this CUDA device, None
    where there is none (the torch path then runs)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or _flash_attn_varlen_func() is None:
        return None
    return _vllm_version(head_size)


def available(device: torch.device, dtype: torch.dtype, head_size: int) -> bool:
    return version(device, dtype, head_size) is not None


def _checked_version(query: torch.Tensor, kv_cache: torch.Tensor) -> int:
    fa_version = version(query.device, kv_cache.dtype, query.shape[-1])
    if fa_version is None:
        raise RuntimeError(f"no FlashAttention for {kv_cache.dtype} caches on {query.device}")
    return fa_version


def flash_prefill(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layout: KVLayout,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
) -> torch.Tensor:
    """query: [T, Hq, D] packed rows; block_table/seq_lens: [R]; cu_seqlens_q: [R + 1] int32."""
    fa_version = _checked_version(query, kv_cache)
    keys = layout.keys(kv_cache).transpose(1, 2)
    values = layout.values(kv_cache).transpose(1, 2)
    return _flash_attn_varlen_func()(
        q=query, k=keys, v=values, max_seqlen_q=max_query_len, cu_seqlens_q=cu_seqlens_q,
        max_seqlen_k=max_seq_len, seqused_k=seq_lens, softmax_scale=scale, causal=True,
        block_table=block_table, fa_version=fa_version,
    )


def flash_prefill_gathered(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layout: KVLayout,
    blocks: torch.Tensor,
    offsets: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_query_len: int,
    max_seqlen_k: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of packed rows over the tokens at (blocks[i], offsets[i]), gathered: [N]
    row by row as cu_seqlens_k splits them. Each row's queries are its last tokens, so
    FlashAttention's causal mask, aligned at the end of both, is the row's own (a row whose live
    tokens skip an evicted gap: its kept prompt, then the tokens after the gap)."""
    fa_version = _checked_version(query, kv_cache)
    keys = layout.keys(kv_cache)[blocks, :, offsets]  # [N, Hkv, D]
    values = layout.values(kv_cache)[blocks, :, offsets]
    return _flash_attn_varlen_func()(
        q=query, k=keys, v=values, max_seqlen_q=max_query_len, cu_seqlens_q=cu_seqlens_q, max_seqlen_k=max_seqlen_k,
        cu_seqlens_k=cu_seqlens_k, softmax_scale=scale, causal=True, fa_version=fa_version,
    )
