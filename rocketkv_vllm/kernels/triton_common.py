"""Helpers shared by the Triton kernels: host-side launch parameters and device functions."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from rocketkv_vllm.kv_layout import KVLayout


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def cuda_index(device: torch.device) -> int:
    """The device's index ("cuda" alone means the current device: cuda and cuda:0 are one)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def dependent_launch(device: torch.device) -> bool:
    """Programmatic dependent launch (sm_90+): a kernel launched with it may start while the
    kernel before it finishes, and waits (gdc_wait) only before it reads that kernel's
    output; the launch gap and its prologue overlap the previous kernel."""
    return device.type == "cuda" and not interpreting() and _capability(device.index or 0)[0] >= 9


def lowp_dot(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Feed tl.dot 16-bit operands (fp32 accumulation) when both tensors are the same
    fp16/bf16 dtype. The Triton interpreter's bf16 dot is broken (3.6), so it gets fp32."""
    if a.dtype != b.dtype or a.dtype not in (torch.float16, torch.bfloat16):
        return False
    return not (interpreting() and a.dtype == torch.bfloat16)


def np2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))


def group_pad(group: int) -> int:
    # tl.dot needs every dimension >= 16
    return max(16, np2(group))


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def per_request(value, batch: int, device: torch.device) -> torch.Tensor:
    """[B] int32 on device without host sync (python ints become a fill kernel)."""
    if isinstance(value, torch.Tensor):
        t = value.to(device=device, dtype=torch.int32)
        return t.expand(batch).contiguous() if t.dim() == 0 or t.numel() == 1 else t.contiguous()
    return torch.full((batch,), int(value), dtype=torch.int32, device=device)


def topk_scratch(index: torch.Tensor, chunk: int, ticket: torch.Tensor | None,
                 candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked top-k's scratch (Triton and CUDA C++ alike) for page lists index
    [B, Hkv, P]: candidate keys and pages, `chunk` slots per chunk of P (`candidates`, first
    B rows, when given), and the chunks' arrival tickets (zeros; `ticket` when given, already
    zeroed by the prep kernel)."""
    batch, hkv, num_pages = index.shape
    shape = (batch, hkv, triton.cdiv(num_pages, chunk) * chunk)
    if candidates is None:
        cand_key = torch.empty(shape, dtype=torch.int32, device=index.device)
        cand_page = torch.empty_like(cand_key)
    else:
        cand_key, cand_page = (c[:batch] for c in candidates)
        if cand_key.shape != shape or cand_page.shape != shape:
            raise ValueError(f"top-k candidates must be {shape}, got {tuple(cand_key.shape)}, {tuple(cand_page.shape)}")
    if ticket is None:
        ticket = torch.zeros(batch, hkv, dtype=torch.int32, device=index.device)
    return cand_key, cand_page, ticket


def contiguous_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def check_cache(kv_cache: torch.Tensor, layout: KVLayout) -> None:
    if kv_cache.dim() != 4 or kv_cache.shape[2] != layout.rows_per_block:
        raise ValueError(f"kv_cache shape {tuple(kv_cache.shape)} does not match layout {layout}")
    if kv_cache.stride(3) != 1 or kv_cache.stride(2) != kv_cache.shape[3]:
        # rows of D, so the channel groups of the summary region span rows (kv_layout)
        raise ValueError("kv_cache must be contiguous within each block and KV head")


def check_group(query: torch.Tensor, kv_cache: torch.Tensor) -> int:
    num_q_heads, hkv = query.shape[1], kv_cache.shape[1]
    if num_q_heads % hkv:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({hkv})")
    return num_q_heads // hkv


@triton.jit
def live_tokens(pos, seq, keep, gap):
    """Logical positions holding live tokens: before the end, outside the evicted gap."""
    return (pos < seq) & ((pos < keep) | (pos >= gap))


@triton.jit
def virtual_pages(seq, keep, gap, PS: tl.constexpr):
    """The live pages of a request, numbered densely ("virtual" pages): the kept prompt
    pages [0, nk), then the pages from the one holding gap_end (at least nk) to the end.
    Returns (nk, first logical page of the tail, number of virtual pages)."""
    nk = (keep + PS - 1) // PS
    tail = tl.maximum(nk, gap // PS)
    n = nk + tl.maximum((seq + PS - 1) // PS - tail, 0)
    return nk, tail, n


@triton.jit
def pages_in_table(n, nk, tail, NPV):
    """The virtual pages whose logical pages the block table addresses (NPV pages): a request
    longer than its table (not one vLLM builds) is cut there rather than read past it."""
    return tl.minimum(tl.minimum(n, NPV), nk + tl.maximum(NPV - tail, 0))


@triton.jit
def logical_page(v, nk, tail):
    return tl.where(v < nk, v, tail + v - nk)


@triton.jit
def page_len(p, seq, keep, gap, PS: tl.constexpr):
    """Live tokens of logical pages p: the live positions are [0, min(keep, seq)) and
    [max(gap, keep), seq), two disjoint ranges, each intersected with the page in closed form
    (element-wise, so it costs no [pages, PS] tensor)."""
    start = p * PS
    end = start + PS
    before_keep = tl.maximum(tl.minimum(end, tl.minimum(keep, seq)) - start, 0)
    after_gap = tl.maximum(tl.minimum(end, seq) - tl.maximum(start, tl.maximum(gap, keep)), 0)
    return before_keep + after_gap


@triton.jit
def summary_at(page_in_block, d, PPB: tl.constexpr, GW: tl.constexpr):
    """Offset of channel d of a page's max summary from the start of its block's summary
    region (kv_layout: groups of GW channels, each holding every page's max, then every
    page's min, so the min is PPB * GW further)."""
    return (d // GW) * (2 * PPB * GW) + page_in_block * GW + d % GW


@triton.jit
def nan_to_zero(x):
    bad = (x != x) | (tl.abs(x) == float("inf"))
    return tl.where(bad, 0.0, x)
