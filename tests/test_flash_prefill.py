"""Prefill attention through vLLM's FlashAttention: the version is vLLM's choice for the GPU
(2 on Ampere and Ada, 3 on Hopper), and on a GPU it equals the paged torch reference."""
import pytest
import torch

from rocketkv_vllm.kernels import flash_prefill
from rocketkv_vllm.kv_layout import KVLayout
from rocketkv_vllm.ops import reference as ops
from test_paged_reference import make_request_cache

GPU = torch.device("cuda")  # (only its type is read by version())


@pytest.fixture
def fake_flash(monkeypatch):
    """vLLM's flash_attn_varlen_func and version choice replaced: records each call's arguments."""
    calls = []
    chosen = {"version": 3}
    monkeypatch.setattr(flash_prefill, "_flash_attn_varlen_func", lambda: lambda **kw: calls.append(kw) or kw["q"])
    monkeypatch.setattr(flash_prefill, "_vllm_version", lambda head_size: chosen["version"])
    return calls, chosen


@pytest.mark.parametrize("vllm_choice,used", [(3, 3), (2, 2), (None, None)])
def test_version_on_a_gpu_for_half_precision_caches(fake_flash, vllm_choice, used):
    fake_flash[1]["version"] = vllm_choice
    assert flash_prefill.version(GPU, torch.bfloat16, 128) == used
    assert flash_prefill.available(GPU, torch.float16, 128) == (used is not None)


@pytest.mark.parametrize("vllm_choice,fa2,used", [(4, True, 2), (4, False, None), (3, True, 3), (None, True, None)])
def test_fa2_stands_in_where_vllm_picks_a_version_with_other_cache_layouts(monkeypatch, vllm_choice, fa2, used):
    from vllm.v1.attention.backends import fa_utils

    monkeypatch.setattr(fa_utils, "get_flash_attn_version", lambda head_size=None: vllm_choice)
    monkeypatch.setattr(fa_utils, "is_fa_version_supported", lambda version: fa2 and version == 2)
    flash_prefill._vllm_version.cache_clear()
    try:
        assert flash_prefill._vllm_version(128) == used
    finally:
        flash_prefill._vllm_version.cache_clear()


def test_no_flash_attention_on_cpu_or_for_fp32_caches(fake_flash):
    assert flash_prefill.version(torch.device("cpu"), torch.bfloat16, 128) is None
    assert flash_prefill.version(GPU, torch.float32, 128) is None


def test_the_call_passes_the_version_and_the_strided_cache_views(fake_flash, monkeypatch):
    calls, _ = fake_flash
    monkeypatch.setattr(flash_prefill, "version", lambda device, dtype, head_size: 2)
    layout = KVLayout(16, 2)
    kv = torch.zeros(layout.cache_shape(5, 2, 64), dtype=torch.bfloat16)
    query = torch.zeros(3, 4, 64, dtype=torch.bfloat16)
    flash_prefill.flash_prefill(query, kv, layout, torch.zeros(1, 5, dtype=torch.int32), None, None, 3, 3, 0.1)
    (call,) = calls
    assert call["fa_version"] == 2 and call["causal"] and call["softmax_scale"] == 0.1
    # [blocks, block_size, Hkv, D] views of the key and value rows of each block
    for name, first_row in (("k", 0), ("v", 16)):
        view = call[name]
        assert view.shape == (5, 16, 2, 64) and view.stride() == (kv.stride(0), 64, kv.stride(1), 1)
        assert view.data_ptr() == kv.data_ptr() + first_row * 64 * kv.element_size()


