"""Through `vllm serve`: a request that omits max_tokens is planned as one asking for the
server's output_tokens, not for the rest of the context that vLLM fills in."""
import json

import openai
import pytest

from engine_utils import default_model, openai_server, passkey_prompt

OUTPUT_TOKENS = 64


@pytest.fixture(scope="module")
def client():
    settings = {"rocketkv": {"budget": 256, "output_tokens": OUTPUT_TOKENS}}
    with openai_server(
        default_model(), "--attention-backend", "rocketkv", "--dtype", "float32", "--max-model-len", "2048",
        "--block-size", "16", "--enforce-eager", "--kv-cache-memory-bytes", str(128 << 20), "--max-num-seqs", "2",
        "--additional-config", json.dumps(settings),
    ) as running:
        yield openai.OpenAI(base_url=f"{running.base}/v1", api_key="none")


def completion(client, **kwargs):
    out = client.completions.create(model=client.models.list().data[0].id, prompt=passkey_prompt(52913, 22),
                                    temperature=0, logprobs=3, stop=["\n", "."], **kwargs)
    return out.choices[0].text, out.choices[0].logprobs.top_logprobs


def test_omitted_max_tokens_plans_for_output_tokens(client):
    omitted = completion(client)
    assert "52913" in omitted[0].replace(" ", "")
    # the same plan: bit-identical log-probabilities, not just the same greedy text
    assert completion(client, max_tokens=OUTPUT_TOKENS) == omitted
    assert completion(client, max_tokens=1500) == omitted
    # a request asking for fewer tokens than that plans for fewer: stage 1 keeps more
    assert completion(client, max_tokens=12)[1] != omitted[1]
