"""Paged-cache reference ops (the CPU path) against the contiguous algorithms."""
import pytest
import torch

from rocketkv_vllm.algorithms import causal_attention, hsa_select, page_summaries, snapkv_select, sparse_attention
from rocketkv_vllm.kv_layout import KVLayout
from rocketkv_vllm.ops import reference as ops


def make_request_cache(layout, num_blocks, hkv, d, lengths, dtype=torch.float32):
    """Fill a paged cache with random tokens for requests of `lengths`, shuffled blocks."""
    kv = torch.full(layout.cache_shape(num_blocks, hkv, d), float("nan"), dtype=dtype)
    perm = torch.randperm(num_blocks)
    max_blocks = max(-(-n // layout.block_size) for n in lengths) + 1
    table = torch.zeros(len(lengths), max_blocks, dtype=torch.int32)
    keys, values, used = [], [], 0
    for i, n in enumerate(lengths):
        nb = -(-n // layout.block_size) + 1
        table[i, :nb] = perm[used : used + nb].int()
        used += nb
        k, v = torch.randn(n, hkv, d, dtype=dtype), torch.randn(n, hkv, d, dtype=dtype)
        pos = torch.arange(n)
        slots = table[i, pos // layout.block_size].long() * layout.block_size + pos % layout.block_size
        for chunk in torch.arange(n).split(7):  # chunked writes
            ops.write_kv(kv, layout, k[chunk], v[chunk], slots[chunk])
        keys.append(k)
        values.append(v)
    return kv, table, keys, values


@pytest.mark.parametrize("block_size,page_size", [(16, 1), (16, 4), (32, 8), (16, 16)])
def test_write_kv_stores_tokens_and_summaries(block_size, page_size):
    torch.manual_seed(block_size + page_size)
    layout = KVLayout(block_size, page_size)
    kv, table, keys, values = make_request_cache(layout, 16, 2, 8, [45, 19])
    for i, n in enumerate([45, 19]):
        k, v = ops.gather_tokens(kv, layout, table[i], n)
        assert torch.equal(k, keys[i]) and torch.equal(v, values[i])
        kmax, kmin = ops.gather_page_summaries(kv, layout, table[i : i + 1], -(-n // page_size))
        ref_max, ref_min = page_summaries(keys[i], page_size)
        assert torch.equal(kmax[0], ref_max) and torch.equal(kmin[0], ref_min)


def test_compaction_keeps_selected_tokens_per_head():
    torch.manual_seed(0)
    layout = KVLayout(16, 4)
    prompt = 70
    kv, table, keys, values = make_request_cache(layout, 12, 2, 8, [prompt])
    q = torch.randn(8, 4, 8)
    kept = snapkv_select(q, keys[0], prompt, keep=23, pool_kernel=5)
    ops.compact_kept_tokens(kv, layout, table[0], kept, prompt)
    k, v = ops.gather_tokens(kv, layout, table[0], 23)
    for h in range(2):
        assert torch.equal(k[:, h], keys[0][kept[h], h]) and torch.equal(v[:, h], values[0][kept[h], h])
    kmax, _ = ops.gather_page_summaries(kv, layout, table[:1], 6)
    assert torch.equal(kmax[0], page_summaries(k, 4)[0])
    # decode tokens at positions 70.. extend the tail pages, which start empty
    new_k = torch.randn(3, 2, 8)
    pos = torch.arange(prompt, prompt + 3)
    slots = table[0, pos // 16].long() * 16 + pos % 16
    ops.write_kv(kv, layout, new_k, torch.randn(3, 2, 8), slots)
    kmax, kmin = ops.gather_page_summaries(kv, layout, table[:1], 19)
    assert torch.equal(kmax[0, 17], new_k[:2].amax(0)) and torch.equal(kmin[0, 18], new_k[2])


@pytest.mark.parametrize("group", [1, 4])
def test_paged_hsa_and_attention_match_contiguous(group):
    torch.manual_seed(group)
    layout = KVLayout(16, 4)
    lengths = [60, 33, 90]
    hkv, d = 2, 16
    kv, table, keys, values = make_request_cache(layout, 32, hkv, d, lengths)
    seq_lens = torch.tensor(lengths)
    # requests 1 and 2 have an evicted gap (page-aligned: compaction handles the rest)
    keep = torch.tensor([60, 20, 40])
    gap_end = torch.tensor([60, 28, 80])
    query = torch.randn(3, hkv * group, d)
    top_pages = torch.tensor([4, 100, 6])  # request 1's budget exceeds its context
    pages, count = ops.hsa_select_pages(query, kv, layout, table, seq_lens, keep, gap_end, torch.tensor([8, 16, 4]), top_pages)

    num_pages = 23
    live = torch.stack([ops.live_positions(num_pages * 4, int(keep[i]), int(gap_end[i]), torch.device("cpu")) for i in range(3)])
    live &= torch.arange(num_pages * 4)[None] < seq_lens[:, None]
    padded_k = torch.zeros(3, num_pages * 4, hkv, d)
    padded_v = torch.zeros(3, num_pages * 4, hkv, d)
    for i, n in enumerate(lengths):
        padded_k[i, :n], padded_v[i, :n] = keys[i], values[i]
    masked = torch.where(live[..., None, None], padded_k, float("nan"))
    kmax = masked.view(3, num_pages, 4, hkv, d).nan_to_num(float("-inf")).amax(2)
    kmin = masked.view(3, num_pages, 4, hkv, d).nan_to_num(float("inf")).amin(2)
    plen = live.view(3, num_pages, 4).sum(-1)
    expected = hsa_select(query, kmax, kmin, plen, torch.tensor([8, 16, 4]), top_pages)
    assert torch.equal(pages[..., : expected.shape[-1]], expected.int())
    assert torch.equal(count, (expected >= 0).sum(-1, dtype=torch.int32))
    assert count[1].tolist() == [int((plen[1] > 0).sum())] * hkv

    out = ops.paged_sparse_attention(query, kv, layout, table, pages, count, seq_lens, keep, gap_end, 0.25)
    pages = pages.long()
    tok = (pages.clamp(min=0)[..., None] * 4 + torch.arange(4)).flatten(-2)
    ok = (pages >= 0).repeat_interleave(4, -1) & live.gather(1, tok.flatten(1)).view_as(tok)
    ref = sparse_attention(query, padded_k, padded_v, torch.where(ok, tok, -1), 0.25)
    assert torch.allclose(out, ref, atol=1e-5)


def live_attention(query, keys, values, seq_len, keep, gap_end, query_positions, scale):
    """The contiguous oracle: causal attention over one request's live tokens."""
    live = ops.live_positions(seq_len, keep, gap_end, torch.device("cpu"))
    return causal_attention(query, keys[:seq_len][live], values[:seq_len][live], query_positions,
                            torch.arange(seq_len)[live], scale)


@pytest.mark.parametrize("seq_len,queries,keep,gap_end", [
    (90, 90, 90, 90),  # a whole prompt from position 0 (SDPA's causal mask)
    (90, 41, 90, 90),  # a later chunk, masked in query chunks of 16
    (90, 30, 20, 52),  # a chunk after an evicted gap
])
def test_paged_causal_attention_matches_contiguous(seq_len, queries, keep, gap_end):
    torch.manual_seed(seq_len + queries + keep)
    layout, hkv = KVLayout(16, 4), 2
    kv, table, keys, values = make_request_cache(layout, 16, hkv, 16, [seq_len])
    query = torch.randn(queries, hkv * 3, 16)
    out = ops.paged_causal_attention(query, kv, layout, table[0], seq_len, keep, gap_end, 0.3, query_chunk=16)
    ref = live_attention(query, keys[0], values[0], seq_len, keep, gap_end, torch.arange(seq_len - queries, seq_len), 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_dense_decode_rows_attend_every_live_token():
    """Rows whose budget is EVERY_PAGE, beside a selecting row: each over every live token of
    its request around its gap (dead slots hold NaN), a padding row (seq_len 0) gives zeros."""
    torch.manual_seed(3)
    layout, hkv, d = KVLayout(16, 2), 2, 16
    lengths = [70, 45, 1, 33]
    kv, table, keys, values = make_request_cache(layout, 32, hkv, d, lengths)
    seq_lens, keep, gap_end = torch.tensor([70, 45, 0, 33]), torch.tensor([30, 45, 0, 33]), torch.tensor([50, 45, 0, 33])
    top_pages = torch.tensor([ops.EVERY_PAGE, 3, ops.EVERY_PAGE, ops.EVERY_PAGE])
    query = torch.randn(4, hkv * 2, d)
    selection = ops.hsa_select_pages(query, kv, layout, table, seq_lens, keep, gap_end, d, top_pages)
    assert selection.count[[0, 2, 3]].eq(0).all() and selection.count[1].eq(3).all()
    out = ops.paged_sparse_attention(query, kv, layout, table, *selection, seq_lens, keep, gap_end, 0.3,
                                     top_pages=top_pages)
    for row in (0, 3):
        n = int(seq_lens[row])
        ref = live_attention(query[row : row + 1], keys[row], values[row], n, int(keep[row]), int(gap_end[row]),
                             torch.tensor([n - 1]), 0.3)
        torch.testing.assert_close(out[row : row + 1], ref, rtol=1e-5, atol=1e-5)
    assert out[2].eq(0).all()
    listed = ops.paged_sparse_attention(query[1:2], kv, layout, table[1:2], selection.index[1:2], selection.count[1:2],
                                        seq_lens[1:2], keep[1:2], gap_end[1:2], 0.3)
    assert torch.equal(out[1:2], listed)


@pytest.mark.parametrize("prompt,written,keep", [(37, 43, 20), (40, 50, 12), (33, 36, 33 - 1)])
def test_compaction_of_a_resumed_request_keeps_tokens_past_the_prompt(prompt, written, keep):
    """vLLM recomputes prompt + outputs after preemption: positions >= prompt are live already."""
    torch.manual_seed(prompt)
    layout = KVLayout(16, 4)
    kv, table, keys, _ = make_request_cache(layout, 12, 2, 8, [written])
    kept = torch.stack([torch.randperm(prompt - 4)[: keep - 4].sort().values for _ in range(2)])
    kept = torch.cat([kept, torch.arange(prompt - 4, prompt).expand(2, -1)], dim=1)
    ops.compact_kept_tokens(kv, layout, table[0], kept, prompt)
    ops.refold_after_prompt(kv, layout, table[0], prompt, written)
    live = ops.live_positions(written, keep, prompt, torch.device("cpu"))
    k, _ = ops.gather_tokens(kv, layout, table[0], written)
    pages = -(-written // 4)
    kmax, kmin = ops.gather_page_summaries(kv, layout, table[:1], pages)
    for page in range(pages):
        positions = [p for p in range(page * 4, min(written, page * 4 + 4)) if live[p]]
        if positions:
            assert torch.equal(kmax[0, page], k[positions].amax(0)), page
            assert torch.equal(kmin[0, page], k[positions].amin(0)), page


@pytest.mark.parametrize("block_size,page_size,group,gw", [(16, 4, 8, 8), (32, 1, 4, 4), (16, 4, 0, 16), (16, 4, 64, 16)])
def test_summaries_sit_in_channel_groups(block_size, page_size, group, gw):
    """The summary views address what the kernels do: after the block's key and value rows,
    groups of gw channels (gw = head_dim for group 0 or wider: row-major), each with every
    page's max, then every page's min."""
    layout = KVLayout(block_size, page_size, group)
    ppb, d = layout.pages_per_block, 16
    assert layout.summary_channels(d) == gw
    kv = torch.arange(3 * 2 * layout.rows_per_block * d, dtype=torch.float64).view(layout.cache_shape(3, 2, d))
    start = 2 * block_size * d
    flat = kv.view(3, 2, -1)[2, 1]
    for page in (0, ppb - 1):
        for chan in (0, 5, d - 1):
            at = start + (chan // gw) * 2 * ppb * gw + page * gw + chan % gw
            assert layout.page_max(kv)[2, 1, page][chan] == flat[at]
            assert layout.page_min(kv)[2, 1, page][chan] == flat[at + ppb * gw]
    region = torch.cat([layout.page_max(kv)[2, 1].flatten(), layout.page_min(kv)[2, 1].flatten()])
    assert torch.equal(region.sort().values, flat[start:])  # the region exactly, no overlap
    written = kv.clone()
    layout.page_max(written)[2, 1, ppb - 1] = torch.full((d,), -1.0, dtype=torch.float64)
    assert int((written != kv).sum()) == d and bool((layout.page_max(written)[2, 1, ppb - 1] == -1).all())
    with pytest.raises(ValueError, match="contiguous"):
        layout.page_max(kv.transpose(2, 3).contiguous().transpose(2, 3))
