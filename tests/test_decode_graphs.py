"""Steps that vLLM runs without a full CUDA graph replay each layer's decode attention from a
graph captured per padded row count (kernels/layer_graphs.py, the builder's GraphRows).

The builder's padded rows are checked on the host; the impl's forward over them must give the
direct launch's output, step after step with fresh queries and across row counts. On CPU the
graph is a stand-in that runs the captured body each time (reference ops); on a GPU the real
graphs replay the Triton/CUDA kernels.
"""
import contextlib
import gc
import random
from types import SimpleNamespace

import pytest
import torch

from rocketkv_vllm.config import RocketKVConfig
from rocketkv_vllm.kernels import layer_graphs
from rocketkv_vllm.kernels.layer_graphs import LayerGraphs, padded_rows
from rocketkv_vllm.ops import reference as R
from rocketkv_vllm.plan import plan_for_params
from rocketkv_vllm.ops.reference import EVERY_PAGE
from rocketkv_vllm.vllm_glue.backend import RocketKVMetadataBuilder
from rocketkv_vllm.vllm_glue.batch_context import rows_of_batch
from rocketkv_vllm.vllm_glue.impl import RocketKVImpl
from rocketkv_vllm.vllm_glue.request_plans import attach_plan
from rocketkv_vllm.vllm_glue.tp_groups import selection_queries  # noqa: F401  (the impl's own-queries default)

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
BLOCK, HEADS, KV_HEADS, HEAD_DIM, MAX_ROWS, WIDTH = 16, 8, 2, 64, 8, 40
CONFIG = RocketKVConfig(budget=64, dense_below=0)  # HSA rows


