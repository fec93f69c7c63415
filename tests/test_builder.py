"""The metadata builder's per-step plan, without an engine: row kinds, budgets, the
fixed-address decode tensors that CUDA-graph replay relies on, and the checks that a row's
plan is the scheduler's."""
import copy
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rocketkv_vllm.config import MODES, RocketKVConfig
from rocketkv_vllm.ops.newest_page import NewestPages
from rocketkv_vllm.plan import plan_for_params
from rocketkv_vllm.vllm_glue import request_plans
from rocketkv_vllm.ops.reference import EVERY_PAGE
from rocketkv_vllm.vllm_glue.backend import Compaction, DenseRow, RocketKVMetadataBuilder
from rocketkv_vllm.vllm_glue.batch_context import dummy_batch, rows_of_batch
from rocketkv_vllm.vllm_glue.request_plans import PLAN_KEY, attach_plan
from rocketkv_vllm.vllm_glue.metrics import RocketKVStats

BLOCK, HEAD_DIM, MAX_ROWS = 16, 64, 8
CONFIG = RocketKVConfig(budget=64, dense_below=0)  # HSA rows
SPEC = SimpleNamespace(head_size=HEAD_DIM, block_size=BLOCK, dtype=torch.float32, num_kv_heads=2)


def make_builder(max_rows: int = MAX_ROWS, max_tokens: int = 1024) -> RocketKVMetadataBuilder:
    builder = object.__new__(RocketKVMetadataBuilder)  # no VllmConfig needed for build()
    builder._setup(CONFIG, SPEC, max_rows, max_tokens, torch.device("cpu"), 4 * SPEC.num_kv_heads, 64)
    return builder


def request(prompt_len: int, mode: str = "rocketkv", max_tokens: int = 16, req_id: str | None = None):
    """A worker's request state whose params carry the scheduler's plan (kv_manager.track)."""
    params = SimpleNamespace(extra_args={"rocketkv_mode": mode}, max_tokens=max_tokens)
    attach_plan(params, plan_for_params(params, prompt_len, CONFIG, HEAD_DIM, BLOCK))
    return SimpleNamespace(req_id=req_id or f"r{random.random()}", sampling_params=params, num_prompt_tokens=prompt_len)


def common(query_lens, seq_lens, num_reqs=None):
    num_reqs = num_reqs or len(query_lens)
    query_lens = list(query_lens) + [0] * (num_reqs - len(query_lens))  # CUDA-graph padding rows
    seq_lens = list(seq_lens) + [0] * (num_reqs - len(seq_lens))
    starts = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    return SimpleNamespace(
        query_start_loc_cpu=starts, query_start_loc=starts.clone(), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        seq_lens_cpu_upper_bound=torch.tensor(seq_lens, dtype=torch.int32), num_reqs=num_reqs,
        num_actual_tokens=int(starts[-1]), block_table_tensor=torch.arange(num_reqs * 64, dtype=torch.int32).view(num_reqs, 64),
        slot_mapping=torch.zeros(int(starts[-1]), dtype=torch.int64),
    )


def test_pure_decode_step_covers_padding_rows_with_fixed_addresses():
    builder = make_builder()
    rows = [request(300), request(300, "mt"), request(40)]  # evicting, MT, budget >= prompt (exact)
    cm = common([1, 1, 1], [310, 305, 45], num_reqs=4)
    with rows_of_batch(rows):
        meta = builder.build(0, cm)
        again = builder.build(0, cm)
    d = meta.decode
    assert not meta.dense and not meta.compactions
    assert d.token_index is None and d.num_rows == 4
    assert d.top_pages.data_ptr() == again.decode.top_pages.data_ptr() == builder._columns.gpu[3].data_ptr()
    assert d.block_table.data_ptr() == cm.block_table_tensor.data_ptr()
    top_pages, keep, gap_end = d.top_pages.tolist(), d.keep.tolist(), d.gap_end.tolist()
    assert top_pages[0] < EVERY_PAGE and keep[0] < gap_end[0] == 300  # compacted, sparse
    assert top_pages[1] < EVERY_PAGE and keep[1] == gap_end[1] == 300  # MT: sparse, nothing evicted
    assert top_pages[2] == EVERY_PAGE and d.top_channels[2] == HEAD_DIM  # exact plan: every page
    assert top_pages[3] == EVERY_PAGE and d.seq_lens[3] == 0  # padding: nothing to read


