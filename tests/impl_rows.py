"""A metadata builder and impl made without vLLM's config, and request states that carry their
plans: for tests that run the impl's forward over rows they choose (test_flash_prefill.py)."""
import random
from types import SimpleNamespace

import torch

from rocketkv_vllm.config import RocketKVConfig
from rocketkv_vllm.plan import plan_for_params
from rocketkv_vllm.vllm_glue.backend import RocketKVMetadataBuilder
from rocketkv_vllm.vllm_glue.impl import RocketKVImpl
from rocketkv_vllm.vllm_glue.request_plans import attach_plan

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
BLOCK, HEADS, KV_HEADS, HEAD_DIM, MAX_ROWS, WIDTH = 16, 8, 2, 64, 8, 40


def make_builder(config: RocketKVConfig) -> RocketKVMetadataBuilder:
    spec = SimpleNamespace(head_size=HEAD_DIM, block_size=BLOCK, dtype=DTYPE, num_kv_heads=KV_HEADS)
    builder = object.__new__(RocketKVMetadataBuilder)
    builder._setup(config, spec, MAX_ROWS, 1024, DEV, HEADS, WIDTH)
    builder.flash_prefill = False
    if builder._graph_io is None:  # CPU: the per-layer graphs' rows all the same
        builder.allocate_graph_buffers(DTYPE)
    return builder


def request(config: RocketKVConfig, prompt_len: int, mode: str):
    params = SimpleNamespace(extra_args={"rocketkv_mode": mode}, max_tokens=16)
    attach_plan(params, plan_for_params(params, prompt_len, config, HEAD_DIM, BLOCK))
    return SimpleNamespace(req_id=f"r{random.random()}", sampling_params=params, num_prompt_tokens=prompt_len)


def make_impl(builder: RocketKVMetadataBuilder) -> RocketKVImpl:
    impl = object.__new__(RocketKVImpl)
    impl.num_heads, impl.head_size, impl.num_kv_heads, impl.scale = HEADS, HEAD_DIM, KV_HEADS, HEAD_DIM ** -0.5
    impl.config, impl.layout, impl._ops, impl._graphs = builder.config, builder.layout, None, None
    impl.selection_queries = lambda q: q
    impl._may_select = builder.config.selects_pages()
    return impl
