"""The page selection's launch plan (made once per step by the metadata builder, scratch from
its workspace) selects what a call that plans for itself selects, whatever the scratch
held before: the workspace is shared by every layer and batch size."""
import pytest
import torch

from test_kernels import DEV, HEAD_DIMS, _select_inputs

from rocketkv_vllm.kernels import triton_hsa
from rocketkv_vllm.kernels import triton_ops as T
from rocketkv_vllm.kernels.triton_hsa import SelectionPlanner, SelectionShape, SelectionWorkspace


def selected(selection):
    """The chosen pages of each (request, KV head), in the kernels' order."""
    return [[selection.index[b, h, : int(selection.count[b, h])].tolist() for h in range(selection.count.shape[1])]
            for b in range(selection.count.shape[0])]


def shape_of(query, kv, layout, table) -> SelectionShape:
    return SelectionShape(query.shape[1], kv.shape[1], query.shape[2], layout, table.shape[1] * layout.pages_per_block, DEV)


def poisoned_planner(shape: SelectionShape, max_batch: int) -> SelectionPlanner:
    planner = SelectionPlanner(shape, max_batch)
    for buffer in planner.workspace._buffers.values():
        buffer.fill_(float("nan") if buffer.is_floating_point() else -777)
    return planner


@pytest.mark.parametrize("group,block_size,page_size,dtype,summary_group", [(4, 16, 4, torch.bfloat16, 8), (1, 16, 1, torch.float32, 0)])
def test_planned_selection_matches_a_self_planned_one(group, block_size, page_size, dtype, summary_group):
    layout, kv, table, seq, keep, gap, query, tc, tp = _select_inputs(group, block_size, page_size, dtype, HEAD_DIMS[0], 5, summary_group)
    planner = poisoned_planner(shape_of(query, kv, layout, table), max_batch=8)
    for batch in (5, 3, 5):  # batch sizes share the scratch; the second 5 finds the others' leftovers
        args = (query[:batch], kv, layout, table[:batch], seq[:batch], keep[:batch], gap[:batch], tc[:batch], tp[:batch])
        plan = planner(batch)
        assert plan is planner(batch)  # made once per batch size
        planned = T.hsa_select_pages(*args, plan=plan)
        assert planned.index.data_ptr() == plan.scratch["index"].data_ptr()
        assert selected(planned) == selected(T.hsa_select_pages(*args))


def test_planned_selection_in_row_groups(monkeypatch):
    """A scratch budget of about two requests: a batch of five is scored in groups."""
    layout, kv, table, seq, keep, gap, query, tc, tp = _select_inputs(4, 16, 4, torch.float32, HEAD_DIMS[0], 13)
    per_row = kv.shape[1] * table.shape[1] * layout.pages_per_block * (4 + 3)
    monkeypatch.setattr(triton_hsa, "SCRATCH_ELEMENTS", 2 * per_row)
    planner = poisoned_planner(shape_of(query, kv, layout, table), max_batch=5)
    plan = planner(5)
    assert plan.rows < 5 and plan.scratch["logits"].shape[0] == plan.rows
    args = (query, kv, layout, table, seq, keep, gap, tc, tp)
    assert selected(T.hsa_select_pages(*args, plan=plan)) == selected(T.hsa_select_pages(*args))


def test_workspace_holds_every_batch_size_and_refuses_more():
    layout, kv, table, _, _, _, query, _, _ = _select_inputs(4, 16, 4, torch.float32, HEAD_DIMS[0], 1)
    shape = shape_of(query, kv, layout, table)
    workspace = SelectionWorkspace(shape, 6)
    plans = [triton_hsa.plan_selection(shape, b, workspace=workspace) for b in range(1, 7)]
    assert [p.scratch["index"].shape[0] for p in plans] == list(range(1, 7))
    with pytest.raises(ValueError, match="too small"):
        triton_hsa.plan_selection(shape, 7, workspace=workspace)


def test_plan_refuses_another_batch():
    layout, kv, table, seq, keep, gap, query, tc, tp = _select_inputs(4, 16, 4, torch.float32, HEAD_DIMS[0], 2)
    plan = SelectionPlanner(shape_of(query, kv, layout, table), 8)(4)
    with pytest.raises(ValueError, match="planned for 4"):
        T.hsa_select_pages(query, kv, layout, table, seq, keep, gap, tc, tp, plan=plan)


def test_layers_take_the_workspace_in_memory_profiling_and_the_builder_plans_over_it(monkeypatch):
    """vLLM profiles memory with a forward without metadata, then sizes the KV pool, then makes the
    metadata builders. Each attention layer takes the selection workspace in that forward, so the
    profile counts it, and the builder made afterwards plans over the same one, not a second."""
    import gc
    import weakref
    from types import SimpleNamespace

    from rocketkv_vllm.config import RocketKVConfig
    from rocketkv_vllm.kv_layout import KVLayout
    from rocketkv_vllm.vllm_glue import backend
    from rocketkv_vllm.vllm_glue.impl import RocketKVImpl

    config, block, heads, kv_heads, head_dim, rows, width = RocketKVConfig(budget=64), 16, 8, 2, 64, 6, 40
    ops = SimpleNamespace(selection_planner=SelectionPlanner)
    layout = KVLayout(block, config.page_size, config.layout_summary_group())

    def layer() -> RocketKVImpl:
        impl = object.__new__(RocketKVImpl)  # (no vLLM config needed past __init__)
        impl.num_heads, impl.head_size, impl.num_kv_heads, impl.layout, impl._ops = heads, head_dim, kv_heads, layout, ops
        impl._selection_heads, impl._decode_bounds, impl._workspace = heads, (rows, width), None
        impl._may_select = True
        return impl

    layers = [layer(), layer()]
    output = torch.zeros(3, heads * head_dim, device=DEV)
    for impl in layers:  # the profile run: no metadata, no KV cache yet
        assert impl.forward(None, torch.zeros(3, heads * head_dim, device=DEV), None, None, torch.empty(0), None, output) is output
    workspace = layers[0]._workspace
    assert workspace is not None and layers[1]._workspace is workspace
    assert workspace.shape.num_pages == width * layout.pages_per_block and workspace.max_batch == rows

    monkeypatch.setattr(backend, "get_ops", lambda device: ops)
    spec = SimpleNamespace(head_size=head_dim, block_size=block, dtype=torch.float32, num_kv_heads=kv_heads)
    builder = object.__new__(backend.RocketKVMetadataBuilder)
    builder._setup(config, spec, rows, 1024, DEV, heads, width)
    assert builder._planner(width).workspace is workspace

    gone = weakref.ref(workspace)
    del layers, impl, builder, workspace
    gc.collect()
    assert gone() is None  # freed with the last of its holders (an engine torn down)


@pytest.mark.parametrize("max_model_len,block_size,width", [(100_000, 16, 6256), (131_072, 16, 8192), (4096, 64, 64), (1000, 32, 32)])
def test_decode_bounds_match_the_model_runners_block_tables(max_model_len, block_size, width):
    """The workspace the layers reserve is the builder's only when its width is the model
    runner's block-table width: max_model_len in blocks, rounded up to a multiple of 128 / block_size."""
    from types import SimpleNamespace

    from rocketkv_vllm.vllm_glue.backend import decode_bounds

    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=48),
                             compilation_config=SimpleNamespace(max_cudagraph_capture_size=512),
                             model_config=SimpleNamespace(max_model_len=max_model_len), cache_config=SimpleNamespace(block_size=block_size))
    assert decode_bounds(config) == (512, width)