def test_steps_without_a_choosing_row_launch_no_selection():
    """With the kernels' planner, a step whose decode rows all attend every live page (exact
    plans, padding) is marked not to select (steps outside vLLM's full graphs then launch no
    selection, and the attention gets the plan's unwritten lists); a step with a choosing row
    selects. The reference path always selects (its selection returns at once)."""
    from rocketkv_vllm.kernels.triton_ops import SelectionPlanner

    kernels = make_builder()
    kernels._planner_cls, kernels._planners = SelectionPlanner, {}
    exact, choosing = [request(40), request(45)], [request(300), request(40)]
    cm = common([1, 1], [41, 46], num_reqs=4)
    with rows_of_batch(exact):
        d = kernels.build(0, cm).decode
        assert make_builder().build(0, cm).decode.selects
    assert not d.selects and d.top_pages.tolist() == [EVERY_PAGE] * 4
    index, count = d.selection.unlisted()
    assert index.shape[:2] == count.shape == (4, SPEC.num_kv_heads)
    with rows_of_batch(choosing):
        assert kernels.build(0, common([1, 1], [310, 41], num_reqs=4)).decode.selects


def test_prompt_chunks_and_mixed_rows():
    builder = make_builder()
    # decode, the one-token chunk completing an evicting prompt, a one-token MT prompt chunk, a prefill chunk
    rows = [request(300), request(200), request(200, "mt"), request(500)]
    cm = common([1, 1, 1, 100], [310, 200, 200, 100])
    with rows_of_batch(rows):
        meta = builder.build(0, cm)
    assert [r.row for r in meta.dense] == [1, 3]
    assert [c.row for c in meta.compactions] == [1]
    d = meta.decode
    assert d.num_rows == 2 and d.token_index.tolist() == [0, 2]
    assert d.block_table.tolist() == cm.block_table_tensor[[0, 2]].tolist()
    assert d.seq_lens.tolist() == [310, 200]
    assert d.top_pages.tolist()[1] == EVERY_PAGE  # a prompt token attends exactly


def test_dummy_rows_are_exact_decodes():
    """Graph capture and warm-up run rows without requests: exact attention, same kernels."""
    builder = make_builder()
    with dummy_batch():
        meta = builder.build(0, common([1, 1], [1, 1]))
        mixed = builder.build(0, common([1, 5], [1, 5]))
    assert not meta.dense and meta.decode.num_rows == 2
    assert meta.decode.top_pages.tolist() == [EVERY_PAGE, EVERY_PAGE]
    assert [(r.row, r.keep, r.gap_end, r.seq_len) for r in mixed.dense] == [(1, 5, 5, 5)] and not mixed.compactions


def test_dummy_run_ignores_the_input_batch_of_the_last_step():
    """_dummy_run may run while the input batch still lists requests (plugin marks it)."""
    builder = make_builder()
    with rows_of_batch([request(300)]), dummy_batch():
        meta = builder.build(0, common([1, 1], [1, 1]))
    assert meta.decode.top_pages.tolist() == [EVERY_PAGE, EVERY_PAGE]


def test_build_outside_the_row_hooks_raises():
    with pytest.raises(RuntimeError, match="outside the model runner"):
        make_builder().build(0, common([1], [10]))


@pytest.mark.parametrize("states", [[None, None], [], ["one"]])
def test_rows_without_request_state_raise(states):
    states = [request(300) if s == "one" else s for s in states]
    with rows_of_batch(states), pytest.raises(RuntimeError, match="row . has no request state"):
        make_builder().build(0, common([1, 1], [310, 310]))


