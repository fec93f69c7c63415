"""RocketKV's paged KV cache layout: keys, values and page summaries share each block.

One tensor per layer, [num_blocks, Hkv, 2 * block_size + 2 * pages_per_block, D]:
per block and KV head, `block_size` key rows, `block_size` value rows, then the
element-wise key max of each page and the key min of each page (pages are
`page_size`-token slices of the block). Keeping the summaries inside the block means
they are allocated, accounted and freed with it, under the same block id, and one
KV head's page is a contiguous run of rows (one read per page in the kernels).
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

    def page_max(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """[num_blocks, Hkv, pages_per_block, D] view."""
        start = 2 * self.block_size
        return kv_cache[:, :, start : start + self.pages_per_block]

    def page_min(self, kv_cache: torch.Tensor) -> torch.Tensor:
        start = 2 * self.block_size + self.pages_per_block
        return kv_cache[:, :, start : start + self.pages_per_block]
