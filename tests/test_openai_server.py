"""`vllm serve --attention-backend rocketkv` answering OpenAI clients (engine in its own process)."""
import json
import subprocess
import sys

import openai
import pytest
import requests

from engine_utils import default_model, free_port, openai_server, passkey_prompt

PASSKEY = 52913


OUTPUT_TOKENS = 32
# the passkey chat prompt takes 1,123 tokens: a chat request that omits max_tokens is allowed the
# other 48 of the context (vLLM then asks for them, which would plan differently from
# OUTPUT_TOKENS: stage 1 would keep 659 tokens, not 670), at a bearable CPU cost
MAX_MODEL_LEN = 1171


@pytest.fixture(scope="module")
def server():
    settings = {"rocketkv": {"budget": 512, "output_tokens": OUTPUT_TOKENS}}
    with openai_server(
        default_model(), "--attention-backend", "rocketkv",
        "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--block-size", "16", "--enforce-eager",
        "--kv-cache-memory-bytes", str(160 << 20), "--max-num-seqs", "4",
        # (vLLM's start-up runs the model over this many tokens: a prompt's worth, not the default 2048)
        "--max-num-batched-tokens", str(MAX_MODEL_LEN),
        "--additional-config", json.dumps(settings),
    ) as running:
        yield running.base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none")


def model_name(client) -> str:
    return client.models.list().data[0].id


def test_completion_with_per_request_budget(client):
    prompt = passkey_prompt(PASSKEY, 22)
    for xargs in ({"rocketkv_budget": 512}, {"rocketkv_mode": "mt", "rocketkv_budget": 256}, {"rocketkv_mode": "full"}):
        out = client.completions.create(
            model=model_name(client), prompt=prompt, max_tokens=10, temperature=0, extra_body={"vllm_xargs": xargs}
        )
        assert str(PASSKEY) in out.choices[0].text.replace(" ", ""), xargs


def test_chat_completion(client):
    out = client.chat.completions.create(
        model=model_name(client), messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0, extra_body={"vllm_xargs": {"rocketkv_budget": 64}},
    )
    assert "Paris" in out.choices[0].message.content


# (raw JSON body fragment of vllm_xargs, text the HTTP 400 must contain)
BAD_XARGS = [
    ('{"rocketkv_budget": 0}', "rocketkv_budget"),
    ('{"rocketkv_budget": -1}', "rocketkv_budget"),
    ('{"rocketkv_budget": true}', "rocketkv_budget"),
    ('{"rocketkv_budget": 1208925819614629174706176}', "rocketkv_budget"),  # 2**80
    ('{"rocketkv_budget": NaN}', "rocketkv_budget"),
    ('{"rocketkv_budget": 64.0}', "rocketkv_budget"),
    ('{"rocketkv_budget": "lots"}', "rocketkv_budget"),
    ('{"rocketkv_budget": null}', "rocketkv_budget"),
    ('{"rocketkv_budget": [64]}', "rocketkv_budget"),
    ('{"rocketkv_budget": {"x": 1}}', "rocketkv_budget"),
    ('{"rocketkv_mode": "x"}', "rocketkv_mode"),
    ('{"rocketkv_mode": 3}', "rocketkv_mode"),
    ('{"rocketkv_budgte": 256}', "did you mean 'rocketkv_budget'"),
    ('{"rocketkv_top_k": -1}', "rocketkv_top_k"),
    ('[1, 2]', "vllm_xargs"),
    ('"rocketkv_budget=64"', "vllm_xargs"),
]


def test_bad_settings_get_http_400_naming_the_field_and_server_keeps_serving(server, client):
    for body, field in BAD_XARGS:
        for path, payload in (("completions", '"prompt": "Hello"'),
                              ("chat/completions", '"messages": [{"role": "user", "content": "Hello"}]')):
            data = f'{{"model": "{model_name(client)}", {payload}, "max_tokens": 4, "vllm_xargs": {body}}}'
            response = requests.post(f"{server}/v1/{path}", data=data, headers={"Content-Type": "application/json"}, timeout=60)
            assert response.status_code == 400, (path, body, response.status_code, response.text)
            assert field in response.text, (path, body, response.text)
    assert client.completions.create(model=model_name(client), prompt="Hello", max_tokens=4).choices[0].text


def test_bad_server_config_stops_start_up_naming_the_field():
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", default_model(), "--attention-backend", "rocketkv",
           "--port", str(free_port()), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
           "--additional-config", '{"rocketkv": {"budgte": 64}}']
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "unknown setting 'rocketkv.budgte'; did you mean 'rocketkv.budget'" in done.stderr[-3000:]


def test_kv_cache_usage_metric_is_exported(server):
    assert "vllm:kv_cache_usage_perc" in requests.get(f"{server}/metrics", timeout=10).text


def plan_rule_chat(client, **kwargs):
    out = client.chat.completions.create(
        model=model_name(client), temperature=0, logprobs=True, top_logprobs=3, stop=["\n", "."],
        messages=[{"role": "user", "content": passkey_prompt(PASSKEY, 22)}],
        extra_body={"vllm_xargs": {"rocketkv_budget": 256}}, **kwargs)
    return [(t.token, t.logprob) for t in out.choices[0].logprobs.content]


def test_omitted_max_tokens_plans_for_output_tokens(client):
    """A chat request that omits max_tokens (vLLM then allows the rest of the context) is planned
    as one asking for the server's output_tokens."""
    omitted = plan_rule_chat(client)
    assert len(omitted) > 1
    # the same plan: bit-identical log-probabilities, not just the same greedy text, as far as
    # both go (without max_tokens the request may run on to the end of the context)
    asked = plan_rule_chat(client, max_tokens=OUTPUT_TOKENS)
    assert len(asked) == min(len(omitted), OUTPUT_TOKENS) and asked == omitted[:len(asked)]
    # a request asking for fewer tokens than that plans for fewer: stage 1 keeps more
    assert plan_rule_chat(client, max_tokens=12) != omitted[:12]