def test_missing_or_disagreeing_plan_raises():
    builder = make_builder()
    unplanned = request(300)
    unplanned.sampling_params.extra_args = {"rocketkv_mode": "rocketkv"}
    with rows_of_batch([unplanned]), pytest.raises(RuntimeError, match="without the scheduler's plan"):
        builder.build(0, common([1], [310]))
    other = request(300)
    other.num_prompt_tokens = 280  # the worker sees another prompt than the scheduler planned
    with rows_of_batch([other]), pytest.raises(RuntimeError, match="plans of request .* differ"):
        builder.build(0, common([1], [310]))
    budget = request(300)
    budget.sampling_params.extra_args = {**budget.sampling_params.extra_args, "rocketkv_budget": 128}
    with rows_of_batch([budget]), pytest.raises(RuntimeError, match="differ"):
        builder.build(0, common([1], [310]))


def test_row_plans_are_checked_once_per_request(monkeypatch):
    builder = make_builder()
    calls = []
    original = request_plans.checked_plan
    monkeypatch.setattr(request_plans, "checked_plan", lambda state, *a: calls.append(state.req_id) or original(state, *a))
    rows = [request(300, req_id="a"), request(300, "mt", req_id="b")]
    with rows_of_batch(rows):
        for seq in range(310, 315):
            builder.build(0, common([1, 1], [seq, seq]))
    assert sorted(calls) == ["a", "b"]
    # a streaming session's update: new params and a longer prompt are checked anew
    rows[1] = request(400, "mt", req_id="b")
    with rows_of_batch(rows):
        builder.build(0, common([1, 1], [320, 410]))
    assert sorted(calls) == ["a", "b", "b"]


def test_attached_plan_leaves_shared_extra_args_alone():
    """vLLM's shallow clone of one SamplingParams shares extra_args between requests."""
    shared = {"rocketkv_mode": "rocketkv"}
    a, b = (SimpleNamespace(extra_args=shared, max_tokens=16) for _ in range(2))
    attach_plan(a, plan_for_params(a, 300, CONFIG, HEAD_DIM, BLOCK))
    assert PLAN_KEY in a.extra_args and PLAN_KEY not in b.extra_args and shared == {"rocketkv_mode": "rocketkv"}
    assert request_plans.shipped_plan(copy.deepcopy(a)) == plan_for_params(a, 300, CONFIG, HEAD_DIM, BLOCK)


# --- the vectorized build against the per-row rules it replaced ---------------------------

def rules_of_rows(states, query_lens, seq_lens, num_reqs):
    """The builder's row rules, one row at a time: (dense, compactions, decode rows, columns,
    oracle rows)."""
    starts = np.concatenate([[0], np.cumsum(query_lens + [0] * (num_reqs - len(query_lens)))]).tolist()
    dense, compactions, decode_rows, columns, oracle = [], [], [], [], []
    for i, query_len in enumerate(query_lens):
        if query_len == 0:
            continue
        seq_len = seq_lens[i]
        computed = seq_len - query_len
        state = states[i]
        plan = plan_for_params(state.sampling_params, state.num_prompt_tokens, CONFIG, HEAD_DIM, BLOCK)
        prompt_len = plan.prompt_len
        completes_prompt = computed < prompt_len <= seq_len
        compacted = plan.evicts and computed >= prompt_len
        if query_len == 1 and plan.oracle_tokens and computed >= prompt_len:
            oracle.append((i, starts[i], seq_len, plan.oracle_tokens))
            continue
        if query_len == 1 and not (plan.evicts and completes_prompt):
            sparse = plan.sparse and computed >= prompt_len
            decode_rows.append(i)
            columns.append((plan.keep if compacted else prompt_len, prompt_len,
                            plan.top_channels if sparse else HEAD_DIM, plan.top_pages if sparse else EVERY_PAGE))
            continue
        keep = plan.keep if compacted else prompt_len
        dense.append(DenseRow(i, starts[i], starts[i] + query_len, seq_len, keep, prompt_len))
        if plan.evicts and completes_prompt:
            window_start = max(computed, prompt_len - CONFIG.window)
            compactions.append(Compaction(i, starts[i] + window_start - computed, starts[i] + prompt_len - computed,
                                          prompt_len, plan.keep, seq_len))
    return dense, compactions, decode_rows, columns, oracle


