"""Engine features RocketKV cannot serve correctly are refused at start-up with a clear error."""
import pytest

from engine_utils import tiny_llama

from vllm import LLM

BASE = dict(
    skip_tokenizer_init=True, attention_backend="rocketkv", dtype="float32", enforce_eager=True,
    max_model_len=256, kv_cache_memory_bytes=1 << 20,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_llama(str(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"block_size": 48}, "--block-size 48"),
        ({"block_size": 16, "speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}},
         "speculative decoding"),
    ],
)
def test_unsupported_features_are_refused(model, extra, message):
    with pytest.raises(Exception, match=message):
        LLM(model, **BASE, **extra)


def test_sliding_window_models_are_refused(tmp_path):
    model = tiny_llama(str(tmp_path), family="Mistral", sliding_window=64)
    with pytest.raises(Exception, match="does not support sliding windows"):
        LLM(model, **BASE, block_size=16)
