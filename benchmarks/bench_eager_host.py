"""Decode attention of a whole step (every layer) launched eagerly vs replayed as a CUDA graph.

A step outside a full CUDA graph (mixed prefill+decode steps, uncaptured batch sizes,
--enforce-eager) launches each layer's decode attention from Python: write_kv, the page
selection (prep, logits, top-k) and the split-K attention. This times, on one pure-decode
batch of a Llama-3.1-8B shape (Hq 32, Hkv 8, D 128, 32 layers, each its own KV cache):

- eager_unplanned: every layer plans its page selection and allocates its scratch (as
  before the builder's launch plan);
- eager_planned:   the selection planned once per step (the metadata builder's
  SelectionPlanner: host decisions made once, scratch from a workspace allocated once);
- layer_graphs:    each layer's selection + attention replayed from its own graph over
                   fixed-address rows padded to a power of two, queries copied in and the
                   output out (the impl's path for steps without a full graph, layer_graphs.py;
                   as there, no selection when no row chooses pages: dense rows only);
- layer_graphs_no_copies: the same replays without the query and output copies (what
                   the copies cost, against what launching a graph per layer costs);
- graph:           eager_planned captured once and replayed (the full-CUDA-graph path of a
                   server whose requests may select pages, which launches the selection
                   whatever the rows);
- unselected_graph: (rows that decode exactly) write_kv and the attention over every live
                   page without a list, no selection launched, as a full graph: the full-graph
                   path of a server where no request selects (16-token pages by default,
                   RocketKVConfig.selects_pages);
- attend_all_pages_graph: the attention kernel alone over an explicit list of every live page,
                   as a full graph (what HSA's attention would cost if it chose every page);
- fa3_graph:       (when vLLM is importable) stock's decode: FlashAttention 3 over the whole
                   context of every request, with the KV write, as a full graph;
- builder_build:   (when vLLM is importable) the metadata builder's build() of this batch.

CUDA events time each repeat of --steps steps; per mode: median and spread (min, max) of the
per-step milliseconds over --repeats repeats, and the host's launch time per step (Python,
no synchronisation). JSON on stdout.

    python benchmarks/bench_eager_host.py --batch 3 --context 131072 --layers 32 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rocketkv_vllm.config import RocketKVConfig  # noqa: E402
from rocketkv_vllm.kernels import get_ops  # noqa: E402
from rocketkv_vllm.kernels.layer_graphs import LayerGraphs, padded_rows  # noqa: E402
from rocketkv_vllm.kernels.triton_hsa import SelectionPlanner, SelectionShape  # noqa: E402
from rocketkv_vllm.kv_layout import KVLayout  # noqa: E402
from rocketkv_vllm.ops.newest_page import NewestPages  # noqa: E402
from rocketkv_vllm.ops.reference import EVERY_PAGE  # noqa: E402
from rocketkv_vllm.plan import plan_for_params  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--mode", default="rocketkv", choices=["rocketkv", "mt", "full"])
    p.add_argument("--dense-below", type=int, default=0,
                   help="rocketkv.dense_below: kept contexts up to this many tokens attend exactly (0: HSA)")
    p.add_argument("--page-size", type=int, default=None, help="rocketkv.page_size (default: the setting's default)")
    p.add_argument("--max-tokens", type=int, default=256, help="the requests' max_tokens (their plan depends on it)")
    p.add_argument("--max-model-len", type=int, default=0, help="block-table width (default: context + max_tokens)")
    p.add_argument("--max-rows", type=int, default=256, help="the builder's max_num_seqs (workspace size)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shared-cache", action="store_true", help="one KV cache for every layer (less GPU memory)")
    return p.parse_args()


class DecodeLayers:
    """The decode half of RocketKVImpl.forward for every layer of a pure-decode step."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        config = bench_config(args)
        self.layout = KVLayout(args.block_size, config.page_size, config.layout_summary_group())
        b, ctx = args.batch, args.context
        max_len = args.max_model_len or ctx + args.max_tokens
        width = -(-max_len // args.block_size)
        blocks = -(-(ctx + 1) // args.block_size)
        dtype = torch.bfloat16
        caches = 1 if args.shared_cache else args.layers
        self.kv = [torch.randn(self.layout.cache_shape(b * blocks + 1, KV_HEADS, HEAD_DIM), dtype=dtype, device=device)
                   for _ in range(caches)]
        table = torch.zeros(b, width, dtype=torch.int32, device=device)
        table[:, :blocks] = torch.randperm(b * blocks, device=device).int().view(b, blocks) + 1
        self.table = table
        plan = plan_for_params(SimpleNamespace(extra_args=None, max_tokens=args.max_tokens), ctx, config, HEAD_DIM,
                               args.block_size)
        self.plan = plan
        self.selects = bool(plan.sparse)  # else no selection is launched outside full graphs (the impl's rule)
        full = lambda v: torch.full((b,), v, dtype=torch.int32, device=device)  # noqa: E731
        self.seq = full(ctx + 1)
        self.keep, self.gap = full(plan.keep if plan.evicts else ctx), full(ctx)
        self.top_channels = full(plan.top_channels if plan.sparse else HEAD_DIM)
        self.top_pages = full(plan.top_pages if plan.sparse else EVERY_PAGE)
        pos = self.seq.long() - 1
        self.slots = table.gather(1, (pos // args.block_size)[:, None].int())[:, 0].long() * args.block_size + pos % args.block_size
        self.query = torch.randn(b, Q_HEADS, HEAD_DIM, dtype=dtype, device=device)
        self.new_kv = torch.randn(b, KV_HEADS, HEAD_DIM, dtype=dtype, device=device)
        self.out = torch.empty_like(self.query)
        # the builder's per-step newest pages (ops/newest_page.py), appended by each layer's selection
        self.newest = NewestPages.of(self.seq, config.page_size) if config.attend_newest_page else None
        self.layers = args.layers
        self.ops = get_ops(device)
        shape = SelectionShape(Q_HEADS, KV_HEADS, HEAD_DIM, self.layout, width * self.layout.pages_per_block, device)
        self.planner = SelectionPlanner(shape, max(args.max_rows, b))
        self.batch = b

    def padded_inputs(self, max_rows: int) -> None:
        """Fixed-address copies of the batch padded to a power of two rows (seq_len 0 beyond
        it), as the metadata builder's GraphRows are, and a graph store per layer."""
        b, rows = self.batch, padded_rows(self.batch, max_rows)

        def pad(t: torch.Tensor, fill: int = 0) -> torch.Tensor:
            padded = torch.full((rows, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
            padded[:b] = t
            return padded

        self.graph_rows = rows
        self.padded = SimpleNamespace(
            query=pad(self.query), out=pad(self.out), table=pad(self.table), seq=pad(self.seq), keep=pad(self.keep),
            gap=pad(self.gap), top_channels=pad(self.top_channels, HEAD_DIM), top_pages=pad(self.top_pages, EVERY_PAGE),
            newest=NewestPages.of(pad(self.seq), self.layout.page_size) if self.newest else None, plan=self.planner(rows),
        )
        self.graphs = [LayerGraphs() for _ in range(self.layers)]

    def _select_and_attend(self, kv: torch.Tensor, p: SimpleNamespace) -> None:
        if self.selects:
            scored = p.newest.scored_seq_lens if p.newest else p.seq
            selection = self.ops.hsa_select_pages(p.query, kv, self.layout, p.table, scored, p.keep, p.gap,
                                                  p.top_channels, p.top_pages,
                                                  newest_page=p.newest.page if p.newest else None, plan=p.plan)
        else:
            selection = p.plan.unlisted()
        self.ops.paged_sparse_attention(p.query, kv, self.layout, p.table, selection.index, selection.count, p.seq,
                                        p.keep, p.gap, 1.0 / HEAD_DIM ** 0.5, out=p.out, top_pages=p.top_pages)

    def step_layer_graphs(self, copies: bool = True) -> None:
        """The impl's path for a step without a full graph: write_kv, then per layer copy the
        queries in, replay the layer's graph, copy the output out (copies=False: the replays alone)."""
        p, b = self.padded, self.batch
        for layer in range(self.layers):
            kv = self.kv[layer % len(self.kv)]
            self.ops.write_kv(kv, self.layout, self.new_kv, self.new_kv, self.slots)
            if copies:
                p.query[:b].copy_(self.query)
            self.graphs[layer].replay((self.graph_rows, kv.data_ptr()), lambda: self._select_and_attend(kv, p), kv.device)
            if copies:
                self.out.copy_(p.out[:b])

    def step_attend_all_pages(self) -> None:
        """write_kv and the attention kernel over every live page of the evicted layout."""
        if not hasattr(self, "all_pages"):
            self.all_pages = all_live_pages(self.seq, self.keep, self.gap, self.layout.page_size, KV_HEADS)
        index, count = self.all_pages
        for layer in range(self.layers):
            kv = self.kv[layer % len(self.kv)]
            self.ops.write_kv(kv, self.layout, self.new_kv, self.new_kv, self.slots)
            self.ops.paged_sparse_attention(self.query, kv, self.layout, self.table, index, count, self.seq,
                                            self.keep, self.gap, 1.0 / HEAD_DIM ** 0.5, out=self.out)

    def step_unselected(self) -> None:
        """write_kv and the attention of exactly decoding rows, no selection (RocketKVImpl._decode
        where no row selects)."""
        selection = self.planner(self.batch).unlisted()
        for layer in range(self.layers):
            kv = self.kv[layer % len(self.kv)]
            self.ops.write_kv(kv, self.layout, self.new_kv, self.new_kv, self.slots)
            self.ops.paged_sparse_attention(self.query, kv, self.layout, self.table, selection.index, selection.count,
                                            self.seq, self.keep, self.gap, 1.0 / HEAD_DIM ** 0.5, out=self.out,
                                            top_pages=self.top_pages)

    def step(self, planned: bool) -> None:
        """Every layer launched from Python: with the builder's plan (planned) or one per call;
        all layers select, as inside a full graph."""
        ops, layout = self.ops, self.layout
        selection_plan = self.planner(self.batch) if planned else None  # once per step (the builder)
        for layer in range(self.layers):
            kv = self.kv[layer % len(self.kv)]
            ops.write_kv(kv, layout, self.new_kv, self.new_kv, self.slots)
            scored = self.newest.scored_seq_lens if self.newest else self.seq
            selection = ops.hsa_select_pages(self.query, kv, layout, self.table, scored, self.keep, self.gap,
                                             self.top_channels, self.top_pages,
                                             newest_page=self.newest.page if self.newest else None, plan=selection_plan)
            ops.paged_sparse_attention(self.query, kv, layout, self.table, selection.index, selection.count, self.seq,
                                       self.keep, self.gap, 1.0 / HEAD_DIM ** 0.5, out=self.out,
                                       top_pages=self.top_pages)


def all_live_pages(seq: torch.Tensor, keep: torch.Tensor, gap: torch.Tensor, page_size: int,
                   kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every live page of each request (the kept prompt pages, then those from the gap's end on) as a
    page selection: index [B, kv_heads, W] and count [B, kv_heads]."""
    kept, tail = -(-keep // page_size), -(-seq // page_size) - gap // page_size
    j = torch.arange(int((kept + tail).max()), device=seq.device, dtype=torch.int32)
    pages = torch.where(j < kept[:, None], j, j - kept[:, None] + gap[:, None] // page_size)
    return (pages[:, None].expand(-1, kv_heads, -1).contiguous(),
            (kept + tail)[:, None].expand(-1, kv_heads).contiguous())


def timed(run, steps: int, repeats: int) -> dict:
    """Per-step ms (CUDA events) and host launch ms per step, over repeats of `steps` steps."""
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    device_ms, host_ms = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        host = time.perf_counter() - t0
        end.record()
        end.synchronize()
        device_ms.append(start.elapsed_time(end) / steps)
        host_ms.append(host * 1e3 / steps)
    return {
        "step_ms_median": statistics.median(device_ms), "step_ms_min": min(device_ms), "step_ms_max": max(device_ms),
        "host_launch_ms_median": statistics.median(host_ms), "step_ms": device_ms,
    }


def captured(run) -> torch.cuda.CUDAGraph:
    """run() warmed up off the default stream (torch's advice), then captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph


def fa3_step(args: argparse.Namespace, layers: DecodeLayers):
    """Stock's decode step (FlashAttention 3 over the whole context, its KV written first) on
    the same KV caches viewed as FlashAttention's paged layout; None without vLLM."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    b, device = args.batch, layers.query.device
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=device)
    seq, table, scale = layers.seq, layers.table, 1.0 / HEAD_DIM ** 0.5
    max_seq = int(seq.max())

    def step() -> None:
        for layer in range(layers.layers):
            kv = layers.kv[layer % len(layers.kv)]
            layers.ops.write_kv(kv, layers.layout, layers.new_kv, layers.new_kv, layers.slots)
            keys = layers.layout.keys(kv).transpose(1, 2)
            values = layers.layout.values(kv).transpose(1, 2)
            flash_attn_varlen_func(q=layers.query, k=keys, v=values, max_seqlen_q=1, cu_seqlens_q=cu_q,
                                   max_seqlen_k=max_seq, seqused_k=seq, softmax_scale=scale, causal=True,
                                   block_table=table, fa_version=3, out=layers.out)
    return step


def bench_config(args: argparse.Namespace) -> RocketKVConfig:
    """The server settings the layers and the metadata builder both plan with."""
    pages = {} if args.page_size is None else {"page_size": args.page_size}
    return RocketKVConfig(budget=args.budget, mode=args.mode, dense_below=args.dense_below, **pages)


def builder_build_us(args: argparse.Namespace, layers: DecodeLayers, device: torch.device) -> dict | None:
    """The metadata builder's build() of this batch (needs vLLM; None without it)."""
    try:
        from rocketkv_vllm.vllm_glue.backend import RocketKVMetadataBuilder
        from rocketkv_vllm.vllm_glue.batch_context import rows_of_batch
        from rocketkv_vllm.vllm_glue.request_plans import attach_plan
    except ImportError as exc:
        return {"skipped": f"vLLM not importable: {exc}"}
    config = bench_config(args)
    spec = SimpleNamespace(head_size=HEAD_DIM, block_size=args.block_size, dtype=torch.bfloat16, num_kv_heads=KV_HEADS)
    builder = object.__new__(RocketKVMetadataBuilder)
    builder._setup(config, spec, max(args.max_rows, args.batch), 8192, device, Q_HEADS, layers.table.shape[1])
    states = []
    for i in range(args.batch):
        params = SimpleNamespace(extra_args=None, max_tokens=args.max_tokens)
        attach_plan(params, layers.plan)
        states.append(SimpleNamespace(req_id=f"r{i}", sampling_params=params, num_prompt_tokens=args.context))
    b = args.batch
    starts = torch.arange(b + 1, dtype=torch.int32)
    cm = SimpleNamespace(
        query_start_loc_cpu=starts, query_start_loc=starts.to(device), seq_lens=layers.seq,
        seq_lens_cpu_upper_bound=torch.full((b,), args.context + 1, dtype=torch.int32), num_reqs=b, num_actual_tokens=b,
        block_table_tensor=layers.table, slot_mapping=layers.slots,
    )
    with rows_of_batch(states):
        for _ in range(10):
            builder.build(0, cm)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(100):
                builder.build(0, cm)
            times.append((time.perf_counter() - t0) * 1e4)
    torch.cuda.synchronize()
    return {"build_us_median": statistics.median(times), "build_us_min": min(times), "build_us_max": max(times)}


def main() -> None:
    args = parse()
    device = torch.device("cuda")
    layers = DecodeLayers(args, device)
    result = {
        "batch": args.batch, "context": args.context, "layers": args.layers, "mode": args.mode, "budget": args.budget,
        "plan": {"keep": layers.plan.keep, "sparse": layers.plan.sparse, "top_channels": layers.plan.top_channels,
                 "top_pages": layers.plan.top_pages},
        "dense_below": args.dense_below,
        "ops_backend": layers.ops.backend, "gpu": torch.cuda.get_device_name(device),
        "workspace_mib": layers.planner.workspace.nbytes() / 2**20, "steps": args.steps, "repeats": args.repeats,
    }
    result["builder_build"] = builder_build_us(args, layers, device)  # (first: a failure loses no timing)
    result["eager_unplanned"] = timed(lambda: layers.step(planned=False), args.steps, args.repeats)
    result["eager_planned"] = timed(lambda: layers.step(planned=True), args.steps, args.repeats)
    layers.padded_inputs(max(args.max_rows, args.batch))
    result["layer_graphs"] = timed(layers.step_layer_graphs, args.steps, args.repeats)
    result["layer_graphs_no_copies"] = timed(lambda: layers.step_layer_graphs(copies=False), args.steps, args.repeats)
    result["layer_graphs_rows"] = layers.graph_rows
    result["graph"] = timed(captured(lambda: layers.step(planned=True)).replay, args.steps, args.repeats)
    if not layers.plan.sparse:
        result["unselected_graph"] = timed(captured(layers.step_unselected).replay, args.steps, args.repeats)
    result["attend_all_pages_graph"] = timed(captured(layers.step_attend_all_pages).replay, args.steps, args.repeats)
    fa3 = fa3_step(args, layers)
    if fa3 is not None:
        result["fa3_graph"] = timed(captured(fa3).replay, args.steps, args.repeats)
    graph_ms = result["graph"]["step_ms_median"]
    for mode in ("eager_unplanned", "eager_planned", "layer_graphs", "layer_graphs_no_copies"):
        if mode not in result:
            continue
        result[f"{mode}_over_graph"] = result[mode]["step_ms_median"] / graph_ms
        result[mode]["host_us_per_layer"] = result[mode]["host_launch_ms_median"] * 1e3 / args.layers
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