def test_padded_rows_are_powers_of_two_up_to_the_maximum():
    assert [padded_rows(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert padded_rows(5, 6) == 6 and padded_rows(300, 512) == 512


def test_a_failed_capture_falls_back_to_direct_launches(monkeypatch):
    def invalidated(body, device, pool):
        body()  # (the warm-up run)
        raise RuntimeError("operation not permitted when stream is capturing")

    warnings = []
    pools = []
    monkeypatch.setattr(layer_graphs.SharedPool, "of",
                        lambda device: pools.append(SimpleNamespace(handle=(1, 0), retired=False, retire=lambda d: None))
                        or pools[-1])
    monkeypatch.setattr(layer_graphs, "capture", invalidated)
    monkeypatch.setattr(layer_graphs.logger, "warning", lambda message, *args: warnings.append(message % args))
    graphs, calls = LayerGraphs(), []
    for _ in range(3):
        graphs.replay("k", lambda: calls.append(1), DEV)
    assert len(calls) == 4 and len(graphs) == 0  # warm-up, then every step directly; no retry
    assert len(pools) == 1
    assert len(warnings) == 1 and "not permitted" in warnings[0]

    def broken():
        raise ValueError("a real error in the body")

    with pytest.raises(ValueError, match="real error"):  # not swallowed: the direct launch raises it
        graphs.replay("other", broken, DEV)


def test_layers_share_a_pool_until_all_are_gone(monkeypatch):
    """Every live LayerGraphs captures into one pool; once all are gone (an engine torn down)
    the allocator has retired it, so the next ones get a new pool, as after a failed capture."""
    handles = iter(range(1, 100))
    monkeypatch.setattr(layer_graphs.torch.cuda, "graph_pool_handle", lambda: (next(handles), 0))
    monkeypatch.setattr(layer_graphs.torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(layer_graphs.SharedPool, "_current", {})
    gpu = torch.device("cuda", 0)
    first, second = layer_graphs.SharedPool.of(gpu), layer_graphs.SharedPool.of(gpu)
    assert first is second and first.handle == (1, 0)
    assert layer_graphs.SharedPool.of(torch.device("cuda", 1)).handle == (2, 0)  # per device
    del first, second
    gc.collect()
    third = layer_graphs.SharedPool.of(gpu)
    assert third.handle == (3, 0)
    other = layer_graphs.SharedPool.of(torch.device("cuda", 1))
    other.retire(torch.device("cuda", 1))  # (retiring cuda:1's pool leaves cuda:0's)
    assert layer_graphs.SharedPool.of(gpu) is third and third.retired is False
    third.retire(gpu)
    fourth = layer_graphs.SharedPool.of(gpu)
    assert third.retired and fourth.handle == (5, 0) and not fourth.retired


def make_builder() -> RocketKVMetadataBuilder:
    spec = SimpleNamespace(head_size=HEAD_DIM, block_size=BLOCK, dtype=DTYPE, num_kv_heads=KV_HEADS)
    builder = object.__new__(RocketKVMetadataBuilder)
    builder._setup(CONFIG, spec, MAX_ROWS, 1024, DEV, HEADS, WIDTH)
    builder.flash_prefill = False  # (the dense rows' path is not what this file checks)
    if builder._graph_io is None:  # CPU: the host side of the graph rows all the same
        builder.allocate_graph_buffers(DTYPE)
    return builder


def request(prompt_len: int, mode: str):
    params = SimpleNamespace(extra_args={"rocketkv_mode": mode}, max_tokens=16)
    attach_plan(params, plan_for_params(params, prompt_len, CONFIG, HEAD_DIM, BLOCK))
    return SimpleNamespace(req_id=f"r{random.random()}", sampling_params=params, num_prompt_tokens=prompt_len)


def common(query_lens, seq_lens, table):
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    return SimpleNamespace(
        query_start_loc_cpu=starts, query_start_loc=starts.to(DEV), seq_lens=seq.to(DEV), seq_lens_cpu_upper_bound=seq,
        num_reqs=len(query_lens), num_actual_tokens=int(starts[-1]), block_table_tensor=table[: len(query_lens)],
        slot_mapping=torch.zeros(int(starts[-1]), dtype=torch.int64, device=DEV),
    )


def test_graph_rows_are_fixed_views_padded_with_empty_rows():
    builder = make_builder()
    table = torch.arange(MAX_ROWS * WIDTH, dtype=torch.int32, device=DEV).view(MAX_ROWS, WIDTH)
    states = [request(300, "rocketkv"), request(90, "full"), request(200, "mt")]
    with rows_of_batch(states):
        mixed = builder.build(0, common([1, 90, 1], [310, 90, 205], table)).decode  # decode rows 0 and 2
        g = mixed.graph
        assert g.batch.block_table.tolist() == table[[0, 2]].tolist()
        assert g.batch.seq_lens.tolist() == [310, 205]
        prefix = builder.build(0, common([1, 1, 1], [311, 91, 206], table)).decode
    h = prefix.graph
    assert (mixed.num_rows, g.batch.num_rows, prefix.num_rows, h.batch.num_rows) == (2, 2, 3, 4)
    assert h.batch.seq_lens.tolist() == [311, 91, 206, 0]  # the padding row reads nothing
    assert [int(h.batch.top_channels[3]), int(h.batch.top_pages[3])] == [HEAD_DIM, EVERY_PAGE]
    assert h.batch.block_table.tolist()[:3] == table[:3].tolist()
    # every size's views start at the same addresses: one graph per size replays any step
    for name in ("block_table", "seq_lens", "keep", "gap_end", "top_channels", "top_pages"):
        assert getattr(g.batch, name).data_ptr() == getattr(h.batch, name).data_ptr(), name
    assert g.query.data_ptr() == h.query.data_ptr() and g.output.data_ptr() == h.output.data_ptr()
    assert h.query.shape == (4, HEADS, HEAD_DIM)


def test_no_graph_rows_without_the_setting():
    spec = SimpleNamespace(head_size=HEAD_DIM, block_size=BLOCK, dtype=DTYPE, num_kv_heads=KV_HEADS)
    builder = object.__new__(RocketKVMetadataBuilder)
    builder._setup(RocketKVConfig(budget=64, dense_below=0, decode_graphs=False), spec, MAX_ROWS, 1024, DEV, HEADS, WIDTH)
    table = torch.zeros(MAX_ROWS, WIDTH, dtype=torch.int32, device=DEV)
    with rows_of_batch([request(300, "rocketkv")]):
        assert builder.build(0, common([1], [310], table)).decode.graph is None


class RunEachTime:
    """The CPU stand-in for LayerGraphs: runs the body at every replay."""

    def __init__(self) -> None:
        self.keys = set()

    def __len__(self) -> int:
        return len(self.keys)

    def replay(self, key, body, device) -> None:
        self.keys.add(key)
        body()


def make_impl(builder, graphs) -> RocketKVImpl:
    impl = object.__new__(RocketKVImpl)  # (no vLLM config needed past __init__)
    impl.num_heads, impl.head_size, impl.num_kv_heads, impl.scale = HEADS, HEAD_DIM, KV_HEADS, HEAD_DIM ** -0.5
    impl.config, impl.layout, impl._ops, impl._graphs = CONFIG, builder.layout, None, graphs
    impl._graphs_builder_id = builder._builder_id
    impl.selection_queries = lambda q: q
    impl._may_select = CONFIG.selects_pages()
    return impl


def filled_cache(layout, lengths):
    """A cache holding random tokens for requests of these lengths, and their block table."""
    blocks = [-(-n // BLOCK) + 1 for n in lengths]
    kv = torch.zeros(layout.cache_shape(sum(blocks) + 1, KV_HEADS, HEAD_DIM), dtype=DTYPE, device=DEV)
    table = torch.zeros(MAX_ROWS, WIDTH, dtype=torch.int32, device=DEV)
    perm = torch.randperm(sum(blocks)) + 1
    used = 0
    for i, (n, nb) in enumerate(zip(lengths, blocks)):
        table[i, :nb] = perm[used : used + nb].to(DEV, torch.int32)
        used += nb
        pos = torch.arange(n, device=DEV)
        slots = table[i, pos // BLOCK].long() * BLOCK + pos % BLOCK
        R.write_kv(kv, layout, torch.randn(n, KV_HEADS, HEAD_DIM, device=DEV), torch.randn(n, KV_HEADS, HEAD_DIM, device=DEV),
                   slots)
    return kv, table


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [1, 1, 1, 1, 1], [1, 30, 1], [1, 1, 30]], ids=str)
def test_forward_over_graph_rows_equals_the_direct_launch(query_lens):
    torch.manual_seed(len(query_lens) + query_lens[1])
    builder = make_builder()
    lengths = [300, 200, 120, 260, 90][: len(query_lens)]
    seq_lens = [n if q > 1 else n + 1 for n, q in zip(lengths, query_lens)]
    kv, table = filled_cache(builder.layout, seq_lens)
    modes = ["rocketkv", "full", "mt", "rocketkv", "mt"]
    states = [request(n, m) if q == 1 else request(n, "full") for n, m, q in zip(lengths, modes, query_lens)]
    graphs = LayerGraphs() if CUDA else RunEachTime()
    with_graphs, direct = make_impl(builder, graphs), make_impl(builder, None)
    tokens = sum(query_lens)
    for step in range(3):  # fresh queries each step: a replay must read them, not the captured ones
        with rows_of_batch(states):
            meta = builder.build(0, common(query_lens, seq_lens, table))
        query = torch.randn(tokens, HEADS * HEAD_DIM, device=DEV, dtype=DTYPE)
        outs = []
        for impl in (with_graphs, direct):
            out = torch.full((tokens, HEADS * HEAD_DIM), float("nan"), device=DEV, dtype=DTYPE)
            impl.forward(None, query, None, None, kv, meta, out)
            outs.append(out)
        assert meta.decode.graph is not None
        assert not outs[0].isnan().any()
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-2 if CUDA else 1e-5, atol=1e-2 if CUDA else 1e-5)
    assert len(graphs) == 1  # one padded size, captured once


def test_graphs_over_an_earlier_builders_rows_are_dropped():
    """vLLM's CUDA-graph memory profiling makes a builder, runs steps and frees it: graphs over
    its buffers must not replay over the next builder's, whatever addresses those get."""
    torch.manual_seed(3)
    first = make_builder()
    kv, table = filled_cache(first.layout, [301, 201])
    states = [request(300, "rocketkv"), request(200, "mt")]
    impl = make_impl(first, LayerGraphs() if CUDA else RunEachTime())
    for builder in (first, make_builder()):
        with rows_of_batch(states):
            meta = builder.build(0, common([1, 1], [301, 201], table))
        impl.forward(None, torch.randn(2, HEADS * HEAD_DIM, device=DEV, dtype=DTYPE), None, None, kv, meta,
                     torch.empty(2, HEADS * HEAD_DIM, device=DEV, dtype=DTYPE))
        assert impl._graphs_builder_id == builder._builder_id and len(impl._graphs) == 1
    assert first._builder_id != builder._builder_id


@pytest.mark.gpu
def test_graph_rows_replay_after_another_size_ran():
    """Two sizes' graphs share one memory pool: replaying one after the other stays exact."""
    torch.manual_seed(7)
    builder = make_builder()
    seq_lens = [300, 200, 120, 260, 90]
    kv, table = filled_cache(builder.layout, seq_lens)
    states = [request(n - 1, "rocketkv") for n in seq_lens]
    graphs = LayerGraphs()
    with_graphs, direct = make_impl(builder, graphs), make_impl(builder, None)
    for rows in (5, 2, 5, 1, 2):
        with rows_of_batch(states[:rows]):
            meta = builder.build(0, common([1] * rows, seq_lens[:rows], table))
        query = torch.randn(rows, HEADS * HEAD_DIM, device=DEV, dtype=DTYPE)
        outs = [torch.empty(rows, HEADS * HEAD_DIM, device=DEV, dtype=DTYPE) for _ in range(2)]
        with_graphs.forward(None, query, None, None, kv, meta, outs[0])
        direct.forward(None, query, None, None, kv, meta, outs[1])
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-2, atol=1e-2)
    assert len(graphs) == 3  # 8, 2 and 1 rows


@pytest.mark.gpu
def test_an_invalidated_capture_leaves_the_device_usable():
    """A body that cannot be captured (here a host sync) runs directly, and the CUDA generator,
    which capture_begin put in capture mode, works afterwards."""
    x = torch.zeros(4, device=DEV)

    def body():
        x.add_(1)
        x.sum().item()  # not capturable: invalidates the capture

    graphs = LayerGraphs()
    graphs.replay("sync", body, DEV)
    graphs.replay("sync", body, DEV)
    assert len(graphs) == 0 and x.tolist() == [3.0] * 4  # the warm-up run, then two direct runs
    assert torch.randn(8, device=DEV).isfinite().all()
    assert not torch.cuda.is_current_stream_capturing()


def test_full_graphs_of_a_server_without_selecting_requests_launch_no_selection():
    """A full graph is captured once for whatever rows later steps hold, so its capture launches
    the page selection, except on a server where no request may select (16-token pages by
    default; no plan selects there, see test_plan.test_quest_needs_pages_it_may_select)."""
    builder = make_builder()
    selecting, exact = make_impl(builder, None), make_impl(builder, None)
    exact._may_select = RocketKVConfig().selects_pages()
    assert selecting._may_select and not exact._may_select
    assert selecting._launches_selection(False, capturing_full_graph=True)
    assert not exact._launches_selection(False, capturing_full_graph=True)
    assert exact._launches_selection(False, False) is selecting._launches_selection(False, False) is False
    assert selecting._launches_selection(True, capturing_full_graph=False)


@pytest.mark.gpu
@pytest.mark.parametrize("may_select", [True, False])
def test_a_full_graph_replays_rows_that_select_and_rows_that_do_not(may_select):
    """vLLM's capture of a full graph, as the impl sees it (forward while the stream captures):
    replayed for steps whose rows select pages and steps whose rows do not, it gives the direct
    launch's output, the selection running in every replay (its scratch is written); captured
    where no request may select (the default 16-token pages), it holds no selection (its scratch
    is left as it was) and such a server's steps hold dense rows only."""
    torch.manual_seed(11)
    builder = make_builder()
    seq_lens = [301, 201, 121]
    kv, table = filled_cache(builder.layout, seq_lens)
    seq = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)  # vLLM's persistent seq_lens
    steps = {"selecting": [request(300, "rocketkv"), request(200, "mt"), request(120, "full")],
             "dense": [request(n - 1, "full") for n in seq_lens]}
    replayed = ("dense", "selecting", "dense") if may_select else ("dense", "dense")

    def build(states):
        cm = common([1, 1, 1], seq_lens, table)
        cm.seq_lens = seq
        with rows_of_batch(states):
            return builder.build(0, cm)

    captured = make_impl(builder, None)
    captured._may_select = may_select
    direct = make_impl(builder, None)
    query = torch.randn(3, HEADS * HEAD_DIM, device=DEV, dtype=DTYPE)
    out = torch.empty(3, HEADS * HEAD_DIM, device=DEV, dtype=DTYPE)
    meta = build(steps[replayed[1]])
    assert meta.decode.graph is not None and meta.decode.selects == may_select
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # (compiles the kernels)
        captured.forward(None, query, None, None, kv, meta, out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.forward(None, query, None, None, kv, meta, out)
    for name in replayed:
        meta = build(steps[name])
        assert meta.decode.selects == (name == "selecting")
        query.copy_(torch.randn_like(query))
        temp = meta.decode.selection.scratch["temp"]
        temp.fill_(float("nan"))  # the prep kernel writes it whenever the selection runs
        graph.replay()
        expected = torch.empty_like(out)
        direct.forward(None, query, None, None, kv, meta, expected)
        torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
        assert bool(temp[0].isnan().all()) != may_select, name
