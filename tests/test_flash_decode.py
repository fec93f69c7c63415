"""flash_decode: dense decode rows attend their kept prompt through FlashAttention and their
decoded tokens through the split kernel, merged in its reduce (kernels/flash_decode.py).

On CPU the Triton kernels run under the interpreter and the torch reference stands in for
FlashAttention (the same (out, lse) contract); on a GPU the real FlashAttention runs."""
import random
from types import SimpleNamespace

import pytest
import torch

from rocketkv_vllm.config import RocketKVConfig
from rocketkv_vllm.kernels import flash_decode, flash_prefill
from rocketkv_vllm.kv_layout import KVLayout
from rocketkv_vllm.ops import reference as R
from rocketkv_vllm.ops.reference import EVERY_PAGE
from rocketkv_vllm.plan import plan_for_params
from rocketkv_vllm.vllm_glue.backend import RocketKVMetadataBuilder
from rocketkv_vllm.vllm_glue.batch_context import rows_of_batch
from rocketkv_vllm.vllm_glue.impl import RocketKVImpl
from rocketkv_vllm.vllm_glue.request_plans import attach_plan
from test_decode_graphs import common, filled_cache

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
BLOCK, HEADS, KV_HEADS, HEAD_DIM, MAX_ROWS, WIDTH = 16, 8, 2, 64, 8, 40


def reference_part(query, kv_cache, layout, block_table, rows, scale):
    """What attend_kept_prompt returns, from the torch reference: (out [B, Hq, D], lse [Hq, B])."""
    batch, hq, _ = query.shape
    group = hq // kv_cache.shape[1]
    out = torch.full_like(query, float("nan"))
    lse = torch.full((hq, batch), float("-inf"), dtype=torch.float32, device=query.device)
    for b in range(batch):
        n = int(rows.kept[b])
        if n:
            keys, values = R.gather_tokens(kv_cache, layout, block_table[b], n)
            k, v = keys.repeat_interleave(group, 1).double(), values.repeat_interleave(group, 1).double()
            logits = torch.einsum("hd,nhd->hn", query[b].double(), k) * scale
            lse[:, b] = torch.logsumexp(logits, -1).float()
            out[b] = torch.einsum("hn,nhd->hd", logits.softmax(-1), v).to(query.dtype)
    return out, lse


@pytest.fixture
def triton_ops(monkeypatch):
    """The impl and builder on the Triton kernels (interpreted on CPU), FlashAttention available
    (the reference standing in for it on CPU)."""
    if not CUDA:
        monkeypatch.setenv("ROCKETKV_TRITON_INTERPRET", "1")
        monkeypatch.setattr(flash_prefill, "version", lambda device, dtype, head_size: 3)
        monkeypatch.setattr(flash_decode, "attend_kept_prompt", reference_part)
    elif flash_prefill.version(DEV, DTYPE, HEAD_DIM) != 3:
        pytest.skip("vLLM's FlashAttention 3 is not available here")


def make_builder(config: RocketKVConfig) -> RocketKVMetadataBuilder:
    spec = SimpleNamespace(head_size=HEAD_DIM, block_size=BLOCK, dtype=DTYPE, num_kv_heads=KV_HEADS)
    builder = object.__new__(RocketKVMetadataBuilder)
    builder._setup(config, spec, MAX_ROWS, 1024, DEV, HEADS, WIDTH)
    builder.flash_prefill = False
    if builder._graph_io is None:  # CPU: the per-layer graphs' rows all the same
        builder.allocate_graph_buffers(DTYPE)
    return builder


def request(config: RocketKVConfig, prompt_len: int, mode: str):
    params = SimpleNamespace(extra_args={"rocketkv_mode": mode}, max_tokens=16)
    attach_plan(params, plan_for_params(params, prompt_len, config, HEAD_DIM, BLOCK))
    return SimpleNamespace(req_id=f"r{random.random()}", sampling_params=params, num_prompt_tokens=prompt_len)


