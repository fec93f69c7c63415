"""The accuracy harness: task generators, scoring, and a reduced run on SmolLM2 (CPU)."""
import json
import os

import pytest
import torch

from engine_utils import default_model

from rocketkv_vllm.algorithms import causal_attention
from rocketkv_vllm.eval import runner
from rocketkv_vllm.eval.tasks import TASKS, Sample, make_samples, score
from rocketkv_vllm.kv_layout import KVLayout
from rocketkv_vllm.ops import reference


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model())


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [1024, 3000])
def test_samples_fill_the_length_and_hold_their_answers(tokenizer, task, length):
    samples = make_samples(task, tokenizer, length, 2, seed=1)
    assert samples == make_samples(task, tokenizer, length, 2, seed=1)  # seeded
    for s in samples:
        n = len(tokenizer.encode(s.prompt))
        assert length * 0.8 < n + s.max_new_tokens <= length
        body = s.prompt.lower()
        if task not in ("vt",):  # vt's answers are variable names, also in the text
            assert all(a.lower() in body for a in s.answers)
    assert samples[0].prompt != samples[1].prompt


def test_multi_turn_turns_share_their_prefix(tokenizer):
    turns = make_samples("multi_turn", tokenizer, 2048, 1)
    assert [t.turn for t in turns] == list(range(len(turns)))
    context_end = turns[0].prompt.index("What is the special magic number")
    assert all(t.prompt[:context_end] == turns[0].prompt[:context_end] for t in turns)


def test_ruler_string_match_scores():
    s = Sample("x", "", ("1234567", "7654321"), 8)
    assert score(s, " 1234567 and 7654321.") == 100.0
    assert score(s, "1234567") == 50.0
    assert score(s, "123456 7") == 0.0
    assert score(Sample("x", "", ("a", "b"), 8, metric="part"), "B!") == 100.0


def test_summary_table_and_plot(tmp_path):
    rows = [runner.Row("full", None, "t", 1, 80.0, 2), runner.Row("rocketkv", 256, "t", 1, 60.0, 2),
            runner.Row("rocketkv", 512, "t", 1, 70.0, 2), runner.Row("rocketkv", 512, "u", 1, 90.0, 2)]
    assert runner.summary(rows) == {"full": {"-": 80.0}, "rocketkv": {"256": 60.0, "512": 80.0}}
    assert "| rocketkv | 60.0 | 80.0 |" in runner.markdown_table(rows)
    runner.plot(rows, str(tmp_path / "p.png"), "t")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        runner.configs(["rocket"], [256])


def test_selecting_methods_run_on_selection_pages_unless_told():
    """The eval's one engine serves every method: with mt, quest or oracle among them its pages are
    SELECTION_PAGE tokens (on a rocketkv server's default 16, mt requests would decode exactly)."""
    from rocketkv_vllm.eval.__main__ import parse_args, server_settings

    args = parse_args(["--model", "m", "--methods", "full", "rocketkv"])
    assert server_settings(args) == {}
    for method in ("mt", "quest", "oracle"):
        assert server_settings(parse_args(["--model", "m", "--methods", "rocketkv", method])) == {"page_size": 2}
    told = parse_args(["--model", "m", "--methods", "mt", "--rocketkv-config", '{"page_size": 4, "budget": 8}'])
    assert server_settings(told) == {"page_size": 4, "budget": 8}


def test_oracle_with_every_token_is_full_attention():
    torch.manual_seed(0)
    layout, heads, kv_heads, dim = KVLayout(16, 4), 4, 2, 32
    seq_lens = torch.tensor([37, 50])
    cache = torch.zeros(layout.cache_shape(8, kv_heads, dim))
    table = torch.tensor([[3, 0, 5, 7], [1, 2, 4, 6]])
    for b, n in enumerate(seq_lens.tolist()):
        pos = torch.arange(n)
        reference.write_kv(cache, layout, torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, dim),
                           table[b, pos // 16] * 16 + pos % 16)
    query = torch.randn(2, heads, dim)
    full = torch.stack([
        causal_attention(query[b : b + 1], *reference.gather_tokens(cache, layout, table[b], n), torch.tensor([n - 1]),
                         torch.arange(n), 0.2)[0]
        for b, n in enumerate(seq_lens.tolist())
    ])
    out = reference.oracle_decode_attention(query, cache, layout, table, seq_lens, seq_lens.clone(), 64, 0.2)
    torch.testing.assert_close(out, full)
    fewer = reference.oracle_decode_attention(query, cache, layout, table, seq_lens, torch.tensor([4, 4]), 64, 0.2)
    assert not torch.allclose(fewer, full)


def test_reduced_run_on_smollm2(tmp_path):
    """The CLI end to end on CPU: every method at a budget covering the prompts (each must then
    answer exactly as full attention does) and at a compressing one."""
    from rocketkv_vllm.eval.__main__ import main

    out = tmp_path / "acc.json"
    result = main([
        "--model", default_model(), "--tasks", "niah_single", "multi_turn", "--lengths", "512", "--samples", "1",
        "--budgets", "256", "2048", "--dtype", "float32", "--out", str(out), "--no-progress",
        "--engine-args", json.dumps({"kv_cache_memory_bytes": 256 << 20, "max_num_seqs": 16, "max_num_batched_tokens": 1024}),
    ])
    assert set(result["summary"]) == {"full", "rocketkv", "mt", "snapkv", "quest", "oracle"}
    full = {(p["task"], p["turn"]): p["prediction"] for p in result["predictions"] if p["config"] == "full"}
    assert len(full) == 5 and any(p > 0 for p in result["summary"]["full"].values())
    for p in result["predictions"]:
        if p["config"].endswith("@2048"):  # nothing compressed: full attention's answer
            assert p["prediction"] == full[(p["task"], p["turn"])], p
    assert os.path.getsize(tmp_path / "acc.png") > 1000 and (tmp_path / "acc.md").read_text().count("|") > 10
    assert {r["task"] for r in json.loads(out.read_text())["rows"]} == {"niah_single", "multi_turn"}
    # the server defaults: rocketkv requests this short read their kept tokens whole, mt ones select pages
    assert result["exact_decode_up_to"] == {"rocketkv": 16384, "mt": 0}
    assert "exact decode up to 16384 kept tokens (mt: 0)" in (tmp_path / "acc.md").read_text()
