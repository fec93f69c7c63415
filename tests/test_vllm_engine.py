"""RocketKV inside vLLM's engine: batching, block freeing and accounting, preemption, aborts,
validation. A tiny random Llama keeps these fast; the same path serves any GQA Llama."""
import functools
import gc

import pytest
import torch

from engine_utils import free_blocks, greedy, run_steps, scheduler, tiny_llama, token_ids, token_prompt, total_usable_blocks

from vllm import LLM, SamplingParams

BLOCK = 16
greedy = functools.partial(greedy, detokenize=False)  # the tiny model has no tokenizer
ENGINE_ARGS = dict(
    skip_tokenizer_init=True, attention_backend="rocketkv", dtype="float32", enforce_eager=True, max_model_len=1024,
    block_size=BLOCK, kv_cache_memory_bytes=1 << 20, max_num_batched_tokens=256, max_num_seqs=8,
    # channel-major page summaries (the layout of mt servers; the other engine tests use rows)
    additional_config={"rocketkv": {"budget": 64, "window": 16, "summary_group": 1, "dense_below": 0}},  # HSA rows
)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    model = tiny_llama(str(tmp_path_factory.mktemp("tiny")))
    engine = LLM(model, **ENGINE_ARGS)
    yield engine
    del engine
    gc.collect()


PROMPTS = [token_prompt(600, 1), token_prompt(37, 2), token_prompt(300, 3)]


def test_kv_blocks_include_page_summaries(llm):
    # page 2 (the default) in 16-token blocks: 8 max rows + 8 min rows per 32 K/V rows -> 1.5x a plain block
    spec = scheduler(llm).kv_cache_manager.kv_cache_config.kv_cache_groups[0].kv_cache_spec
    assert type(spec).__name__ == "RocketKVSpec"
    assert spec.page_size_bytes * 2 == spec.block_size * 2 * spec.num_kv_heads * spec.head_size * 4 * 3


@pytest.mark.parametrize("mode", ["rocketkv", "mt"])
@pytest.mark.parametrize("budget", [16, 64, 4096])
def test_outputs_have_requested_length(llm, mode, budget):
    outputs = llm.generate(PROMPTS, greedy(20, rocketkv_budget=budget, rocketkv_mode=mode), use_tqdm=False)
    assert [len(ids) for ids in token_ids(outputs)] == [20] * len(PROMPTS)


def test_mixed_batch_equals_requests_run_alone(llm):
    # HSA rows beside exact ones: full, and snapkv (evicted, then every kept page: EVERY_PAGE rows,
    # as dense_below's rows are)
    settings = [{"rocketkv_budget": 48}, {"rocketkv_mode": "mt", "rocketkv_budget": 64}, {"rocketkv_mode": "full"}, {},
                {"rocketkv_mode": "snapkv", "rocketkv_budget": 48}]
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    alone = [token_ids(llm.generate([p], greedy(**s), use_tqdm=False))[0] for p, s in zip(prompts, settings)]
    assert token_ids(llm.generate(prompts, [greedy(**s) for s in settings], use_tqdm=False)) == alone


def test_budget_covering_prompt_equals_full_attention(llm):
    full = token_ids(llm.generate(PROMPTS, greedy(rocketkv_mode="full"), use_tqdm=False))
    assert token_ids(llm.generate(PROMPTS, greedy(rocketkv_budget=600), use_tqdm=False)) == full


def blocks_held_in_decode(llm, extra: dict) -> int:
    _, free = run_steps(llm, {f"usage-{sorted(extra.items())}": (PROMPTS[0], greedy(24, **extra))})
    return total_usable_blocks(llm) - min(free[-8:])