def make_impl(builder) -> RocketKVImpl:
    impl = object.__new__(RocketKVImpl)
    impl.num_heads, impl.head_size, impl.num_kv_heads, impl.scale = HEADS, HEAD_DIM, KV_HEADS, HEAD_DIM ** -0.5
    impl.config, impl.layout, impl._ops, impl._graphs = builder.config, builder.layout, None, None
    impl.selection_queries = lambda q: q
    impl._conditional_selection, impl._may_select = False, builder.config.selects_pages()
    return impl


# (prompt, mode, seq_len): rocketkv requests keep a 64-token budget's worth of their prompts and
# decode densely (dense_below), one keeps its whole prompt (full), one selects pages (mt with HSA),
# and the last is a one-token chunk 50 tokens into its 300-token prompt (a decode row whose keep,
# the whole prompt, lies past its seq_len)
ROWS = [(300, "rocketkv", 305), (90, "full", 95), (200, "mt", 205), (260, "rocketkv", 265), (300, "rocketkv", 50)]


def test_builder_hands_dense_rows_kept_prompts_to_flash_attention(triton_ops):
    config = RocketKVConfig(budget=64, page_size=2, flash_decode=True)
    plain = make_builder(RocketKVConfig(budget=64, page_size=2))
    builder = make_builder(config)
    seq_lens = [seq for _, _, seq in ROWS]
    table = torch.zeros(MAX_ROWS, WIDTH, dtype=torch.int32, device=DEV)
    states = [request(config, n, mode) for n, mode, _ in ROWS]
    with rows_of_batch(states):
        d = builder.build(0, common([1] * len(ROWS), seq_lens, table)).decode
        p = plain.build(0, common([1] * len(ROWS), seq_lens, table)).decode
    assert p.kept_prompt is None
    dense = p.top_pages.cpu() == EVERY_PAGE
    assert dense.tolist() == [True, True, False, True, True]
    keep, gap = p.keep.cpu(), p.gap_end.cpu()
    assert keep[4] == 300  # (the prompt: nothing evicted yet)
    assert d.kept_prompt.kept.tolist() == torch.where(dense, torch.minimum(keep, torch.tensor(seq_lens)), 0).tolist()
    assert d.kept_prompt.kept[4] == 50
    assert d.keep.tolist() == torch.where(dense, 0, keep).tolist()
    assert d.gap_end.tolist() == torch.where(dense, torch.maximum(gap, keep), gap).tolist()
    assert d.kept_prompt.cu_seqlens_q.tolist() == list(range(len(ROWS) + 1))
    assert d.kept_prompt.max_kept == WIDTH * BLOCK
    assert keep[0] < gap[0] and keep[1] == gap[1] == 90  # an evicting and a whole-prompt row
    g = d.graph.batch  # the padded rows of the per-layer graphs: same columns, padding attends nothing
    assert g.kept_prompt.kept.data_ptr() == d.kept_prompt.kept.data_ptr()
    assert g.num_rows == 8 and g.kept_prompt.cu_seqlens_q.numel() == 9
    assert g.kept_prompt.kept.tolist() == d.kept_prompt.kept.tolist() + [0, 0, 0]


def test_a_step_of_selecting_rows_only_has_no_flash_attention_part(triton_ops):
    """Outside full graphs such a step launches no FlashAttention (the per-layer graphs key on it);
    the columns keep every row's own keep and gap_end."""
    config = RocketKVConfig(budget=64, page_size=2, flash_decode=True)
    builder = make_builder(config)
    table = torch.zeros(MAX_ROWS, WIDTH, dtype=torch.int32, device=DEV)
    states = [request(config, 200, "mt"), request(config, 150, "mt")]
    with rows_of_batch(states):
        d = builder.build(0, common([1, 1], [205, 155], table)).decode
    assert d.selects and d.kept_prompt is None and d.graph.batch.kept_prompt is None
    assert d.keep.tolist() == d.gap_end.tolist() == [200, 150]


