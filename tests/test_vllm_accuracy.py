"""RocketKV on a real model (SmolLM2-135M-Instruct, float32) through vLLM's offline API.

Stock vLLM (CPU_ATTN) gives the reference; RocketKV with a budget covering the prompt
must reproduce its greedy tokens, and compressed runs must still retrieve a pass key.
Prompts (~1.1K tokens) span several prefill chunks.
"""
import gc

import pytest

from engine_utils import default_model, greedy, passkey_prompt, token_ids

from vllm import LLM

ENGINE_ARGS = dict(
    dtype="float32", enforce_eager=True, max_model_len=2048, block_size=16, kv_cache_memory_bytes=160 << 20,
    max_num_batched_tokens=256, max_num_seqs=4,
)
PASSKEY = 71432
PROMPTS = [passkey_prompt(PASSKEY, 22), "The capital of France is"]


@pytest.fixture(scope="module")
def model() -> str:
    return default_model()


@pytest.fixture(scope="module")
def stock_outputs(model):
    llm = LLM(model, attention_backend="CPU_ATTN", **ENGINE_ARGS)
    out = token_ids(llm.generate(PROMPTS, greedy(12), use_tqdm=False))
    del llm
    gc.collect()
    return out


@pytest.fixture(scope="module")
def llm(model, stock_outputs):
    engine = LLM(model, attention_backend="rocketkv", additional_config={"rocketkv": {"budget": 512}}, **ENGINE_ARGS)
    yield engine
    del engine
    gc.collect()


def test_prompt_spans_several_prefill_chunks(llm):
    assert len(llm.get_tokenizer().encode(PROMPTS[0])) > 3 * ENGINE_ARGS["max_num_batched_tokens"]


def test_budget_covering_prompt_matches_stock_vllm(llm, stock_outputs):
    assert token_ids(llm.generate(PROMPTS, greedy(12, rocketkv_budget=4096), use_tqdm=False)) == stock_outputs
    assert token_ids(llm.generate(PROMPTS, greedy(12, rocketkv_mode="full"), use_tqdm=False)) == stock_outputs


@pytest.mark.parametrize("extra", [{}, {"rocketkv_budget": 256, "rocketkv_mode": "mt"}])
def test_pass_key_survives_compression(llm, stock_outputs, extra):
    stock_text = llm.get_tokenizer().decode(stock_outputs[0])
    assert str(PASSKEY) in stock_text.replace(" ", "")
    text = llm.generate(PROMPTS[:1], greedy(12, **extra), use_tqdm=False)[0].outputs[0].text
    assert str(PASSKEY) in text.replace(" ", "")
