"""An engine on another backend, with the plugin installed: it serves as before and refuses rocketkv_* keys."""
import pytest

from engine_utils import greedy, tiny_llama, token_ids

from vllm import LLM


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    model = tiny_llama(str(tmp_path_factory.mktemp("tiny")))
    return LLM(model, skip_tokenizer_init=True, attention_backend="CPU_ATTN", dtype="float32", enforce_eager=True,
               max_model_len=256, block_size=16, kv_cache_memory_bytes=1 << 20)


def test_stock_engine_refuses_rocketkv_settings_and_keeps_serving(stock):
    prompt = [{"prompt_token_ids": list(range(5, 40))}]
    with pytest.raises(ValueError, match="rocketkv_budget: this server does not use the RocketKV attention backend"):
        stock.generate(prompt, greedy(4, rocketkv_budget=64), use_tqdm=False)
    assert len(token_ids(stock.generate(prompt, greedy(4, other_plugin_setting=1), use_tqdm=False))[0]) == 4
