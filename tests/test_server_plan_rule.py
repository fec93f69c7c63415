"""Through `vllm serve`: a chat request that omits max_tokens (vLLM then allows the rest of the
context) is planned as one asking for the server's output_tokens."""
import json

import openai
import pytest

from engine_utils import default_model, openai_server, passkey_prompt

OUTPUT_TOKENS = 64
# the prompt takes 1,123 tokens: an omitted max_tokens leaves up to 157 for the output, which
# vLLM then asks for (and which would plan differently from 64), at a bearable CPU cost
MAX_MODEL_LEN = 1280


@pytest.fixture(scope="module")
def client():
    settings = {"rocketkv": {"budget": 256, "output_tokens": OUTPUT_TOKENS}}
    with openai_server(
        default_model(), "--attention-backend", "rocketkv", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
        "--block-size", "16", "--enforce-eager", "--kv-cache-memory-bytes", str(160 << 20), "--max-num-seqs", "2",
        "--additional-config", json.dumps(settings),
    ) as running:
        yield openai.OpenAI(base_url=f"{running.base}/v1", api_key="none")


def chat(client, **kwargs):
    out = client.chat.completions.create(
        model=client.models.list().data[0].id, temperature=0, logprobs=True, top_logprobs=3, stop=["\n", "."],
        messages=[{"role": "user", "content": passkey_prompt(52913, 22)}], **kwargs)
    choice = out.choices[0]
    return choice.message.content, [(t.token, t.logprob) for t in choice.logprobs.content]


def test_omitted_max_tokens_plans_for_output_tokens(client):
    omitted = chat(client)[1]
    assert len(omitted) > 1
    # the same plan: bit-identical log-probabilities, not just the same greedy text, as far as
    # both go (without max_tokens the request may run on to the end of the context)
    for max_tokens in (OUTPUT_TOKENS, 100):
        asked = chat(client, max_tokens=max_tokens)[1]
        assert len(asked) == min(len(omitted), max_tokens) and asked == omitted[:len(asked)]
    # a request asking for fewer tokens than that plans for fewer: stage 1 keeps more
    assert chat(client, max_tokens=12)[1] != omitted[:12]
