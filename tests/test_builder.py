"""The metadata builder's per-step plan, without an engine: row kinds, budgets, and the
fixed-address decode tensors that CUDA-graph replay relies on."""
from types import SimpleNamespace

import torch

from rocketkv_vllm.config import RocketKVConfig
from rocketkv_vllm.vllm_glue.backend import ALL_PAGES, RocketKVMetadataBuilder
from rocketkv_vllm.vllm_glue.batch_context import rows_of_batch

BLOCK, HEAD_DIM = 16, 64
CONFIG = RocketKVConfig(budget=64)


def make_builder(max_rows: int = 8) -> RocketKVMetadataBuilder:
    builder = object.__new__(RocketKVMetadataBuilder)  # no VllmConfig needed for build()
    builder.config, builder.head_dim, builder.block_size = CONFIG, HEAD_DIM, BLOCK
    builder.device = torch.device("cpu")
    builder.kv_cache_spec = SimpleNamespace(dtype=torch.float32)
    builder._columns = torch.zeros(4, max_rows, dtype=torch.int32)
    return builder


def request(prompt_len: int, mode: str = "rocketkv", max_tokens: int = 16):
    params = SimpleNamespace(extra_args={"rocketkv_mode": mode}, max_tokens=max_tokens)
    return SimpleNamespace(sampling_params=params, num_prompt_tokens=prompt_len)


def common(query_lens, seq_lens, num_reqs=None):
    num_reqs = num_reqs or len(query_lens)
    query_lens = list(query_lens) + [0] * (num_reqs - len(query_lens))  # CUDA-graph padding rows
    seq_lens = list(seq_lens) + [0] * (num_reqs - len(seq_lens))
    starts = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    return SimpleNamespace(
        query_start_loc_cpu=starts, query_start_loc=starts, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        _seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int32), num_reqs=num_reqs,
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
    assert d.top_pages.data_ptr() == again.decode.top_pages.data_ptr() == builder._columns[3].data_ptr()
    assert d.block_table.data_ptr() == cm.block_table_tensor.data_ptr()
    top_pages, keep, gap_end = d.top_pages.tolist(), d.keep.tolist(), d.gap_end.tolist()
    assert top_pages[0] < ALL_PAGES and keep[0] < gap_end[0] == 300  # compacted, sparse
    assert top_pages[1] < ALL_PAGES and keep[1] == gap_end[1] == 300  # MT: sparse, nothing evicted
    assert top_pages[2] == ALL_PAGES and d.top_channels[2] == HEAD_DIM  # exact plan: every page
    assert top_pages[3] == ALL_PAGES and d.seq_lens[3] == 0  # padding: nothing to read


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
    assert d.top_pages.tolist()[1] == ALL_PAGES  # a prompt token attends exactly


def test_dummy_rows_are_exact_decodes():
    """Graph capture and warm-up run rows without requests: exact attention, same kernels."""
    builder = make_builder()
    with rows_of_batch([]):
        meta = builder.build(0, common([1, 1], [1, 1]))
    assert not meta.dense and meta.decode.num_rows == 2
    assert meta.decode.top_pages.tolist() == [ALL_PAGES, ALL_PAGES]
