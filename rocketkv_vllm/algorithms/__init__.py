"""RocketKV's algorithms as pure PyTorch functions: the specification and test oracle."""
from rocketkv_vllm.algorithms.attention import attend_chosen, causal_attention, sparse_attention
from rocketkv_vllm.algorithms.budget import BudgetSplit, round_page_size, split_budget
from rocketkv_vllm.algorithms.hsa import (
    approximate_page_scores,
    exact_topk,
    hsa_select,
    pages_to_tokens,
    quest_select,
    sparq_select,
    top_channel_mask,
)
from rocketkv_vllm.algorithms.snapkv import adaptive_pool_kernel, snapkv_select, window_scores
from rocketkv_vllm.algorithms.summaries import page_summaries, update_summaries

__all__ = [
    "BudgetSplit", "adaptive_pool_kernel", "attend_chosen", "approximate_page_scores", "causal_attention",
    "exact_topk", "hsa_select", "page_summaries", "pages_to_tokens", "quest_select",
    "round_page_size", "snapkv_select", "sparq_select", "sparse_attention", "split_budget",
    "top_channel_mask", "update_summaries", "window_scores",
]
