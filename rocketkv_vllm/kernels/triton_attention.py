"""Split-K paged sparse attention (flash decoding) over chosen pages, Triton.

Grid (B, Hkv, S): the S programs of a (request, KV head) split that head's chosen pages
evenly at run time, at least MIN_ITERS_PER_SPLIT chunks each (a split's fixed cost is
then amortised: fewer splits of a small budget, all S of a long dense row), so the grid
depends on the batch size only (CUDA graphs) and work is balanced whatever each request's
budget. Rows whose top_pages is EVERY_PAGE (dense decode rows) enumerate their live pages
in place of reading a page list. All query heads of the GQA group share each K/V read.
The next chunk's page and block numbers are loaded one iteration ahead, so the K/V loads
never wait on the two dependent index loads. A reduce kernel (one program per query head)
then combines the splits; splits left empty write only their (empty) statistics.
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
    live_tokens,
    logical_page,
    lowp_dot,
    np2,
    num_sms,
    pages_in_table,
    per_request,
    virtual_pages,
)
from rocketkv_vllm.kv_layout import KVLayout
from rocketkv_vllm.ops.reference import EVERY_PAGE

REDUCE_SPLIT_CHUNK = 32  # splits the reduce kernel combines per step, with independent loads
# Split count: ATTN_PROGRAMS_PER_SM programs an SM, at most ATTN_MAX_SPLITS per (request, KV
# head) (H200, 12.5K kept tokens at B=3: 16 splits 1.94 ms, 22 splits 2.31 ms; H100, dense rows
# of 9.4K and 16K kept tokens at B=8: 18 splits 8-10% faster than 9, benchmarks/results/h100_s20/
# dense_sweep.json), unless that leaves SMs without a program (B=1 with 8 KV heads): then up to
# ATTN_MAX_SPLITS_FEW_ROWS (H200, 12.5K kept tokens at B=1: 16 splits 1.50 ms, 64 splits 0.93
# ms). Each split takes at least MIN_ITERS_PER_SPLIT chunks, so HSA's ~1K chosen tokens at a 2K
# budget use at most 8 splits whatever the count, the rest exiting at once.
ATTN_PROGRAMS_PER_SM, ATTN_MAX_SPLITS, ATTN_MAX_SPLITS_FEW_ROWS, MIN_ITERS_PER_SPLIT = 8, 16, 64, 2


@triton.jit
def _chunk_rows(pidx_ptr, bt_ptr, j, end, off, seq, keep, gap, every, nk, tail, h, s_cb, s_ch, s_cr,
                BS: tl.constexpr, PS: tl.constexpr):
    """Cache row offsets and liveness of the tokens of chosen entries j [TOK]: entries of the
    page list, or (every) the row's virtual pages."""
    jm = j < end
    listed = tl.load(pidx_ptr + j, mask=jm & ~every, other=-1)
    page = tl.where(every & jm, logical_page(j, nk, tail), listed).to(tl.int64)
    pos = page * PS + off
    live = jm & (page >= 0) & live_tokens(pos, seq, keep, gap)
    blk = tl.load(bt_ptr + pos // BS, mask=live, other=0).to(tl.int64)
    return blk * s_cb + h * s_ch + (pos % BS) * s_cr, live


@triton.jit
def _sparse_attn_split_kernel(
    q_ptr, kv_ptr, bt_ptr, pidx_ptr, cnt_ptr, seq_ptr, keep_ptr, gap_ptr, k_ptr,
    acc_ptr, m_ptr, l_ptr,
    scale,
    s_qb, s_qh,
    s_cb, s_ch, s_cr, s_bt,
    s_pb, s_ph,
    G, D, W, NPV,
    BS: tl.constexpr, PS: tl.constexpr,
    G_P: tl.constexpr, BLOCK_D: tl.constexpr, TOK: tl.constexpr,
    LOWP: tl.constexpr, HAS_K: tl.constexpr, EVERY: tl.constexpr, MIN_ITERS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    nh = tl.num_programs(1).to(tl.int64)
    ns = tl.num_programs(2)
    g = tl.arange(0, G_P)
    d = tl.arange(0, BLOCK_D)
    gm = g < G
    dm = d < D
    PPI: tl.constexpr = TOK // PS  # chosen pages per iteration
    seq = tl.load(seq_ptr + b)
    keep = tl.load(keep_ptr + b)
    gap = tl.load(gap_ptr + b)
    nk, tail, n = virtual_pages(seq, keep, gap, PS)
    if HAS_K:
        every = tl.load(k_ptr + b) == EVERY
    else:
        every = tl.full([], 0, tl.int1)
    if every:
        count = pages_in_table(n, nk, tail, NPV)
    else:
        count = tl.minimum(tl.load(cnt_ptr + b * nh + h), W)
    per_split = tl.maximum(tl.cdiv(tl.cdiv(count, ns), PPI), MIN_ITERS) * PPI
    start = sp * per_split
    end = tl.minimum(start + per_split, count)
    m = tl.full([G_P], float("-inf"), tl.float32)
    l = tl.zeros([G_P], tl.float32)
    acc = tl.zeros([G_P, BLOCK_D], tl.float32)
    if start < end:
        q = tl.load(q_ptr + b * s_qb + (h * G + g)[:, None] * s_qh + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
        if LOWP:
            q = q.to(kv_ptr.dtype.element_ty)
        else:
            q = q.to(tl.float32)
        tok = tl.arange(0, TOK)
        ent = tok // PS
        off = tok % PS
        pidx = pidx_ptr + b * s_pb + h * s_ph
        bt = bt_ptr + b * s_bt
        row, live = _chunk_rows(pidx, bt, start + ent, end, off, seq, keep, gap, every, nk, tail, h, s_cb, s_ch, s_cr,
                                BS, PS)
        for j0 in range(start, end, PPI):
            lm = live[:, None] & dm[None, :]
            k = tl.load(kv_ptr + row[:, None] + d[None, :], mask=lm, other=0.0)
            v = tl.load(kv_ptr + row[:, None] + BS * s_cr + d[None, :], mask=lm, other=0.0)
            cur_live = live
            row, live = _chunk_rows(pidx, bt, j0 + PPI + ent, end, off, seq, keep, gap, every, nk, tail, h, s_cb, s_ch,
                                    s_cr, BS, PS)
            if LOWP:
                s = tl.dot(q, tl.trans(k))
            else:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            s = tl.where(cur_live[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            if LOWP:
                pv = tl.dot(p.to(kv_ptr.dtype.element_ty), v)
            else:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            acc = acc * alpha[:, None] + pv
            m = m_new
    base = ((b * nh + h) * ns + sp) * G_P + g
    tl.store(m_ptr + base, m, mask=gm)
    tl.store(l_ptr + base, l, mask=gm)
    # (an empty split's accumulator is never read: the reduce skips splits with m = -inf)
    tl.store(acc_ptr + base[:, None] * BLOCK_D + d[None, :], acc, mask=gm[:, None] & (start < end))


@triton.jit
def _sparse_attn_reduce_kernel(
    acc_ptr, m_ptr, l_ptr, out_ptr,
    s_ob, s_oh,
    G, D, NSPLIT,
    G_P: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
):
    # one program per query head; its splits are combined SPLIT_CHUNK at a time with
    # independent loads (a split-by-split loop is a chain of dependent loads: 13 us at
    # 33 splits on the H100)
    b = tl.program_id(0).to(tl.int64)
    qh = tl.program_id(1).to(tl.int64)
    nh = tl.num_programs(1).to(tl.int64) // G
    h = qh // G
    g = qh % G
    sc = tl.arange(0, SPLIT_CHUNK)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, NSPLIT, SPLIT_CHUNK):
        sm = (s0 + sc) < NSPLIT
        base = ((b * nh + h) * NSPLIT + s0 + sc) * G_P + g
        ms = tl.load(m_ptr + base, mask=sm, other=float("-inf"))
        ls = tl.load(l_ptr + base, mask=sm, other=0.0)
        a = tl.load(acc_ptr + base[:, None] * BLOCK_D + d[None, :], mask=(sm & (ms > float("-inf")))[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(ms, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        beta = tl.exp(ms - m_safe)
        l = l * alpha + tl.sum(ls * beta, axis=0)
        acc = acc * alpha + tl.sum(a * beta[:, None], axis=0)
        m = m_new
    out = tl.where(l > 0, acc / tl.where(l > 0, l, 1.0), 0.0)
    tl.store(out_ptr + b * s_ob + qh * s_oh + d, out.to(out_ptr.dtype.element_ty), mask=dm)


def default_splits(rows: int, sms: int) -> int:
    """Split-K programs per (request, KV head) for `rows` (request, KV head) pairs."""
    cap = ATTN_MAX_SPLITS if rows * ATTN_MAX_SPLITS >= sms else ATTN_MAX_SPLITS_FEW_ROWS
    return min(cap, triton.cdiv(ATTN_PROGRAMS_PER_SM * sms, rows))


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
    *,
    num_splits: int | None = None,
    tokens_per_iter: int | None = None,
    out: torch.Tensor | None = None,
    top_pages: torch.Tensor | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Exact attention over the live tokens of the chosen pages page_index[b, h, :page_count[b, h]]
    (-1 entries are skipped), or of every live page for rows whose top_pages (the [B] budgets
    given to hsa_select_pages) is EVERY_PAGE: [B, Hq, D] in query's dtype, written into `out`
    when given. num_splits, tokens_per_iter, num_warps, num_stages: the split kernel's launch
    (benchmarks/sweep_dense_attention.py tunes them)."""
    check_cache(kv_cache, layout)
    group = check_group(query, kv_cache)
    batch, num_q_heads, head_dim = query.shape
    hkv = kv_cache.shape[1]
    device = query.device
    if out is None:
        out = torch.empty(batch, num_q_heads, head_dim, dtype=query.dtype, device=device)
    elif out.shape != query.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(query.shape)} and contiguous in head_dim, got {tuple(out.shape)}")
    if batch == 0:
        return out
    ps = layout.page_size
    g_p, block_d = group_pad(group), np2(head_dim)
    if tokens_per_iter is None:
        tokens_per_iter = 64 if head_dim <= 128 else 32
    tok = max(16, ps, np2(tokens_per_iter))
    if num_splits is None:
        num_splits = default_splits(batch * hkv, num_sms(device))
    num_splits = max(1, int(num_splits))
    query = contiguous_last(query)
    pidx = contiguous_last(page_index)
    bt = contiguous_last(block_table)
    seq, kp, ge = (per_request(t, batch, device) for t in (seq_lens, keep, gap_end))
    count = page_count.to(device=device, dtype=torch.int32).contiguous()
    k = per_request(top_pages, batch, device) if top_pages is not None else count  # (unread without top_pages)
    lowp = lowp_dot(query, kv_cache)

    acc = torch.empty(batch, hkv, num_splits, g_p, block_d, dtype=torch.float32, device=device)
    m = torch.empty(batch, hkv, num_splits, g_p, dtype=torch.float32, device=device)
    l = torch.empty_like(m)
    _sparse_attn_split_kernel[(batch, hkv, num_splits)](
        query, kv_cache, bt, pidx, count, seq, kp, ge, k, acc, m, l,
        float(scale),
        query.stride(0), query.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), bt.stride(0),
        pidx.stride(0), pidx.stride(1),
        group, head_dim, pidx.shape[-1], bt.shape[1] * layout.pages_per_block,
        BS=layout.block_size, PS=ps, G_P=g_p, BLOCK_D=block_d, TOK=tok, LOWP=lowp,
        HAS_K=top_pages is not None, EVERY=EVERY_PAGE, MIN_ITERS=MIN_ITERS_PER_SPLIT,
        num_warps=num_warps, num_stages=num_stages,
    )
    _sparse_attn_reduce_kernel[(batch, num_q_heads)](
        acc, m, l, out, out.stride(0), out.stride(1), group, head_dim, num_splits,
        G_P=g_p, BLOCK_D=block_d, SPLIT_CHUNK=min(REDUCE_SPLIT_CHUNK, np2(num_splits)), num_warps=4,
    )
    return out
