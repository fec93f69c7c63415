"""SnapKV++ on GPU (stage 1), Triton: observation-window scores without an S x S matrix, and
in-place compaction of the kept tokens with their page summaries."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rocketkv_vllm.algorithms.snapkv import check_window_shapes
from rocketkv_vllm.kernels.triton_common import check_cache, lowp_dot, np2, num_sms, summary_at
from rocketkv_vllm.kv_layout import KVLayout


@triton.jit
def _window_stats_kernel(
    q_ptr, k_ptr, m_ptr, l_ptr,
    scale,
    s_qw, s_qh, s_kl, s_kh,
    W, L, G, D, CHUNK,
    BW: tl.constexpr, BL: tl.constexpr, BLOCK_D: tl.constexpr, LOWP: tl.constexpr,
):
    # pass 1: per (query head, window row, key chunk) causal softmax max and normaliser
    hq = tl.program_id(0).to(tl.int64)
    wt = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2).to(tl.int64)
    nsp = tl.num_programs(2).to(tl.int64)
    hk = hq // G
    w = wt * BW + tl.arange(0, BW)
    wm = w < W
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(q_ptr + w[:, None] * s_qw + hq * s_qh + d[None, :], mask=wm[:, None] & dm[None, :], other=0.0)
    if not LOWP:
        q = q.to(tl.float32)
    qpos = L - W + w
    m = tl.full([BW], float("-inf"), tl.float32)
    s = tl.zeros([BW], tl.float32)
    hi = tl.minimum(tl.minimum(L, L - W + wt * BW + BW), (sp + 1) * CHUNK)
    for l0 in range(sp * CHUNK, hi, BL):
        lpos = l0 + tl.arange(0, BL)
        lm = lpos < L
        k = tl.load(k_ptr + lpos[:, None] * s_kl + hk * s_kh + d[None, :], mask=lm[:, None] & dm[None, :], other=0.0)
        if LOWP:
            x = tl.dot(q, tl.trans(k.to(q.dtype)))
        else:
            x = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        vis = (lpos[None, :] <= qpos[:, None]) & lm[None, :]
        x = tl.where(vis, x * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
    tl.store(m_ptr + (hq * nsp + sp) * W + w, m, mask=wm)
    tl.store(l_ptr + (hq * nsp + sp) * W + w, s, mask=wm)


@triton.jit
def _window_accum_kernel(
    q_ptr, k_ptr, m_ptr, l_ptr, out_ptr,
    scale,
    s_qw, s_qh, s_kl, s_kh,
    W, L, G, D,
    BW: tl.constexpr, BL: tl.constexpr, BLOCK_D: tl.constexpr, LOWP: tl.constexpr,
):
    # pass 2: per (KV head, key tile) sum of probabilities over the group and the window
    hk = tl.program_id(0).to(tl.int64)
    lt = tl.program_id(1).to(tl.int64)
    lpos = lt * BL + tl.arange(0, BL)
    lm = lpos < L
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    k = tl.load(k_ptr + lpos[:, None] * s_kl + hk * s_kh + d[None, :], mask=lm[:, None] & dm[None, :], other=0.0)
    if not LOWP:
        k = k.to(tl.float32)
    total = tl.zeros([BL], tl.float32)
    # first window row that can see this tile: qpos = L - W + w >= lt * BL
    w_first = tl.maximum(lt * BL - (L - W), 0)
    w_start = (w_first // BW) * BW
    for gi in range(0, G):
        hq = hk * G + gi
        for w0 in range(w_start, W, BW):
            w = w0 + tl.arange(0, BW)
            wm = w < W
            q = tl.load(q_ptr + w[:, None] * s_qw + hq * s_qh + d[None, :], mask=wm[:, None] & dm[None, :], other=0.0)
            if LOWP:
                x = tl.dot(q.to(k.dtype), tl.trans(k))
            else:
                x = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
            mrow = tl.load(m_ptr + hq * W + w, mask=wm, other=0.0)
            lrow = tl.load(l_ptr + hq * W + w, mask=wm, other=1.0)
            qpos = L - W + w
            vis = (lpos[None, :] <= qpos[:, None]) & lm[None, :] & wm[:, None]
            p = tl.exp(x * scale - mrow[:, None]) / lrow[:, None]
            total += tl.sum(tl.where(vis, p, 0.0), axis=0)
    tl.store(out_ptr + hk * L + lpos, total, mask=lm)


def snapkv_window_scores(
    window_queries: torch.Tensor,
    keys: torch.Tensor,
    prompt_len: int,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Same as algorithms.snapkv.window_scores: [Hkv, prompt_len] float32.

    Two passes (row max/normaliser, then accumulation per key tile); nothing larger than
    the [W, prompt_len] statistics is materialised.
    """
    w, group, head_dim = check_window_shapes(window_queries, keys, prompt_len)
    num_kv_heads, num_q_heads = keys.shape[1], window_queries.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    device = keys.device
    q = window_queries if window_queries.stride(-1) == 1 else window_queries.contiguous()
    k = keys if keys.stride(-1) == 1 else keys.contiguous()
    lowp = lowp_dot(q, k)
    block_d = np2(head_dim)
    bw = max(16, min(64, np2(w)))
    bl = 64 if block_d <= 64 else 32
    if device.type != "cuda":
        bl = 32
    w_tiles = triton.cdiv(w, bw)
    if num_splits is None:
        num_splits = triton.cdiv(2 * num_sms(device), num_q_heads * w_tiles)
    num_splits = max(1, min(int(num_splits), triton.cdiv(prompt_len, bl)))
    chunk = triton.cdiv(triton.cdiv(prompt_len, num_splits), bl) * bl
    num_splits = triton.cdiv(prompt_len, chunk)
    m_part = torch.empty(num_q_heads, num_splits, w, dtype=torch.float32, device=device)
    l_part = torch.empty_like(m_part)
    _window_stats_kernel[(num_q_heads, w_tiles, num_splits)](
        q, k, m_part, l_part, float(scale), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        w, prompt_len, group, head_dim, chunk, BW=bw, BL=bl, BLOCK_D=block_d, LOWP=lowp, num_warps=4,
    )
    # combine the key chunks (split 0 always sees key 0, so m is finite)
    m = m_part.amax(dim=1)
    lsum = (l_part * torch.exp(m_part - m[:, None, :])).sum(dim=1)
    m, lsum = m.contiguous(), lsum.contiguous()
    out = torch.empty(num_kv_heads, prompt_len, dtype=torch.float32, device=device)
    _window_accum_kernel[(num_kv_heads, triton.cdiv(prompt_len, bl))](
        q, k, m, lsum, out, float(scale), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        w, prompt_len, group, head_dim, BW=bw, BL=bl, BLOCK_D=block_d, LOWP=lowp, num_warps=4,
    )
    return out


