"""The Triton kernels behind one name, with the signatures of rocketkv_vllm.ops.reference.

Everything stays on device without host synchronisation, with grids that depend only on
the batch size and the block-table width, so the decode path (write_kv,
hsa_select_pages, paged_sparse_attention) is CUDA-graph capturable.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1 must be set
before this module is imported).
"""
from rocketkv_vllm.kernels.triton_attention import paged_sparse_attention
from rocketkv_vllm.kernels.triton_hsa import (
    PageSelection,
    SelectionPlanner,
    SelectionShape,
    hsa_page_scores,
    hsa_select_pages,
)
from rocketkv_vllm.kernels.triton_snapkv import compact_kept_tokens, snapkv_window_scores
from rocketkv_vllm.kernels.triton_write import write_kv

__all__ = [
    "PageSelection",
    "SelectionPlanner",
    "SelectionShape",
    "compact_kept_tokens",
    "hsa_page_scores",
    "hsa_select_pages",
    "paged_sparse_attention",
    "snapkv_window_scores",
    "write_kv",
]
