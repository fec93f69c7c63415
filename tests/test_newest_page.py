"""The newest page is attended at every decode step, inside the same page budget."""
import torch

from rocketkv_vllm.config import RocketKVConfig
from rocketkv_vllm.kv_layout import KVLayout
from rocketkv_vllm.ops import reference
from rocketkv_vllm.ops.newest_page import NewestPages
from rocketkv_vllm.plan import plan_request
from rocketkv_vllm.config import request_settings


def test_selection_plus_newest_page():
    torch.manual_seed(0)
    layout, kv_heads, dim, top = KVLayout(16, 4), 2, 32, 3
    seq_lens = torch.tensor([45, 0, 30])  # row 1: CUDA-graph padding
    keep, gap_end = torch.tensor([45, 0, 12]), torch.tensor([45, 0, 28])  # row 2 evicted [12, 28)
    cache = torch.randn(layout.cache_shape(12, kv_heads, dim))
    table = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    query = torch.randn(3, 4, dim)
    newest = NewestPages.of(seq_lens, layout.page_size)
    assert newest.scored_seq_lens.tolist() == [44, 0, 28] and newest.page.tolist() == [11, -1, 7]
    args = (query, cache, layout, table, newest.scored_seq_lens, keep, gap_end, torch.full((3,), dim), torch.full((3,), top))
    plain = reference.hsa_select_pages(*args)
    before = [plain.index[b, h, : plain.count[b, h]].tolist() for b in range(3) for h in range(kv_heads)]
    scored = reference.hsa_select_pages(*args, newest_page=newest.page)
    for b, last_page in ((0, 11), (2, 7)):
        for h in range(kv_heads):
            chosen = scored.index[b, h, : scored.count[b, h]].tolist()
            assert chosen == before[b * kv_heads + h] + [last_page] and chosen == sorted(chosen)
            assert len(chosen) == top + 1 and last_page not in chosen[:-1]
    assert scored.count[1].tolist() == [0, 0]


def test_plan_spends_one_page_of_the_budget_on_the_newest():
    settings = request_settings({"rocketkv_budget": 256}, RocketKVConfig())
    with_newest = plan_request(settings, RocketKVConfig(dense_below=0), 4000, 128, 64, 16)
    paper = plan_request(settings, RocketKVConfig(attend_newest_page=False, dense_below=0), 4000, 128, 64, 16)
    assert with_newest.top_pages + 1 == paper.top_pages == 256 // 2 // RocketKVConfig(dense_below=0).page_size
