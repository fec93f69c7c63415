"""RocketKV's log lines: the effective settings once per engine, a warning where a path falls back.

Nothing here logs per token or per step: warnings raised from the step loop are `_once`.
"""
from __future__ import annotations

import torch
from vllm.logger import init_logger

from rocketkv_vllm.config import RocketKVConfig

logger = init_logger("vllm.rocketkv")  # under vLLM's logger: its handler, format and VLLM_LOGGING_LEVEL

KERNELS = {
    "reference": "torch reference",
    "triton": "Triton",
    "triton+cuda": "CUDA C++ (write_kv, HSA top-k) + Triton",
}


def kernels_in_use(ops_backend: str, device: torch.device) -> str:
    """How get_ops(device).backend runs: Triton on CPU is the interpreter (tests)."""
    name = KERNELS.get(ops_backend, ops_backend)
    return f"{name} (interpreter)" if ops_backend == "triton" and device.type != "cuda" else name


def get_ops_backend(device: torch.device) -> str:
    from rocketkv_vllm.kernels import get_ops

    return get_ops(device).backend


def summary_layout(group: int) -> str:
    return "whole rows" if group == 0 else f"channel-major, groups of {group} channel{'s' if group > 1 else ''}"


def exact_decode(config: RocketKVConfig) -> str:
    """Which requests decode exactly over what they keep (dense_below) instead of selecting pages."""
    if not config.selects_pages():
        return f"every request decodes exactly ({config.page_size}-token pages)"
    return f"exact decode up to {config.dense_below_for('rocketkv')} kept tokens (mt: {config.dense_below_for('mt')})"


def settings_line(config: RocketKVConfig, block_size: int, kernels: str, flash_prefill: int | None) -> str:
    """flash_prefill: the FlashAttention version prefill runs, None for the torch path."""
    return (
        f"RocketKV: budget {config.budget}, mode {config.mode}, page size {config.page_size}, block size {block_size}, "
        f"summaries {summary_layout(config.layout_summary_group())}, window {config.window}, "
        f"{exact_decode(config)}, "
        f"kernels {kernels}, dense prefill {f'FlashAttention {flash_prefill}' if flash_prefill else 'torch reference'}"
    )


def log_settings(config: RocketKVConfig, block_size: int, device: torch.device, dtype: torch.dtype,
                 head_size: int) -> None:
    """The start-up line (first rank only; one line for all layers and kernel groups)."""
    from rocketkv_vllm.kernels import cuda_ops, flash_prefill

    flash = flash_prefill.version(device, dtype, head_size)
    kernels = kernels_in_use(get_ops_backend(device), device)
    logger.info_once(settings_line(config, block_size, kernels, flash), scope="global")
    if device.type == "cuda" and not cuda_ops.available():
        warn_cuda_extension_missing(cuda_ops.import_error() or "not usable on this GPU")
    if device.type == "cuda" and not flash:
        logger.warning_once(
            "RocketKV: vLLM's FlashAttention (version 2 or 3) is not available for %s caches on this GPU: prefill "
            "attention runs the torch reference path (slow, memory-hungry at long context)",
            str(dtype).removeprefix("torch."), scope="global",
        )


def warn_cuda_extension_missing(reason: object) -> None:
    logger.warning_once(
        "RocketKV: the CUDA C++ kernels (rocketkv_vllm._C) are not available (%s): write_kv and the HSA "
        "top-k run as Triton kernels (slower); reinstall with nvcc present to build them", str(reason), scope="global",
    )
