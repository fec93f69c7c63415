"""RocketKV attention backend for vLLM: Backend (what it is), metadata builder (per-step plan).

The impl (forward pass) lives in impl.py. Row kinds in a step:
- dense:    prefill chunks and uncompressed decodes, exact causal attention;
- decode:   one-token decodes of compressed requests, HSA over page summaries;
- compact:  the chunk that completes an evicting request's prompt: after its dense
            attention, SnapKV++ picks the kept tokens and compacts them in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import VllmConfig
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from rocketkv_vllm.config import RocketKVConfig
from rocketkv_vllm.kernels import flash_prefill
from rocketkv_vllm.kv_layout import KVLayout
from rocketkv_vllm.plan import RequestPlan, plan_for_params
from rocketkv_vllm.vllm_glue.batch_context import current_rows


class RocketKVBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]
    # get_kv_cache_shape only receives sizes; the summary page size comes from the
    # RocketKV spec, set when the worker's layers emit it (before the cache is allocated).
    page_size: ClassVar[int] = RocketKVConfig().page_size

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        from rocketkv_vllm.vllm_glue.impl import RocketKVImpl

        return RocketKVImpl

    @staticmethod
    def get_builder_cls() -> type["RocketKVMetadataBuilder"]:
        return RocketKVMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int]:
        return [16, 32, 64, 128]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 128]

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def configure(cls, config: RocketKVConfig) -> None:
        cls.page_size = config.page_size

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, cache_dtype_str: str = "auto"
    ) -> tuple[int, ...]:
        return KVLayout(block_size, RocketKVBackend.page_size).cache_shape(num_blocks, num_kv_heads, head_size)

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False


@dataclass(frozen=True)
class DenseRow:
    row: int
    query_start: int
    query_end: int
    seq_len: int
    keep: int  # live positions: p < keep or p >= gap_end
    gap_end: int


@dataclass(frozen=True)
class Compaction:
    row: int
    window_start: int  # query token indices of the observation window
    window_end: int
    prompt_len: int
    keep: int
    seq_len: int  # > prompt_len only when a resumed request recomputes its outputs too


@dataclass
class DecodeBatch:
    """HSA decode rows, prepared once per step for every layer (int32 device tensors).

    Decode rows come first in the batch (the builder asks vLLM to reorder), so their
    query tokens are usually 0..Bd-1 and `token_index` is None.
    """

    token_index: torch.Tensor | None  # [Bd] query token of each decode row, None = tokens 0..Bd-1
    num_rows: int
    block_table: torch.Tensor  # [Bd, max_blocks] rows of the decode requests, only usable columns
    seq_lens: torch.Tensor
    keep: torch.Tensor
    gap_end: torch.Tensor
    top_channels: torch.Tensor
    top_pages: torch.Tensor
    max_top_pages: int


@dataclass
class PackedDense:
    """Gap-free dense rows packed for one FlashAttention call (GPU)."""

    token_index: torch.Tensor  # [T] query tokens of the rows, row by row
    rows: torch.Tensor  # [R]
    cu_seqlens_q: torch.Tensor  # [R + 1] int32
    seq_lens: torch.Tensor  # [R] int32
    max_query_len: int
    max_seq_len: int


@dataclass
class RocketKVMetadata:
    num_actual_tokens: int
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    dense: list[DenseRow]
    compactions: list[Compaction]
    decode: DecodeBatch | None
    packed_dense: PackedDense | None = None  # replaces `dense` where FlashAttention is available


class RocketKVMetadataBuilder(AttentionMetadataBuilder[RocketKVMetadata]):
    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.config = RocketKVConfig.from_additional_config(vllm_config.additional_config)
        self.head_dim = kv_cache_spec.head_size
        self.block_size = kv_cache_spec.block_size
        self.device = device
        self._init_reorder_batch_threshold(1)  # decodes first: their tokens are a prefix of the batch

    def _plan(self, state, seq_len: int) -> RequestPlan:
        if state is None:  # dummy rows (profiling, warm-up): exact attention
            return RequestPlan.exact(seq_len, self.head_dim)
        return plan_for_params(state.sampling_params, state.num_prompt_tokens, self.config, self.head_dim, self.block_size)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False) -> RocketKVMetadata:
        cm = common_attn_metadata
        starts = cm.query_start_loc_cpu.tolist()
        query_lens = [b - a for a, b in zip(starts, starts[1:])]
        seq_lens = cm.seq_lens.cpu().tolist() if cm._seq_lens_cpu is None else cm._seq_lens_cpu.tolist()
        rows = current_rows()
        dense, compactions, decode_rows = [], [], []
        for i, query_len in enumerate(query_lens):
            if query_len == 0:
                continue
            seq_len = seq_lens[i]
            computed = seq_len - query_len
            plan = self._plan(rows[i] if i < len(rows) else None, seq_len)
            prompt_len = plan.prompt_len
            compacted = plan.evicts and computed >= prompt_len
            keep, gap_end = (plan.keep, prompt_len) if compacted else (prompt_len, prompt_len)
            if plan.sparse and query_len == 1 and computed >= prompt_len:
                decode_rows.append((starts[i], i, seq_len, keep, gap_end, plan.top_channels, plan.top_pages))
                continue
            dense.append(DenseRow(i, starts[i], starts[i] + query_len, seq_len, keep, gap_end))
            if plan.evicts and computed < prompt_len <= seq_len:
                window_start = max(computed, prompt_len - self.config.window)
                compactions.append(
                    Compaction(i, starts[i] + window_start - computed, starts[i] + prompt_len - computed, prompt_len, plan.keep, seq_len)
                )
        decode = self._decode_batch(decode_rows, cm.block_table_tensor) if decode_rows else None
        meta = RocketKVMetadata(cm.num_actual_tokens, cm.block_table_tensor, cm.slot_mapping, dense, compactions, decode)
        if dense and flash_prefill.available(self.device, self.kv_cache_spec.dtype) and all(r.keep == r.gap_end for r in dense):
            meta.packed_dense = self._pack(dense)
        return meta

    def _decode_batch(self, decode_rows: list[tuple[int, ...]], block_table: torch.Tensor) -> DecodeBatch:
        tokens, rows, *columns = torch.tensor(decode_rows, dtype=torch.int32).T
        max_blocks = -(-int(columns[0].max()) // self.block_size)
        contiguous = bool(torch.equal(tokens, torch.arange(len(decode_rows), dtype=torch.int32)))
        rows = rows.to(self.device, non_blocking=True)
        seq_lens, keep, gap_end, top_channels, top_pages = torch.stack(columns).to(self.device, non_blocking=True)
        return DecodeBatch(
            None if contiguous else tokens.long().to(self.device, non_blocking=True), len(decode_rows),
            block_table[rows.long(), :max_blocks], seq_lens, keep, gap_end, top_channels, top_pages,
            max_top_pages=int(columns[-1].max()),
        )

    def _pack(self, dense: list[DenseRow]) -> PackedDense:
        query_lens = [r.query_end - r.query_start for r in dense]
        token_index = torch.cat([torch.arange(r.query_start, r.query_end) for r in dense])
        cu = torch.zeros(len(dense) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(query_lens).cumsum(0)

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, non_blocking=True)

        return PackedDense(
            dev(token_index), dev(torch.tensor([r.row for r in dense])), dev(cu),
            dev(torch.tensor([r.seq_len for r in dense], dtype=torch.int32)), max(query_lens), max(r.seq_len for r in dense),
        )
