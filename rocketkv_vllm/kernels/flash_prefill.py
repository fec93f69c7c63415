"""Exact causal attention for prefill chunks with vLLM's FlashAttention 3 over RocketKV's cache.

RocketKV's block stores [Hkv, rows, D]; its key/value rows viewed as [blocks, block_size,
Hkv, D] are a strided ("HND") paged cache that FlashAttention's paged kernel reads directly.
"""
from __future__ import annotations

import functools

import torch

from rocketkv_vllm.kv_layout import KVLayout


@functools.lru_cache(maxsize=1)
def _flash_attn_varlen_func():
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """FlashAttention 3 serves fp16/bf16 caches on CUDA; other cases use the torch path."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _flash_attn_varlen_func() is not None


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
    keys = layout.keys(kv_cache).transpose(1, 2)
    values = layout.values(kv_cache).transpose(1, 2)
    return _flash_attn_varlen_func()(
        q=query, k=keys, v=values, max_seqlen_q=max_query_len, cu_seqlens_q=cu_seqlens_q,
        max_seqlen_k=max_seq_len, seqused_k=seq_lens, softmax_scale=scale, causal=True,
        block_table=block_table, fa_version=3,
    )
