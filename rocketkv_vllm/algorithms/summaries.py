"""Page summaries for HSA: element-wise max and min of keys per page and KV head."""
from __future__ import annotations

import torch


def page_summaries(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summaries of a contiguous key sequence.

    keys: [L, Hkv, D]. Returns (kmax, kmin), each [ceil(L / page_size), Hkv, D] in keys'
    dtype; the last page summarises only the tokens it holds.
    """
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    length, num_kv_heads, head_dim = keys.shape
    num_pages = -(-length // page_size)
    pad = num_pages * page_size - length
    padded = torch.cat([keys, keys[-1:].expand(pad, -1, -1)]) if pad else keys
    paged = padded.view(num_pages, page_size, num_kv_heads, head_dim)
    return paged.amax(dim=1), paged.amin(dim=1)


def update_summaries(
    kmax: torch.Tensor,
    kmin: torch.Tensor,
    new_keys: torch.Tensor,
    slots: torch.Tensor,
    page_size: int,
) -> None:
    """Fold newly written keys into the summaries, in place.

    kmax, kmin: [num_pages, Hkv, D]; page p covers slots [p * page_size, (p+1) * page_size).
    new_keys:   [T, Hkv, D] written at `slots` [T] (negative slots are padding, skipped).
    Tokens of a page arrive in slot order, so a token at a page's first slot starts the
    page afresh; later tokens (this call or a later one) only widen it.
    """
    valid = slots >= 0
    slots, new_keys = slots[valid], new_keys[valid]
    if slots.numel() == 0:
        return
    pages = slots // page_size
    starts = pages[slots % page_size == 0]
    kmax[starts] = float("-inf")
    kmin[starts] = float("inf")
    index = pages[:, None, None].expand_as(new_keys)
    kmax.scatter_reduce_(0, index, new_keys.to(kmax.dtype), reduce="amax")
    kmin.scatter_reduce_(0, index, new_keys.to(kmin.dtype), reduce="amin")