def random_row(rng: random.Random):
    """A request state and this step's (query_len, seq_len): decode, prompt chunk (maybe the
    completing one, maybe one token long), or a resumed request recomputing past its prompt."""
    prompt_len = rng.choice([5, 40, 130, 300, 700])
    state = request(prompt_len, rng.choice(["rocketkv"] * 3 + ["mt"] * 2 + list(MODES)), max_tokens=rng.choice([4, 16, 64]))
    kind = rng.choice(["decode"] * 3 + ["chunk", "completing", "resumed"])
    if kind == "decode":
        seq_len = prompt_len + rng.randint(1, 50)
        return state, 1, seq_len
    if kind == "resumed":
        seq_len = prompt_len + rng.randint(1, 20)
        return state, rng.randint(1, seq_len), seq_len
    end = prompt_len if kind == "completing" else rng.randint(1, prompt_len)
    query_len = rng.randint(1, end)
    return state, query_len, end


@pytest.mark.parametrize("seed", range(16))
def test_vectorized_build_matches_the_row_rules(seed):
    rng = random.Random(seed)
    builder = make_builder()
    rows = [random_row(rng) for _ in range(rng.randint(1, 6))]
    rows.sort(key=lambda r: r[1] != 1 or rng.random() < 0.3)  # decodes mostly first, as vLLM reorders
    states, query_lens, seq_lens = (list(c) for c in zip(*rows))
    num_reqs = len(rows) + rng.choice([0, 0, 2])  # CUDA-graph padding rows
    cm = common(query_lens, seq_lens, num_reqs=num_reqs)
    with rows_of_batch(states):
        meta = builder.build(0, cm)
    dense, compactions, decode_rows, columns, oracle = rules_of_rows(states, query_lens, seq_lens, num_reqs)
    assert meta.dense == dense and meta.compactions == compactions
    if oracle:
        o = meta.oracle
        rows, tokens, seqs, top_k = (list(c) for c in zip(*oracle))
        assert (o.token_index.tolist(), o.seq_lens.tolist(), o.top_k.tolist()) == (tokens, seqs, top_k)
        assert o.block_table.tolist() == cm.block_table_tensor[rows].tolist() and o.max_seq_len == max(seqs)
    else:
        assert meta.oracle is None
    d = meta.decode
    if not decode_rows:
        assert d is None
        return
    contiguous = decode_rows == list(range(len(decode_rows)))
    assert d.num_rows == (num_reqs if contiguous and not (dense or oracle) else len(decode_rows))
    got = torch.stack([d.keep, d.gap_end, d.top_channels, d.top_pages]).T.tolist()
    assert got[: len(decode_rows)] == [list(c) for c in columns]
    assert all(row == [0, 0, HEAD_DIM, EVERY_PAGE] for row in got[len(decode_rows):])
    if contiguous:
        assert d.token_index is None and d.block_table.data_ptr() == cm.block_table_tensor.data_ptr()
    else:
        starts = cm.query_start_loc_cpu.tolist()
        assert d.token_index.tolist() == [starts[i] for i in decode_rows]
    padded = decode_rows + list(range(len(decode_rows), d.num_rows))
    assert d.block_table.tolist() == cm.block_table_tensor[padded].tolist()
    assert d.seq_lens.tolist() == cm.seq_lens[padded].tolist()
    newest = NewestPages.of(d.seq_lens, CONFIG.page_size)  # what the impl computed per layer
    assert d.newest.scored_seq_lens.tolist() == newest.scored_seq_lens.tolist()
    assert d.newest.page.tolist() == newest.page.tolist()