def test_no_version_is_an_error_not_a_silent_fallback(monkeypatch):
    monkeypatch.setattr(flash_prefill, "version", lambda device, dtype, head_size: None)
    layout = KVLayout(16, 2)
    with pytest.raises(RuntimeError, match="no FlashAttention"):
        flash_prefill.flash_prefill(torch.zeros(3, 4, 64), torch.zeros(layout.cache_shape(5, 2, 64)), layout,
                                    torch.zeros(1, 5, dtype=torch.int32), None, None, 3, 3, 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("seq_len,queries", [(300, 300), (300, 77), (1000, 129)])
def test_flash_prefill_equals_the_paged_reference(seq_len, queries):
    if not flash_prefill.available(GPU, torch.bfloat16, 128):
        pytest.skip("vLLM's FlashAttention 2/3 is not available here")
    torch.manual_seed(seq_len + queries)
    layout, hkv = KVLayout(16, 2), 8
    kv, table, _, _ = make_request_cache(layout, 80, hkv, 128, [seq_len], dtype=torch.bfloat16)
    # (unwritten slots hold finite stale values in a real cache, not the helper's NaN)
    kv, table = torch.nan_to_num(kv).cuda(), table.cuda()
    query = torch.randn(queries, hkv * 4, 128, dtype=torch.bfloat16, device="cuda")
    out = flash_prefill.flash_prefill(
        query, kv, layout, table, torch.tensor([0, queries], dtype=torch.int32, device="cuda"),
        torch.tensor([seq_len], dtype=torch.int32, device="cuda"), queries, seq_len, 0.088)
    ref = ops.paged_causal_attention(query.float(), kv.float(), layout, table[0], seq_len, seq_len, seq_len, 0.088)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def torch_flash_attention(**kw) -> torch.Tensor:
    """vLLM's flash_attn_varlen_func in torch, paged (block_table, seqused_k) or over gathered keys
    and values (cu_seqlens_k), with FlashAttention's causal mask: aligned at the end of each row."""
    q, k_all, v_all = kw["q"], kw["k"], kw["v"]
    assert kw["causal"]
    cu_q = kw["cu_seqlens_q"].tolist()
    out = torch.empty_like(q)
    for r in range(len(cu_q) - 1):
        if kw.get("block_table") is not None:  # k, v: [blocks, block_size, Hkv, D]
            n = int(kw["seqused_k"][r])
            blocks = kw["block_table"][r, : -(-n // k_all.shape[1])].long()
            k, v = (t[blocks].flatten(0, 1)[:n] for t in (k_all, v_all))
        else:
            start, end = kw["cu_seqlens_k"][r : r + 2].tolist()
            k, v = k_all[start:end], v_all[start:end]
        rows = q[cu_q[r] : cu_q[r + 1]]
        visible = torch.arange(k.shape[0])[None, :] <= torch.arange(k.shape[0] - rows.shape[0], k.shape[0])[:, None]
        attended = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(0, 1)[None].float() for t in (rows, k, v)), attn_mask=visible.to(q.device),
            scale=kw["softmax_scale"], enable_gqa=True)
        out[cu_q[r] : cu_q[r + 1]] = attended[0].transpose(0, 1).to(q.dtype)
    return out


# (prompt, mode, query tokens, seq_len): chunks of two compacted requests recomputed after
# preemption (gapped: their kept prompt, then the tokens after it) beside a whole prompt's chunk
GAPPED_STEP = [(300, "rocketkv", 3, 313), (90, "full", 90, 90), (260, "rocketkv", 20, 280)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_forward_over_gapped_and_gap_free_prefill_rows_equals_the_reference(monkeypatch, device):
    """The impl's forward sends gap-free dense rows to the paged call and gapped ones, gathered, to
    the contiguous one; on CPU the torch stand-in above runs both, on a GPU vLLM's FlashAttention.
    The evicted gaps hold NaN: a row that read its gap would show it."""
    from rocketkv_vllm.config import RocketKVConfig
    from rocketkv_vllm.ops import reference as R
    from rocketkv_vllm.vllm_glue.batch_context import rows_of_batch
    from test_decode_graphs import common, filled_cache
    from impl_rows import DEV, DTYPE, HEAD_DIM, HEADS, KV_HEADS, make_builder, make_impl, request

    if device != DEV.type:
        pytest.skip(f"runs on {device} only")
    if device == "cpu":
        monkeypatch.setattr(flash_prefill, "_flash_attn_varlen_func", lambda: torch_flash_attention)
        monkeypatch.setattr(flash_prefill, "version", lambda device, dtype, head_size: 3)
    elif not flash_prefill.available(DEV, DTYPE, HEAD_DIM):
        pytest.skip("vLLM's FlashAttention 2/3 is not available here")
    torch.manual_seed(11)
    builder = make_builder(RocketKVConfig(budget=64))
    builder.flash_prefill = True
    query_lens, seq_lens = [q for _, _, q, _ in GAPPED_STEP], [s for _, _, _, s in GAPPED_STEP]
    kv, table = filled_cache(builder.layout, seq_lens)
    with rows_of_batch([request(builder.config, n, mode) for n, mode, _, _ in GAPPED_STEP]):
        meta = builder.build(0, common(query_lens, seq_lens, table))
    assert meta.packed_dense.rows.tolist() == [1] and meta.gapped_dense.cu_seqlens_q.tolist() == [0, 3, 23]
    for row in meta.dense:
        gap = torch.arange(row.keep, row.gap_end, device=DEV)
        if gap.numel():
            slots = table[row.row, gap // builder.layout.block_size].long() * builder.layout.block_size + gap % builder.layout.block_size
            nan = torch.full((gap.numel(), KV_HEADS, HEAD_DIM), float("nan"), device=DEV, dtype=DTYPE)
            R.write_kv(kv, builder.layout, nan, nan, slots)
    query = torch.randn(sum(query_lens), HEADS * HEAD_DIM, device=DEV, dtype=DTYPE)
    out = torch.full_like(query, float("nan"))
    impl = make_impl(builder)
    impl.forward(None, query, None, None, kv, meta, out)
    q = query.view(-1, HEADS, HEAD_DIM)
    for row in meta.dense:
        expected = R.paged_causal_attention(q[row.query_start : row.query_end].float(), kv.float(), builder.layout,
                                            table[row.row], row.seq_len, row.keep, row.gap_end, impl.scale)
        got = out[row.query_start : row.query_end].view(-1, HEADS, HEAD_DIM).float()
        torch.testing.assert_close(got, expected, rtol=2e-2 if device == "cuda" else 1e-4, atol=2e-2 if device == "cuda" else 1e-4)
