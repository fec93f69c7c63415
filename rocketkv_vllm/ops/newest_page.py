"""Every decode step attends the page that holds its newest tokens, whatever HSA scores it.

The page being filled by decoding holds the token just written and the few before it: the
model's own continuation. HSA's score spreads a page's bound over its tokens, so this
partial page competes with a fraction of a full page's weight and is often left out; the
model then loses its place while copying (7-digit needles come out with digits dropped:
benchmarks/results/accuracy/). Quest keeps this page always; so does RocketKV here:
selection scores the pages before it with one page less, and the newest page is appended
(it has the highest page number, so the list stays ascending).

The metadata builder fills these columns once per step from the host's sequence lengths
(persistent buffers, so CUDA graphs replay them); each layer then appends with two tensor ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rocketkv_vllm.ops.reference import PageSelection


@dataclass(frozen=True)
class NewestPages:
    scored_seq_lens: torch.Tensor  # [B] what selection scores: the pages before the newest
    page: torch.Tensor  # [B, 1, 1] int32, each request's newest page
    live: torch.Tensor  # [B, 1] int32, 1 for requests with tokens (0: CUDA-graph padding)

    @classmethod
    def of(cls, seq_lens: torch.Tensor, page_size: int) -> "NewestPages":
        """From device seq_lens: the definition the builder's host computation is tested against."""
        last = (seq_lens - 1).clamp(min=0)
        return cls(last // page_size * page_size, (last // page_size).to(torch.int32)[:, None, None],
                   (seq_lens > 0).to(torch.int32)[:, None])

    def append_to(self, selection: PageSelection) -> PageSelection:
        """Add each live request's newest page after its chosen ones, in place."""
        index, count = selection
        index.scatter_(2, count.long().unsqueeze(-1), self.page.expand(-1, index.shape[1], 1))
        count += self.live
        return selection
