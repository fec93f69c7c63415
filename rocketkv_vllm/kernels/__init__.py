"""Kernel dispatch: `get_ops(device)` returns the five paged-cache operations.

CUDA: write_kv from the CUDA C++ extension (rocketkv_vllm._C) when it is built, else
Triton (also for summary groups narrower than 16 bytes, see _cuda_write_kv_where_it_wins);
Triton for hsa_select_pages (its top-k step in CUDA C++ when built), paged_sparse_attention,
snapkv_window_scores and compact_kept_tokens.
CPU: the torch reference (rocketkv_vllm.ops.reference), or the Triton kernels under the
Triton interpreter when ROCKETKV_TRITON_INTERPRET=1 (tests; TRITON_INTERPRET=1 must also be
set before triton is first imported).
"""
from __future__ import annotations

import functools
import os
import sys
from types import SimpleNamespace

import torch

OP_NAMES = ("write_kv", "hsa_select_pages", "paged_sparse_attention", "snapkv_window_scores", "compact_kept_tokens")


def _reference_ops() -> SimpleNamespace:
    from rocketkv_vllm.algorithms.snapkv import window_scores
    from rocketkv_vllm.ops import reference

    return SimpleNamespace(
        backend="reference",
        write_kv=reference.write_kv,
        hsa_select_pages=reference.hsa_select_pages,
        paged_sparse_attention=reference.paged_sparse_attention,
        snapkv_window_scores=window_scores,
        compact_kept_tokens=reference.compact_kept_tokens,
        selection_planner=None,  # the reference plans nothing ahead
    )


def _cuda_write_kv_where_it_wins(kv_cache: torch.Tensor, layout, key: torch.Tensor, value: torch.Tensor,
                                  slot_mapping: torch.Tensor) -> None:
    """The CUDA C++ write_kv, except over summary groups narrower than a 16-byte vector
    (channel-major summaries, mt servers), where the Triton kernel is faster: H100,
    8,192-token prefill chunk, groups of 1: CUDA 128 us, Triton 42 us (rows: 32 vs 41 us)."""
    from rocketkv_vllm.kernels import cuda_ops, triton_ops

    if layout.summary_channels(kv_cache.shape[-1]) * kv_cache.element_size() % 16:
        triton_ops.write_kv(kv_cache, layout, key, value, slot_mapping)
    else:
        cuda_ops.write_kv(kv_cache, layout, key, value, slot_mapping)


def _triton_ops(cuda_write_kv: bool) -> SimpleNamespace:
    from rocketkv_vllm.kernels import triton_ops

    write_kv = triton_ops.write_kv
    backend = "triton"
    if cuda_write_kv:
        from rocketkv_vllm.kernels import cuda_ops

        if cuda_ops.available():
            write_kv = _cuda_write_kv_where_it_wins
            backend = "triton+cuda"
    return SimpleNamespace(
        backend=backend,
        write_kv=write_kv,
        hsa_select_pages=triton_ops.hsa_select_pages,
        paged_sparse_attention=triton_ops.paged_sparse_attention,
        snapkv_window_scores=triton_ops.snapkv_window_scores,
        compact_kept_tokens=triton_ops.compact_kept_tokens,
        selection_planner=triton_ops.SelectionPlanner,
    )


@functools.lru_cache(maxsize=None)
def _ops_for(kind: str, interpret: bool) -> SimpleNamespace:
    if kind == "cuda":
        return _triton_ops(cuda_write_kv=True)
    if interpret:
        # triton decides interpretation when a @triton.jit function is defined, its own
        # standard library included: the flag must be on before triton is first imported
        if os.environ.get("TRITON_INTERPRET") != "1" and "triton.language" in sys.modules:
            raise RuntimeError("ROCKETKV_TRITON_INTERPRET=1 needs TRITON_INTERPRET=1 from process start")
        os.environ["TRITON_INTERPRET"] = "1"
        return _triton_ops(cuda_write_kv=False)
    return _reference_ops()


def get_ops(device: torch.device | str) -> SimpleNamespace:
    """Namespace with write_kv, hsa_select_pages, paged_sparse_attention,
    snapkv_window_scores and compact_kept_tokens for `device` (and `.backend`), and
    selection_planner: (SelectionShape, max batch) -> planner of hsa_select_pages' `plan`
    per batch size (the Triton kernels), or None."""
    kind = torch.device(device).type
    interpret = os.environ.get("ROCKETKV_TRITON_INTERPRET") == "1"
    return _ops_for(kind, interpret and kind != "cuda")


__all__ = ["OP_NAMES", "get_ops"]
