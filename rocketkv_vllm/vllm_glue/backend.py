"""RocketKV attention backend for vLLM: Backend (what it is), metadata builder (per-step plan).

The impl (forward pass) lives in impl.py. Row kinds in a step:
- decode:   one-token rows (decodes, and one-token prompt chunks that evict nothing):
            HSA over page summaries, then attention over the chosen pages; a row whose
            plan is exact gets the budget EVERY_PAGE (no selection, the attention reads
            every live page), so every decode row runs the same fixed-shape kernels and
            pure-decode steps replay as full CUDA graphs;
- dense:    prefill chunks, exact causal attention;
- compact:  the chunk that completes an evicting request's prompt: after its dense
            attention, SnapKV++ picks the kept tokens and compacts them in place.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
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
from vllm.v1.utils import CpuGpuBuffer

from rocketkv_vllm.config import RocketKVConfig
from rocketkv_vllm.kernels import flash_prefill, get_ops
from rocketkv_vllm.kernels.layer_graphs import padded_rows
from rocketkv_vllm.kv_layout import KVLayout
from rocketkv_vllm.ops.newest_page import NewestPages
from rocketkv_vllm.ops.reference import EVERY_PAGE
from rocketkv_vllm.vllm_glue.batch_context import current_batch
from rocketkv_vllm.vllm_glue.request_plans import (
    EVICTS, KEEP, NUM_COLUMNS, ORACLE_TOKENS, PROMPT_LEN, SPARSE, TOP_CHANNELS, TOP_PAGES, PlanTable,
)
from rocketkv_vllm.vllm_glue.logs import log_settings
from rocketkv_vllm.vllm_glue.tp_groups import gathers_queries, selection_num_heads


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
    # the page selection's launch decisions and scratch for num_rows rows (kernels'
    # `plan_selection`), made once per step for every layer; None on the reference path
    selection: Any = None
    newest: NewestPages | None = None  # each row's newest page (config.attend_newest_page)
    graph: "GraphRows | None" = None  # the same rows for the impl's per-layer CUDA graphs
    # some row chooses pages (top_pages below EVERY_PAGE); when none does, steps outside vLLM's
    # full graphs launch no page selection (a full graph, captured for any rows, always does)
    selects: bool = True


@dataclass
class GraphRows:
    """The decode rows padded to `batch.num_rows` (kernels/layer_graphs.padded_rows) for
    steps that vLLM runs without a full CUDA graph: every tensor is a fixed-address view (the
    builder's block-table copy, columns and query/output buffers), padding rows have seq_len 0,
    so each layer captures one graph per padded size and replays it whatever the step holds."""

    batch: DecodeBatch  # contiguous rows 0..num_rows-1 of the buffers below
    query: torch.Tensor  # [num_rows, Hq, D]: a step copies its decode queries into the first rows
    output: torch.Tensor  # [num_rows, Hq, D]: and its decode outputs out of them
    # the builder that owns the buffers: graphs captured over an earlier builder's (vLLM's
    # CUDA-graph memory profiling makes one and frees it) must not replay over reused addresses
    builder_id: int = 0


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
class GappedDense:
    """Dense rows with an evicted gap (prefill chunks of preempted, already compacted requests: their
    live tokens are two ranges that FlashAttention's paged call cannot take), each live token's
    place in the cache for one FlashAttention call over them gathered (GPU)."""

    token_index: torch.Tensor  # [T] query tokens of the rows, row by row
    cu_seqlens_q: torch.Tensor  # [R + 1] int32
    cu_seqlens_k: torch.Tensor  # [R + 1] int32: live tokens, positions [0, keep) then [gap_end, seq_len)
    blocks: torch.Tensor  # [N] int64: each live token's physical block
    offsets: torch.Tensor  # [N] int64: and its row in that block
    max_query_len: int
    max_live: int


@dataclass
class RocketKVMetadata:
    num_actual_tokens: int
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    dense: list[DenseRow]
    compactions: list[Compaction]
    decode: DecodeBatch | None
    oracle: OracleBatch | None
    # where FlashAttention is available, these two replace `dense`: its gap-free and its gapped rows
    packed_dense: PackedDense | None = None
    gapped_dense: GappedDense | None = None


@dataclass(frozen=True)
class RowKinds:
    """A step's rows classified from host arrays (numpy, one entry per batch row)."""

    decode: np.ndarray  # row numbers of decode rows, ascending
    dense: np.ndarray  # row numbers of dense rows, ascending
    compacts: np.ndarray  # [rows] bool: the dense row completes an evicting prompt
    kept: np.ndarray  # [rows] the plan's kept prompt tokens (compaction)
    oracle: np.ndarray  # row numbers of the oracle ablation's decode rows, ascending
    oracle_tokens: np.ndarray  # [rows]
    # [4, rows] keep, gap_end (live positions: p < keep or p >= gap_end), top_channels, top_pages
    columns: np.ndarray

    @property
    def keep(self) -> np.ndarray:
        return self.columns[0]

    @property
    def gap_end(self) -> np.ndarray:
        return self.columns[1]


def classify_rows(query_lens: np.ndarray, seq_lens: np.ndarray, plans: np.ndarray, head_dim: int) -> RowKinds:
    """Row kinds and decode columns of a batch from its query and sequence lengths and its
    rows' plan columns ([rows, NUM_COLUMNS], request_plans), all vectorized."""
    prompt_len, evicts = plans[:, PROMPT_LEN], plans[:, EVICTS] != 0
    computed = seq_lens - query_lens
    completes_prompt = (computed < prompt_len) & (prompt_len <= seq_lens)
    after_prompt = computed >= prompt_len
    evicting_chunk = evicts & completes_prompt
    is_oracle = (query_lens == 1) & (plans[:, ORACLE_TOKENS] > 0) & after_prompt
    is_decode = (query_lens == 1) & ~evicting_chunk & ~is_oracle
    is_dense = (query_lens > 0) & ~is_decode & ~is_oracle  # (no query: finished, or CUDA-graph padding)
    sparse = (plans[:, SPARSE] != 0) & after_prompt  # a prompt token attends exactly
    columns = plans[:, [KEEP, PROMPT_LEN, TOP_CHANNELS, TOP_PAGES]].T.copy()
    columns[0, ~(evicts & after_prompt)] = prompt_len[~(evicts & after_prompt)]
    columns[2:, ~sparse] = ((head_dim,), (EVERY_PAGE,))
    return RowKinds(is_decode.nonzero()[0], is_dense.nonzero()[0], is_dense & evicting_chunk, plans[:, KEEP],
                    is_oracle.nonzero()[0], plans[:, ORACLE_TOKENS], columns)


_builder_ids = itertools.count(1)


def decode_bounds(vllm_config: VllmConfig) -> tuple[int, int]:
    """The most rows a decode step holds and the block tables' width (max_model_len in blocks):
    what the page selection's workspace is sized for."""
    rows = max(vllm_config.scheduler_config.max_num_seqs, vllm_config.compilation_config.max_cudagraph_capture_size or 0)
    block_size = vllm_config.cache_config.block_size
    blocks = -(-vllm_config.model_config.max_model_len // block_size)
    # (the model runner rounds its block tables' width up to a multiple of 128 / block_size)
    align = 128 // block_size if block_size <= 128 else 1
    return rows, -(-blocks // align) * align


def selection_shape(num_heads: int, num_kv_heads: int, head_dim: int, layout: KVLayout, width: int,
                    device: torch.device):
    """The kernels' SelectionShape of block tables `width` blocks wide (the builder's and the
    attention layers' alike, so that they find the same workspace)."""
    from rocketkv_vllm.kernels.triton_hsa import SelectionShape

    return SelectionShape(num_heads, num_kv_heads, head_dim, layout, width * layout.pages_per_block, device)


class RocketKVMetadataBuilder(AttentionMetadataBuilder[RocketKVMetadata]):
    """Per step: classifies the rows (numpy, no per-row Python), stages every host-made
    int32 array in persistent pinned buffers (one copy each to the device) and makes the
    page selection's launch plan once for all layers."""

    # pure-decode steps run the fixed-shape decode kernels only: vLLM captures them whole
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)  # decodes first: their tokens are a prefix of the batch
        max_rows, max_blocks = decode_bounds(vllm_config)
        config = RocketKVConfig.from_additional_config(vllm_config.additional_config)
        local_heads = vllm_config.compilation_config.static_forward_context[layer_names[0]].num_heads
        if gathers_queries(local_heads, vllm_config):  # the impl captures no per-layer graphs then
            config = replace(config, decode_graphs=False)
        self._setup(
            config, kv_cache_spec, max_rows, vllm_config.scheduler_config.max_num_batched_tokens, device,
            # the query heads a selection scores with: this worker's, or a replicated KV head's whole group
            selection_num_heads(local_heads, vllm_config), max_blocks, vllm_config.model_config.dtype,
        )
        log_settings(self.config, self.block_size, device, kv_cache_spec.dtype, self.head_dim)

    def _setup(self, config: RocketKVConfig, kv_cache_spec: AttentionSpec, max_rows: int, max_tokens: int,
               device: torch.device, num_heads: int, max_blocks: int, query_dtype: torch.dtype | None = None) -> None:
        """Everything build() needs (tests make builders without a VllmConfig through this).
        num_heads: query heads a page selection scores with; max_blocks: the block tables' expected width;
        query_dtype: the model's (the KV cache's by default)."""
        self.config, self.kv_cache_spec, self.device = config, kv_cache_spec, device
        self.head_dim, self.block_size = kv_cache_spec.head_size, kv_cache_spec.block_size
        self.max_rows, self.max_tokens, self.num_heads = max_rows, max_tokens, num_heads
        self.layout = KVLayout(self.block_size, config.page_size, config.layout_summary_group())
        # the page selection's launch plans (kernels' SelectionPlanner) per block-table width,
        # over a workspace sized here for max_rows; none on the reference path
        self._planner_cls = get_ops(device).selection_planner
        self._planners: dict[int, Any] = {}
        if self._planner_cls is not None:
            self._planner(max_blocks)
        self.plans = PlanTable(config, self.head_dim, self.block_size)
        self.flash_prefill = flash_prefill.available(device, kv_cache_spec.dtype, kv_cache_spec.head_size)
        # keep, gap_end, top_channels, top_pages of each decode row, its newest page
        # (scored seq_len, page) and its seq_len; persistent for CUDA graphs
        self._columns = CpuGpuBuffer(7, max_rows, dtype=torch.int32, device=device)
        # the decode rows' block-table rows and query/output buffers of the per-layer graphs
        self._graph_tables: dict[int, torch.Tensor] = {}
        self._graph_io: tuple[torch.Tensor, torch.Tensor] | None = None
        self._builder_id = next(_builder_ids)
        if config.decode_graphs and device.type == "cuda":
            self.allocate_graph_buffers(query_dtype or kv_cache_spec.dtype)
        # rows, query tokens, seq_lens and top-k of the oracle ablation's decode rows
        self._oracle = CpuGpuBuffer(4 * max_rows, dtype=torch.int32, device=device)
        # decode rows and their query tokens, when they are not a prefix of the batch
        self._decode_rows = CpuGpuBuffer(2 * max_rows, dtype=torch.int32, device=device)
        # packed dense rows: rows, cu_seqlens_q, seq_lens, query tokens
        self._packed = CpuGpuBuffer(3 * max_rows + 1 + max_tokens, dtype=torch.int32, device=device)
        # a pinned buffer is rewritten only once the copy from it ran (vLLM's input preparation
        # waits the same way; this also covers builds outside the model runner)
        self._copied = torch.cuda.Event() if device.type == "cuda" else None

    def allocate_graph_buffers(self, dtype: torch.dtype) -> None:
        """Query and output rows for the per-layer decode graphs (GraphRows); on CUDA with
        config.decode_graphs, and in tests on any device."""
        shape = (self.max_rows, self.num_heads, self.head_dim)
        self._graph_io = (torch.zeros(shape, dtype=dtype, device=self.device),
                          torch.zeros(shape, dtype=dtype, device=self.device))

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False) -> RocketKVMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        starts = cm.query_start_loc_cpu.numpy()[: num_reqs + 1]
        query_lens = np.diff(starts)
        if cm.seq_lens_cpu_upper_bound is None:  # exact here: RocketKV refuses speculative decoding
            raise RuntimeError("RocketKV needs CommonAttentionMetadata.seq_lens_cpu_upper_bound (the host's seq_lens)")
        seq_lens = cm.seq_lens_cpu_upper_bound.numpy()[:num_reqs]
        kinds = classify_rows(query_lens, seq_lens, self._plan_columns(query_lens, seq_lens), self.head_dim)
        if self._copied is not None:
            self._copied.synchronize()
        rows = kinds.dense
        dense = [
            DenseRow(row, start, start + qlen, seq, keep, gap)
            for row, start, qlen, seq, keep, gap in zip(rows.tolist(), *(a[rows].tolist() for a in (
                starts[:-1], query_lens, seq_lens, kinds.keep, kinds.gap_end)))
        ] if rows.size else []
        oracle = self._oracle_batch(cm, kinds, starts, seq_lens) if kinds.oracle.size else None
        decode = self._decode_batch(cm, kinds, starts, seq_lens, pure=not (dense or oracle)) if kinds.decode.size else None
        compactions = self._compactions(kinds, starts, seq_lens) if dense else []
        meta = RocketKVMetadata(cm.num_actual_tokens, cm.block_table_tensor, cm.slot_mapping, dense, compactions, decode, oracle)
        if dense and self.flash_prefill:
            gap_free = kinds.keep[rows] == kinds.gap_end[rows]
            if gap_free.any():
                free = rows[gap_free]
                meta.packed_dense = self._pack(free, starts, query_lens[free], seq_lens[free])
            if not gap_free.all():
                gapped = rows[~gap_free]
                meta.gapped_dense = self._gather_gapped(cm.block_table_tensor, gapped, starts, query_lens[gapped],
                                                        seq_lens[gapped], kinds.keep[gapped], kinds.gap_end[gapped])
        if self._copied is not None:
            self._copied.record()
        return meta

    def _plan_columns(self, query_lens: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
        """[rows, NUM_COLUMNS] plan columns of the batch's rows."""
        batch = current_batch()
        if batch is None:
            # rows without their requests: an evicting row would read its freed gap
            raise RuntimeError("RocketKV: attention metadata built outside the model runner's row hooks (plugin.py)")
        num_reqs = len(query_lens)
        plans = np.zeros((num_reqs, NUM_COLUMNS), dtype=np.int32)
        if batch.dummy:  # no requests: every row attends exactly (RequestPlan.exact)
            plans[:, PROMPT_LEN] = plans[:, KEEP] = seq_lens
            plans[:, TOP_CHANNELS] = self.head_dim
            return plans
        states = batch.states[:num_reqs]
        unknown = (query_lens[len(states):] > 0).nonzero()[0]
        if unknown.size:
            raise RuntimeError(f"RocketKV: batch row {len(states) + int(unknown[0])} has no request state")
        plans[: len(states)] = self.plans.columns(states)
        return plans

    def _decode_batch(self, cm: CommonAttentionMetadata, kinds: RowKinds, starts: np.ndarray, seq_lens: np.ndarray,
                      pure: bool) -> DecodeBatch:
        rows = kinds.decode
        count = rows.size
        contiguous = rows[-1] == count - 1
        # a pure-decode step covers every row, CUDA-graph padding included (seq_len 0: nothing to read)
        num_rows = cm.num_reqs if pure and contiguous else count
        graph_rows = padded_rows(num_rows, self.max_rows) if self._graph_io is not None else 0
        host = self._columns.np
        host[:4, :count] = kinds.columns[:, rows]
        host[6, :count] = seq_lens[rows]
        host[:, count : max(num_rows, graph_rows)] = ((0,), (0,), (self.head_dim,), (EVERY_PAGE,), (0,), (-1,), (0,))
        if self.config.attend_newest_page:  # (NewestPages.of, from the host's seq_lens)
            last = np.maximum(seq_lens[rows] - 1, 0) // self.layout.page_size
            host[4, :count], host[5, :count] = last * self.layout.page_size, np.where(seq_lens[rows] > 0, last, -1)
        # (the reference path always selects: without listed rows its selection returns at once)
        selects = self._planner_cls is None or bool((kinds.columns[3, rows] != EVERY_PAGE).any())
        all_cols = self._columns.copy_to_gpu()
        cols = all_cols[:, :num_rows]
        if contiguous:
            token_index, index = None, None
            block_table, seq_lens_rows = cm.block_table_tensor[:num_rows], cm.seq_lens[:num_rows]
        else:
            staged = self._decode_rows.np
            staged[:count], staged[count : 2 * count] = rows, starts[rows]
            on_device = self._decode_rows.copy_to_gpu(2 * count)
            index, token_index = on_device[:count], on_device[count : 2 * count]
            block_table, seq_lens_rows = cm.block_table_tensor[index], cm.seq_lens[index]
        width = cm.block_table_tensor.shape[1]
        decode = DecodeBatch(token_index, num_rows, block_table, seq_lens_rows, *cols[:4],
                             self._plan(width, num_rows), self._newest(cols), selects=selects)
        if graph_rows:
            decode.graph = self._graph_rows(cm.block_table_tensor, index, count, graph_rows, all_cols[:, :graph_rows],
                                            selects)
        return decode

    def _newest(self, cols: torch.Tensor) -> NewestPages | None:
        return NewestPages(cols[4], cols[5]) if self.config.attend_newest_page else None

    def _plan(self, width: int, rows: int):
        return self._planner(width)(rows) if self._planner_cls is not None else None

    def _graph_rows(self, block_table: torch.Tensor, index: torch.Tensor | None, count: int, graph_rows: int,
                    cols: torch.Tensor, selects: bool) -> GraphRows:
        """The decode rows as GraphRows: their block-table rows copied into a persistent table
        (one device copy a step), the rest of it unread (seq_len 0)."""
        width = block_table.shape[1]
        table = self._graph_tables.get(width)
        if table is None:
            table = self._graph_tables[width] = torch.zeros(self.max_rows, width, dtype=block_table.dtype,
                                                            device=block_table.device)
        if index is None:
            table[:count].copy_(block_table[:count], non_blocking=True)
        else:
            torch.index_select(block_table, 0, index, out=table[:count])
        batch = DecodeBatch(None, graph_rows, table[:graph_rows], cols[6], *cols[:4], self._plan(width, graph_rows),
                            self._newest(cols), selects=selects)
        query, output = self._graph_io
        return GraphRows(batch, query[:graph_rows], output[:graph_rows], self._builder_id)

    def _planner(self, width: int):
        planner = self._planners.get(width)
        if planner is None:  # (earlier planners stay: captured CUDA graphs use their workspaces)
            shape = selection_shape(self.num_heads, self.kv_cache_spec.num_kv_heads, self.head_dim, self.layout, width,
                                    self.device)
            planner = self._planners[width] = self._planner_cls(shape, self.max_rows)
        return planner

    def _oracle_batch(self, cm: CommonAttentionMetadata, kinds: RowKinds, starts: np.ndarray,
                      seq_lens: np.ndarray) -> OracleBatch:
        rows = kinds.oracle
        count = rows.size
        staged = self._oracle.np
        for i, column in enumerate((rows, starts[rows], seq_lens[rows], kinds.oracle_tokens[rows])):
            staged[i * count : (i + 1) * count] = column
        on_device = self._oracle.copy_to_gpu(4 * count)
        row, token, seq, top_k = (on_device[i * count : (i + 1) * count] for i in range(4))
        return OracleBatch(token.long(), cm.block_table_tensor[row], seq, top_k, int(seq_lens[rows].max()))

    def _compactions(self, kinds: RowKinds, starts: np.ndarray, seq_lens: np.ndarray) -> list[Compaction]:
        rows = kinds.compacts.nonzero()[0]
        if not rows.size:
            return []
        prompt_len, computed = kinds.gap_end[rows], seq_lens[rows] - (starts[rows + 1] - starts[rows])
        window_start = np.maximum(computed, prompt_len - self.config.window)
        return [
            Compaction(row, start + ws - c, start + p - c, p, k, seq)
            for row, start, ws, c, p, k, seq in zip(*(a.tolist() for a in (
                rows, starts[rows], window_start, computed, prompt_len, kinds.kept[rows], seq_lens[rows])))
        ]

    def _gather_gapped(self, block_table: torch.Tensor, rows: np.ndarray, starts: np.ndarray, query_lens: np.ndarray,
                       seq_lens: np.ndarray, keep: np.ndarray, gap_end: np.ndarray) -> GappedDense:
        """Where each gapped row's live tokens are: the kept prompt, then what follows the gap. Its
        queries follow the gap (rows are compacted only after their prompt: classify_rows), so causal
        attention over the live tokens alone, aligned at their end, is the row's attention. Host work
        per live token: rare steps (preemption), outside graphs."""
        live = keep + seq_lens - gap_end
        cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (query_lens, live))
        index = np.arange(cu_k[-1]) - np.repeat(cu_k[:-1], live)  # each live token's index in its row
        positions = index + np.where(index >= np.repeat(keep, live), np.repeat(gap_end - keep, live), 0)
        token_index = np.repeat(starts[rows] - cu_q[:-1], query_lens) + np.arange(cu_q[-1])

        def device(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(array).to(self.device, dtype)

        positions_t = device(positions, torch.int64)
        blocks = block_table[device(np.repeat(rows, live), torch.int64), positions_t // self.block_size].long()
        return GappedDense(device(token_index, torch.int64), device(cu_q, torch.int32), device(cu_k, torch.int32),
                           blocks, positions_t % self.block_size, int(query_lens.max()), int(live.max()))

    def _pack(self, rows: np.ndarray, starts: np.ndarray, query_lens: np.ndarray, seq_lens: np.ndarray) -> PackedDense:
        count, tokens = rows.size, int(query_lens.sum())
        cu = np.zeros(count + 1, dtype=np.int32)
        np.cumsum(query_lens, out=cu[1:])
        staged = self._packed.np
        staged[:count], staged[count : 2 * count + 1], staged[2 * count + 1 : 3 * count + 1] = rows, cu, seq_lens
        # query token t of the packed rows: its row's first token + its offset in the row
        staged[3 * count + 1 : 3 * count + 1 + tokens] = np.repeat(starts[rows] - cu[:-1], query_lens) + np.arange(tokens)
        on_device = self._packed.copy_to_gpu(3 * count + 1 + tokens)
        return PackedDense(
            on_device[3 * count + 1 :], on_device[:count], on_device[count : 2 * count + 1],
            on_device[2 * count + 1 : 3 * count + 1], int(query_lens.max()), int(seq_lens.max()),
        )
