"""RocketKV's paged KV cache layout: keys, values and page summaries share each block.

One tensor per layer, [num_blocks, Hkv, 2 * block_size + 2 * pages_per_block, D]:
per block and KV head, `block_size` key rows, `block_size` value rows, then the page
summaries: the element-wise key max and key min of each page (pages are
`page_size`-token slices of the block). Keeping the summaries inside the block means
they are allocated, accounted and freed with it, under the same block id.

The summaries' 2 * pages_per_block rows are stored channel-major: channel d of the
max of page j sits at d * 2 * pages_per_block + j from the start of the region, its min
pages_per_block further. A decode step scores pages on its r largest query channels
only, and channel-major summaries let it read just those channels' bytes (at r = 8 of
128, an eighth of the region's sectors; row-major rows would be read almost whole).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    block_size: int
    page_size: int

    def __post_init__(self) -> None:
        bs, ps = self.block_size, self.page_size
        if ps <= 0 or ps & (ps - 1) or bs % ps:
            raise ValueError(f"page_size must be a power of two dividing block_size ({bs}), got {ps}")

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

    @property
    def summary_channel_stride(self) -> int:
        """Elements between consecutive channels of one page's summary."""
        return 2 * self.pages_per_block

    def page_max(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """[num_blocks, Hkv, pages_per_block, D] view of the channel-major page maxima."""
        return self._summaries(kv_cache, 0)

    def page_min(self, kv_cache: torch.Tensor) -> torch.Tensor:
        return self._summaries(kv_cache, self.pages_per_block)

    def _summaries(self, kv_cache: torch.Tensor, first: int) -> torch.Tensor:
        nb, hkv, rows, d = kv_cache.shape
        if kv_cache.stride(3) != 1 or kv_cache.stride(2) != d:
            raise ValueError("the KV cache must be contiguous within each block and KV head")
        offset = kv_cache.storage_offset() + 2 * self.block_size * d + first
        size = (nb, hkv, self.pages_per_block, d)
        return kv_cache.as_strided(size, (kv_cache.stride(0), kv_cache.stride(1), 1, self.summary_channel_stride), offset)
