"""Triton kernels for RocketKV's paged-cache operations.

Same signatures and semantics as rocketkv_vllm.ops.reference (the oracle). Everything
stays on device without host synchronisation (no .item(), .tolist(), nonzero or
data-dependent shapes) as long as the host-known bounds are passed
(hsa_select_pages(max_top_pages=...)); that path is CUDA-graph capturable.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1 must be set
before this module is imported).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rocketkv_vllm.algorithms.snapkv import check_window_shapes
from rocketkv_vllm.kv_layout import KVLayout

__all__ = [
    "write_kv",
    "hsa_select_pages",
    "paged_sparse_attention",
    "snapkv_window_scores",
    "compact_kept_tokens",
]

_NEG_INF = float("-inf")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _lowp_dot(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Feed tl.dot 16-bit operands (fp32 accumulation) when both tensors are the same
    fp16/bf16 dtype. The Triton interpreter's bf16 dot is broken (3.6), so it gets fp32."""
    if a.dtype != b.dtype or a.dtype not in (torch.float16, torch.bfloat16):
        return False
    return not (_interpreting() and a.dtype == torch.bfloat16)


def _np2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


def _group_pad(group: int) -> int:
    # tl.dot needs every dimension >= 16
    return max(16, _np2(group))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _per_request(value, batch: int, device: torch.device) -> torch.Tensor:
    """[B] int32 on device without host sync (python ints become a fill kernel)."""
    if isinstance(value, torch.Tensor):
        t = value.to(device=device, dtype=torch.int32)
        return t.expand(batch).contiguous() if t.dim() == 0 or t.numel() == 1 else t.contiguous()
    return torch.full((batch,), int(value), dtype=torch.int32, device=device)


def _check_cache(kv_cache: torch.Tensor, layout: KVLayout) -> None:
    if kv_cache.dim() != 4 or kv_cache.shape[2] != layout.rows_per_block:
        raise ValueError(f"kv_cache shape {tuple(kv_cache.shape)} does not match layout {layout}")
    if kv_cache.stride(3) != 1:
        raise ValueError("kv_cache must be contiguous in head_dim")


