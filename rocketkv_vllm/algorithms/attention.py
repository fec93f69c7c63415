"""Exact attention references: dense causal (prefill) and sparse over chosen tokens (decode)."""
from __future__ import annotations

import torch


def _grouped(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    *lead, num_q_heads, head_dim = q.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    return q.reshape(*lead, num_kv_heads, num_q_heads // num_kv_heads, head_dim)


def causal_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Softmax attention where query at position p sees keys at positions <= p.

    query: [T, Hq, D]; keys, values: [L, Hkv, D]; *_positions: int [T] / [L].
    Returns [T, Hq, D] in query's dtype (float32 accumulation).
    """
    num_kv_heads = keys.shape[1]
    q = _grouped(query.float(), num_kv_heads)
    logits = torch.einsum("tkgd,lkd->tkgl", q, keys.float()) * scale
    visible = key_positions[None, :] <= query_positions[:, None]
    logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.nan_to_num(logits.softmax(dim=-1))
    out = torch.einsum("tkgl,lkd->tkgd", probs, values.float())
    return out.reshape(query.shape).to(query.dtype)


def sparse_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    token_index: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Exact attention of each KV head's query group over that head's chosen tokens.

    query:       [B, Hq, D], one decode query per request.
    keys/values: [B, L, Hkv, D] (padded per request).
    token_index: [B, Hkv, K] int, -1 = no token. A head with no token outputs zeros.
    Returns [B, Hq, D] in query's dtype.
    """
    head_dim = query.shape[-1]
    chosen = token_index >= 0
    idx = token_index.clamp(min=0)[..., None].expand(-1, -1, -1, head_dim)
    k = keys.transpose(1, 2).gather(2, idx)  # [B, Hkv, K, D]
    v = values.transpose(1, 2).gather(2, idx)
    return attend_chosen(query, k, v, chosen, scale)


def attend_chosen(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    chosen: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of each GQA group over its own gathered tokens.

    query: [B, Hq, D]; keys/values: [B, Hkv, K, D]; chosen: [B, Hkv, K] bool.
    Returns [B, Hq, D] in query's dtype; a head with nothing chosen outputs zeros.
    """
    batch, num_q_heads, head_dim = query.shape
    q = _grouped(query.float(), keys.shape[1])
    logits = torch.einsum("bhgd,bhkd->bhgk", q, keys.float()) * scale
    logits = logits.masked_fill(~chosen[:, :, None, :], float("-inf"))
    probs = torch.nan_to_num(logits.softmax(dim=-1))
    # unchosen slots may hold uninitialised cache memory (NaN): zero them, not just their weight
    values = values.float().masked_fill(~chosen[..., None], 0.0)
    out = torch.einsum("bhgk,bhkd->bhgd", probs, values)
    return out.reshape(batch, num_q_heads, head_dim).to(query.dtype)
