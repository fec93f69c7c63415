"""Hybrid Sparse Attention selection (stage 2) and the selectors it is compared with.

Shapes: B requests, Hq query heads in Hkv GQA groups of G = Hq / Hkv, head dim D.
Page selectors take per-page summaries [B, Np, Hkv, D] and `page_len` [B, Np] (tokens a
page holds; 0 marks a page that must not be chosen) and return page indices
[B, Hkv, K] (ascending, -1 padding). Token selectors take keys [B, L, Hkv, D] and
`token_valid` [B, L] and return token indices in the same format.
"""
from __future__ import annotations

import torch

IntOrPerRequest = int | torch.Tensor


def _per_request(value: IntOrPerRequest, batch: int, device: torch.device, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, device=device, dtype=torch.long).expand(batch)
    if (t <= 0).any():
        raise ValueError(f"{name} must be positive, got {value}")
    return t


def _group_queries(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    batch, num_q_heads, head_dim = query.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    return query.float().view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)


def top_channel_mask(query: torch.Tensor, num_kv_heads: int, top_channels: IntOrPerRequest) -> torch.Tensor:
    """[B, Hkv, D] bool: the r channels with the largest mean |q| over each GQA group."""
    q = _group_queries(query, num_kv_heads)
    batch, _, _, head_dim = q.shape
    r = _per_request(top_channels, batch, q.device, "top_channels")
    if (r > head_dim).any():
        raise ValueError(f"top_channels ({r.max().item()}) must not exceed head_dim ({head_dim})")
    order = q.abs().mean(dim=2).argsort(dim=-1, descending=True)
    rank = order.argsort(dim=-1)
    return rank < r[:, None, None]


def _sparq_temperature(q: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """sqrt(D * |q_sel|_1 / |q|_1) per query head: [B, Hkv, G]."""
    head_dim = q.shape[-1]
    total = q.abs().sum(dim=-1).clamp_min(1e-30)
    kept = (q.abs() * channels[:, :, None, :]).sum(dim=-1)
    return (head_dim * kept / total).clamp_min(1e-30).sqrt()


def _top_indices(scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row of scores [B, Hkv, N], indices of the top min(k_b, #valid) entries, ascending, -1 padded."""
    n = scores.shape[-1]
    k_max = int(min(k.max().item(), n))
    masked = scores.masked_fill(~valid[:, None, :], float("-inf"))
    top = masked.topk(k_max, dim=-1)
    slot = torch.arange(k_max, device=scores.device)
    keep = (slot[None, None, :] < k[:, None, None]) & (top.values > float("-inf"))
    index = torch.where(keep, top.indices, n)
    index = index.sort(dim=-1).values
    return torch.where(index == n, -1, index)


def _group_softmax_mean(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim per query head, averaged over the GQA group: [B, Hkv, N]."""
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.nan_to_num(logits.softmax(dim=-1)).mean(dim=2)


def approximate_page_scores(
    query: torch.Tensor,
    kmax: torch.Tensor,
    kmin: torch.Tensor,
    channels: torch.Tensor,
) -> torch.Tensor:
    """Upper bound of q.k over each page on the chosen channels: [B, Hkv, G, Np].

    q_d * max_d where q_d > 0 else q_d * min_d, summed over channels with channels=True.
    """
    num_kv_heads = kmax.shape[2]
    q = _group_queries(query, num_kv_heads) * channels[:, :, None, :]
    hi = torch.einsum("bhgd,bphd->bhgp", q.clamp(min=0), kmax.float().nan_to_num(0.0, 0.0, 0.0))
    lo = torch.einsum("bhgd,bphd->bhgp", q.clamp(max=0), kmin.float().nan_to_num(0.0, 0.0, 0.0))
    return hi + lo


def hsa_select(
    query: torch.Tensor,
    kmax: torch.Tensor,
    kmin: torch.Tensor,
    page_len: torch.Tensor,
    top_channels: IntOrPerRequest,
    top_pages: IntOrPerRequest,
) -> torch.Tensor:
    """HSA: pages whose approximate attention (on the top-r channels) is highest.

    Page scores become logits scaled by SparQ's temperature, spread over the page's tokens
    (log page_len), softmaxed per query head and averaged over the group.
    Returns page indices [B, Hkv, max(top_pages)].
    """
    num_kv_heads = kmax.shape[2]
    channels = top_channel_mask(query, num_kv_heads, top_channels)
    q = _group_queries(query, num_kv_heads)
    bound = approximate_page_scores(query, kmax, kmin, channels)
    logits = bound / _sparq_temperature(q, channels)[..., None]
    valid = page_len > 0
    logits = logits + page_len.clamp(min=1).float().log()[:, None, None, :]
    scores = _group_softmax_mean(logits, valid)
    k = _per_request(top_pages, query.shape[0], query.device, "top_pages")
    return _top_indices(scores, valid, k)


def quest_select(
    query: torch.Tensor,
    kmax: torch.Tensor,
    kmin: torch.Tensor,
    page_len: torch.Tensor,
    top_pages: IntOrPerRequest,
) -> torch.Tensor:
    """Quest-like ablation: the page bound over all channels."""
    return hsa_select(query, kmax, kmin, page_len, query.shape[-1], top_pages)


def sparq_select(
    query: torch.Tensor,
    keys: torch.Tensor,
    token_valid: torch.Tensor,
    top_channels: IntOrPerRequest,
    top_k: IntOrPerRequest,
) -> torch.Tensor:
    """SparQ-like ablation: token scores from the top-r channels of the real keys."""
    num_kv_heads = keys.shape[2]
    channels = top_channel_mask(query, num_kv_heads, top_channels)
    q = _group_queries(query, num_kv_heads)
    approx = torch.einsum("bhgd,blhd->bhgl", q * channels[:, :, None, :], keys.float())
    logits = approx / _sparq_temperature(q, channels)[..., None]
    scores = _group_softmax_mean(logits, token_valid)
    k = _per_request(top_k, query.shape[0], query.device, "top_k")
    return _top_indices(scores, token_valid, k)


def exact_topk(
    query: torch.Tensor,
    keys: torch.Tensor,
    token_valid: torch.Tensor,
    top_k: IntOrPerRequest,
    scale: float | None = None,
) -> torch.Tensor:
    """Oracle: the tokens with the highest true attention (averaged over the group)."""
    num_kv_heads = keys.shape[2]
    q = _group_queries(query, num_kv_heads)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhgd,blhd->bhgl", q, keys.float()) * scale
    scores = _group_softmax_mean(logits, token_valid)
    k = _per_request(top_k, query.shape[0], query.device, "top_k")
    return _top_indices(scores, token_valid, k)


def pages_to_tokens(page_index: torch.Tensor, page_size: int, token_valid: torch.Tensor) -> torch.Tensor:
    """Expand page indices [B, Hkv, K] into token indices [B, Hkv, K * page_size] (-1 padded).

    Tokens that are not valid (past the sequence, or evicted) become -1.
    """
    offsets = torch.arange(page_size, device=page_index.device)
    tokens = (page_index[..., None] * page_size + offsets).flatten(-2)
    tokens = torch.where(page_index.repeat_interleave(page_size, dim=-1) >= 0, tokens, -1)
    length = token_valid.shape[1]
    inside = (tokens >= 0) & (tokens < length)
    b = torch.arange(tokens.shape[0], device=tokens.device)[:, None, None]
    ok = inside & token_valid[b, tokens.clamp(0, length - 1)]
    return torch.where(ok, tokens, -1)
