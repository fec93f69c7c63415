"""Every decode step attends the page that holds its newest tokens, whatever HSA scores it.

The page being filled by decoding holds the token just written and the few before it: the
model's own continuation. HSA's score spreads a page's bound over its tokens, so this
partial page competes with a fraction of a full page's weight and is often left out; the
model then loses its place while copying (7-digit needles come out with digits dropped:
benchmarks/results/accuracy/). Quest keeps this page always; so does RocketKV here:
selection scores the pages before it with one page less, and the newest page is appended
(it has the highest page number, so the list stays ascending).

The metadata builder fills these columns once per step from the host's sequence lengths
(persistent buffers, so CUDA graphs replay them); the top-k step of each layer's selection
appends the page as it writes the list (hsa_select_pages' newest_page: no launch of its own).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NewestPages:
    scored_seq_lens: torch.Tensor  # [B] what selection scores: the pages before the newest
    page: torch.Tensor  # [B] int32, each request's newest page, -1 for none (CUDA-graph padding)

    @classmethod
    def of(cls, seq_lens: torch.Tensor, page_size: int) -> "NewestPages":
        """From device seq_lens: the definition the builder's host computation is tested against."""
        last = (seq_lens - 1).clamp(min=0)
        page = torch.where(seq_lens > 0, last // page_size, -1).to(torch.int32)
        return cls(last // page_size * page_size, page)
