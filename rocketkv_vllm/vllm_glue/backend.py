"""RocketKV attention backend for vLLM: Backend (what it is), metadata builder (per-step plan).

The impl (forward pass) lives in impl.py. Row kinds in a step:
- decode:   one-token rows (decodes, and one-token prompt chunks that evict nothing):
            HSA over page summaries, then attention over the chosen pages; a row whose
            plan is exact gets a budget covering all its pages, so every decode row runs
            the same fixed-shape kernels and pure-decode steps replay as full CUDA graphs;
- dense:    prefill chunks, exact causal attention;
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
    AttentionCGSupport,
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
from rocketkv_vllm.vllm_glue.logs import log_settings, warn_gap_rows_on_torch_path


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
class OracleBatch:
    """Decode rows of the `oracle` ablation (exact top-k attention, torch reference)."""

    token_index: torch.Tensor  # [B] query token of each row
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    top_k: torch.Tensor
    max_seq_len: int


ALL_PAGES = 1 << 30  # a budget covering every page: exact attention through the sparse path


@dataclass
class DecodeBatch:
    """Decode rows, prepared once per step for every layer (int32 device tensors).

    Decode rows come first in the batch (the builder asks vLLM to reorder), so their
    query tokens are usually 0..Bd-1 and `token_index` is None; then every tensor is a
    view of a persistent buffer (vLLM's block table and seq_lens, the builder's columns),
    as CUDA-graph replay requires.
    """

    token_index: torch.Tensor | None  # [Bd] query token of each decode row, None = tokens 0..Bd-1
    num_rows: int
    block_table: torch.Tensor  # [Bd, max_blocks_per_request]
    seq_lens: torch.Tensor
    keep: torch.Tensor
    gap_end: torch.Tensor
    top_channels: torch.Tensor
    top_pages: torch.Tensor


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
    oracle: OracleBatch | None
    packed_dense: PackedDense | None = None  # replaces `dense` where FlashAttention is available


class RocketKVMetadataBuilder(AttentionMetadataBuilder[RocketKVMetadata]):
    # pure-decode steps run the fixed-shape decode kernels only: vLLM captures them whole
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.config = RocketKVConfig.from_additional_config(vllm_config.additional_config)
        self.head_dim = kv_cache_spec.head_size
        self.block_size = kv_cache_spec.block_size
        self.device = device
        self._init_reorder_batch_threshold(1)  # decodes first: their tokens are a prefix of the batch
        max_rows = max(
            vllm_config.scheduler_config.max_num_seqs,
            vllm_config.compilation_config.max_cudagraph_capture_size or 0,
        )
        # keep, gap_end, top_channels, top_pages of each decode row; persistent for CUDA graphs
        self._columns = torch.zeros(4, max_rows, dtype=torch.int32, device=device)
        log_settings(self.config, self.block_size, device, kv_cache_spec.dtype)

    def _plan(self, rows, i: int, seq_len: int) -> RequestPlan:
        if not rows:  # dummy batches (profiling, warm-up, graph capture): exact attention
            return RequestPlan.exact(seq_len, self.head_dim)
        state = rows[i] if i < len(rows) else None
        if state is None:  # guessing "exact" would read the freed gap of an evicting request
            raise RuntimeError(f"RocketKV: batch row {i} has no request state")
        return plan_for_params(state.sampling_params, state.num_prompt_tokens, self.config, self.head_dim, self.block_size)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False) -> RocketKVMetadata:
        cm = common_attn_metadata
        starts = cm.query_start_loc_cpu.tolist()
        query_lens = [b - a for a, b in zip(starts, starts[1:])]
        seq_lens = cm.seq_lens.cpu().tolist() if cm._seq_lens_cpu is None else cm._seq_lens_cpu.tolist()
        rows = current_rows()
        dense, compactions, decode_rows, columns, oracle = [], [], [], [], []
        for i, query_len in enumerate(query_lens):
            if query_len == 0:  # finished this step, or CUDA-graph padding
                continue
            seq_len = seq_lens[i]
            computed = seq_len - query_len
            plan = self._plan(rows, i, seq_len)
            prompt_len = plan.prompt_len
            completes_prompt = computed < prompt_len <= seq_len
            if query_len == 1 and plan.oracle_tokens and computed >= plan.prompt_len:
                oracle.append((i, starts[i], seq_len, plan.oracle_tokens))
                continue
            if query_len == 1 and not (plan.evicts and completes_prompt):
                compacted = plan.evicts and computed >= prompt_len
                sparse = plan.sparse and computed >= prompt_len
                decode_rows.append(i)
                columns.append((
                    plan.keep if compacted else prompt_len, prompt_len,
                    plan.top_channels if sparse else self.head_dim, plan.top_pages if sparse else ALL_PAGES,
                ))
                continue
            compacted = plan.evicts and computed >= prompt_len
            keep, gap_end = (plan.keep, prompt_len) if compacted else (prompt_len, prompt_len)
            dense.append(DenseRow(i, starts[i], starts[i] + query_len, seq_len, keep, gap_end))
            if plan.evicts and completes_prompt:
                window_start = max(computed, prompt_len - self.config.window)
                compactions.append(
                    Compaction(i, starts[i] + window_start - computed, starts[i] + prompt_len - computed, prompt_len, plan.keep, seq_len)
                )
        decode = self._decode_batch(cm, decode_rows, columns, pure=not (dense or oracle)) if decode_rows else None
        meta = RocketKVMetadata(cm.num_actual_tokens, cm.block_table_tensor, cm.slot_mapping, dense, compactions, decode,
                                self._oracle_batch(cm, oracle) if oracle else None)
        if dense and flash_prefill.available(self.device, self.kv_cache_spec.dtype):
            if all(r.keep == r.gap_end for r in dense):
                meta.packed_dense = self._pack(dense)
            else:
                warn_gap_rows_on_torch_path()
        return meta

    def _decode_batch(self, cm: CommonAttentionMetadata, rows: list[int], columns: list[tuple[int, ...]], pure: bool) -> DecodeBatch:
        contiguous = rows == list(range(len(rows)))
        # a pure-decode step covers every row, CUDA-graph padding included (seq_len 0: nothing to read)
        num_rows = cm.num_reqs if pure and contiguous else len(rows)
        values = torch.zeros(4, num_rows, dtype=torch.int32)
        values[2], values[3] = self.head_dim, ALL_PAGES
        values[:, : len(rows)] = torch.tensor(columns, dtype=torch.int32).T
        cols = self._columns[:, :num_rows]
        cols.copy_(self._staged(values), non_blocking=True)
        if contiguous:
            token_index, block_table, seq_lens = None, cm.block_table_tensor[:num_rows], cm.seq_lens[:num_rows]
        else:
            index = self._to_device(torch.tensor(rows))
            token_index = cm.query_start_loc[index].long()
            block_table, seq_lens = cm.block_table_tensor[index], cm.seq_lens[index]
        return DecodeBatch(token_index, num_rows, block_table, seq_lens, cols[0], cols[1], cols[2], cols[3])

    def _oracle_batch(self, cm: CommonAttentionMetadata, rows: list[tuple[int, int, int, int]]) -> OracleBatch:
        row, token, seq_len, top_k = (self._to_device(torch.tensor(c)) for c in zip(*rows))
        return OracleBatch(token.long(), cm.block_table_tensor[row], seq_len, top_k, max(r[2] for r in rows))

    def _pack(self, dense: list[DenseRow]) -> PackedDense:
        query_lens = [r.query_end - r.query_start for r in dense]
        token_index = torch.cat([torch.arange(r.query_start, r.query_end) for r in dense])
        cu = torch.zeros(len(dense) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(query_lens).cumsum(0)

        dev = self._to_device
        return PackedDense(
            dev(token_index), dev(torch.tensor([r.row for r in dense])), dev(cu),
            dev(torch.tensor([r.seq_len for r in dense], dtype=torch.int32)), max(query_lens), max(r.seq_len for r in dense),
        )

    def _staged(self, host: torch.Tensor) -> torch.Tensor:
        """host in pinned memory on CUDA, so that copies from it need not block the host: a
        copy from pageable memory waits for the GPU to drain the stream, serialising every
        step's preparation with the previous step. torch's pinned allocator keeps the block
        until the copy ran."""
        return host.pin_memory() if self.device.type == "cuda" else host

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        return self._staged(host).to(self.device, non_blocking=True)