@triton.jit
def _compact_gather_kernel(
    kv_ptr, row_ptr, kept_ptr, tmp_ptr,
    s_cb, s_ch, s_cr, s_kh,
    KEEP, D,
    BS: tl.constexpr, BT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # copy the kept tokens' K/V to a scratch buffer (sources and destinations overlap)
    h = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64) * BT + tl.arange(0, BT)
    tm = t < KEEP
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    pos = tl.load(kept_ptr + h * s_kh + t, mask=tm, other=0).to(tl.int64)
    blk = tl.load(row_ptr + pos // BS, mask=tm, other=0).to(tl.int64)
    row = blk * s_cb + h * s_ch + (pos % BS) * s_cr
    lm = tm[:, None] & dm[None, :]
    k = tl.load(kv_ptr + row[:, None] + d[None, :], mask=lm)
    v = tl.load(kv_ptr + row[:, None] + BS * s_cr + d[None, :], mask=lm)
    dst = ((h * KEEP + t) * 2)[:, None] * BLOCK_D + d[None, :]
    tl.store(tmp_ptr + dst, k, mask=lm)
    tl.store(tmp_ptr + dst + BLOCK_D, v, mask=lm)


@triton.jit
def _compact_scatter_kernel(
    kv_ptr, row_ptr, tmp_ptr,
    s_cb, s_ch, s_cr,
    KEEP, D,
    BS: tl.constexpr, PS: tl.constexpr, PPB: tl.constexpr, GW: tl.constexpr,
    NPT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # write kept tokens to positions [0, keep) and the summaries of their pages; a tile
    # holds NPT whole pages, so every page summary is computed by one program
    h = tl.program_id(0).to(tl.int64)
    pt = tl.program_id(1).to(tl.int64)
    tok = tl.arange(0, NPT * PS)
    t = pt * NPT * PS + tok
    tm = t < KEEP
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    lm = tm[:, None] & dm[None, :]
    src = ((h * KEEP + t) * 2)[:, None] * BLOCK_D + d[None, :]
    k = tl.load(tmp_ptr + src, mask=lm)
    v = tl.load(tmp_ptr + src + BLOCK_D, mask=lm)
    blk = tl.load(row_ptr + t // BS, mask=tm, other=0).to(tl.int64)
    row = blk * s_cb + h * s_ch + (t % BS) * s_cr
    tl.store(kv_ptr + row[:, None] + d[None, :], k, mask=lm)
    tl.store(kv_ptr + row[:, None] + BS * s_cr + d[None, :], v, mask=lm)
    kf = k.to(tl.float32)
    kmax = tl.max(tl.reshape(tl.where(tm[:, None], kf, float("-inf")), (NPT, PS, BLOCK_D)), axis=1)
    kmin = tl.min(tl.reshape(tl.where(tm[:, None], kf, float("inf")), (NPT, PS, BLOCK_D)), axis=1)
    page = pt * NPT + tl.arange(0, NPT)
    pm = page * PS < KEEP
    pblk = tl.load(row_ptr + page // PPB, mask=pm, other=0).to(tl.int64)
    at = (pblk * s_cb + h * s_ch + 2 * BS * s_cr)[:, None] + summary_at((page % PPB)[:, None], d[None, :], PPB, GW)
    sm = pm[:, None] & dm[None, :]
    tl.store(kv_ptr + at, kmax.to(kv_ptr.dtype.element_ty), mask=sm)
    tl.store(kv_ptr + at + PPB * GW, kmin.to(kv_ptr.dtype.element_ty), mask=sm)


@triton.jit
def _clear_pages_kernel(
    kv_ptr, row_ptr, P0, P1,
    s_cb, s_ch, s_cr, D,
    BS: tl.constexpr, PPB: tl.constexpr, GW: tl.constexpr, NP_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    page = P0 + tl.arange(0, NP_P)
    pm = page < P1
    d = tl.arange(0, BLOCK_D)
    sm = pm[:, None] & (d < D)[None, :]
    blk = tl.load(row_ptr + page // PPB, mask=pm, other=0).to(tl.int64)
    at = (blk * s_cb + h * s_ch + 2 * BS * s_cr)[:, None] + summary_at((page % PPB)[:, None], d[None, :], PPB, GW)
    ninf = tl.full([NP_P, BLOCK_D], float("-inf"), tl.float32)
    tl.store(kv_ptr + at, ninf.to(kv_ptr.dtype.element_ty), mask=sm)
    tl.store(kv_ptr + at + PPB * GW, (-ninf).to(kv_ptr.dtype.element_ty), mask=sm)


def compact_kept_tokens(
    kv_cache: torch.Tensor,
    layout: KVLayout,
    block_row: torch.Tensor,
    kept: torch.Tensor,
    prompt_len: int,
) -> None:
    """Stage-1 eviction for one request (same semantics as the reference)."""
    check_cache(kv_cache, layout)
    num_kv_heads, keep = kept.shape
    if keep >= prompt_len or keep == 0:
        return
    bs, ps, ppb = layout.block_size, layout.page_size, layout.pages_per_block
    head_dim = kv_cache.shape[-1]
    block_d = np2(head_dim)
    gw = layout.summary_channels(head_dim)
    device = kv_cache.device
    row = block_row if block_row.stride(-1) == 1 else block_row.contiguous()
    kept_c = kept if kept.stride(-1) == 1 else kept.contiguous()
    tmp = torch.empty(num_kv_heads, keep, 2, block_d, dtype=kv_cache.dtype, device=device)
    bt = 32
    _compact_gather_kernel[(num_kv_heads, triton.cdiv(keep, bt))](
        kv_cache, row, kept_c, tmp,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kept_c.stride(0),
        keep, head_dim, BS=bs, BT=bt, BLOCK_D=block_d, num_warps=4,
    )
    npt = max(1, 32 // ps)
    num_kept_pages = -(-keep // ps)
    _compact_scatter_kernel[(num_kv_heads, triton.cdiv(num_kept_pages, npt))](
        kv_cache, row, tmp,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        keep, head_dim, BS=bs, PS=ps, PPB=ppb, GW=gw, NPT=npt, BLOCK_D=block_d, num_warps=4,
    )
    if prompt_len % bs:
        tail_start = (prompt_len // ps) * ps
        tail_end = (prompt_len // bs + 1) * bs
        p0 = max(tail_start // ps, num_kept_pages)
        p1 = tail_end // ps
        if p1 > p0:
            _clear_pages_kernel[(num_kv_heads,)](
                kv_cache, row, p0, p1,
                kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), head_dim,
                BS=bs, PPB=ppb, GW=gw, NP_P=np2(p1 - p0), BLOCK_D=block_d, num_warps=1,
            )
