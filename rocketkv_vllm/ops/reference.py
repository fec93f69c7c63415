"""Torch implementations of RocketKV's operations on the paged cache (kv_layout.KVLayout).

They are the CPU execution path and the oracle for the Triton / CUDA kernels.

Per-request token validity after stage 1 (logical positions, as vLLM sees them):
position p holds a live token iff p < keep or gap_end <= p < seq_len, where keep is
the number of compacted prompt tokens and gap_end the prompt length. A request that
evicted nothing has keep == gap_end.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from rocketkv_vllm.algorithms import attend_chosen, exact_topk, hsa_select, sparse_attention
from rocketkv_vllm.kv_layout import KVLayout


class PageSelection(NamedTuple):
    """Pages chosen per request and KV head: index [B, Hkv, W] int32 holds logical page
    numbers, ascending, in its first count [B, Hkv] entries; later entries are unspecified
    (-1 here, anything in the kernels). W exceeds the count of any request whose last live
    page was left out of the scoring (room for ops.newest_page to add it)."""

    index: torch.Tensor
    count: torch.Tensor


# top_pages of a row that attends every live page exactly (dense decode rows): selection
# writes it no page list (count 0) and paged_sparse_attention, given the rows' top_pages,
# enumerates the live pages itself, so a dense row costs no list written and read back
EVERY_PAGE = 2**31 - 1


def write_kv(
    kv_cache: torch.Tensor,
    layout: KVLayout,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store key/value [T, Hkv, D] at slot_mapping [T] (-1 skips) and fold keys into page summaries.

    A token at a page's first slot restarts the page's summary, so tokens of a page must
    arrive in slot order (they do: vLLM writes positions in order).
    """
    live = slot_mapping >= 0
    slots, key, value = slot_mapping[live].long(), key[live], value[live]
    if slots.numel() == 0:
        return
    block, offset = slots // layout.block_size, slots % layout.block_size
    layout.keys(kv_cache)[block, :, offset] = key.to(kv_cache.dtype)
    layout.values(kv_cache)[block, :, offset] = value.to(kv_cache.dtype)

    page = block * layout.pages_per_block + offset // layout.page_size
    pages, inverse = page.unique(return_inverse=True)
    index = inverse[:, None, None].expand_as(key)
    new_max = key.new_full((pages.numel(), *key.shape[1:]), float("-inf"))
    new_min = key.new_full((pages.numel(), *key.shape[1:]), float("inf"))
    new_max = new_max.scatter_reduce(0, index, key, reduce="amax")
    new_min = new_min.scatter_reduce(0, index, key, reduce="amin")
    restarted = torch.zeros(pages.numel(), dtype=torch.bool, device=slots.device)
    restarted[inverse[offset % layout.page_size == 0]] = True

    pb, pp = pages // layout.pages_per_block, pages % layout.pages_per_block
    kmax, kmin = layout.page_max(kv_cache), layout.page_min(kv_cache)
    old_max = torch.where(restarted[:, None, None], new_max, kmax[pb, :, pp].to(key.dtype))
    old_min = torch.where(restarted[:, None, None], new_min, kmin[pb, :, pp].to(key.dtype))
    kmax[pb, :, pp] = torch.maximum(old_max, new_max).to(kv_cache.dtype)
    kmin[pb, :, pp] = torch.minimum(old_min, new_min).to(kv_cache.dtype)