def test_forward_with_flash_decode_equals_the_split_kernel_alone(triton_ops):
    torch.manual_seed(5)
    seq_lens = [seq for _, _, seq in ROWS]
    with_flash = make_builder(RocketKVConfig(budget=64, page_size=2, flash_decode=True))
    alone = make_builder(RocketKVConfig(budget=64, page_size=2))
    kv, table = filled_cache(with_flash.layout, seq_lens)
    states = [request(with_flash.config, n, mode) for n, mode, _ in ROWS]
    query = torch.randn(len(ROWS), HEADS * HEAD_DIM, device=DEV, dtype=DTYPE)
    outs = []
    for builder in (with_flash, alone):
        with rows_of_batch(states):
            meta = builder.build(0, common([1] * len(ROWS), seq_lens, table))
        out = torch.full((len(ROWS), HEADS * HEAD_DIM), float("nan"), device=DEV, dtype=DTYPE)
        make_impl(builder).forward(None, query, None, None, kv, meta, out)
        outs.append(out)
    assert not outs[0].isnan().any()
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2 if CUDA else 1e-4, atol=2e-2 if CUDA else 1e-4)


@pytest.mark.gpu
def test_flash_attention_part_equals_the_reference():
    if flash_prefill.version(DEV, DTYPE, HEAD_DIM) != 3:
        pytest.skip("vLLM's FlashAttention 3 is not available here")
    torch.manual_seed(9)

    layout = KVLayout(16, 2)
    kv, table = filled_cache(layout, [600, 90, 300])  # (block tables of WIDTH blocks: at most 640 tokens)
    rows = flash_decode.KeptPromptRows(torch.tensor([550, 0, 300], dtype=torch.int32, device=DEV),
                                       torch.arange(4, dtype=torch.int32, device=DEV), WIDTH * 16)
    query = torch.randn(3, HEADS, HEAD_DIM, device=DEV, dtype=kv.dtype)
    out, lse = flash_decode.attend_kept_prompt(query, kv, layout, table[:3], rows, 0.125)
    ref_out, ref_lse = reference_part(query, kv, layout, table[:3], rows, 0.125)
    has = rows.kept.cpu() > 0
    torch.testing.assert_close(out[has].float(), ref_out[has].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse[:, has], ref_lse[:, has], rtol=1e-3, atol=1e-3)
    assert not torch.isfinite(lse[:, ~has]).any()  # an empty row: +-inf, which the reduce treats as no part


@pytest.mark.gpu
def test_a_full_graph_with_flash_decode_replays_fresh_steps(triton_ops):
    """vLLM's capture of a full graph through the impl's forward (FlashAttention's fixed split bound
    and the merge inside it), replayed for steps with new queries and one more decoded token: the
    direct launch's output."""
    torch.manual_seed(13)
    config = RocketKVConfig(budget=64, page_size=2, flash_decode=True)
    builder = make_builder(config)
    rows = ROWS[:4]
    seq_lens = [seq for _, _, seq in rows]
    kv, table = filled_cache(builder.layout, [n + 3 for n in seq_lens])
    seq = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)  # vLLM's persistent seq_lens
    states = [request(config, n, mode) for n, mode, _ in rows]

    def build():
        cm = common([1] * len(rows), seq.tolist(), table)
        cm.seq_lens = seq
        with rows_of_batch(states):
            return builder.build(0, cm)

    impl = make_impl(builder)
    query = torch.randn(len(rows), HEADS * HEAD_DIM, device=DEV, dtype=DTYPE)
    out = torch.empty_like(query)
    meta = build()
    assert meta.decode.kept_prompt is not None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        impl.forward(None, query, None, None, kv, meta, out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        impl.forward(None, query, None, None, kv, meta, out)
    plain = make_builder(RocketKVConfig(budget=64, page_size=2))  # the split kernel over every kept token
    for _ in range(3):
        seq += 1
        build()
        query.copy_(torch.randn_like(query))
        graph.replay()
        with rows_of_batch(states):
            plain_meta = plain.build(0, common([1] * len(rows), seq.tolist(), table))
        expected = torch.empty_like(out)
        make_impl(plain).forward(None, query, None, None, kv, plain_meta, expected)
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
