"""HSA page selection in three fixed-grid Triton kernels (CUDA-graph capturable).

1. prep    (B, Hkv):    top-r channel mask of the group's mean |q| (and list), masked
                        queries, SparQ temperature per query head;
2. logits  (B, Hkv, S): approximate page logits on the chosen channels from the page
                        max/min summaries (whole rows, or only the chosen channels when
                        they are few), per tile of live pages (nothing else: every
                        cross-thread reduction here costs a barrier per tile and head);
                        each of the S programs of a (request, KV head)
                        strides over that request's own tiles, so the grid depends on the
                        batch size only and short requests cost no empty programs;
3. top-k   (B, Hkv):    each query head's softmax statistics over its logits, the
                        group-softmax-mean page scores, then an exact radix select of the
                        k-th largest score (histogram passes over 8-bit digits of the
                        float bits, stopping once the boundary bucket is taken whole)
                        and one compaction pass writing the chosen logical pages in
                        ascending order (ties broken by lower page).

Pages are enumerated "virtually" (only the kept prompt pages and the pages after the
evicted gap), so an evicting request never scores its gap. A request whose budget covers
all its live pages skips scoring and selects them all (this is how exact-attention decode
rows share the sparse path).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rocketkv_vllm.kernels.triton_common import (
    check_cache,
    check_group,
    contiguous_last,
    group_pad,
    logical_page,
    nan_to_zero,
    np2,
    num_sms,
    page_len,
    per_request,
    virtual_pages,
)
from rocketkv_vllm.kv_layout import KVLayout
from rocketkv_vllm.ops.reference import PageSelection

PAGE_CHUNK = 4096  # pages per step of the top-k kernel's passes
# 4-byte scratch elements (logits, keys, masked queries) held at once
# (256 MiB); bigger batches are scored in row groups. The output page lists are extra.
SCRATCH_ELEMENTS = 1 << 26
# logits programs per SM (several resident waves of 4-warp programs: measured best on the H100)
LOGIT_PROGRAMS_PER_SM = 8
LOGIT_TILE = 16  # pages per step of a logits program


@triton.jit
def _hsa_prep_kernel(
    q_ptr, r_ptr, qm_ptr, temp_ptr, chan_ptr,
    s_qb, s_qh,
    G, D,
    G_P: tl.constexpr, BLOCK_D: tl.constexpr, R_GATHER: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    nh = tl.num_programs(1).to(tl.int64)
    g = tl.arange(0, G_P)
    d = tl.arange(0, BLOCK_D)
    gm = g < G
    dm = d < D
    rows = h * G + g
    q = tl.load(q_ptr + b * s_qb + rows[:, None] * s_qh + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    q = q.to(tl.float32)
    qa = tl.abs(q)
    score = tl.sum(qa, axis=0) / G
    # NaN ranks first (as in torch.topk) so that the ranks stay a permutation and the
    # channel list below has no unwritten slots
    score = tl.where(score != score, float("inf"), score)
    score = tl.where(dm, score, -1.0)
    # rank of channel c = #channels strictly larger + #equal channels with a lower index
    sc = score[None, :]
    sd = score[:, None]
    before = (sc > sd) | ((sc == sd) & (d[None, :] < d[:, None]))
    rank = tl.sum(before.to(tl.int32), axis=1)
    r = tl.load(r_ptr + b)
    chan = (rank < r) & dm
    qm = tl.where(chan[None, :], q, 0.0)
    total = tl.maximum(tl.sum(qa, axis=1), 1e-30)
    kept = tl.sum(tl.abs(qm), axis=1)
    temp = tl.sqrt(tl.maximum(D * kept / total, 1e-30))
    temp = tl.where(gm, temp, 1.0)
    out = (b * nh + h) * G_P
    tl.store(qm_ptr + (out + g)[:, None] * BLOCK_D + d[None, :], qm)
    tl.store(temp_ptr + out + g, temp)
    # the chosen channels as a list (by rank), for the logits kernel's gather path
    tl.store(chan_ptr + (b * nh + h) * R_GATHER + rank, d, mask=chan & (rank < R_GATHER))


@triton.jit
def _summary_rows(bt, t, n, nk, tail, seq, keep, gap, h, s_cb, s_ch, s_cr,
                  BS: tl.constexpr, PS: tl.constexpr, PPB: tl.constexpr, TILE: tl.constexpr):
    """Virtual pages of tile t, their live-token counts, which are scored, and the cache
    row of each page's max summary."""
    v = t * TILE + tl.arange(0, TILE)
    p = logical_page(v, nk, tail).to(tl.int64)
    plen = page_len(p, seq, keep, gap, PS)
    valid = (v < n) & (plen > 0)
    blk = tl.load(bt + p // PPB, mask=valid, other=0).to(tl.int64)
    return v, plen, valid, blk * s_cb + h * s_ch + (2 * BS + p % PPB) * s_cr


@triton.jit
def _tile_logits(
    kv_ptr, qm_ptr, temp_ptr, logit_ptr, bt, cols, cmask,
    s, ns, n, nk, tail, seq, keep, gap, h, bh, s_cb, s_ch, s_cr, NPV,
    G: tl.constexpr, BS: tl.constexpr, PS: tl.constexpr, PPB: tl.constexpr,
    G_P: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
):
    """Logits of this program's tiles of pages from the summary channels at offsets `cols`
    (masked by cmask): all of a row (contiguous, vector loads) or a list of chosen ones."""
    qbase = bh * G_P
    nv, nplen, nvalid, nrow = _summary_rows(bt, s, n, nk, tail, seq, keep, gap, h, s_cb, s_ch, s_cr, BS, PS, PPB, TILE)
    for t in range(s, tl.cdiv(n, TILE), ns):
        v, plen, valid, row = nv, nplen, nvalid, nrow
        lm = valid[:, None] & cmask[None, :]
        kmax = nan_to_zero(tl.load(kv_ptr + row[:, None] + cols[None, :], mask=lm, other=0.0).to(tl.float32))
        kmin = nan_to_zero(tl.load(kv_ptr + row[:, None] + PPB * s_cr + cols[None, :], mask=lm, other=0.0).to(tl.float32))
        # the next tile's block numbers load while this tile computes
        nv, nplen, nvalid, nrow = _summary_rows(bt, t + ns, n, nk, tail, seq, keep, gap, h, s_cb, s_ch, s_cr, BS, PS, PPB, TILE)
        log_len = tl.log(tl.maximum(plen, 1).to(tl.float32))
        for gi in tl.static_range(G):
            qg = tl.load(qm_ptr + (qbase + gi) * BLOCK_D + cols, mask=cmask, other=0.0)
            bound = tl.sum(kmax * tl.maximum(qg, 0.0)[None, :] + kmin * tl.minimum(qg, 0.0)[None, :], axis=1)
            logit = bound / tl.load(temp_ptr + qbase + gi) + log_len
            logit = tl.where(valid, logit, float("-inf"))
            tl.store(logit_ptr + (bh * G + gi) * NPV + v, logit, mask=v < n)


@triton.jit
def _hsa_logits_kernel(
    kv_ptr, bt_ptr, seq_ptr, keep_ptr, gap_ptr, k_ptr, r_ptr, chan_ptr, qm_ptr, temp_ptr,
    logit_ptr,
    s_cb, s_ch, s_cr, s_bt,
    D, NPV,
    G: tl.constexpr, BS: tl.constexpr, PS: tl.constexpr, PPB: tl.constexpr,
    G_P: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr, R_GATHER: tl.constexpr,
):
    # Page bounds are dot products of one query row with TILE summary rows: computed as
    # element-wise products and row sums in fp32 (a tl.dot would pad the group to 16 rows
    # and, in fp32, spill registers), one query head of the group at a time.
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    nh = tl.num_programs(1).to(tl.int64)
    ns = tl.num_programs(2)
    seq = tl.load(seq_ptr + b)
    keep = tl.load(keep_ptr + b)
    gap = tl.load(gap_ptr + b)
    nk, tail, n = virtual_pages(seq, keep, gap, PS)
    n = tl.minimum(n, NPV)  # never past the block table
    if tl.load(k_ptr + b) < n:  # else every live page is chosen: nothing to score
        bh = b * nh + h
        bt = bt_ptr + b * s_bt
        r = tl.load(r_ptr + b)
        if r <= R_GATHER:
            # few channels (r <= D / 8): read just those. Most 32-byte sectors of a row are
            # then skipped and the products shrink D / r times.
            j = tl.arange(0, R_GATHER)
            jm = j < r
            cols = tl.load(chan_ptr + bh * R_GATHER + j, mask=jm, other=0)
            cols = tl.minimum(tl.maximum(cols, 0), D - 1)  # never outside the row, whatever the query
            _tile_logits(kv_ptr, qm_ptr, temp_ptr, logit_ptr, bt, cols, jm, s, ns, n, nk, tail, seq, keep, gap, h, bh,
                         s_cb, s_ch, s_cr, NPV, G, BS, PS, PPB, G_P, BLOCK_D, TILE)
        else:
            # Whole summary rows: DRAM moves 32-byte sectors (16 channels), so masking to
            # the chosen channels saves little at larger r, and a per-channel mask would turn
            # each 16-byte vector load into eight 2-byte loads. Unchosen channels meet
            # zeros in the masked queries.
            d = tl.arange(0, BLOCK_D)
            _tile_logits(kv_ptr, qm_ptr, temp_ptr, logit_ptr, bt, d, d < D, s, ns, n, nk, tail, seq, keep, gap, h, bh,
                         s_cb, s_ch, s_cr, NPV, G, BS, PS, PPB, G_P, BLOCK_D, TILE)


@triton.jit
def _radix_digit(keys, n, threshold, remaining, SHIFT: tl.constexpr, TOP: tl.constexpr, CHUNK: tl.constexpr):
    """One radix-select pass over key bits [SHIFT, TOP) of the keys whose bits >= TOP equal
    threshold's: the digit of the `remaining`-th largest of them is set in threshold.
    Returns (threshold, keys still to take from that digit's bucket, keys in the bucket)."""
    NB: tl.constexpr = 1 << (TOP - SHIFT)
    c = tl.arange(0, CHUNK)
    hist = tl.zeros([NB], tl.int32)
    for v0 in range(0, n, CHUNK):
        v = v0 + c
        key = tl.load(keys + v, mask=v < n, other=-1)
        same_prefix = (key >= 0) & ((key >> TOP) == (threshold >> TOP))
        hist += tl.histogram((key >> SHIFT) & (NB - 1), NB, mask=same_prefix)
    bins = tl.arange(0, NB)
    at_least = tl.sum(hist) - tl.cumsum(hist, 0) + hist  # keys with digit >= bin
    digit = tl.max(tl.where(at_least >= remaining, bins, 0))
    above = tl.sum(tl.where(bins > digit, hist, 0))
    in_bucket = tl.sum(tl.where(bins == digit, hist, 0))
    return threshold | (digit << SHIFT), remaining - above, in_bucket


@triton.jit
def _radix_select(keys, n, k, CHUNK: tl.constexpr):
    """The k-th largest of n non-negative int32 keys (-1 = absent; k <= present keys, and
    k <= 0 selects none):
    (threshold, shift, take_equal) such that the top k are the keys with
    key >> shift > threshold >> shift plus the first take_equal with key >> shift equal.
    Digits of 7/8/8/8 bits (256-bin histograms: wider ones cost more than the pass they
    save); it stops as soon as the k-th key's bucket is taken whole."""
    threshold, remaining, in_bucket = _radix_digit(keys, n, tl.zeros([], tl.int32), k, 24, 31, CHUNK)
    shift = tl.zeros([], tl.int32) + 24
    for i in tl.static_range(3):
        if in_bucket != remaining:
            threshold, remaining, in_bucket = _radix_digit(keys, n, threshold, remaining, 16 - 8 * i, 24 - 8 * i, CHUNK)
            shift = tl.zeros([], tl.int32) + (16 - 8 * i)
    return threshold, shift, remaining


@triton.jit
def _hsa_topk_kernel(
    seq_ptr, keep_ptr, gap_ptr, k_ptr,
    logit_ptr, key_ptr, idx_ptr, cnt_ptr,
    NPV,
    G: tl.constexpr, PS: tl.constexpr, G_P: tl.constexpr, CHUNK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    nh = tl.num_programs(1).to(tl.int64)
    bh = b * nh + h
    seq = tl.load(seq_ptr + b)
    keep = tl.load(keep_ptr + b)
    gap = tl.load(gap_ptr + b)
    k = tl.load(k_ptr + b)
    nk, tail, n = virtual_pages(seq, keep, gap, PS)
    n = tl.minimum(n, NPV)  # never past the block table
    c = tl.arange(0, CHUNK)  # pages per step (one step for most requests)
    keys = key_ptr + bh * NPV
    idx = idx_ptr + bh * NPV  # page lists are as wide as the virtual pages can be
    threshold = tl.zeros([], tl.int32)
    shift = tl.zeros([], tl.int32)
    take_equal = tl.zeros([], tl.int32) + NPV  # pages whose key prefix equals threshold's taken, lowest first
    if k < n:
        # softmax statistics of each query head over its page logits (online over chunks)
        g = tl.arange(0, G_P)
        gm = g < G
        m = tl.full([G_P], float("-inf"), tl.float32)
        ssum = tl.zeros([G_P], tl.float32)
        for v0 in range(0, n, CHUNK):
            v = v0 + c
            for gi in tl.static_range(G):
                lg = tl.load(logit_ptr + (bh * G + gi) * NPV + v, mask=v < n, other=float("-inf"))
                m_g = tl.sum(tl.where(g == gi, m, 0.0))
                m_new = tl.maximum(m_g, tl.max(lg, axis=0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                s_g = tl.sum(tl.where(g == gi, ssum, 0.0)) * tl.exp(m_g - m_safe) + tl.sum(tl.exp(lg - m_safe), axis=0)
                m = tl.where(g == gi, m_new, m)
                ssum = tl.where(g == gi, s_g, ssum)
        ok = gm & (ssum > 0)
        m = tl.where(ok, m, 0.0)
        inv = tl.where(ok, 1.0 / tl.where(ok, ssum, 1.0), 0.0) / G
        # page scores as order-preserving int32 keys (scores are >= 0; -1 = not selectable).
        # The selectable pages are exactly the live ones (as in the all-pages case below),
        # and a NaN score (logits overflowed) ranks lowest instead of turning negative.
        n_valid = tl.zeros([], tl.int32)
        for v0 in range(0, n, CHUNK):
            v = v0 + c
            vm = v < n
            score = tl.zeros([CHUNK], tl.float32)
            for gi in tl.static_range(G):  # one query head at a time: no padding to G_P rows
                lg = tl.load(logit_ptr + (bh * G + gi) * NPV + v, mask=vm, other=float("-inf"))
                m_g = tl.sum(tl.where(g == gi, m, 0.0))
                inv_g = tl.sum(tl.where(g == gi, inv, 0.0))
                score += tl.exp(lg - m_g) * inv_g
            score = tl.where(score == score, score, 0.0)
            valid = vm & (page_len(logical_page(v, nk, tail), seq, keep, gap, PS) > 0)
            key = tl.where(valid, score.to(tl.int32, bitcast=True), -1)
            tl.store(keys + v, key, mask=vm)
            n_valid += tl.sum(valid.to(tl.int32))
        tl.debug_barrier()  # the keys are read back below in other threads' layout
        if k < n_valid:
            threshold, shift, take_equal = _radix_select(keys, n, k, CHUNK)
    # write the chosen pages: key prefixes above the threshold's, then the first take_equal equal ones
    scored = (k < n) & (take_equal < NPV)
    written = tl.zeros([], tl.int32)
    equal_seen = tl.zeros([], tl.int32)
    for v0 in range(0, n, CHUNK):
        v = v0 + c
        vm = v < n
        p = logical_page(v, nk, tail)
        if scored:
            prefix = tl.load(keys + v, mask=vm, other=-1) >> shift
            eq = vm & (prefix == (threshold >> shift))
            eq_rank = equal_seen + tl.cumsum(eq.to(tl.int32), 0) - eq.to(tl.int32)
            chosen = vm & ((prefix > (threshold >> shift)) | (eq & (eq_rank < take_equal)))
            equal_seen += tl.sum(eq.to(tl.int32))
        else:
            chosen = vm & (page_len(p, seq, keep, gap, PS) > 0)
        ci = chosen.to(tl.int32)
        slot = written + tl.cumsum(ci, 0) - ci
        tl.store(idx + slot, p, mask=chosen)
        written += tl.sum(ci)
    tl.store(cnt_ptr + bh, written)


def gather_channels(head_dim: int) -> int:
    """Requests choosing at most this many channels (a power of two near head_dim / 8)
    have the logits kernel read just those channels of each summary row."""
    return np2(max(1, head_dim // 8) + 1) // 2


def _launch(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layout: KVLayout,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    keep: torch.Tensor,
    gap_end: torch.Tensor,
    top_channels,
    top_pages,
    splits: int | None,
    keep_keys: bool = False,
) -> tuple[PageSelection, torch.Tensor | None]:
    check_cache(kv_cache, layout)
    group = check_group(query, kv_cache)
    batch, _, head_dim = query.shape
    hkv = kv_cache.shape[1]
    device = query.device
    g_p, block_d = group_pad(group), np2(head_dim)
    ps, ppb = layout.page_size, layout.pages_per_block
    # live pages never exceed the logical pages the block table can address
    num_pages = block_table.shape[1] * ppb
    tile = LOGIT_TILE
    num_tiles = triton.cdiv(num_pages, tile)
    # requests are scored in groups whose logits and keys fit the scratch budget
    r_gather = gather_channels(head_dim)
    per_row = hkv * (num_pages * (group + 1) + g_p * (block_d + 1) + r_gather)
    rows = batch if keep_keys else max(1, min(batch, SCRATCH_ELEMENTS // per_row))
    if splits is None:
        splits = triton.cdiv(LOGIT_PROGRAMS_PER_SM * num_sms(device), max(1, rows * hkv))
    splits = max(1, min(int(splits), num_tiles))
    query = contiguous_last(query)
    bt = contiguous_last(block_table)
    seq, kp, ge = (per_request(t, batch, device) for t in (seq_lens, keep, gap_end))
    r = per_request(top_channels, batch, device)
    k = per_request(top_pages, batch, device)

    index = torch.empty(batch, hkv, num_pages, dtype=torch.int32, device=device)
    count = torch.empty(batch, hkv, dtype=torch.int32, device=device)
    qm = torch.empty(rows, hkv, g_p, block_d, dtype=torch.float32, device=device)
    temp = torch.empty(rows, hkv, g_p, dtype=torch.float32, device=device)
    chan = torch.empty(rows, hkv, r_gather, dtype=torch.int32, device=device)
    logits = torch.empty(rows, hkv, group, num_pages, dtype=torch.float32, device=device)
    keys = torch.empty(rows, hkv, num_pages, dtype=torch.int32, device=device)
    for r0 in range(0, batch, rows):
        part = slice(r0, min(batch, r0 + rows))
        n = part.stop - r0
        _hsa_prep_kernel[(n, hkv)](
            query[part], r[part], qm, temp, chan, query.stride(0), query.stride(1), group, head_dim,
            G_P=g_p, BLOCK_D=block_d, R_GATHER=r_gather, num_warps=4,
        )
        _hsa_logits_kernel[(n, hkv, splits)](
            kv_cache, bt[part], seq[part], kp[part], ge[part], k[part], r[part], chan, qm, temp, logits,
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), bt.stride(0),
            head_dim, num_pages,
            G=group, BS=layout.block_size, PS=ps, PPB=ppb, G_P=g_p, BLOCK_D=block_d, TILE=tile, R_GATHER=r_gather,
            num_warps=4,
        )
        _hsa_topk_kernel[(n, hkv)](
            seq[part], kp[part], ge[part], k[part], logits, keys, index[part], count[part], num_pages,
            G=group, PS=ps, G_P=g_p, CHUNK=min(PAGE_CHUNK, np2(num_pages)),
            num_warps=16,  # 4096-page chunks fit without spills
        )
    return PageSelection(index, count), keys if keep_keys else None


def hsa_select_pages(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layout: KVLayout,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    keep: torch.Tensor,
    gap_end: torch.Tensor,
    top_channels,
    top_pages,
    *,
    splits: int | None = None,
) -> PageSelection:
    """HSA over the paged cache: per request and KV head, the top_pages live pages with the
    highest approximate attention (all live pages when top_pages covers them, none when
    top_pages is 0).

    No host synchronisation; shapes depend only on the batch and the block table width.
    """
    selection, _ = _launch(query, kv_cache, layout, block_table, seq_lens, keep, gap_end, top_channels, top_pages, splits)
    return selection


def hsa_page_scores(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layout: KVLayout,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    keep: torch.Tensor,
    gap_end: torch.Tensor,
    top_channels,
) -> torch.Tensor:
    """The page scores the selection ranks: [B, Hkv, block_table width * pages_per_block]
    float32 over logical pages, -inf where a page is not selectable (tests, benchmarks)."""
    _, keys = _launch(query, kv_cache, layout, block_table, seq_lens, keep, gap_end, top_channels, 0, None, keep_keys=True)
    batch, hkv, num_pages = keys.shape
    scores = torch.full_like(keys, float("-inf"), dtype=torch.float32)
    ps = layout.page_size
    for b in range(batch):
        seq, kp, ge = int(seq_lens[b]), int(keep[b]), int(gap_end[b])
        nk = -(-kp // ps)
        tail = max(nk, ge // ps)
        logical = torch.cat([torch.arange(nk), torch.arange(tail, -(-seq // ps))]).to(keys.device)
        key = keys[b, :, : logical.numel()]
        scores[b, :, logical] = torch.where(key >= 0, key.view(torch.float32), float("-inf"))
    return scores
