"""HSA page selection in fixed-grid kernels (CUDA-graph capturable): Triton, and CUDA C++ for the top-k.

1. prep    (B, Hkv):    top-r channel mask of the group's mean |q| (and list), masked
                        queries, SparQ temperature per query head; resets the top-k's
                        arrival ticket (saves a memset launch);
2. logits  (B, Hkv, S): approximate page logits on the chosen channels from the page
                        max/min summaries (whole rows, or only the chosen channels when
                        they are few), per tile of live pages, and each program's softmax
                        statistics (kept element-wise across its tiles: a cross-thread
                        reduction costs a barrier, so only one a program);
                        each of the S programs of a (request, KV head)
                        strides over that request's own tiles, so the grid depends on the
                        batch size only and short requests cost no empty programs;
3. top-k   (B, Hkv, C): the group-softmax-mean page scores as int32 keys (the softmax
                        statistics come from the logits programs' partial ones), an exact
                        radix select of the k-th largest (histograms of digits of the float
                        bits, stopping once the boundary bucket is taken whole) and the chosen
                        logical pages in ascending order (ties broken by lower page). One
                        program per chunk of pages, keys in registers: a request of one chunk
                        (most) is done there; a longer one's chunks each pick their top k
                        (the request's top k are among them), and the chunk that finishes
                        last picks the top k of those candidates. Where the CUDA C++
                        extension is built, csrc/hsa_topk.cu runs this step instead (same
                        algorithm and result).

Pages are enumerated "virtually" (only the kept prompt pages and the pages after the
evicted gap), so an evicting request never scores its gap. A request whose budget covers
all its live pages skips scoring and selects them all; one whose budget is EVERY_PAGE
(exact-attention decode rows) gets no list at all: paged_sparse_attention enumerates its
live pages.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rocketkv_vllm.kernels import cuda_ops
from rocketkv_vllm.kernels.triton_common import (
    check_cache,
    check_group,
    contiguous_last,
    cuda_index,
    dependent_launch,
    group_pad,
    logical_page,
    nan_to_zero,
    np2,
    num_sms,
    page_len,
    pages_in_table,
    per_request,
    summary_at,
    topk_scratch,
    virtual_pages,
)
from rocketkv_vllm.kv_layout import KVLayout
from rocketkv_vllm.ops.reference import EVERY_PAGE, PageSelection

PAGE_CHUNK = 4096  # pages per top-k program (groups of up to 4 query heads)
# 4-byte scratch elements (logits, keys, masked queries) held at once
# (256 MiB); bigger batches are scored in row groups. The output page lists are extra.
SCRATCH_ELEMENTS = 1 << 26
# logits programs per SM (several resident waves of 4-warp programs: measured best on the H100)
LOGIT_PROGRAMS_PER_SM = 8
LOGIT_TILE = 16  # pages per step of a logits program
LOGIT_MAX_REGISTERS = 96  # 5 resident 4-warp programs an SM
# radix digits after the 7-bit top one. A histogram pass over keys in registers costs about
# its bins (16 bins ~0.5 us, 256 ~2.5 us on the H100), so 4-bit digits win there; over keys in
# memory each pass also reads them back, so 8-bit digits (fewer passes) win.
RADIX_BITS_REGISTERS = 4
RADIX_BITS_MEMORY = 8


@triton.jit
def _hsa_prep_kernel(
    q_ptr, r_ptr, qm_ptr, temp_ptr, chan_ptr, ticket_ptr,
    s_qb, s_qh,
    G, D,
    G_P: tl.constexpr, BLOCK_D: tl.constexpr, R_LIST: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # the logits kernel may launch now: it waits for this one's outputs (gdc_wait)
        gdc_launch_dependents()
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
    # the chosen channels as a list (by rank), for the logits kernel's gather paths
    tl.store(chan_ptr + (b * nh + h) * R_LIST + rank, d, mask=chan & (rank < R_LIST))
    tl.store(ticket_ptr + b * nh + h, 0)


@triton.jit
def _summary_rows(bt, t, n, nk, tail, seq, keep, gap, h, s_cb, s_ch, s_cr,
                  BS: tl.constexpr, PS: tl.constexpr, PPB: tl.constexpr, GW: tl.constexpr, TILE: tl.constexpr):
    """Virtual pages of tile t, their live-token counts, which are scored, and where each
    page's max summary starts (its channel group 0)."""
    v = t * TILE + tl.arange(0, TILE)
    p = logical_page(v, nk, tail).to(tl.int64)
    plen = page_len(p, seq, keep, gap, PS)
    valid = (v < n) & (plen > 0)
    blk = tl.load(bt + p // PPB, mask=valid, other=0).to(tl.int64)
    return v, plen, valid, blk * s_cb + h * s_ch + 2 * BS * s_cr + (p % PPB) * GW


@triton.jit
def _tile_logits(
    kv_ptr, qm_ptr, temp_ptr, logit_ptr, bt, cols, cmask,
    s, ns, n, nk, tail, seq, keep, gap, h, bh, s_cb, s_ch, s_cr, NPV,
    G: tl.constexpr, BS: tl.constexpr, PS: tl.constexpr, PPB: tl.constexpr,
    G_P: tl.constexpr, G_S: tl.constexpr, BLOCK_D: tl.constexpr, GW: tl.constexpr, TILE: tl.constexpr,
):
    """Logits of this program's tiles of pages from the summary channels `cols` (masked by
    cmask): all of them (GW-wide contiguous groups, vector loads) or a list of chosen ones.
    Returns each query head's max and sum of exp over this program's logits (the top-k's
    softmax statistics), kept element-wise across tiles so that no tile pays a reduction."""
    qbase = bh * G_P
    at = summary_at(0, cols, PPB, GW)[None, :]
    g = tl.arange(0, G_S)
    m_run = tl.full([G_S, TILE], float("-inf"), tl.float32)
    s_run = tl.zeros([G_S, TILE], tl.float32)
    nv, nplen, nvalid, nrow = _summary_rows(bt, s, n, nk, tail, seq, keep, gap, h, s_cb, s_ch, s_cr, BS, PS, PPB, GW, TILE)
    for t in range(s, tl.cdiv(n, TILE), ns):
        v, plen, valid, row = nv, nplen, nvalid, nrow
        lm = valid[:, None] & cmask[None, :]
        kmax = nan_to_zero(tl.load(kv_ptr + row[:, None] + at, mask=lm, other=0.0).to(tl.float32))
        kmin = nan_to_zero(tl.load(kv_ptr + row[:, None] + PPB * GW + at, mask=lm, other=0.0).to(tl.float32))
        # the next tile's block numbers load while this tile computes
        nv, nplen, nvalid, nrow = _summary_rows(bt, t + ns, n, nk, tail, seq, keep, gap, h, s_cb, s_ch, s_cr, BS, PS, PPB, GW, TILE)
        log_len = tl.log(tl.maximum(plen, 1).to(tl.float32))
        lg = tl.full([G_S, TILE], float("-inf"), tl.float32)
        for gi in tl.static_range(G):
            qg = tl.load(qm_ptr + (qbase + gi) * BLOCK_D + cols, mask=cmask, other=0.0)
            bound = tl.sum(kmax * tl.maximum(qg, 0.0)[None, :] + kmin * tl.minimum(qg, 0.0)[None, :], axis=1)
            logit = bound / tl.load(temp_ptr + qbase + gi) + log_len
            logit = tl.where(valid, logit, float("-inf"))
            tl.store(logit_ptr + (bh * G + gi) * NPV + v, logit, mask=v < n)
            lg = tl.where(g[:, None] == gi, logit[None, :], lg)
        m_new = tl.maximum(m_run, lg)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_run = s_run * tl.exp(m_run - m_safe) + tl.exp(lg - m_safe)
        m_run = m_new
    return _merged_stats(m_run, s_run)


@triton.jit
def _gathered_logits(
    kv_ptr, qm_ptr, temp_ptr, logit_ptr, bt, chan_ptr, r, D,
    s, ns, n, nk, tail, seq, keep, gap, h, bh, s_cb, s_ch, s_cr, NPV,
    G: tl.constexpr, BS: tl.constexpr, PS: tl.constexpr, PPB: tl.constexpr,
    G_P: tl.constexpr, G_S: tl.constexpr, BLOCK_D: tl.constexpr, GW: tl.constexpr, TILE: tl.constexpr,
    R: tl.constexpr, R_LIST: tl.constexpr,
):
    """_tile_logits on the r (<= R) chosen channels of the prep kernel's list (R_LIST wide)."""
    j = tl.arange(0, R)
    jm = j < r
    cols = tl.load(chan_ptr + bh * R_LIST + j, mask=jm, other=0)
    cols = tl.minimum(tl.maximum(cols, 0), D - 1)  # never outside the row, whatever the query
    return _tile_logits(kv_ptr, qm_ptr, temp_ptr, logit_ptr, bt, cols, jm, s, ns, n, nk, tail, seq, keep, gap,
                        h, bh, s_cb, s_ch, s_cr, NPV, G, BS, PS, PPB, G_P, G_S, BLOCK_D, GW, TILE)


@triton.jit
def _hsa_logits_kernel(
    kv_ptr, bt_ptr, seq_ptr, keep_ptr, gap_ptr, k_ptr, r_ptr, chan_ptr, qm_ptr, temp_ptr,
    logit_ptr, stat_ptr,
    s_cb, s_ch, s_cr, s_bt,
    D, NPV,
    G: tl.constexpr, BS: tl.constexpr, PS: tl.constexpr, PPB: tl.constexpr,
    G_P: tl.constexpr, G_S: tl.constexpr, BLOCK_D: tl.constexpr, GW: tl.constexpr, TILE: tl.constexpr,
    R0: tl.constexpr, T0: tl.constexpr, R1: tl.constexpr, T1: tl.constexpr, R2: tl.constexpr, T2: tl.constexpr,
    PDL: tl.constexpr,
):
    # Page bounds are dot products of one query row with TILE summary rows: computed as
    # element-wise products and row sums in fp32 (a tl.dot would pad the group to 16 rows
    # and, in fp32, spill registers), one query head of the group at a time.
    # the gather tiers (gather_tiers), checked here: the interpreter runs only the branch taken,
    # so a tier of 0 channels would pass the CPU tests unnoticed
    tl.static_assert(1 <= R0 and R0 <= R1 and R1 <= R2)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    nh = tl.num_programs(1).to(tl.int64)
    ns = tl.num_programs(2)
    seq = tl.load(seq_ptr + b)
    keep = tl.load(keep_ptr + b)
    gap = tl.load(gap_ptr + b)
    nk, tail, n = virtual_pages(seq, keep, gap, PS)
    n = pages_in_table(n, nk, tail, NPV)
    if tl.load(k_ptr + b) < n:  # else every live page is chosen: nothing to score
        bh = b * nh + h
        bt = bt_ptr + b * s_bt
        r = tl.load(r_ptr + b)
        if PDL:  # launched while the prep kernel runs: its channels and queries are read below
            gdc_wait()
        # few channels: read just those (gather_tiers), with grouped summaries only their
        # groups (one channel of a block's pages is 16 contiguous bytes at bf16 in groups of
        # 1, where a row-major page row would be read almost whole). Fewer channels take
        # tiles of more pages in the same registers, so more loads are in flight.
        if r <= R0:
            m, ssum = _gathered_logits(kv_ptr, qm_ptr, temp_ptr, logit_ptr, bt, chan_ptr, r, D, s, ns, n, nk, tail, seq,
                                       keep, gap, h, bh, s_cb, s_ch, s_cr, NPV, G, BS, PS, PPB, G_P, G_S, BLOCK_D, GW,
                                       T0, R0, R2)
        elif r <= R1:
            m, ssum = _gathered_logits(kv_ptr, qm_ptr, temp_ptr, logit_ptr, bt, chan_ptr, r, D, s, ns, n, nk, tail, seq,
                                       keep, gap, h, bh, s_cb, s_ch, s_cr, NPV, G, BS, PS, PPB, G_P, G_S, BLOCK_D, GW,
                                       T1, R1, R2)
        elif r <= R2:
            m, ssum = _gathered_logits(kv_ptr, qm_ptr, temp_ptr, logit_ptr, bt, chan_ptr, r, D, s, ns, n, nk, tail, seq,
                                       keep, gap, h, bh, s_cb, s_ch, s_cr, NPV, G, BS, PS, PPB, G_P, G_S, BLOCK_D, GW,
                                       T2, R2, R2)
        else:
            # every channel: at larger r most groups hold a chosen channel anyway, and a
            # per-channel mask would turn each GW-wide vector load into scalar loads.
            # Unchosen channels meet zeros in the masked queries.
            d = tl.arange(0, BLOCK_D)
            m, ssum = _tile_logits(kv_ptr, qm_ptr, temp_ptr, logit_ptr, bt, d, d < D, s, ns, n, nk, tail, seq, keep, gap,
                                   h, bh, s_cb, s_ch, s_cr, NPV, G, BS, PS, PPB, G_P, G_S, BLOCK_D, GW, TILE)
        # [rows, Hkv, programs, 2, G_S]: this program's max and sum of exp per query head
        g = tl.arange(0, G_S)
        stat = stat_ptr + ((bh * ns + s) * 2) * G_S
        tl.store(stat + g, m)
        tl.store(stat + G_S + g, ssum)


@triton.jit
def _add_add_min(a_count, a_sum, a_min, b_count, b_sum, b_min):
    return a_count + b_count, a_sum + b_sum, tl.minimum(a_min, b_min)


@triton.jit
def _pick_digit(hist, threshold, remaining, SHIFT: tl.constexpr):
    """Given the histogram of one digit of the keys still in the running, the digit
    of the `remaining`-th largest of them, set into threshold. Returns (threshold, keys still
    to take from that digit's bucket, keys in the bucket), from one scan and one reduction."""
    at_least = tl.cumsum(hist, 0, reverse=True)  # keys with digit >= bin: non-increasing
    reach = at_least >= remaining  # exactly the bins <= the digit
    count, above, at_digit = tl.reduce(
        (reach.to(tl.int32), tl.where(reach, 0, hist), tl.where(reach, at_least, 1 << 30)), 0, _add_add_min)
    return threshold | ((count - 1) << SHIFT), remaining - above, at_digit - above


@triton.jit
def _digit_hist(src, n, threshold, SHIFT: tl.constexpr, TOP: tl.constexpr, CHUNK: tl.constexpr, IN_REGS: tl.constexpr):
    """Histogram of key bits [SHIFT, TOP) over the present keys whose bits >= TOP equal
    threshold's; src is the key tensor itself (IN_REGS) or a pointer to n keys."""
    NB: tl.constexpr = 1 << (TOP - SHIFT)
    if IN_REGS:
        same_prefix = (src >= 0) & ((src >> TOP) == (threshold >> TOP))
        hist = tl.histogram((src >> SHIFT) & (NB - 1), NB, mask=same_prefix)
    else:
        c = tl.arange(0, CHUNK)
        hist = tl.zeros([NB], tl.int32)
        for v0 in range(0, n, CHUNK):
            key = tl.load(src + v0 + c, mask=v0 + c < n, other=-1, cache_modifier=".cg")  # other SMs wrote them
            same_prefix = (key >= 0) & ((key >> TOP) == (threshold >> TOP))
            hist += tl.histogram((key >> SHIFT) & (NB - 1), NB, mask=same_prefix)
    return hist


@triton.jit
def _radix_refine(src, n, top_hist, k, CHUNK: tl.constexpr, IN_REGS: tl.constexpr, W: tl.constexpr):
    """The k-th largest of n non-negative int32 keys (-1 = absent; k <= present keys, and
    k <= 0 selects none), given the histogram of their top digit (bits [24, 31)):
    (threshold, shift, take_equal) such that the top k are the keys with
    key >> shift > threshold >> shift plus the first take_equal with key >> shift equal.
    Further digits of W bits (W divides 24), stopping as soon as the k-th key's bucket is
    taken whole."""
    threshold, remaining, in_bucket = _pick_digit(top_hist, tl.zeros([], tl.int32), k, 24)
    shift = tl.zeros([], tl.int32) + 24
    for i in tl.static_range(24 // W):
        if in_bucket != remaining:
            hist = _digit_hist(src, n, threshold, 24 - W * (i + 1), 24 - W * i, CHUNK, IN_REGS)
            threshold, remaining, in_bucket = _pick_digit(hist, threshold, remaining, 24 - W * (i + 1))
            shift = tl.zeros([], tl.int32) + (24 - W * (i + 1))
    return threshold, shift, remaining


@triton.jit
def _load_logits(logit_ptr, bh, v, vm, NPV, G: tl.constexpr, G_P: tl.constexpr):
    """[G_P, CHUNK] logits of the group's query heads at virtual pages v (-inf elsewhere)."""
    g = tl.arange(0, G_P)
    ptr = logit_ptr + (bh * G + g[:, None]) * NPV + v[None, :]
    return tl.load(ptr, mask=(g < G)[:, None] & vm[None, :], other=float("-inf"))


@triton.jit
def _combined_stats(stat_ptr, bh, NS, NS_P: tl.constexpr, G_P: tl.constexpr):
    """Each query head's softmax max and sum of exp over all its page logits, from the NS
    logits programs' partial ones ([.., NS, 2, G_P] per request and KV head)."""
    i = tl.arange(0, NS_P)
    g = tl.arange(0, G_P)
    at = stat_ptr + (bh * NS + i[None, :]) * 2 * G_P + g[:, None]
    present = (i < NS)[None, :]
    return _merged_stats(tl.load(at, mask=present, other=float("-inf")), tl.load(at + G_P, mask=present, other=0.0))


@triton.jit
def _merged_stats(m_i, s_i):
    """Per row, the softmax max and sum of exp of partial ones ([rows, parts] each: a part's
    max and its sum of exp relative to that max; -inf / 0 for an empty part)."""
    m = tl.max(m_i, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m, tl.sum(s_i * tl.exp(m_i - m_safe[:, None]), axis=1)


@triton.jit
def _group_weights(m, ssum, G: tl.constexpr):
    """Each head's softmax max and 1 / (G * sum of exp), both 0 for a head with no finite
    logit (so that it adds nothing to the group mean)."""
    ok = ssum > 0
    return tl.where(ok, m, 0.0), tl.where(ok, 1.0 / tl.where(ok, ssum, 1.0), 0.0) / G


@triton.jit
def _page_keys(lg, m, inv, live):
    """Group-softmax-mean page scores as order-preserving int32 keys (scores are >= 0;
    -1 = not selectable). The selectable pages are exactly the live ones, and a NaN score
    (logits overflowed) ranks lowest instead of turning negative."""
    score = tl.sum(tl.exp(lg - m[:, None]) * inv[:, None], axis=0)  # the group axis is per thread
    score = tl.where(score == score, score, 0.0)
    return tl.where(live, score.to(tl.int32, bitcast=True), -1)


@triton.jit
def _chosen_slots(chosen, written):
    """Where the chosen elements of one chunk go when appended in order after `written`
    ones, and the new count."""
    ci = chosen.to(tl.int32)
    return written + tl.cumsum(ci, 0) - ci, written + tl.sum(ci)


@triton.jit
def _write_chosen(dst, values, chosen, written):
    """Append the chosen values of one chunk (in page order) at dst[written:]; returns the
    new count."""
    slot, written = _chosen_slots(chosen, written)
    tl.store(dst + slot, values, mask=chosen)
    return written


@triton.jit
def _chosen_by_key(key, vm, threshold, shift, take_equal, equal_seen):
    """Pages whose key prefix is above the threshold's, and the first take_equal equal ones.
    (Skipping the ranks when the bucket is taken whole, a branch, cost 15 us at 128K, B=8.)"""
    prefix = key >> shift
    eq = vm & (prefix == (threshold >> shift))
    eq_rank = equal_seen + tl.cumsum(eq.to(tl.int32), 0) - eq.to(tl.int32)
    chosen = vm & ((prefix > (threshold >> shift)) | (eq & (eq_rank < take_equal)))
    return chosen, equal_seen + tl.sum(eq.to(tl.int32))


@triton.jit
def _top_in_registers(key, vm, k, CHUNK: tl.constexpr, W: tl.constexpr):
    """Which of a chunk of keys in registers (-1 = absent) are its top k, ties to the lower
    position: all present ones when k covers them."""
    top_hist = tl.histogram(key >> 24, 128, mask=key >= 0)
    chosen = key >= 0
    if k < tl.sum(top_hist):
        threshold, shift, take_equal = _radix_refine(key, CHUNK, top_hist, k, CHUNK, True, W)
        chosen, _ = _chosen_by_key(key, vm, threshold, shift, take_equal, tl.zeros([], tl.int32))
    return chosen


@triton.jit
def _with_newest(idx, written, newest_ptr, b, NPV, HAS_NEWEST: tl.constexpr):
    """The count of a list of `written` pages after the row's newest page (newest_ptr[b], -1
    for none) is appended at idx[written] (ops.newest_page)."""
    if HAS_NEWEST:
        page = tl.load(newest_ptr + b)
        add = (page >= 0) & (written < NPV)
        tl.store(idx + written, page, mask=add)
        written += add.to(tl.int32)
    return written


@triton.jit
def _hsa_topk_kernel(
    seq_ptr, keep_ptr, gap_ptr, k_ptr,
    logit_ptr, stat_ptr, key_ptr, cand_key_ptr, cand_page_ptr, ticket_ptr, idx_ptr, cnt_ptr, newest_ptr,
    NPV, NS,
    G: tl.constexpr, PS: tl.constexpr, G_P: tl.constexpr, CHUNK: tl.constexpr, NS_P: tl.constexpr,
    W_REGS: tl.constexpr, W_MEMORY: tl.constexpr, EVERY: tl.constexpr, HAS_NEWEST: tl.constexpr,
):
    # One program per chunk of a request's pages (program_id(2)). A request of one chunk
    # (most) is selected by its one program with logits and keys in registers. A longer one:
    # each chunk's program picks its chunk's top k, since the request's top k are among
    # those, and the program that finishes last picks the top k of these candidates.
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    part = tl.program_id(2)
    nh = tl.num_programs(1).to(tl.int64)
    bh = b * nh + h
    seq = tl.load(seq_ptr + b)
    keep = tl.load(keep_ptr + b)
    gap = tl.load(gap_ptr + b)
    k = tl.load(k_ptr + b)
    nk, tail, n = virtual_pages(seq, keep, gap, PS)
    n = pages_in_table(n, nk, tail, NPV)
    parts = tl.cdiv(n, CHUNK)
    c = tl.arange(0, CHUNK)
    idx = idx_ptr + bh * NPV  # page lists are as wide as the virtual pages can be
    if k >= n:  # every live page is chosen: nothing to score
        if k == EVERY:  # no list: the attention enumerates the live pages itself
            if part == 0:
                tl.store(cnt_ptr + bh, 0)
        elif part == 0:
            written = tl.zeros([], tl.int32)
            for v0 in range(0, n, CHUNK):
                p = logical_page(v0 + c, nk, tail)
                written = _write_chosen(idx, p, (v0 + c < n) & (page_len(p, seq, keep, gap, PS) > 0), written)
            tl.store(cnt_ptr + bh, _with_newest(idx, written, newest_ptr, b, NPV, HAS_NEWEST))
    elif part < parts:
        m, ssum = _combined_stats(stat_ptr, bh, NS, NS_P, G_P)  # (before the logits take the registers)
        m, inv = _group_weights(m, ssum, G)
        v = part * CHUNK + c
        vm = v < n
        pages = logical_page(v, nk, tail)
        live = vm & (page_len(pages, seq, keep, gap, PS) > 0)
        key = _page_keys(_load_logits(logit_ptr, bh, v, vm, NPV, G, G_P), m, inv, live)
        tl.store(key_ptr + bh * NPV + v, key, mask=vm)  # only hsa_page_scores reads them back
        chosen = _top_in_registers(key, vm, k, CHUNK, W_REGS)
        if parts == 1:
            written = _write_chosen(idx, pages, chosen, tl.zeros([], tl.int32))
            tl.store(cnt_ptr + bh, _with_newest(idx, written, newest_ptr, b, NPV, HAS_NEWEST))
        else:
            # candidates: `per` slots a chunk (its chosen in page order, then absent keys)
            per = tl.minimum(k, CHUNK)
            cands = bh * tl.cdiv(NPV, CHUNK) * CHUNK
            mine = cands + part * per
            slot, taken = _chosen_slots(chosen, tl.zeros([], tl.int32))
            tl.store(cand_page_ptr + mine + slot, pages, mask=chosen)
            tl.store(cand_key_ptr + mine + slot, key, mask=chosen)
            tl.store(cand_key_ptr + mine + c, tl.full([CHUNK], -1, tl.int32), mask=(c >= taken) & (c < per))
            tl.debug_barrier()  # every thread's candidates are stored before the ticket is taken
            if tl.atomic_add(ticket_ptr + bh, 1, sem="acq_rel") == parts - 1:
                # the last chunk to finish: the top k of all chunks' candidates, which are in
                # page order (chunk by chunk), read past L1 (other SMs wrote them)
                total = parts * per
                ck = cand_key_ptr + cands
                cp = cand_page_ptr + cands
                if total <= CHUNK:
                    cm = c < total
                    key = tl.load(ck + c, mask=cm, other=-1, cache_modifier=".cg")
                    chosen = _top_in_registers(key, cm, k, CHUNK, W_REGS)
                    written = _write_chosen(idx, tl.load(cp + c, mask=cm, other=0, cache_modifier=".cg"), chosen,
                                            tl.zeros([], tl.int32))
                else:  # large k: radix passes over the candidates in memory
                    top_hist = _digit_hist(ck, total, tl.zeros([], tl.int32), 24, 31, CHUNK, False)
                    threshold = tl.zeros([], tl.int32)  # with k >= the live candidates: every one
                    shift = tl.zeros([], tl.int32)
                    take_equal = tl.zeros([], tl.int32) + total
                    if k < tl.sum(top_hist):
                        threshold, shift, take_equal = _radix_refine(ck, total, top_hist, k, CHUNK, False, W_MEMORY)
                    equal_seen = tl.zeros([], tl.int32)
                    written = tl.zeros([], tl.int32)
                    for v0 in range(0, total, CHUNK):
                        cm = v0 + c < total
                        key = tl.load(ck + v0 + c, mask=cm, other=-1, cache_modifier=".cg")
                        chosen, equal_seen = _chosen_by_key(key, cm & (key >= 0), threshold, shift, take_equal, equal_seen)
                        written = _write_chosen(idx, tl.load(cp + v0 + c, mask=cm, other=0, cache_modifier=".cg"),
                                                chosen, written)
                tl.store(cnt_ptr + bh, _with_newest(idx, written, newest_ptr, b, NPV, HAS_NEWEST))


def topk_chunk(group: int) -> int:
    """Pages per chunk of the top-k kernel: a chunk of the group's logits lives in registers
    (16 warps), so larger groups take smaller chunks (sm_90 compiles without spills)."""
    g = np2(group)
    return PAGE_CHUNK if g <= 4 else PAGE_CHUNK * 2 // g


def gather_tiers(head_dim: int, grouped: bool) -> tuple[tuple[int, int], ...]:
    """The logits kernel's few-channel paths, tried in order: (at most this many chosen
    channels, pages a tile); a request choosing more reads whole summary rows. Over row-major
    summaries one path, up to ~head_dim / 8 channels in tiles of 4 LOGIT_TILEs (repeated to
    fill the three slots). Over grouped summaries, where whole rows read slowest and few
    channels cheapest, three: ~head_dim / 16, / 8, / 4 channels in tiles of 8, 4, 1
    LOGIT_TILEs (the same registers). H100, 128K, B=8, groups of 1, r=8: 64-page tiles
    0.273 ms, 128-page 0.229; 32K, r=32: whole rows 0.247, gathered 0.174."""
    few = np2(max(1, head_dim // 8) + 1) // 2
    if not grouped:
        return ((few, 4 * LOGIT_TILE),) * 3
    return (max(1, few // 2), 8 * LOGIT_TILE), (few, 4 * LOGIT_TILE), (2 * few, LOGIT_TILE)


def gather_channels(head_dim: int, grouped: bool = False) -> int:
    """Requests choosing at most this many channels have the logits kernel read just those
    channels of each page summary (gather_tiers)."""
    return gather_tiers(head_dim, grouped)[-1][0]


@dataclass(frozen=True)
class SelectionShape:
    """What a page selection's launch depends on besides the number of requests."""

    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    layout: KVLayout
    num_pages: int  # logical pages the block tables address: their width * pages_per_block
    device: torch.device

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class SelectionPlan:
    """The host decisions of a page selection of `batch` requests and its scratch tensors:
    made once per step for every layer by the metadata builder (views of its workspace, so
    CUDA-graph replays keep their addresses), or per call by the kernels' direct callers."""

    shape: SelectionShape
    batch: int
    rows: int  # requests scored at once: their logits, keys and candidates fit SCRATCH_ELEMENTS
    splits: int  # logits programs per (request, KV head)
    tiers: tuple[tuple[int, int], ...]  # gather_tiers
    summary_channels: int
    pdl: bool
    cuda_topk: bool  # the CUDA C++ top-k (else Triton's); same result
    topk_chunk: int
    scratch: dict[str, torch.Tensor]

    def unlisted(self) -> PageSelection:
        """The plan's page lists, as hsa_select_pages returns them but not written: for a batch of
        EVERY_PAGE rows only, whose attention reads no list (no selection launched)."""
        return PageSelection(self.scratch["index"], self.scratch["count"])

    def check(self, query: torch.Tensor, kv_cache: torch.Tensor, layout: KVLayout, block_table: torch.Tensor) -> None:
        shape = self.shape
        if (query.shape != (self.batch, shape.num_heads, shape.head_dim) or kv_cache.shape[1] != shape.num_kv_heads
                or layout != shape.layout or block_table.shape[1] * layout.pages_per_block != shape.num_pages):
            raise ValueError(f"a page selection planned for {self.batch} x {shape} got query {tuple(query.shape)}, "
                             f"kv_cache {tuple(kv_cache.shape)}, {layout}, block table {tuple(block_table.shape)}")


def _scratch_shapes(shape: SelectionShape, batch: int, rows: int, splits: int, r_list: int,
                    chunk: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    hkv, num_pages, group = shape.num_kv_heads, shape.num_pages, shape.group
    g_p, block_d = group_pad(group), np2(shape.head_dim)
    candidates = triton.cdiv(num_pages, chunk) * chunk
    i32, f32 = torch.int32, torch.float32
    return {
        "index": ((batch, hkv, num_pages), i32),
        "count": ((batch, hkv), i32),
        "qm": ((rows, hkv, g_p, block_d), f32),
        "temp": ((rows, hkv, g_p), f32),
        "chan": ((rows, hkv, r_list), i32),
        "logits": ((rows, hkv, group, num_pages), f32),
        "stats": ((rows, hkv, splits, 2, np2(group)), f32),
        "keys": ((rows, hkv, num_pages), i32),
        "ticket": ((rows, hkv), i32),
        "cand_key": ((rows, hkv, candidates), i32),
        "cand_page": ((rows, hkv, candidates), i32),
    }


def _decisions(shape: SelectionShape, batch: int, splits: int | None, keep_keys: bool) -> dict:
    group, head_dim, hkv, device = shape.group, shape.head_dim, shape.num_kv_heads, shape.device
    num_tiles = triton.cdiv(shape.num_pages, LOGIT_TILE)
    gw = shape.layout.summary_channels(head_dim)
    tiers = gather_tiers(head_dim, grouped=gw < head_dim)
    r_list = tiers[-1][0]
    per_row = hkv * (shape.num_pages * (group + 3) + group_pad(group) * (np2(head_dim) + 1) + r_list)
    rows = batch if keep_keys else max(1, min(batch, SCRATCH_ELEMENTS // per_row))
    if splits is None:
        splits = triton.cdiv(LOGIT_PROGRAMS_PER_SM * num_sms(device), max(1, rows * hkv))
    # the top-k: CUDA C++ where the extension is built (a radix pass there is one shared-memory
    # histogram, not Triton's several block-wide reductions), else Triton; same result
    cuda_topk = device.type == "cuda" and cuda_ops.available()
    chunk = min(PAGE_CHUNK if cuda_topk else topk_chunk(group), np2(shape.num_pages))
    return dict(rows=rows, splits=max(1, min(int(splits), num_tiles)), tiers=tiers, summary_channels=gw,
                pdl=dependent_launch(device), cuda_topk=cuda_topk, topk_chunk=chunk)


def plan_selection(shape: SelectionShape, batch: int, *, splits: int | None = None, keep_keys: bool = False,
                   workspace: "SelectionWorkspace | None" = None) -> SelectionPlan:
    """The launch decisions for `batch` requests, with scratch from the workspace (else new)."""
    d = _decisions(shape, batch, splits, keep_keys)
    shapes = _scratch_shapes(shape, batch, d["rows"], d["splits"], d["tiers"][-1][0], d["topk_chunk"])
    if workspace is not None:
        scratch = workspace.views(shapes)
    else:
        scratch = {name: torch.empty(size, dtype=dtype, device=shape.device) for name, (size, dtype) in shapes.items()}
    return SelectionPlan(shape, batch, scratch=scratch, **d)


class SelectionWorkspace:
    """Scratch for the page selections of up to max_batch requests of one shape, allocated
    once (at most SCRATCH_ELEMENTS 4-byte elements plus the page lists, index[B, Hkv, pages]);
    every plan's tensors are views of it, reused by every layer (stream order keeps a layer's
    reads before the next layer's writes)."""

    ALIGN = 64  # elements between views (256-byte aligned starts)

    def __init__(self, shape: SelectionShape, max_batch: int) -> None:
        self.shape, self.max_batch = shape, max_batch
        need = {torch.int32: 0, torch.float32: 0}
        for batch in range(1, max_batch + 1):
            d = _decisions(shape, batch, None, False)
            sizes = self._sizes(_scratch_shapes(shape, batch, d["rows"], d["splits"], d["tiers"][-1][0], d["topk_chunk"]))
            for dtype in need:
                need[dtype] = max(need[dtype], sizes[dtype])
        self._buffers = {dtype: torch.empty(n, dtype=dtype, device=shape.device) for dtype, n in need.items()}

    @classmethod
    def _sizes(cls, shapes: dict) -> dict[torch.dtype, int]:
        sizes = {torch.int32: 0, torch.float32: 0}
        for size, dtype in shapes.values():
            sizes[dtype] += -(-math.prod(size) // cls.ALIGN) * cls.ALIGN
        return sizes

    def views(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
        offsets = {torch.int32: 0, torch.float32: 0}
        views = {}
        for name, (size, dtype) in shapes.items():
            n = math.prod(size)
            start = offsets[dtype]
            if start + n > self._buffers[dtype].numel():
                raise ValueError(f"the selection workspace of {self.max_batch} x {self.shape} is too small for {name} {size}")
            views[name] = self._buffers[dtype][start : start + n].view(size)
            offsets[dtype] = start + -(-n // self.ALIGN) * self.ALIGN
        return views

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


class SelectionPlanner:
    """Plans for every batch size up to max_batch over one workspace, each made once."""

    # the workspaces alive, by (shape, max_batch): the attention layers allocate theirs during
    # vLLM's memory profiling (so that it is counted before the KV pool is sized) and the metadata
    # builder, made later, plans over that same one
    _workspaces: "weakref.WeakValueDictionary[tuple, SelectionWorkspace]" = weakref.WeakValueDictionary()

    def __init__(self, shape: SelectionShape, max_batch: int) -> None:
        self.workspace = self.workspace_for(shape, max_batch)
        self._plans: dict[int, SelectionPlan] = {}

    @classmethod
    def workspace_for(cls, shape: SelectionShape, max_batch: int) -> SelectionWorkspace:
        """The live workspace of this shape and size, else a new one (held by its users: it is
        freed with the last of them)."""
        device = shape.device
        if device.type == "cuda" and device.index is None:  # (cuda and cuda:0 are one device)
            shape = replace(shape, device=torch.device("cuda", cuda_index(device)))
        key = (shape, max_batch)
        workspace = cls._workspaces.get(key)
        if workspace is None:
            workspace = cls._workspaces[key] = SelectionWorkspace(shape, max_batch)
        return workspace

    def __call__(self, batch: int) -> SelectionPlan:
        plan = self._plans.get(batch)
        if plan is None:
            plan = self._plans[batch] = plan_selection(self.workspace.shape, batch, workspace=self.workspace)
        return plan


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
    plan: SelectionPlan | None = None,
    newest_page: torch.Tensor | None = None,
) -> tuple[PageSelection, torch.Tensor | None]:
    check_cache(kv_cache, layout)
    group = check_group(query, kv_cache)
    batch, _, head_dim = query.shape
    device = query.device
    if plan is None:
        shape = SelectionShape(query.shape[1], kv_cache.shape[1], head_dim, layout,
                               block_table.shape[1] * layout.pages_per_block, device)
        plan = plan_selection(shape, batch, splits=splits, keep_keys=keep_keys)
    else:
        plan.check(query, kv_cache, layout, block_table)
    hkv, num_pages, rows, splits = kv_cache.shape[1], plan.shape.num_pages, plan.rows, plan.splits
    g_p, block_d = group_pad(group), np2(head_dim)
    ps, ppb = layout.page_size, layout.pages_per_block
    (r_few, t_few), (r_mid, t_mid), (r_list, t_wide) = plan.tiers
    pdl = plan.pdl
    query = contiguous_last(query)
    bt = contiguous_last(block_table)
    seq, kp, ge = (per_request(t, batch, device) for t in (seq_lens, keep, gap_end))
    r = per_request(top_channels, batch, device)
    k = per_request(top_pages, batch, device)
    newest = per_request(newest_page, batch, device) if newest_page is not None else None
    sc = plan.scratch
    index, count, qm, temp, chan, logits, stats, keys, ticket = (
        sc[name] for name in ("index", "count", "qm", "temp", "chan", "logits", "stats", "keys", "ticket"))
    candidates = (sc["cand_key"], sc["cand_page"])
    for r0 in range(0, batch, rows):
        n = min(batch, r0 + rows) - r0
        if n == batch:  # (most steps: one group, no slicing)
            q_p, bt_p, seq_p, kp_p, ge_p, k_p, r_p, index_p, count_p = query, bt, seq, kp, ge, k, r, index, count
            newest_p = newest
        else:
            part = slice(r0, r0 + n)
            q_p, bt_p, seq_p, kp_p, ge_p, k_p, r_p, index_p, count_p = (
                t[part] for t in (query, bt, seq, kp, ge, k, r, index, count))
            newest_p = newest[part] if newest is not None else None
        _hsa_prep_kernel[(n, hkv)](
            q_p, r_p, qm, temp, chan, ticket, query.stride(0), query.stride(1), group, head_dim,
            G_P=g_p, BLOCK_D=block_d, R_LIST=r_list, PDL=pdl, num_warps=4,
        )
        _hsa_logits_kernel[(n, hkv, splits)](
            kv_cache, bt_p, seq_p, kp_p, ge_p, k_p, r_p, chan, qm, temp, logits, stats,
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), bt.stride(0),
            head_dim, num_pages,
            G=group, BS=layout.block_size, PS=ps, PPB=ppb, G_P=g_p, G_S=np2(group), BLOCK_D=block_d,
            GW=plan.summary_channels, TILE=LOGIT_TILE, R0=r_few, T0=t_few, R1=r_mid, T1=t_mid, R2=r_list, T2=t_wide,
            PDL=pdl, num_warps=4, launch_pdl=pdl,
            # the tiers' branches would take it to 99 registers (groups of 1): 4 programs an
            # SM instead of 5. sm_90 compiles 96 without spills up to head_dim 128 and groups
            # of 8 query heads (tests/test_kernels_compile.py), not beyond
            maxnreg=LOGIT_MAX_REGISTERS if block_d <= 128 and np2(group) <= 8 else None,
        )
        if plan.cuda_topk:
            cuda_ops.top_pages_from_logits(logits, stats, seq_p, kp_p, ge_p, k_p, ps, index_p, count_p, keys, ticket,
                                           chunk=plan.topk_chunk, candidates=candidates, newest_page=newest_p, pdl=pdl)
        else:
            top_pages_from_logits(logits, stats, seq_p, kp_p, ge_p, k_p, ps, index_p, count_p, keys, ticket,
                                  candidates=candidates, newest_page=newest_p)
    return PageSelection(index, count), keys if keep_keys else None


def top_pages_from_logits(
    logits: torch.Tensor,
    stats: torch.Tensor,
    seq: torch.Tensor,
    keep: torch.Tensor,
    gap_end: torch.Tensor,
    top_pages: torch.Tensor,
    page_size: int,
    index: torch.Tensor,
    count: torch.Tensor,
    keys: torch.Tensor,
    ticket: torch.Tensor | None = None,
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
    newest_page: torch.Tensor | None = None,
) -> None:
    """The top-k kernel alone (also what benchmarks/bench_topk.py times): from the page
    logits [>= B, Hkv, G, P] of B requests and their softmax statistics in parts
    [>= B, Hkv, parts, 2, np2(G)] (each part's max and sum of exp per query head; the logits
    kernel writes one part per program), their chosen pages into index [B, Hkv, P] and
    count [B, Hkv], each list followed by newest_page[b] where given and >= 0; keys
    [>= B, Hkv, P] is scratch (the page scores, as int32 keys), ticket [>= B, Hkv] zeros (the
    chunks' arrival counters; made here when not given), candidates the chunks' candidate
    keys and pages (topk_scratch; made here when not given)."""
    batch, hkv = index.shape[:2]
    group, num_pages = logits.shape[2:]
    chunk = min(topk_chunk(group), np2(num_pages))
    cand_key, cand_page, ticket = topk_scratch(index, chunk, ticket, candidates)
    _hsa_topk_kernel[(batch, hkv, triton.cdiv(num_pages, chunk))](
        seq, keep, gap_end, top_pages, logits, stats, keys, cand_key, cand_page, ticket, index, count,
        top_pages if newest_page is None else newest_page, num_pages, stats.shape[2],
        G=group, PS=page_size, G_P=np2(group), CHUNK=chunk, NS_P=np2(stats.shape[2]),
        W_REGS=RADIX_BITS_REGISTERS, W_MEMORY=RADIX_BITS_MEMORY, EVERY=EVERY_PAGE, HAS_NEWEST=newest_page is not None,
        num_warps=16,  # a 4096-page chunk of a group's logits stays in registers
    )


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
    newest_page: torch.Tensor | None = None,
    splits: int | None = None,
    plan: SelectionPlan | None = None,
) -> PageSelection:
    """HSA over the paged cache: per request and KV head, the top_pages live pages with the
    highest approximate attention (all live pages when top_pages covers them, none when
    top_pages is 0 or EVERY_PAGE: see paged_sparse_attention's top_pages), then
    newest_page[b] (ops.newest_page; -1: none) appended to each list (by the top-k kernel).

    No host synchronisation; shapes depend only on the batch and the block table width.
    plan: plan_selection's for this batch (its scratch and launch decisions), else one is
    made here; `splits` is then ignored.
    """
    selection, _ = _launch(query, kv_cache, layout, block_table, seq_lens, keep, gap_end, top_channels, top_pages, splits,
                           plan=plan, newest_page=newest_page)
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
