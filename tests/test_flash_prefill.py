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
