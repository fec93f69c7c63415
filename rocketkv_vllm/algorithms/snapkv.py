"""SnapKV++ (stage 1): choose the prompt tokens each KV head keeps at prefill end."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def adaptive_pool_kernel(prefix_len: int, kernel_size: int) -> int:
    """Largest odd kernel <= kernel_size that still fits in the scored prefix.

    Pooling spreads each token's score to its neighbours so kept tokens come in
    runs; a kernel wider than the prefix would flatten every score to the maximum.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"pool kernel_size must be a positive odd integer, got {kernel_size}")
    fit = prefix_len if prefix_len % 2 == 1 else prefix_len - 1
    return max(1, min(kernel_size, fit))


def check_window_shapes(window_queries: torch.Tensor, keys: torch.Tensor, prompt_len: int) -> tuple[int, int, int]:
    """(W, GQA group size, head dim) of a window-scoring call, or ValueError."""
    w, num_q_heads, head_dim = window_queries.shape
    num_kv_heads = keys.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if not 0 < w <= prompt_len <= keys.shape[0]:
        raise ValueError(f"need 0 < window ({w}) <= prompt_len ({prompt_len}) <= keys ({keys.shape[0]})")
    return w, num_q_heads // num_kv_heads, head_dim


def window_scores(
    window_queries: torch.Tensor, keys: torch.Tensor, prompt_len: int, scale: float | None = None
) -> torch.Tensor:
    """Attention mass the observation window puts on each prompt token, per KV head.

    window_queries: [W, Hq, D], the queries at positions prompt_len - W .. prompt_len - 1.
    keys:           [L >= prompt_len, Hkv, D] (after RoPE); Hq must be a multiple of Hkv.
    Returns [Hkv, prompt_len] float32: causal softmax over the prompt, summed over the
    window queries and over the query heads of each GQA group.
    """
    w, group, head_dim = check_window_shapes(window_queries, keys, prompt_len)
    num_kv_heads = keys.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    q = window_queries.float().view(w, num_kv_heads, group, head_dim)
    k = keys[:prompt_len].float()
    logits = torch.einsum("wkgd,lkd->kgwl", q, k) * scale
    q_pos = torch.arange(prompt_len - w, prompt_len, device=keys.device)
    causal = torch.arange(prompt_len, device=keys.device)[None, :] <= q_pos[:, None]
    logits = logits.masked_fill(~causal, float("-inf"))
    return logits.softmax(dim=-1).sum(dim=(1, 2))


def snapkv_select(
    window_queries: torch.Tensor,
    keys: torch.Tensor,
    prompt_len: int,
    keep: int,
    pool_kernel: int = 63,
    scale: float | None = None,
    scores_fn: Callable[..., torch.Tensor] = window_scores,
) -> torch.Tensor:
    """Token indices each KV head keeps: [Hkv, min(keep, prompt_len)], ascending int64.

    The window (last W = window_queries.shape[0] prompt tokens) is always kept; the
    other keep - W slots go to the prefix tokens with the highest max-pooled window
    attention. Every head keeps the same number of tokens, each its own set.
    scores_fn computes window_scores (a kernel with its signature may stand in).
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep <= 0:
        raise ValueError(f"keep must be a positive integer, got {keep!r}")
    w = window_queries.shape[0]
    num_kv_heads = keys.shape[1]
    device = keys.device
    if keep >= prompt_len:
        return torch.arange(prompt_len, device=device).expand(num_kv_heads, -1).clone()
    if keep < w:
        raise ValueError(f"keep ({keep}) must be at least the observation window ({w})")
    prefix_len = prompt_len - w
    scores = scores_fn(window_queries, keys, prompt_len, scale)[:, :prefix_len]
    kernel = adaptive_pool_kernel(prefix_len, pool_kernel)
    pooled = F.max_pool1d(scores[:, None, :], kernel, stride=1, padding=kernel // 2)[:, 0]
    top = pooled.topk(keep - w, dim=-1).indices.sort(dim=-1).values
    window = torch.arange(prefix_len, prompt_len, device=device).expand(num_kv_heads, -1)
    return torch.cat([top, window], dim=-1)