# ---------------------------------------------------------------------------------------
# write_kv: KV store fused with the page max/min update
# ---------------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(
    kv_ptr, key_ptr, val_ptr, slot_ptr, order_ptr,
    T,
    s_cb, s_ch, s_cr,
    s_kt, s_kh, s_vt, s_vh,
    D,
    BS: tl.constexpr, PS: tl.constexpr, PPB: tl.constexpr,
    BLOCK_D: tl.constexpr, USE_ORDER: tl.constexpr,
):
    # One program per (token, KV head). Every program stores its token's K/V; the first
    # token of each run of same-page tokens (in slot_mapping order, or in `order` when
    # given) also folds the whole run into the page summary, so each page touched is
    # updated by exactly one program (deterministic, no atomics).
    i = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    if USE_ORDER:
        t = tl.load(order_ptr + i).to(tl.int64)
    else:
        t = i.to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // BS
        off = slot % BS
        base = kv_ptr + blk * s_cb + h * s_ch
        k = tl.load(key_ptr + t * s_kt + h * s_kh + d, mask=dm, other=0.0)
        v = tl.load(val_ptr + t * s_vt + h * s_vh + d, mask=dm, other=0.0)
        tl.store(base + off * s_cr + d, k.to(kv_ptr.dtype.element_ty), mask=dm)
        tl.store(base + (BS + off) * s_cr + d, v.to(kv_ptr.dtype.element_ty), mask=dm)

        page = slot // PS
        # leader: previous token (in processing order) is not on the same page
        if USE_ORDER:
            tp = tl.load(order_ptr + tl.maximum(i - 1, 0), mask=i > 0, other=0).to(tl.int64)
        else:
            tp = tl.maximum(t - 1, 0)
        prev = tl.load(slot_ptr + tp, mask=i > 0, other=-1).to(tl.int64)
        prev_page = tl.where(prev >= 0, prev // PS, -1)
        if (i == 0) | (prev < 0) | (prev_page != page):
            kf = k.to(tl.float32)
            kmax = kf
            kmin = kf
            restart = (off % PS) == 0
            run = i >= 0  # scalar True
            for j in tl.static_range(1, PS):
                nxt = i + j
                ok = run & (nxt < T)
                if USE_ORDER:
                    tn = tl.load(order_ptr + nxt, mask=ok, other=0).to(tl.int64)
                else:
                    tn = nxt.to(tl.int64)
                s2 = tl.load(slot_ptr + tn, mask=ok, other=-1).to(tl.int64)
                run = ok & (s2 >= 0) & (tl.where(s2 >= 0, s2 // PS, -1) == page)
                k2 = tl.load(key_ptr + tn * s_kt + h * s_kh + d, mask=dm & run, other=0.0).to(tl.float32)
                kmax = tl.where(run, tl.maximum(kmax, k2), kmax)
                kmin = tl.where(run, tl.minimum(kmin, k2), kmin)
                restart = restart | (run & ((s2 % PS) == 0))
            prow = 2 * BS + (page % PPB)
            pmax_ptr = base + prow * s_cr + d
            pmin_ptr = base + (prow + PPB) * s_cr + d
            keep_old = restart == 0
            old_max = tl.load(pmax_ptr, mask=dm & keep_old, other=0.0).to(tl.float32)
            old_min = tl.load(pmin_ptr, mask=dm & keep_old, other=0.0).to(tl.float32)
            kmax = tl.where(keep_old, tl.maximum(old_max, kmax), kmax)
            kmin = tl.where(keep_old, tl.minimum(old_min, kmin), kmin)
            tl.store(pmax_ptr, kmax.to(kv_ptr.dtype.element_ty), mask=dm)
            tl.store(pmin_ptr, kmin.to(kv_ptr.dtype.element_ty), mask=dm)


def write_kv(
    kv_cache: torch.Tensor,
    layout: KVLayout,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    pages_contiguous: bool = True,
) -> None:
    """Store key/value [T, Hkv, D] at slot_mapping [T] (-1 skips); fold keys into page summaries.

    Tokens of one page must be adjacent in slot_mapping (true for vLLM: a request's new
    tokens are consecutive, in position order). Pass pages_contiguous=False to lift that
    assumption (a device-side stable sort of the slots is done first).
    """
    _check_cache(kv_cache, layout)
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _, hkv, _, head_dim = kv_cache.shape
    if key.dtype != kv_cache.dtype:
        # max/min commute with the monotone rounding to the cache dtype; converting here
        # also pins the rounding to torch's (round-to-nearest-even)
        key = key.to(kv_cache.dtype)
    if value.dtype != kv_cache.dtype:
        value = value.to(kv_cache.dtype)
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    slots = slot_mapping if slot_mapping.is_contiguous() else slot_mapping.contiguous()
    if pages_contiguous:
        order = slots  # unused
    else:
        order = torch.sort(slots.long(), stable=True).indices
    _write_kv_kernel[(num_tokens, hkv)](
        kv_cache, key, value, slots, order,
        num_tokens,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        head_dim,
        BS=layout.block_size, PS=layout.page_size, PPB=layout.pages_per_block,
        BLOCK_D=_np2(head_dim), USE_ORDER=not pages_contiguous,
        num_warps=1 if head_dim <= 64 else 2,
    )


# ---------------------------------------------------------------------------------------
# HSA page selection
# ---------------------------------------------------------------------------------------


@triton.jit
def _hsa_prep_kernel(
    q_ptr, r_ptr, qm_ptr, temp_ptr,
    s_qb, s_qh,
    G, D,
    G_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Per (request, KV head): the top-r channel mask (largest mean |q| over the group),
    # the masked group queries and SparQ's temperature per query head.
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
    score = tl.where(dm, score, -1.0)
    # rank of channel c = #channels strictly larger + #equal channels with a lower index
    sc = score[None, :]  # other channel j along axis 1
    sd = score[:, None]  # channel c along axis 0
    jj = d[None, :]
    cc = d[:, None]
    before = (sc > sd) | ((sc == sd) & (jj < cc))
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


@triton.jit
def _page_len(p, seq, keep, gap, PS: tl.constexpr):
    # live tokens of pages p [TILE]: positions pos < seq and (pos < keep or pos >= gap)
    o = tl.arange(0, PS)
    pos = p[:, None] * PS + o[None, :]
    live = (pos < seq) & ((pos < keep) | (pos >= gap))
    return tl.sum(live.to(tl.int32), axis=1)


@triton.jit
def _nan_to_zero(x):
    bad = (x != x) | (tl.abs(x) == float("inf"))
    return tl.where(bad, 0.0, x)


@triton.jit
def _hsa_logits_kernel(
    kv_ptr, bt_ptr, seq_ptr, keep_ptr, gap_ptr, qm_ptr, temp_ptr,
    logit_ptr, pmax_ptr, psum_ptr,
    s_cb, s_ch, s_cr, s_bt,
    G, D, NP, NT,
    BS: tl.constexpr, PS: tl.constexpr, PPB: tl.constexpr,
    G_P: tl.constexpr, BLOCK_D: tl.constexpr, TILE_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    t = tl.program_id(2).to(tl.int64)
    nh = tl.num_programs(1).to(tl.int64)
    g = tl.arange(0, G_P)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    p = t * TILE_P + tl.arange(0, TILE_P)
    seq = tl.load(seq_ptr + b).to(tl.int64)
    keep = tl.load(keep_ptr + b).to(tl.int64)
    gap = tl.load(gap_ptr + b).to(tl.int64)
    stat = ((b * nh + h) * NT + t) * G_P + g
    if t * TILE_P * PS >= seq:
        # tile past the request's end: no valid page
        tl.store(pmax_ptr + stat, tl.full([G_P], float("-inf"), tl.float32))
        tl.store(psum_ptr + stat, tl.zeros([G_P], tl.float32))
    else:
        plen = _page_len(p, seq, keep, gap, PS)
        valid = (plen > 0) & (p < NP)
        blk = tl.load(bt_ptr + b * s_bt + p // PPB, mask=valid, other=0).to(tl.int64)
        row = blk * s_cb + h * s_ch + (2 * BS + p % PPB) * s_cr
        lm = valid[:, None] & dm[None, :]
        kmax = tl.load(kv_ptr + row[:, None] + d[None, :], mask=lm, other=0.0).to(tl.float32)
        kmin = tl.load(kv_ptr + row[:, None] + PPB * s_cr + d[None, :], mask=lm, other=0.0).to(tl.float32)
        kmax = _nan_to_zero(kmax)
        kmin = _nan_to_zero(kmin)
        qbase = (b * nh + h) * G_P
        qm = tl.load(qm_ptr + (qbase + g)[:, None] * BLOCK_D + d[None, :])
        temp = tl.load(temp_ptr + qbase + g)
        hi = tl.dot(tl.maximum(qm, 0.0), tl.trans(kmax), input_precision="ieee")
        lo = tl.dot(tl.minimum(qm, 0.0), tl.trans(kmin), input_precision="ieee")
        logit = (hi + lo) / temp[:, None] + tl.log(tl.maximum(plen, 1).to(tl.float32))[None, :]
        logit = tl.where(valid[None, :], logit, float("-inf"))
        gm = g < G
        lptr = logit_ptr + ((b * nh + h) * G + g)[:, None] * NP + p[None, :]
        tl.store(lptr, logit, mask=gm[:, None] & (p < NP)[None, :])
        m = tl.max(logit, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(tl.exp(logit - m_safe[:, None]), axis=1)
        tl.store(pmax_ptr + stat, m)
        tl.store(psum_ptr + stat, s)


@triton.jit
def _hsa_stats_kernel(
    pmax_ptr, psum_ptr, gmax_ptr, gsum_ptr, NT,
    G_P: tl.constexpr, CHUNK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    nh = tl.num_programs(1).to(tl.int64)
    g = tl.arange(0, G_P)
    c = tl.arange(0, CHUNK)
    base = (b * nh + h) * NT
    m = tl.full([G_P], float("-inf"), tl.float32)
    s = tl.zeros([G_P], tl.float32)
    for t0 in range(0, NT, CHUNK):
        tm = (t0 + c) < NT
        idx = (base + t0 + c)[:, None] * G_P + g[None, :]
        pm = tl.load(pmax_ptr + idx, mask=tm[:, None], other=float("-inf"))
        ps = tl.load(psum_ptr + idx, mask=tm[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(pm, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(ps * tl.exp(pm - m_safe[None, :]), axis=0)
        m = m_new
    out = (b * nh + h) * G_P + g
    tl.store(gmax_ptr + out, m)
    tl.store(gsum_ptr + out, s)


@triton.jit
def _hsa_scores_kernel(
    logit_ptr, gmax_ptr, gsum_ptr, seq_ptr, score_ptr,
    G, NP,
    PS: tl.constexpr, G_P: tl.constexpr, TILE_P: tl.constexpr,
):
    # score[p] = mean over the group of softmax_p(logit[g, p]); -inf marks pages that
    # must not be chosen.
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    t = tl.program_id(2).to(tl.int64)
    nh = tl.num_programs(1).to(tl.int64)
    g = tl.arange(0, G_P)
    gm = g < G
    p = t * TILE_P + tl.arange(0, TILE_P)
    pm = p < NP
    seq = tl.load(seq_ptr + b).to(tl.int64)
    sptr = score_ptr + (b * nh + h) * NP + p
    if t * TILE_P * PS >= seq:
        tl.store(sptr, tl.full([TILE_P], float("-inf"), tl.float32), mask=pm)
    else:
        sb = (b * nh + h) * G_P + g
        m = tl.load(gmax_ptr + sb)
        s = tl.load(gsum_ptr + sb)
        ok = gm & (s > 0)
        m = tl.where(ok, m, 0.0)
        inv = tl.where(ok, 1.0 / tl.where(ok, s, 1.0), 0.0)
        lptr = logit_ptr + ((b * nh + h) * G + g)[:, None] * NP + p[None, :]
        logit = tl.load(lptr, mask=gm[:, None] & pm[None, :], other=float("-inf"))
        prob = tl.where(ok[:, None], tl.exp(logit - m[:, None]) * inv[:, None], 0.0)
        score = tl.sum(prob, axis=0) / G
        valid = tl.max(logit, axis=0) > float("-inf")
        score = tl.where(valid, score, float("-inf"))
        tl.store(sptr, score, mask=pm)


def hsa_page_scores(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layout: KVLayout,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    keep: torch.Tensor,
    gap_end: torch.Tensor,
    top_channels,
    *,
    tile_pages: int | None = None,
) -> torch.Tensor:
    """HSA page scores [B, Hkv, max_blocks * pages_per_block] fp32; -inf = not selectable."""
    _check_cache(kv_cache, layout)
    batch, num_q_heads, head_dim = query.shape
    _, hkv, _, _ = kv_cache.shape
    if num_q_heads % hkv:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({hkv})")
    group = num_q_heads // hkv
    device = query.device
    g_p, block_d = _group_pad(group), _np2(head_dim)
    ppb = layout.pages_per_block
    num_pages = block_table.shape[1] * ppb
    if tile_pages is None:
        tile_pages = 64 if device.type == "cuda" else 16
    tile_pages = max(16, min(_np2(tile_pages), _np2(num_pages)))
    num_tiles = triton.cdiv(num_pages, tile_pages)
    if query.stride(-1) != 1:
        query = query.contiguous()
    r = _per_request(top_channels, batch, device)
    seq = seq_lens.to(device=device, dtype=torch.int32)
    kp = keep.to(device=device, dtype=torch.int32)
    ge = gap_end.to(device=device, dtype=torch.int32)
    bt = block_table if block_table.stride(-1) == 1 else block_table.contiguous()

    qm = torch.empty(batch, hkv, g_p, block_d, dtype=torch.float32, device=device)
    temp = torch.empty(batch, hkv, g_p, dtype=torch.float32, device=device)
    _hsa_prep_kernel[(batch, hkv)](
        query, r, qm, temp, query.stride(0), query.stride(1), group, head_dim,
        G_P=g_p, BLOCK_D=block_d, num_warps=4,
    )
    logits = torch.empty(batch, hkv, group, num_pages, dtype=torch.float32, device=device)
    pmax = torch.empty(batch, hkv, num_tiles, g_p, dtype=torch.float32, device=device)
    psum = torch.empty_like(pmax)
    _hsa_logits_kernel[(batch, hkv, num_tiles)](
        kv_cache, bt, seq, kp, ge, qm, temp, logits, pmax, psum,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), bt.stride(0),
        group, head_dim, num_pages, num_tiles,
        BS=layout.block_size, PS=layout.page_size, PPB=ppb,
        G_P=g_p, BLOCK_D=block_d, TILE_P=tile_pages, num_warps=4,
    )
    gmax = torch.empty(batch, hkv, g_p, dtype=torch.float32, device=device)
    gsum = torch.empty_like(gmax)
    _hsa_stats_kernel[(batch, hkv)](pmax, psum, gmax, gsum, num_tiles, G_P=g_p, CHUNK=64, num_warps=4)
    scores = torch.empty(batch, hkv, num_pages, dtype=torch.float32, device=device)
    _hsa_scores_kernel[(batch, hkv, num_tiles)](
        logits, gmax, gsum, seq, scores, group, num_pages,
        PS=layout.page_size, G_P=g_p, TILE_P=tile_pages, num_warps=4,
    )
    return scores


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
    max_top_pages: int | None = None,
) -> torch.Tensor:
    """HSA over the paged cache: logical page indices [B, Hkv, width], ascending, -1 padded.

    width = max_top_pages when given (no host sync, CUDA-graph capturable); otherwise
    min(max(top_pages), ceil(max(seq_lens) / page_size)) like the reference (host sync).
    """
    scores = hsa_page_scores(query, kv_cache, layout, block_table, seq_lens, keep, gap_end, top_channels)
    batch, hkv, num_pages = scores.shape
    device = scores.device
    k = _per_request(top_pages, batch, device)
    if max_top_pages is None:
        limit = -(-int(seq_lens.max().item()) // layout.page_size)
        width = int(min(int(k.max().item()), limit))
    else:
        width = int(max_top_pages)
    kk = min(width, num_pages)
    if kk <= 0:
        return torch.full((batch, hkv, max(width, 0)), -1, dtype=torch.long, device=device)
    top = scores.topk(kk, dim=-1, sorted=True)
    slot = torch.arange(kk, device=device)
    chosen = (slot.view(1, 1, kk) < k.view(batch, 1, 1)) & (top.values > _NEG_INF)
    index = torch.where(chosen, top.indices, num_pages).sort(dim=-1).values
    index = torch.where(index == num_pages, -1, index)
    if width > kk:
        index = torch.cat([index, index.new_full((batch, hkv, width - kk), -1)], dim=-1)
    return index


# ---------------------------------------------------------------------------------------
# Split-K paged sparse attention (flash decoding over the chosen pages)
# ---------------------------------------------------------------------------------------


@triton.jit
def _sparse_attn_split_kernel(
    q_ptr, kv_ptr, bt_ptr, pidx_ptr, seq_ptr, keep_ptr, gap_ptr,
    acc_ptr, m_ptr, l_ptr,
    scale,
    s_qb, s_qh,
    s_cb, s_ch, s_cr, s_bt,
    s_pb, s_ph,
    G, D, K, PAGES_PER_SPLIT, NSPLIT,
    BS: tl.constexpr, PS: tl.constexpr,
    G_P: tl.constexpr, BLOCK_D: tl.constexpr, TOK: tl.constexpr,
    LOWP: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2).to(tl.int64)
    nh = tl.num_programs(1).to(tl.int64)
    g = tl.arange(0, G_P)
    d = tl.arange(0, BLOCK_D)
    gm = g < G
    dm = d < D
    q = tl.load(q_ptr + b * s_qb + (h * G + g)[:, None] * s_qh + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    if LOWP:
        q = q.to(kv_ptr.dtype.element_ty)
    else:
        q = q.to(tl.float32)
    seq = tl.load(seq_ptr + b).to(tl.int64)
    keep = tl.load(keep_ptr + b).to(tl.int64)
    gap = tl.load(gap_ptr + b).to(tl.int64)
    start = sp * PAGES_PER_SPLIT
    end = tl.minimum(start + PAGES_PER_SPLIT, K)
    tok = tl.arange(0, TOK)
    ent = tok // PS
    off = tok % PS
    m = tl.full([G_P], float("-inf"), tl.float32)
    l = tl.zeros([G_P], tl.float32)
    acc = tl.zeros([G_P, BLOCK_D], tl.float32)
    for j0 in range(start, end, TOK // PS):
        j = j0 + ent
        jm = j < end
        page = tl.load(pidx_ptr + b * s_pb + h * s_ph + j, mask=jm, other=-1).to(tl.int64)
        pos = page * PS + off
        live = jm & (page >= 0) & (pos < seq) & ((pos < keep) | (pos >= gap))
        blk = tl.load(bt_ptr + b * s_bt + pos // BS, mask=live, other=0).to(tl.int64)
        row = blk * s_cb + h * s_ch + (pos % BS) * s_cr
        lm = live[:, None] & dm[None, :]
        k = tl.load(kv_ptr + row[:, None] + d[None, :], mask=lm, other=0.0)
        if LOWP:
            s = tl.dot(q, tl.trans(k))
        else:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        s = tl.where(live[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(kv_ptr + row[:, None] + BS * s_cr + d[None, :], mask=lm, other=0.0)
        if LOWP:
            pv = tl.dot(p.to(kv_ptr.dtype.element_ty), v)
        else:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        m = m_new
    base = ((b * nh + h) * NSPLIT + sp) * G_P + g
    tl.store(m_ptr + base, m)
    tl.store(l_ptr + base, l)
    tl.store(acc_ptr + base[:, None] * BLOCK_D + d[None, :], acc)


@triton.jit
def _sparse_attn_reduce_kernel(
    acc_ptr, m_ptr, l_ptr, out_ptr,
    s_ob, s_oh,
    G, D, NSPLIT,
    G_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    nh = tl.num_programs(1).to(tl.int64)
    g = tl.arange(0, G_P)
    d = tl.arange(0, BLOCK_D)
    gm = g < G
    dm = d < D
    m = tl.full([G_P], float("-inf"), tl.float32)
    l = tl.zeros([G_P], tl.float32)
    acc = tl.zeros([G_P, BLOCK_D], tl.float32)
    for s in range(0, NSPLIT):
        base = ((b * nh + h) * NSPLIT + s) * G_P + g
        ms = tl.load(m_ptr + base)
        ls = tl.load(l_ptr + base)
        a = tl.load(acc_ptr + base[:, None] * BLOCK_D + d[None, :])
        m_new = tl.maximum(m, ms)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        beta = tl.exp(ms - m_safe)
        l = l * alpha + ls * beta
        acc = acc * alpha[:, None] + a * beta[:, None]
        m = m_new
    out = tl.where((l > 0)[:, None], acc / tl.where(l > 0, l, 1.0)[:, None], 0.0)
    optr = out_ptr + b * s_ob + (h * G + g)[:, None] * s_oh + d[None, :]
    tl.store(optr, out.to(out_ptr.dtype.element_ty), mask=gm[:, None] & dm[None, :])


def paged_sparse_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layout: KVLayout,
    block_table: torch.Tensor,
    page_index: torch.Tensor,
    seq_lens: torch.Tensor,
    keep: torch.Tensor,
    gap_end: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    tokens_per_iter: int | None = None,
) -> torch.Tensor:
    """Exact attention over the live tokens of the chosen pages: [B, Hq, D] in query's dtype."""
    _check_cache(kv_cache, layout)
    batch, num_q_heads, head_dim = query.shape
    hkv = kv_cache.shape[1]
    if num_q_heads % hkv:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({hkv})")
    group = num_q_heads // hkv
    device = query.device
    out = torch.empty(batch, num_q_heads, head_dim, dtype=query.dtype, device=device)
    if batch == 0:
        return out
    num_entries = page_index.shape[-1]
    ps = layout.page_size
    g_p, block_d = _group_pad(group), _np2(head_dim)
    if tokens_per_iter is None:
        tokens_per_iter = 64 if head_dim <= 128 else 32
    tok = max(16, ps, _np2(tokens_per_iter))
    pages_per_iter = tok // ps
    iters = max(1, triton.cdiv(num_entries, pages_per_iter))
    if num_splits is None:
        target = 2 * _num_sms(device)
        num_splits = triton.cdiv(target, batch * hkv)
    num_splits = max(1, min(int(num_splits), iters))
    pages_per_split = triton.cdiv(max(num_entries, 1), num_splits)
    # round up to whole iterations so splits do not share partial chunks
    pages_per_split = triton.cdiv(pages_per_split, pages_per_iter) * pages_per_iter
    num_splits = max(1, triton.cdiv(max(num_entries, 1), pages_per_split))

    if query.stride(-1) != 1:
        query = query.contiguous()
    pidx = page_index if page_index.stride(-1) == 1 else page_index.contiguous()
    bt = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    seq = seq_lens.to(device=device, dtype=torch.int32)
    kp = keep.to(device=device, dtype=torch.int32)
    ge = gap_end.to(device=device, dtype=torch.int32)
    lowp = _lowp_dot(query, kv_cache)

    acc = torch.empty(batch, hkv, num_splits, g_p, block_d, dtype=torch.float32, device=device)
    m = torch.empty(batch, hkv, num_splits, g_p, dtype=torch.float32, device=device)
    l = torch.empty_like(m)
    _sparse_attn_split_kernel[(batch, hkv, num_splits)](
        query, kv_cache, bt, pidx, seq, kp, ge, acc, m, l,
        float(scale),
        query.stride(0), query.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), bt.stride(0),
        pidx.stride(0), pidx.stride(1),
        group, head_dim, num_entries, pages_per_split, num_splits,
        BS=layout.block_size, PS=ps, G_P=g_p, BLOCK_D=block_d, TOK=tok, LOWP=lowp,
        num_warps=4, num_stages=2,
    )
    _sparse_attn_reduce_kernel[(batch, hkv)](
        acc, m, l, out, out.stride(0), out.stride(1), group, head_dim, num_splits,
        G_P=g_p, BLOCK_D=block_d, num_warps=4,
    )
    return out


# ---------------------------------------------------------------------------------------
# SnapKV window scores (stage 1) and compaction of the kept tokens
# ---------------------------------------------------------------------------------------


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
    lowp = _lowp_dot(q, k)
    block_d = _np2(head_dim)
    bw = max(16, min(64, _np2(w)))
    bl = 64 if block_d <= 64 else 32
    if device.type != "cuda":
        bl = 32
    w_tiles = triton.cdiv(w, bw)
    if num_splits is None:
        num_splits = triton.cdiv(2 * _num_sms(device), num_q_heads * w_tiles)
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
    BS: tl.constexpr, PS: tl.constexpr, PPB: tl.constexpr,
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
    prow = pblk * s_cb + h * s_ch + (2 * BS + page % PPB) * s_cr
    sm = pm[:, None] & dm[None, :]
    tl.store(kv_ptr + prow[:, None] + d[None, :], kmax.to(kv_ptr.dtype.element_ty), mask=sm)
    tl.store(kv_ptr + prow[:, None] + PPB * s_cr + d[None, :], kmin.to(kv_ptr.dtype.element_ty), mask=sm)


@triton.jit
def _clear_pages_kernel(
    kv_ptr, row_ptr, P0, P1,
    s_cb, s_ch, s_cr, D,
    BS: tl.constexpr, PPB: tl.constexpr, NP_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    page = P0 + tl.arange(0, NP_P)
    pm = page < P1
    d = tl.arange(0, BLOCK_D)
    sm = pm[:, None] & (d < D)[None, :]
    blk = tl.load(row_ptr + page // PPB, mask=pm, other=0).to(tl.int64)
    prow = blk * s_cb + h * s_ch + (2 * BS + page % PPB) * s_cr
    ninf = tl.full([NP_P, BLOCK_D], float("-inf"), tl.float32)
    tl.store(kv_ptr + prow[:, None] + d[None, :], ninf.to(kv_ptr.dtype.element_ty), mask=sm)
    tl.store(kv_ptr + prow[:, None] + PPB * s_cr + d[None, :], (-ninf).to(kv_ptr.dtype.element_ty), mask=sm)


def compact_kept_tokens(
    kv_cache: torch.Tensor,
    layout: KVLayout,
    block_row: torch.Tensor,
    kept: torch.Tensor,
    prompt_len: int,
) -> None:
    """Stage-1 eviction for one request (same semantics as the reference)."""
    _check_cache(kv_cache, layout)
    num_kv_heads, keep = kept.shape
    if keep >= prompt_len or keep == 0:
        return
    bs, ps, ppb = layout.block_size, layout.page_size, layout.pages_per_block
    head_dim = kv_cache.shape[-1]
    block_d = _np2(head_dim)
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
        keep, head_dim, BS=bs, PS=ps, PPB=ppb, NPT=npt, BLOCK_D=block_d, num_warps=4,
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
                BS=bs, PPB=ppb, NP_P=_np2(p1 - p0), BLOCK_D=block_d, num_warps=1,
            )
