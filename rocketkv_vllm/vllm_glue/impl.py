"""RocketKV attention forward pass: store KV + summaries, exact prefill, SnapKV++ compaction, HSA decode."""
from __future__ import annotations

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionImpl, AttentionLayer, AttentionType

from rocketkv_vllm.algorithms import snapkv_select
from rocketkv_vllm.config import RocketKVConfig
from rocketkv_vllm.kernels import flash_prefill, get_ops
from rocketkv_vllm.kv_layout import KVLayout
from rocketkv_vllm.ops import reference
from rocketkv_vllm.kernels.layer_graphs import LayerGraphs
from rocketkv_vllm.vllm_glue.backend import DecodeBatch, GraphRows, RocketKVMetadata, decode_bounds, selection_shape
from rocketkv_vllm.vllm_glue.tp_groups import gathers_queries, selection_num_heads, selection_queries


class RocketKVImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **unsupported: object,
    ) -> None:
        reasons = [
            name
            for name, present in (
                ("ALiBi", alibi_slopes is not None),
                ("sliding windows", sliding_window is not None),
                ("logit soft-capping", bool(logits_soft_cap)),
                ("non-decoder attention", attn_type != AttentionType.DECODER),
                ("KV sharing between layers", kv_sharing_target_layer_name is not None),
                ("quantized KV caches", kv_cache_dtype not in ("auto", "float16", "bfloat16")),
                (", ".join(sorted(k for k, v in unsupported.items() if v is not None)), any(v is not None for v in unsupported.values())),
            )
            if present
        ]
        if reasons:
            raise NotImplementedError(f"the RocketKV backend does not support {'; '.join(reasons)}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        vllm_config = get_current_vllm_config()
        self.config = RocketKVConfig.from_additional_config(vllm_config.additional_config)
        self.layout = KVLayout(vllm_config.cache_config.block_size, self.config.page_size,
                               self.config.layout_summary_group())
        self._ops = None
        # the queries SnapKV++ and HSA score with (the whole GQA group's when KV heads are replicated)
        self.selection_queries = selection_queries(self.num_heads, self.num_kv_heads, vllm_config)
        # per-layer decode graphs (layer_graphs.py), except where selecting gathers queries
        # across ranks (a collective: only vLLM's own graphs capture those)
        gathers = gathers_queries(self.num_heads, vllm_config)
        self._graphs = LayerGraphs() if self.config.decode_graphs and not gathers else None
        self._graphs_builder_id = 0  # whose GraphRows the graphs were captured over
        # whether any request may select pages: where none may, vLLM's full graphs hold no selection
        self._may_select = self.config.selects_pages()
        # the page selection's workspace, allocated during memory profiling (reserve_selection_workspace)
        self._selection_heads = selection_num_heads(self.num_heads, vllm_config)
        self._decode_bounds = decode_bounds(vllm_config)
        self._workspace = None

    def ops(self, device: torch.device):
        if self._ops is None:
            self._ops = get_ops(device)
        return self._ops

    def reserve_selection_workspace(self, device: torch.device) -> None:
        """In vLLM's memory profiling: allocate the page selection's workspace (up to ~1 GiB at
        128K contexts and 512 rows), so the profile counts it before sizing the KV pool instead
        of the metadata builder allocating it past the memory limit afterwards; the builder
        plans over this same one (SelectionPlanner.workspace_for), every layer holds it."""
        planner = self.ops(device).selection_planner
        if planner is None or self._workspace is not None:
            return
        rows, width = self._decode_bounds
        shape = selection_shape(self._selection_heads, self.num_kv_heads, self.head_size, self.layout, width, device)
        self._workspace = planner.workspace_for(shape, rows)

    def _launches_selection(self, selects: bool, capturing_full_graph: bool) -> bool:
        """Whether this launch selects pages: when a row of the step does, and inside vLLM's capture
        of a full graph (replayed for whatever rows later steps hold) where any request may (no
        request's plan selects where none may: plan.plan_request)."""
        return selects or (capturing_full_graph and self._may_select)

    def _decode(self, ops, q: torch.Tensor, kv_cache: torch.Tensor, d: DecodeBatch, out: torch.Tensor | None,
                select: bool) -> torch.Tensor:
        """HSA page selection (the newest page appended), sparse attention: [rows, Hq, D]. Without
        `select` (no row chooses pages) every row attends all its live pages, unselected."""
        newest = d.newest  # (the builder's, from the host's seq_lens: no ops here)
        if select:
            selection = ops.hsa_select_pages(
                self.selection_queries(q), kv_cache, self.layout, d.block_table,
                newest.scored_seq_lens if newest else d.seq_lens, d.keep, d.gap_end, d.top_channels, d.top_pages,
                newest_page=newest.page if newest else None, plan=d.selection,
            )
        else:
            selection = d.selection.unlisted()
        return ops.paged_sparse_attention(
            q, kv_cache, self.layout, d.block_table, selection.index, selection.count, d.seq_lens, d.keep, d.gap_end,
            self.scale, out=out, top_pages=d.top_pages,
        )

    def _decode_in_graph(self, ops, q: torch.Tensor, kv_cache: torch.Tensor, rows: GraphRows) -> torch.Tensor:
        """_decode over the padded GraphRows, replayed from this layer's graph of their size
        (a graph a size with and one without the page selection)."""
        if rows.builder_id != self._graphs_builder_id:  # a new builder: the earlier graphs' buffers are gone
            self._graphs, self._graphs_builder_id = type(self._graphs)(), rows.builder_id
        n = q.shape[0]
        rows.query[:n].copy_(q)
        select = rows.batch.selects
        key = (rows.batch.num_rows, select, rows.batch.block_table.data_ptr(),
               rows.query.data_ptr(), kv_cache.data_ptr())
        self._graphs.replay(key, lambda: self._decode(ops, rows.query, kv_cache, rows.batch, rows.output, select),
                            kv_cache.device)
        return rows.output[:n]

    def do_kv_cache_update(
        self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        n = slot_mapping.shape[0]
        self.ops(kv_cache.device).write_kv(kv_cache, self.layout, key[:n], value[:n], slot_mapping)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: RocketKVMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the RocketKV backend")
        if attn_metadata is None:  # memory profiling
            self.reserve_selection_workspace(query.device)
            return output
        ops = self.ops(kv_cache.device)
        meta = attn_metadata
        n = meta.num_actual_tokens
        query = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)

        packed, gapped = meta.packed_dense, meta.gapped_dense
        if packed is not None:
            out[packed.token_index] = flash_prefill.flash_prefill(
                query[packed.token_index], kv_cache, self.layout, meta.block_table[packed.rows], packed.cu_seqlens_q,
                packed.seq_lens, packed.max_query_len, packed.max_seq_len, self.scale,
            )
        if gapped is not None:
            out[gapped.token_index] = flash_prefill.flash_prefill_gathered(
                query[gapped.token_index], kv_cache, self.layout, gapped.blocks, gapped.offsets, gapped.cu_seqlens_q,
                gapped.cu_seqlens_k, gapped.max_query_len, gapped.max_live, self.scale,
            )
        if packed is None and gapped is None:  # no FlashAttention here
            for row in meta.dense:
                out[row.query_start : row.query_end] = reference.paged_causal_attention(
                    query[row.query_start : row.query_end], kv_cache, self.layout, meta.block_table[row.row],
                    row.seq_len, row.keep, row.gap_end, self.scale,
                )
        for c in meta.compactions:
            block_row = meta.block_table[c.row]
            keys, _ = reference.gather_tokens(kv_cache, self.layout, block_row, c.prompt_len)
            kept = snapkv_select(
                self.selection_queries(query[c.window_start : c.window_end]), keys, c.prompt_len, c.keep,
                self.config.pool_kernel, self.scale,
                scores_fn=ops.snapkv_window_scores,
            )
            ops.compact_kept_tokens(kv_cache, self.layout, block_row, kept, c.prompt_len)
            if c.seq_len > c.prompt_len:
                reference.refold_after_prompt(kv_cache, self.layout, block_row, c.prompt_len, c.seq_len)

        if (o := meta.oracle) is not None:
            out[o.token_index] = reference.oracle_decode_attention(
                query[o.token_index], kv_cache, self.layout, o.block_table, o.seq_lens, o.top_k, o.max_seq_len, self.scale
            )
        d = meta.decode
        if d is not None:
            # (tokens past num_rows, if any, are CUDA-graph padding that nobody reads)
            q = query[: d.num_rows] if d.token_index is None else query[d.token_index]
            # (inside vLLM's own capture of a full graph, launch directly: graphs do not nest; and
            # select, since the graph replays whatever rows later steps hold)
            capturing = kv_cache.is_cuda and torch.cuda.is_current_stream_capturing()
            if d.graph is not None and self._graphs is not None and not capturing:
                result = self._decode_in_graph(ops, q, kv_cache, d.graph)
            else:
                result = self._decode(ops, q, kv_cache, d, out[: d.num_rows] if d.token_index is None else None,
                                      self._launches_selection(d.selects, capturing))
            if d.token_index is not None:
                out[d.token_index] = result
            elif result.data_ptr() != out.data_ptr():
                out[: d.num_rows] = result
        return output