def test_decode_holds_only_kept_blocks(llm):
    prompt_blocks = -(-600 // BLOCK)
    full = blocks_held_in_decode(llm, {"rocketkv_mode": "full"})
    mt = blocks_held_in_decode(llm, {"rocketkv_mode": "mt"})
    small = blocks_held_in_decode(llm, {"rocketkv_budget": 32})
    large = blocks_held_in_decode(llm, {"rocketkv_budget": 256})
    assert full == mt >= prompt_blocks
    assert small < large < full
    assert small <= full // 3


def test_no_block_leaked_after_finish(llm):
    requests = {f"fin{i}": (PROMPTS[i % 3], greedy(8, rocketkv_budget=16 * (i + 1))) for i in range(6)}
    outputs, _ = run_steps(llm, requests)
    assert sorted(outputs) == sorted(requests)
    assert free_blocks(llm) == total_usable_blocks(llm)


def test_no_block_leaked_after_abort(llm):
    for i, extra in enumerate([{"rocketkv_budget": 32}, {"rocketkv_mode": "full"}, {"rocketkv_mode": "mt"}]):
        llm.llm_engine.add_request(f"abort{i}", PROMPTS[i % 2 * 2], greedy(200, **extra))
    for _ in range(5):  # some still prefilling, some decoding after compaction
        llm.llm_engine.step()
    llm.llm_engine.abort_request([f"abort{i}" for i in range(3)])
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    assert free_blocks(llm) == total_usable_blocks(llm)


def finish_with_logprobs(llm, requests: dict) -> dict:
    """Step requests {id: (prompt, params)} to the end: {id: (token ids, per-token logprobs)}."""
    for request_id, (prompt, params) in requests.items():
        llm.llm_engine.add_request(request_id, prompt, params)
    finished = {}
    while llm.llm_engine.has_unfinished_requests():
        for out in llm.llm_engine.step():
            if out.finished:
                finished[out.request_id] = (list(out.outputs[0].token_ids), out.outputs[0].logprobs)
    return finished


def test_preempted_requests_finish_without_leaking(llm, monkeypatch):
    sched = scheduler(llm)
    preempted = []
    original = sched._preempt_request

    def counting(request, *args, **kwargs):
        preempted.append(request.request_id.rsplit("-", 1)[0])  # (the engine's id: ours + "-" + a random suffix)
        return original(request, *args, **kwargs)

    monkeypatch.setattr(sched, "_preempt_request", counting)
    capacity = total_usable_blocks(llm) * BLOCK

    def params(**extra):
        return SamplingParams(max_tokens=200, temperature=0, ignore_eos=True, detokenize=False, logprobs=4, extra_args=extra)

    requests = {f"pre{i}": (token_prompt(300, 10 + i), params(rocketkv_mode="full")) for i in range(4)}
    requests |= {f"pre-rkv{i}": (token_prompt(300, 20 + i), params(rocketkv_budget=32)) for i in range(3)}
    # stage 1 then exact decode (the last added: preempted first)
    requests |= {f"pre-snap{i}": (token_prompt(300, 30 + i), params(rocketkv_mode="snapkv", rocketkv_budget=32))
                 for i in range(2)}
    assert sum(500 for _ in requests) > capacity  # the scenario must overflow the cache
    finished = finish_with_logprobs(llm, requests)
    assert any(r.startswith("pre-snap") for r in preempted)
    assert sorted(finished) == sorted(requests) and all(len(ids) == 200 for ids, _ in finished.values())
    assert free_blocks(llm) == total_usable_blocks(llm)
    # Requests that decode exactly compute what they compute alone: a recomputed evicting request
    # runs stage 1 at its prompt's end again, and its recomputed outputs attend what it kept, as
    # when they were decoded (window_alignment ends that chunk with the prompt; if the outputs
    # attended the whole prompt there, logprobs moved by up to 0.6). The tiny model repeats one
    # token whatever its context, so the logprobs are compared, not the tokens. (Page selection's
    # rows, pre-rkv, attended chosen pages when they were decoded and every kept token when
    # recomputed: they can differ.)
    for request_id in sorted({r for r in preempted if not r.startswith("pre-rkv")}):
        alone = finish_with_logprobs(llm, {f"{request_id}-alone": requests[request_id]})[f"{request_id}-alone"]
        for position, (ours, theirs) in enumerate(zip(finished[request_id][1], alone[1])):
            assert ours.keys() == theirs.keys(), (request_id, position)
            assert all(abs(ours[t].logprob - theirs[t].logprob) < 1e-4 for t in ours), (request_id, position)


def test_compressed_requests_fit_more_at_once(llm):
    """At the same cache size, budgeted requests run concurrently where full ones queue."""
    capacity = total_usable_blocks(llm)

    def peak_running(extra: dict) -> int:
        for i in range(8):
            llm.llm_engine.add_request(f"cap{extra}{i}", token_prompt(450, 40 + i), greedy(40, **extra))
        peak = 0
        while llm.llm_engine.has_unfinished_requests():
            llm.llm_engine.step()
            peak = max(peak, len(scheduler(llm).running))
        return peak

    full, compressed = peak_running({"rocketkv_mode": "full"}), peak_running({"rocketkv_budget": 32})
    assert compressed > full
    assert free_blocks(llm) == capacity


@pytest.mark.parametrize(
    "extra,field",
    [
        ({"rocketkv_budget": 0}, "rocketkv_budget"),
        ({"rocketkv_budget": -4}, "rocketkv_budget"),
        ({"rocketkv_budget": "many"}, "rocketkv_budget"),
        ({"rocketkv_budget": 1.5}, "rocketkv_budget"),
        ({"rocketkv_mode": "turbo"}, "rocketkv_mode"),
        ({"rocketkv_mode": 3}, "rocketkv_mode"),
    ],
)
def test_invalid_request_settings_raise_and_engine_keeps_serving(llm, extra, field):
    with pytest.raises(ValueError, match=field):
        llm.generate(PROMPTS[1:2], greedy(**extra), use_tqdm=False)
    assert len(token_ids(llm.generate(PROMPTS[1:2], greedy(4), use_tqdm=False))[0]) == 4
    assert free_blocks(llm) == total_usable_blocks(llm)


def test_mt_mode_keeps_prefix_caching_and_evicting_requests_bypass_it(llm):
    shared = token_prompt(400, 77)
    first = llm.generate([shared], greedy(6, rocketkv_mode="mt"), use_tqdm=False)[0]
    again = llm.generate([shared], greedy(6, rocketkv_mode="mt"), use_tqdm=False)[0]
    assert again.num_cached_tokens >= 400 - 2 * BLOCK
    assert list(again.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    # an evicting request neither reads those blocks (it rewrites its own in place) ...
    evicting = llm.generate([shared], greedy(6, rocketkv_budget=32), use_tqdm=False)[0]
    assert evicting.num_cached_tokens == 0
    after = llm.generate([shared], greedy(6, rocketkv_mode="mt"), use_tqdm=False)[0]
    assert list(after.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    # ... nor publishes its compacted blocks as a prefix of its prompt
    private = token_prompt(400, 78)
    llm.generate([private], greedy(6, rocketkv_budget=32), use_tqdm=False)
    assert llm.generate([private], greedy(6, rocketkv_mode="mt"), use_tqdm=False)[0].num_cached_tokens == 0


ENGINE_PROCESS_RUN = """
import json, sys
sys.path.insert(0, {tests!r})
from engine_utils import greedy, token_ids
from vllm import LLM, SamplingParams
llm = LLM({model!r}, **{args!r})
params = [greedy(6, detokenize=False, **s) for s in {settings!r}]
print("RESULT", json.dumps(token_ids(llm.generate({prompts!r}, params, use_tqdm=False))))
"""


def test_engine_process_with_the_kernels_gives_the_in_process_tokens(llm):
    """With the engine core in its own process (VLLM_ENABLE_V1_MULTIPROCESSING=1) the
    scheduler's plans travel to the workers inside the requests (a worker refuses a row without
    one), and the GPU path's kernels (on CPU under the Triton interpreter, which must be on
    before triton is imported: a fresh process) give the tokens of the in-process engine (on
    CPU the torch reference path), with evicting, MT and exact rows in one batch."""
    import json
    import os
    import subprocess
    import sys

    settings = [{"rocketkv_budget": 48}, {"rocketkv_mode": "mt", "rocketkv_budget": 64}, {"rocketkv_mode": "full"}]
    # (short prompts: the Triton interpreter runs a kernel's programs one by one)
    prompts = [token_prompt(260, 1), token_prompt(150, 2), token_prompt(37, 3)]
    model = llm.llm_engine.model_config.model
    code = ENGINE_PROCESS_RUN.format(tests=os.path.dirname(__file__), model=model, args=ENGINE_ARGS, settings=settings,
                                     prompts=prompts)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    if not torch.cuda.is_available():
        env.update(ROCKETKV_TRITON_INTERPRET="1", TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    result = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert result, run.stderr[-3000:]
    if not torch.cuda.is_available():  # the engine core's start-up line names the kernels it runs
        assert "kernels Triton (interpreter)" in run.stdout + run.stderr, (run.stdout + run.stderr)[-3000:]
    assert json.loads(result[0].removeprefix("RESULT ")) == token_ids(
        llm.generate(prompts, [greedy(6, **s) for s in settings], use_tqdm=False))


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager(llm, tmp_path):
    """Full CUDA graphs of pure-decode steps (persistent decode tensors, padded batches)
    give the tokens of eager execution: 3 requests replay the 4-row graph."""
    graphs = LLM(
        llm.llm_engine.model_config.model, **dict(ENGINE_ARGS, enforce_eager=False),
        compilation_config={"cudagraph_mode": "FULL_AND_PIECEWISE", "cudagraph_capture_sizes": [1, 2, 4, 8]},
    )
    settings = [{"rocketkv_budget": 48}, {"rocketkv_mode": "mt", "rocketkv_budget": 64}, {"rocketkv_mode": "full"}]
    params = [greedy(12, **s) for s in settings]
    got = token_ids(graphs.generate(PROMPTS, params, use_tqdm=False))
    del graphs
    gc.collect()
    assert got == token_ids(llm.generate(PROMPTS, params, use_tqdm=False))
