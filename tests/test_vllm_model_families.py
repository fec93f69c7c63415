"""RocketKV serves the GQA decoder families it targets (tiny random models of each)."""
import functools
import gc

import pytest

from engine_utils import greedy, tiny_llama, token_ids, token_prompt

from vllm import LLM

greedy = functools.partial(greedy, detokenize=False)


# Mistral 7B v0.2 and later use full attention (v0.1's sliding window is refused: test_vllm_refusals)
@pytest.mark.parametrize("family,overrides", [("Mistral", {"sliding_window": None}), ("Qwen2", {}), ("Qwen3", {})])
def test_family_runs_compressed_and_exact(tmp_path, family, overrides):
    model = tiny_llama(str(tmp_path), family=family, **overrides)
    llm = LLM(
        model, skip_tokenizer_init=True, attention_backend="rocketkv", dtype="float32", enforce_eager=True,
        max_model_len=1024, block_size=16, kv_cache_memory_bytes=1 << 20, max_num_batched_tokens=256,
        additional_config={"rocketkv": {"budget": 48, "window": 16, "dense_below": 0}},  # HSA rows
    )
    try:
        prompts = [token_prompt(500, 5), token_prompt(90, 6)]
        compressed = token_ids(llm.generate(prompts, greedy(12), use_tqdm=False))
        assert [len(ids) for ids in compressed] == [12, 12]
        full = token_ids(llm.generate(prompts, greedy(12, rocketkv_mode="full"), use_tqdm=False))
        assert token_ids(llm.generate(prompts, greedy(12, rocketkv_budget=500), use_tqdm=False)) == full
    finally:
        del llm
        gc.collect()

