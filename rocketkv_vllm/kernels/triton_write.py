"""write_kv in Triton: KV store fused with the page max/min update (fallback for the CUDA C++ kernel)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rocketkv_vllm.kernels.triton_common import check_cache, np2, summary_at
from rocketkv_vllm.kv_layout import KVLayout


@triton.jit
def _write_kv_kernel(
    kv_ptr, key_ptr, val_ptr, slot_ptr, order_ptr,
    T,
    s_cb, s_ch, s_cr,
    s_kt, s_kh, s_vt, s_vh,
    D,
    BS: tl.constexpr, PS: tl.constexpr, PPB: tl.constexpr, GW: tl.constexpr,
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
            pmax_ptr = base + 2 * BS * s_cr + summary_at(page % PPB, d, PPB, GW)
            pmin_ptr = pmax_ptr + PPB * GW
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
    check_cache(kv_cache, layout)
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
        BS=layout.block_size, PS=layout.page_size, PPB=layout.pages_per_block, GW=layout.summary_channels(head_dim),
        BLOCK_D=np2(head_dim), USE_ORDER=not pages_contiguous,
        num_warps=1 if head_dim <= 64 else 2,
    )
