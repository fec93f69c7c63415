"""CUDA C++ kernels (rocketkv_vllm._C, built by setup.py from csrc/) with Python wrappers.

write_kv (fused KV store + page max/min update) and the HSA top-k (page selection from the
logits kernel's page logits).
The extension is optional: `available()` is False when it is not built, there is no GPU, or it
holds no kernel image for the GPU (built for other architectures, cuda_archs): the Triton
kernels run instead.
"""
from __future__ import annotations

import functools
import logging

import torch

from rocketkv_vllm.kernels import cuda_archs
from rocketkv_vllm.kernels.triton_common import topk_scratch
from rocketkv_vllm.kv_layout import KVLayout

try:  # the extension registers torch.ops.rocketkv.* on import
    from rocketkv_vllm import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # not built (CPU machines, ROCKETKV_SKIP_CUDA=1)
    _C = None
    _IMPORT_ERROR = exc


logger = logging.getLogger(__name__)


def available() -> bool:
    return _C is not None and torch.cuda.is_available() and built_for(torch.cuda.get_device_capability())


@functools.cache
def built_for(capability: tuple[int, int]) -> bool:
    """Whether the extension has a kernel image for this capability (warns once when not)."""
    archs = cuda_archs.recorded()
    if archs is None:  # built without setup.py / CMakeLists.txt: trust it was built for this GPU
        return True
    if cuda_archs.covers(archs, capability):
        return True
    major, minor = capability
    logger.warning(
        "rocketkv_vllm._C was built for CUDA architectures %s, which do not run on this GPU (compute "
        "capability %d.%d): using the Triton kernels. Rebuild with TORCH_CUDA_ARCH_LIST=%d.%d to use the "
        "CUDA C++ ones.", archs, major, minor, major, minor,
    )
    return False


def import_error() -> Exception | None:
    return _IMPORT_ERROR


def write_kv(
    kv_cache: torch.Tensor,
    layout: KVLayout,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Same semantics as ops.reference.write_kv (tokens of one page adjacent in slot_mapping)."""
    if _C is None:
        raise RuntimeError(f"rocketkv_vllm._C is not available: {_IMPORT_ERROR}")
    if key.dtype != kv_cache.dtype:
        # max/min commute with the (monotone) rounding to the cache dtype
        key = key.to(kv_cache.dtype)
    if value.dtype != kv_cache.dtype:
        value = value.to(kv_cache.dtype)
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        slot_mapping = slot_mapping.long()
    torch.ops.rocketkv.write_kv(kv_cache, key, value, slot_mapping, layout.block_size, layout.page_size,
                                layout.summary_channels(kv_cache.shape[-1]))


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
    *,
    chunk: int,
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
    newest_page: torch.Tensor | None = None,
    pdl: bool = True,
) -> None:
    """triton_hsa.top_pages_from_logits in CUDA C++ (same arguments and results); chunk:
    pages per CUDA block, a power of two <= 4096; pdl: launched as a programmatic dependent of
    the logits kernel (sm_90+)."""
    if _C is None:
        raise RuntimeError(f"rocketkv_vllm._C is not available: {_IMPORT_ERROR}")
    cand_key, cand_page, ticket = topk_scratch(index, chunk, ticket, candidates)
    torch.ops.rocketkv.hsa_topk(logits, stats, seq, keep, gap_end, top_pages, page_size, index, count, keys, cand_key,
                                cand_page, ticket, chunk, newest_page, pdl)

