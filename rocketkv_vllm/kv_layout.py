"""RocketKV's paged KV cache layout: keys, values and page summaries share each block.

One tensor per layer, [num_blocks, Hkv, 2 * block_size + 2 * pages_per_block, D]:
per block and KV head, `block_size` key rows, `block_size` value rows, then the
element-wise key max of each page and the key min of each page (pages are
`page_size`-token slices of the block). Keeping the summaries inside the block means
they are allocated, accounted and freed with it, under the same block id.

The summary region (2 * pages_per_block rows of D) is stored in channel groups of `gw`
channels (`summary_channels`): group i holds, for each page j, its max of channels
[i*gw, (i+1)*gw) at i * 2 * pages_per_block * gw + j * gw, then the pages' mins. gw = D
(summary_group 0, the default) is the row-major layout: a page's max row, then its min
row, which scoring on every channel reads fastest. With small groups (FEW_CHANNEL_GROUP),
scoring on a few query channels (RocketKV-MT) reads only their groups, where a row-major
page row would be read almost whole. gw = 1 is channel-major: a channel's page maxima,
then its page minima (16 bytes for 4 pages at bf16).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# channels per summary group for few-channel scoring. H100, 128K, B=8, mt selection: rows
# 0.54 ms, groups of 8 0.30, of 1 0.26; rocketkv-mode selection (every channel): rows 0.100,
# groups of 8 0.116, of 1 0.107
FEW_CHANNEL_GROUP = 1


@dataclass(frozen=True)
class KVLayout:
    block_size: int
    page_size: int
    summary_group: int = 0  # channels per summary group; 0: whole rows (row-major)

    def __post_init__(self) -> None:
        bs, ps = self.block_size, self.page_size
        if ps <= 0 or ps & (ps - 1) or bs % ps:
            raise ValueError(f"page_size must be a power of two dividing block_size ({bs}), got {ps}")
        g = self.summary_group
        if g < 0 or g & (g - 1):
            raise ValueError(f"summary_group must be 0 (whole rows) or a power of two, got {g}")

    @property
    def pages_per_block(self) -> int:
        return self.block_size // self.page_size

    @property
    def rows_per_block(self) -> int:
        return 2 * self.block_size + 2 * self.pages_per_block

    def cache_shape(self, num_blocks: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (num_blocks, num_kv_heads, self.rows_per_block, head_dim)

    def keys(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """[num_blocks, Hkv, block_size, D] view."""
        return kv_cache[:, :, : self.block_size]

    def values(self, kv_cache: torch.Tensor) -> torch.Tensor:
        return kv_cache[:, :, self.block_size : 2 * self.block_size]

    def summary_channels(self, head_dim: int) -> int:
        """Channels per group of the summaries at this head_dim (gw): the whole row for
        summary_group 0 or >= head_dim, else the largest power of two dividing both."""
        g = self.summary_group
        return head_dim if g == 0 or g >= head_dim else math.gcd(g, head_dim)

    def page_max(self, kv_cache: torch.Tensor) -> PageSummaries:
        """The page maxima, indexed as [num_blocks, Hkv, pages_per_block, D]."""
        return PageSummaries(self._grouped(kv_cache, 0))

    def page_min(self, kv_cache: torch.Tensor) -> PageSummaries:
        return PageSummaries(self._grouped(kv_cache, self.pages_per_block))

    def _grouped(self, kv_cache: torch.Tensor, first: int) -> torch.Tensor:
        """[num_blocks, Hkv, pages_per_block, D / gw, gw] view of maxima (first = 0) or
        minima (first = pages_per_block)."""
        nb, hkv, rows, d = kv_cache.shape
        if kv_cache.stride(3) != 1 or kv_cache.stride(2) != d:
            raise ValueError("the KV cache must be contiguous within each block and KV head")
        gw, ppb = self.summary_channels(d), self.pages_per_block
        offset = kv_cache.storage_offset() + 2 * self.block_size * d + first * gw
        size = (nb, hkv, ppb, d // gw, gw)
        return kv_cache.as_strided(size, (kv_cache.stride(0), kv_cache.stride(1), gw, 2 * ppb * gw, 1), offset)


class PageSummaries:
    """Page maxima or minima read and written as [num_blocks, Hkv, pages_per_block, D]
    (indexing the first three dimensions) over their channel groups: reads are copies,
    assignments write through."""

    def __init__(self, grouped: torch.Tensor) -> None:
        self.grouped = grouped

    def __getitem__(self, index) -> torch.Tensor:
        return self.grouped[index].flatten(-2)

    def __setitem__(self, index, value) -> None:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            value = value.unflatten(-1, self.grouped.shape[-2:])
        self.grouped[index] = value

    def fill_(self, value: float) -> PageSummaries:
        self.grouped.fill_(value)
        return self