def gather_tokens(
    kv_cache: torch.Tensor, layout: KVLayout, block_row: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of logical positions [0, num_tokens) of one request: [N, Hkv, D] each."""
    keys, values = gather_blocks(kv_cache, layout, block_row[None], num_tokens)
    return keys[0].transpose(0, 1), values[0].transpose(0, 1)


def gather_blocks(
    kv_cache: torch.Tensor, layout: KVLayout, block_table: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of logical positions [0, num_tokens) of every request, gathered whole
    blocks at a time (one copy each, not one index per token): [B, Hkv, num_tokens, D] each."""
    num_blocks = -(-num_tokens // layout.block_size)
    blocks = block_table[:, :num_blocks].long()
    batch, num_kv_heads, head_dim = blocks.shape[0], kv_cache.shape[1], kv_cache.shape[-1]

    def tokens(view: torch.Tensor) -> torch.Tensor:  # [B, nb, Hkv, bs, D] -> [B, Hkv, nb * bs, D]
        return view[blocks].transpose(1, 2).reshape(batch, num_kv_heads, -1, head_dim)[:, :, :num_tokens]

    return tokens(layout.keys(kv_cache)), tokens(layout.values(kv_cache))


def live_positions(seq_len: int, keep: int, gap_end: int, device: torch.device) -> torch.Tensor:
    """Bool [seq_len]: which logical positions hold live tokens."""
    pos = torch.arange(seq_len, device=device)
    return (pos < keep) | (pos >= gap_end)


def paged_causal_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layout: KVLayout,
    block_row: torch.Tensor,
    seq_len: int,
    keep: int,
    gap_end: int,
    scale: float,
    query_chunk: int = 512,
) -> torch.Tensor:
    """Exact causal attention of one request's last T = query.shape[0] tokens over its live cache.

    query: [T, Hq, D] at positions seq_len - T .. seq_len - 1; torch's fused attention in
    float32. A chunk after earlier ones (or after a gap) is masked query_chunk queries at a
    time, so that a mask never exceeds query_chunk x seq_len.
    """
    # [1, H, L, D]: torch's CPU flash-attention kernel takes only 4-d inputs
    keys, values = (t.float() for t in gather_blocks(kv_cache, layout, block_row[None], seq_len))
    positions = torch.arange(seq_len, device=kv_cache.device)
    live = live_positions(seq_len, keep, gap_end, kv_cache.device)
    gap_free = bool(live.all())
    if not gap_free:
        keys, values, positions = keys[:, :, live], values[:, :, live], positions[live]
    first = seq_len - query.shape[0]
    q = query.float().transpose(0, 1)[None]  # [1, Hq, T, D]
    if gap_free and first == 0:  # query i sees keys 0..i: SDPA's own causal mask, no mask tensor
        attended = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        return attended[0].transpose(0, 1).to(query.dtype)
    out = torch.empty_like(query)
    for start in range(0, query.shape[0], query_chunk):
        chunk = q[:, :, start : start + query_chunk]
        q_pos = torch.arange(first + start, first + start + chunk.shape[2], device=kv_cache.device)
        visible = positions[None, :] <= q_pos[:, None]
        attended = F.scaled_dot_product_attention(chunk, keys, values, attn_mask=visible, scale=scale, enable_gqa=True)
        out[start : start + chunk.shape[2]] = attended[0].transpose(0, 1).to(query.dtype)
    return out


def compact_kept_tokens(
    kv_cache: torch.Tensor,
    layout: KVLayout,
    block_row: torch.Tensor,
    kept: torch.Tensor,
    prompt_len: int,
) -> None:
    """Stage-1 eviction for one request: move each KV head's kept tokens to positions [0, keep).

    kept: [Hkv, keep] ascending positions < prompt_len. Afterwards summaries of pages in
    [0, keep) cover exactly the kept tokens, and the pages that the first decode tokens
    will extend (from position prompt_len to the end of its block) start empty.
    """
    num_kv_heads, keep = kept.shape
    if keep >= prompt_len:
        return
    bs, ps = layout.block_size, layout.page_size
    keys, values = layout.keys(kv_cache), layout.values(kv_cache)
    head = torch.arange(num_kv_heads, device=kv_cache.device)[:, None]
    src_block = block_row[kept // bs].long()
    k_src = keys[src_block, head, kept % bs].clone()
    v_src = values[src_block, head, kept % bs].clone()
    dst = torch.arange(keep, device=kv_cache.device).expand(num_kv_heads, -1)
    dst_block = block_row[dst // bs].long()
    keys[dst_block, head, dst % bs] = k_src
    values[dst_block, head, dst % bs] = v_src

    kmax, kmin = layout.page_max(kv_cache), layout.page_min(kv_cache)
    num_kept_pages = -(-keep // ps)
    pad = num_kept_pages * ps - keep
    padded = torch.cat([k_src, k_src[:, -1:].expand(-1, pad, -1)], dim=1) if pad else k_src
    paged = padded.view(num_kv_heads, num_kept_pages, ps, -1)
    page = torch.arange(num_kept_pages, device=kv_cache.device)
    pb, pp = block_row[page // layout.pages_per_block].long(), page % layout.pages_per_block
    kmax[pb[:, None], head.T, pp[:, None]] = paged.amax(dim=2).transpose(0, 1)
    kmin[pb[:, None], head.T, pp[:, None]] = paged.amin(dim=2).transpose(0, 1)

    tail_start = (prompt_len // ps) * ps
    tail_end = (prompt_len // bs + 1) * bs
    if prompt_len % bs:
        tail = torch.arange(tail_start // ps, tail_end // ps, device=kv_cache.device)
        tail = tail[tail >= num_kept_pages]
        tb, tp = block_row[tail // layout.pages_per_block].long(), tail % layout.pages_per_block
        kmax[tb, :, tp] = float("-inf")
        kmin[tb, :, tp] = float("inf")


def refold_after_prompt(
    kv_cache: torch.Tensor, layout: KVLayout, block_row: torch.Tensor, prompt_len: int, seq_len: int
) -> None:
    """Fold tokens already written past the prompt back into the summaries compaction reset.

    Only a resumed request (vLLM recomputes prompt + outputs) has such tokens when stage 1
    runs: compact_kept_tokens empties the pages of the prompt's tail block, which may
    already hold live tokens at positions [prompt_len, seq_len).
    """
    end = min(seq_len, (prompt_len // layout.block_size + 1) * layout.block_size)
    if end <= prompt_len:
        return
    pos = torch.arange(prompt_len, end, device=kv_cache.device)
    block = block_row[pos // layout.block_size].long()
    keys = layout.keys(kv_cache)[block, :, pos % layout.block_size]  # [T, Hkv, D]
    page = (pos % layout.block_size) // layout.page_size
    kmax, kmin = layout.page_max(kv_cache), layout.page_min(kv_cache)
    for p in page.unique().tolist():
        rows = keys[page == p]
        b = int(block[page == p][0])
        kmax[b, :, p] = torch.maximum(kmax[b, :, p], rows.amax(dim=0))
        kmin[b, :, p] = torch.minimum(kmin[b, :, p], rows.amin(dim=0))


def page_lengths(
    seq_lens: torch.Tensor, keep: torch.Tensor, gap_end: torch.Tensor, num_pages: int, page_size: int
) -> torch.Tensor:
    """Live tokens per logical page: [B, num_pages] int32 (0 = skip the page)."""
    live = live_tokens(seq_lens, keep, gap_end, num_pages * page_size)
    return live.view(-1, num_pages, page_size).sum(dim=-1, dtype=torch.int32)


def live_tokens(seq_lens: torch.Tensor, keep: torch.Tensor, gap_end: torch.Tensor, length: int) -> torch.Tensor:
    """Bool [B, length]: which of each request's logical positions [0, length) hold live tokens."""
    pos = torch.arange(length, device=seq_lens.device)
    return (pos < seq_lens[:, None]) & ((pos < keep[:, None]) | (pos >= gap_end[:, None]))


def gather_page_summaries(
    kv_cache: torch.Tensor, layout: KVLayout, block_table: torch.Tensor, num_pages: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summaries of logical pages [0, num_pages) of every request: [B, num_pages, Hkv, D] each."""
    page = torch.arange(num_pages, device=kv_cache.device)
    block = block_table[:, page // layout.pages_per_block].long()
    slot = (page % layout.pages_per_block).expand_as(block)
    return layout.page_max(kv_cache)[block, :, slot], layout.page_min(kv_cache)[block, :, slot]


def hsa_select_pages(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layout: KVLayout,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    keep: torch.Tensor,
    gap_end: torch.Tensor,
    top_channels: torch.Tensor,
    top_pages: torch.Tensor,
    *,
    newest_page: torch.Tensor | None = None,
    plan: object = None,
) -> PageSelection:
    """HSA over the paged cache: per request and KV head, the top_pages live pages with the
    highest approximate attention (every live page when top_pages covers them; no list for
    EVERY_PAGE rows), then newest_page[b] (ops.newest_page; -1: none) appended to each list.
    `plan`, the kernels' launch plan, is accepted for a common signature and not needed here."""
    batch = query.shape[0]
    top_pages = torch.as_tensor(top_pages, device=query.device).expand(batch)
    listed = (top_pages != EVERY_PAGE).nonzero()[:, 0]
    index = torch.full((batch, kv_cache.shape[1], 1), -1, dtype=torch.int32, device=query.device)
    if listed.numel() == 0:  # dense rows only: nothing to score
        return PageSelection(index, torch.zeros(index.shape[:2], dtype=torch.int32, device=query.device))
    block_table, seq_lens, keep, gap_end, top_channels, top_pages = (
        torch.as_tensor(t, device=query.device).expand(batch, *torch.as_tensor(t).shape[1:])[listed]
        for t in (block_table, seq_lens, keep, gap_end, top_channels, top_pages))
    num_pages = max(1, -(-int(seq_lens.max().item()) // layout.page_size))
    kmax, kmin = gather_page_summaries(kv_cache, layout, block_table, num_pages)
    plen = page_lengths(seq_lens, keep, gap_end, num_pages, layout.page_size)
    pages = hsa_select(query[listed], kmax, kmin, plen, top_channels, top_pages.clamp(max=num_pages)).int()
    # (one spare entry: room for the newest page)
    index = index.expand(-1, -1, pages.shape[-1] + 1).clone()
    index[listed, :, : pages.shape[-1]] = pages
    count = (index >= 0).sum(dim=-1, dtype=torch.int32)
    if newest_page is not None:
        page = torch.as_tensor(newest_page, device=query.device).expand(batch)[listed]
        has = page >= 0
        rows, page = listed[has], page[has].to(torch.int32)[:, None, None].expand(-1, index.shape[1], 1)
        index[rows] = index[rows].scatter(2, count[rows].long().unsqueeze(-1), page)
        count[rows] += 1
    return PageSelection(index, count)


def paged_sparse_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layout: KVLayout,
    block_table: torch.Tensor,
    page_index: torch.Tensor,
    page_count: torch.Tensor,
    seq_lens: torch.Tensor,
    keep: torch.Tensor,
    gap_end: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    top_pages: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention over the live tokens of the chosen pages page_index[b, h, :page_count[b, h]]
    (-1 entries skipped), or of every live page for rows whose top_pages is EVERY_PAGE:
    [B, Hq, D], written into `out` when given."""
    batch = query.shape[0]
    seq_lens, keep, gap_end = (torch.as_tensor(t, device=query.device).expand(batch) for t in (seq_lens, keep, gap_end))
    every = (torch.as_tensor(top_pages, device=query.device).expand(batch) == EVERY_PAGE if top_pages is not None
             else torch.zeros(batch, dtype=torch.bool, device=query.device))
    if bool(every.all()):
        result = _attend_live_tokens(query, kv_cache, layout, block_table, seq_lens, keep, gap_end, scale)
    elif not bool(every.any()):
        result = _attend_listed_pages(query, kv_cache, layout, block_table, page_index, page_count, seq_lens, keep,
                                      gap_end, scale)
    else:
        result = torch.empty_like(query)
        result[every] = _attend_live_tokens(query[every], kv_cache, layout, block_table[every], seq_lens[every],
                                            keep[every], gap_end[every], scale)
        listed = ~every
        result[listed] = _attend_listed_pages(query[listed], kv_cache, layout, block_table[listed], page_index[listed],
                                              page_count[listed], seq_lens[listed], keep[listed], gap_end[listed], scale)
    if out is None:
        return result
    out.copy_(result)
    return out


def _attend_live_tokens(query: torch.Tensor, kv_cache: torch.Tensor, layout: KVLayout, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, keep: torch.Tensor, gap_end: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense decode rows: each query over every live token of its request (torch's fused
    attention over whole gathered blocks); rows without a live token output zeros."""
    length = max(1, int(seq_lens.max().item()))
    keys, values = gather_blocks(kv_cache, layout, block_table, length)
    live = live_tokens(seq_lens, keep, gap_end, length)
    keys, values, mask = keys.float(), values.float(), None
    if not bool(live.all()):
        # dead slots may hold anything, NaN included: zero them (gathered copies), not just their weight
        dead = ~live[:, None, :, None]
        keys, values, mask = keys.masked_fill_(dead, 0.0), values.masked_fill_(dead, 0.0), live[:, None, None, :]
    out = F.scaled_dot_product_attention(query.float()[:, :, None], keys, values, attn_mask=mask, scale=scale,
                                         enable_gqa=True)[:, :, 0]
    return torch.where(live.any(dim=-1)[:, None, None], out, 0.0).to(query.dtype)


def _attend_listed_pages(query: torch.Tensor, kv_cache: torch.Tensor, layout: KVLayout, block_table: torch.Tensor,
                         page_index: torch.Tensor, page_count: torch.Tensor, seq_lens: torch.Tensor, keep: torch.Tensor,
                         gap_end: torch.Tensor, scale: float) -> torch.Tensor:
    """Selected decode rows: each KV head's query group over the live tokens of its listed pages."""
    ps = layout.page_size
    entry = torch.arange(page_index.shape[-1], device=page_index.device)
    page_index = torch.where(entry < page_count[..., None], page_index.long(), -1)
    offsets = torch.arange(ps, device=kv_cache.device)
    tokens = (page_index.clamp(min=0)[..., None] * ps + offsets).flatten(-2)  # [B, Hkv, K*ps]
    chosen = (page_index >= 0).repeat_interleave(ps, dim=-1)
    chosen &= tokens < seq_lens[:, None, None]
    chosen &= (tokens < keep[:, None, None]) | (tokens >= gap_end[:, None, None])
    max_blocks = block_table.shape[1]
    block = block_table.gather(1, (tokens // layout.block_size).clamp(max=max_blocks - 1).flatten(1))
    block = block.view_as(tokens).long()
    head = torch.arange(tokens.shape[1], device=kv_cache.device)[None, :, None]
    k = layout.keys(kv_cache)[block, head, tokens % layout.block_size]
    v = layout.values(kv_cache)[block, head, tokens % layout.block_size]
    return attend_chosen(query, k, v, chosen, scale)


def oracle_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layout: KVLayout,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    top_k: torch.Tensor,
    max_seq_len: int,
    scale: float,
) -> torch.Tensor:
    """The `oracle` ablation for decode queries [B, Hq, D]: per KV head, attention over the
    top_k[b] tokens of highest exact attention (the selection HSA approximates). Requests of
    this mode evict nothing, so every position below seq_lens[b] is live."""
    pos = torch.arange(max_seq_len, device=kv_cache.device)
    block = block_table[:, pos // layout.block_size].long()
    offset = (pos % layout.block_size).expand_as(block)
    keys = layout.keys(kv_cache)[block, :, offset]  # [B, L, Hkv, D]
    values = layout.values(kv_cache)[block, :, offset]
    valid = pos[None, :] < seq_lens[:, None]
    index = exact_topk(query, keys, valid, top_k.long(), scale)
    return sparse_attention(query, keys, values, index, scale)