def test_packed_dense_rows_for_flash_attention():
    builder = make_builder()
    builder.flash_prefill = True  # (FA3 itself is GPU-only; the packing is host work)
    rows = [request(300), request(500, "mt"), request(40, "full"), request(200, "mt")]
    cm = common([1, 100, 7, 30], [310, 100, 7, 60])
    with rows_of_batch(rows):
        meta = builder.build(0, cm)
    p = meta.packed_dense
    assert p.rows.tolist() == [1, 2, 3] and p.cu_seqlens_q.tolist() == [0, 100, 107, 137]
    assert p.seq_lens.tolist() == [100, 7, 60] and (p.max_query_len, p.max_seq_len) == (100, 100)
    assert p.token_index.tolist() == list(range(1, 138))
    assert meta.gapped_dense is None


def test_gapped_dense_rows_gather_their_live_tokens_for_flash_attention():
    """A compacted request's prefill chunk (recomputed after preemption) has its kept prompt, then
    the tokens after the gap: FlashAttention reads them gathered, the other dense rows paged."""
    builder = make_builder()
    builder.flash_prefill = True
    rows = [request(300), request(40, "full"), request(200)]
    cm = common([3, 7, 2], [313, 7, 230])
    with rows_of_batch(rows):
        meta = builder.build(0, cm)
    assert meta.packed_dense.rows.tolist() == [1]
    g = meta.gapped_dense
    keeps = [r.keep for r in meta.dense if r.row != 1]
    assert [r.gap_end for r in meta.dense if r.row != 1] == [300, 200] and all(k < 200 for k in keeps)
    live = [keeps[0] + 13, keeps[1] + 30]
    assert g.cu_seqlens_q.tolist() == [0, 3, 5] and g.cu_seqlens_k.tolist() == [0, live[0], sum(live)]
    assert g.token_index.tolist() == [0, 1, 2, 10, 11] and (g.max_query_len, g.max_live) == (3, max(live))
    for row, (start, end), keep, gap_end in ((0, (0, live[0]), keeps[0], 300), (2, (live[0], sum(live)), keeps[1], 200)):
        positions = list(range(keep)) + list(range(gap_end, cm.seq_lens[row].item()))
        table = cm.block_table_tensor[row]
        assert g.blocks[start:end].tolist() == [table[p // BLOCK].item() for p in positions]
        assert g.offsets[start:end].tolist() == [p % BLOCK for p in positions]
    with rows_of_batch(rows[:1]):  # the chunk that completes the prompt attends it whole, paged
        meta = builder.build(0, common([20], [310]))
    assert meta.gapped_dense is None and meta.packed_dense.rows.tolist() == [0] and meta.compactions


def test_scheduler_attaches_its_plan_and_replans_grown_sessions():
    from rocketkv_vllm.vllm_glue.kv_manager import RocketKVManager

    manager = object.__new__(RocketKVManager)  # track() needs only these
    manager.rocketkv, manager.head_dim, manager.block_size, manager._plans = CONFIG, HEAD_DIM, BLOCK, {}
    manager.stats = RocketKVStats()

    def scheduled(prompt_len: int, mode: str):
        params = SimpleNamespace(extra_args={"rocketkv_mode": mode}, max_tokens=16)
        return SimpleNamespace(request_id="s", sampling_params=params, num_prompt_tokens=prompt_len, num_preemptions=0)

    session = scheduled(300, "mt")
    plan = manager.track(session)
    assert request_plans.shipped_plan(session.sampling_params) == plan == plan_for_params(
        session.sampling_params, 300, CONFIG, HEAD_DIM, BLOCK)
    # the session's next input: new params (no plan yet), a longer prompt
    grown = scheduled(700, "mt")
    assert manager.track(grown).prompt_len == 700 == request_plans.shipped_plan(grown.sampling_params).prompt_len
    # an evicting request keeps the plan its blocks were freed by
    evicting = scheduled(300, "rocketkv")
    evicting.request_id = "e"
    first = manager.track(evicting)
    assert first.evicts and manager.track(evicting) is first and evicting.skip_reading_prefix_cache
