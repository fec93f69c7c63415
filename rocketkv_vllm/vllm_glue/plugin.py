"""vLLM general plugin (entry point `vllm.general_plugins`): makes `rocketkv` a backend choice.

vLLM loads general plugins in every process (API server, engine core, workers) before it
parses backend names, so each hook below is installed everywhere:
- the name `rocketkv` (any case) resolves to AttentionBackendEnum.CUSTOM, registered to
  RocketKVBackend;
- the CPU platform, which otherwise always picks CPU_ATTN, honours that choice;
- layers served by RocketKV emit RocketKVSpec, whose manager frees evicted blocks;
- the scheduler tells that manager about each request (budget, mode, prompt length);
- the scheduler ends no prefill chunk of an evicting prompt inside its observation window
  (window_alignment.py);
- the model runner publishes the request in each batch row to the metadata builder, and
  marks its dummy batches (profiling, warm-up, graph capture) as such;
- a one-token step that still holds a prompt chunk is not replayed as a full CUDA graph
  (the chunk that completes an evicting prompt runs SnapKV++ compaction, which is eager);
- bad per-request settings are rejected before the request is queued (HTTP 400), and a
  bad rocketkv section of --additional-config when the engine config is created;
- the scheduler ships RocketKV's counters in its SchedulerStats, and a stat logger in the
  frontend exports them as `vllm:rocketkv_*` series (vllm_glue.metrics).
Every hook is gated on the engine actually serving RocketKV; patches.py lists the vLLM
internals they patch and the vLLM versions supported.
"""
from __future__ import annotations

import functools
import logging

from rocketkv_vllm.config import REQUEST_PREFIX, RocketKVConfig, request_settings
from rocketkv_vllm.vllm_glue.patches import PATCHED, check_vllm_version, is_patched
from rocketkv_vllm.vllm_glue import window_alignment

logger = logging.getLogger(__name__)
BACKEND_PATH = "rocketkv_vllm.vllm_glue.backend.RocketKVBackend"
_registered = False


def _wrap(owner: type, name: str, make_wrapper) -> None:
    """Replace owner.name by make_wrapper(original), once (plugins may load twice)."""
    if not is_patched(owner, name):
        raise AssertionError(f"{owner.__name__}.{name} is not listed in patches.PATCHED")
    original = owner.__dict__[name]
    if getattr(original, "_rocketkv_wrapped", False):
        return
    wrapper = make_wrapper(original)
    wrapper._rocketkv_wrapped = True
    setattr(owner, name, wrapper)


def _custom_slot_path() -> str | None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    custom = AttentionBackendEnum.CUSTOM
    return custom.get_path() if custom.is_overridden() else None


def _uses_rocketkv(vllm_config) -> bool:
    """The engine's backend is the CUSTOM slot and the slot holds RocketKV (not another plugin's)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return vllm_config.attention_config.backend == AttentionBackendEnum.CUSTOM and _custom_slot_path() == BACKEND_PATH


def _slot_conflict(other: str) -> RuntimeError:
    return RuntimeError(
        f"two vLLM plugins claim the CUSTOM attention backend: RocketKV ({BACKEND_PATH}) and {other}; "
        "leave one of them out (VLLM_PLUGINS lists the plugins vLLM loads)"
    )


def _register_backend_name() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    registered = _custom_slot_path()
    if registered not in (None, BACKEND_PATH):
        raise _slot_conflict(registered)
    AttentionBackendEnum._member_map_["ROCKETKV"] = AttentionBackendEnum.CUSTOM
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)


def _select_on_cpu() -> None:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    def make(original):
        @functools.wraps(original.__func__)
        def get_attn_backend_cls(cls, selected_backend, *args, **kwargs):
            if selected_backend == AttentionBackendEnum.CUSTOM and _custom_slot_path() == BACKEND_PATH:
                return BACKEND_PATH
            return original.__func__(cls, selected_backend, *args, **kwargs)

        return classmethod(get_attn_backend_cls)

    _wrap(CpuPlatform, "get_attn_backend_cls", make)


def _use_v1_model_runner() -> None:
    """The request-to-row hook targets vLLM's V1 model runner (the one CPU uses too)."""
    from vllm.config import VllmConfig

    def make(original):
        @functools.wraps(original)
        def unsupported(self):
            reasons = original(self)
            if _uses_rocketkv(self):
                reasons.append("the RocketKV attention backend")
            return reasons

        return unsupported

    _wrap(VllmConfig, "_get_v2_model_runner_unsupported_features", make)


def _refuse_unsupported(vllm_config, block_size: int) -> None:
    """Engine features whose metadata paths bypass RocketKV's per-request rows or block plan."""
    from rocketkv_vllm.vllm_glue.backend import RocketKVBackend

    parallel = vllm_config.parallel_config
    refused = {
        f"--block-size {block_size} (use one of {RocketKVBackend.get_supported_kernel_block_sizes()})":
            block_size not in RocketKVBackend.get_supported_kernel_block_sizes(),
        "speculative decoding": vllm_config.speculative_config is not None,
        "KV transfer connectors": vllm_config.kv_transfer_config is not None,
        "dual-batch overlap (microbatching)": bool(getattr(parallel, "use_ubatching", False)),
        "decode context parallelism": getattr(parallel, "decode_context_parallel_size", 1) > 1,
    }
    unsupported = [name for name, present in refused.items() if present]
    if unsupported:
        raise ValueError(f"the RocketKV attention backend does not support {', '.join(unsupported)}")


def _emit_rocketkv_spec() -> None:
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from rocketkv_vllm.vllm_glue.backend import RocketKVBackend
    from rocketkv_vllm.vllm_glue.kv_manager import RocketKVSpec

    def make(original):
        @functools.wraps(original)
        def get_kv_cache_spec(self, vllm_config):
            spec = original(self, vllm_config)
            if not (isinstance(self.attn_backend, type) and issubclass(self.attn_backend, RocketKVBackend)):
                return spec
            if type(spec) is not FullAttentionSpec:
                raise ValueError(f"RocketKV supports full attention layers only, got {type(spec).__name__}")
            _refuse_unsupported(vllm_config, spec.block_size)
            config = RocketKVConfig.from_additional_config(vllm_config.additional_config)
            if spec.block_size % config.page_size:
                raise ValueError(f"rocketkv.page_size ({config.page_size}) must divide the block size ({spec.block_size})")
            RocketKVBackend.configure(config)
            return RocketKVSpec(
                block_size=spec.block_size, num_kv_heads=spec.num_kv_heads, head_size=spec.head_size,
                head_size_v=spec.head_size_v, dtype=spec.dtype, kv_quant_mode=spec.kv_quant_mode, rocketkv=config,
            )

        return get_kv_cache_spec

    _wrap(Attention, "get_kv_cache_spec", make)


def _register_kv_manager() -> None:
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from rocketkv_vllm.vllm_glue.kv_manager import RocketKVManager, RocketKVSpec

    KVCacheSpecRegistry._ensure_registered()  # built-ins first: they register only into an empty registry
    KVCacheSpecRegistry.register(RocketKVSpec, RocketKVManager, uniform_type_base_spec=FullAttentionSpec)


def _track_requests_in_scheduler() -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    def track(kv_cache_manager: KVCacheManager, request) -> None:
        for manager in _rocketkv_managers(kv_cache_manager):
            manager.track(request)

    def make(original):
        @functools.wraps(original)
        def wrapper(self, request, *args, **kwargs):
            track(self, request)
            return original(self, request, *args, **kwargs)

        return wrapper

    _wrap(KVCacheManager, "get_computed_blocks", make)
    _wrap(KVCacheManager, "allocate_slots", make)


def _publish_batch_rows() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from rocketkv_vllm.vllm_glue.batch_context import current_batch, dummy_batch, rows_of_batch

    def make(original):
        @functools.wraps(original)
        def build(self, *args, **kwargs):
            batch = current_batch()
            # stock backends need no rows; a dummy run's rows hold no requests
            if not _uses_rocketkv(self.vllm_config) or (batch is not None and batch.dummy):
                return original(self, *args, **kwargs)
            rows = [self.requests.get(req_id) for req_id in self.input_batch.req_ids]
            with rows_of_batch(rows):
                return original(self, *args, **kwargs)

        return build

    def make_dummy(original):
        # profiling, warm-up, graph capture, idle data-parallel ranks: the input batch may
        # still list the last step's requests, but none of them is in these rows
        @functools.wraps(original)
        def dummy_run(self, *args, **kwargs):
            if not _uses_rocketkv(self.vllm_config):
                return original(self, *args, **kwargs)
            with dummy_batch():
                return original(self, *args, **kwargs)

        return dummy_run

    _wrap(GPUModelRunner, "_build_attention_metadata", make)
    _wrap(GPUModelRunner, "_dummy_run", make_dummy)


def holds_prompt_chunk(input_batch, num_reqs: int) -> bool:
    """Whether a request of the batch is still prefilling (its scheduled tokens are prompt)."""
    computed = input_batch.num_computed_tokens_cpu[:num_reqs]
    return bool((computed < input_batch.num_prompt_tokens[:num_reqs]).any())


def _no_full_graph_for_prompt_chunks() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(original):
        @functools.wraps(original)
        def determine(self, num_tokens, num_reqs, *args, force_uniform_decode=None, **kwargs):
            if force_uniform_decode is None and _uses_rocketkv(self.vllm_config):
                if holds_prompt_chunk(self.input_batch, num_reqs):
                    force_uniform_decode = False
            return original(self, num_tokens, num_reqs, *args, force_uniform_decode=force_uniform_decode, **kwargs)

        return determine

    _wrap(GPUModelRunner, "_determine_batch_execution_and_padding", make)


def check_engine_config(vllm_config) -> None:
    """At start-up: the CUSTOM slot still holds RocketKV, and its --additional-config section is valid."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if vllm_config.attention_config.backend != AttentionBackendEnum.CUSTOM or not _registered:
        return
    registered = _custom_slot_path()
    if registered != BACKEND_PATH:  # another plugin re-registered the slot after RocketKV
        raise _slot_conflict(registered)
    RocketKVConfig.from_additional_config(vllm_config.additional_config)  # raises naming the field
    _keep_json_booleans()


def _validate_config_at_startup() -> None:
    """A bad rocketkv section of --additional-config stops `vllm serve` / LLM() before any worker starts."""
    from vllm.engine.arg_utils import EngineArgs

    def make(original):
        @functools.wraps(original)
        def create_engine_config(self, *args, **kwargs):
            vllm_config = original(self, *args, **kwargs)
            check_engine_config(vllm_config)
            return vllm_config

        return create_engine_config

    _wrap(EngineArgs, "create_engine_config", make)


def _keep_json_booleans() -> None:
    """vllm_xargs values are declared str | int | float | list, so pydantic turns JSON true into 1
    and `"rocketkv_budget": true` would pass as a budget of 1: put bool first in the union (the
    API server builds its routes after the engine config, from the rebuilt models)."""
    import importlib

    from rocketkv_vllm.vllm_glue.patches import XARGS_REQUESTS, XARGS_VALUE, XARGS_VALUE_WITH_BOOL

    for owner in XARGS_REQUESTS:
        module, _, name = owner.partition(":")
        model = getattr(importlib.import_module(module), name)
        field = model.model_fields["vllm_xargs"]
        if field.annotation == dict[str, XARGS_VALUE_WITH_BOOL] | None:
            continue
        if field.annotation != dict[str, XARGS_VALUE] | None:
            raise AssertionError(f"{owner}.vllm_xargs changed type ({field.annotation}); see patches.XARGS_REQUESTS")
        field.annotation = dict[str, XARGS_VALUE_WITH_BOOL] | None
        model.model_rebuild(force=True)


def check_request(vllm_config, params, resumable: bool = False) -> None:
    """Raise ValueError (HTTP 400) naming the bad rocketkv_* key of a request's extra_args."""
    extra_args = getattr(params, "extra_args", None) or {}
    if not _uses_rocketkv(vllm_config):
        ours = sorted(key for key in extra_args if isinstance(key, str) and key.startswith(REQUEST_PREFIX))
        if ours:
            raise ValueError(f"{', '.join(ours)}: this server does not use the RocketKV attention backend "
                             "(start it with --attention-backend rocketkv)")
        return
    config = RocketKVConfig.from_additional_config(vllm_config.additional_config)
    mode = request_settings(extra_args, config).mode
    # a streaming-input session grows its prompt after stage 1 has evicted: refuse eviction
    if resumable and mode in ("rocketkv", "snapkv"):
        raise ValueError("streaming-input sessions need rocketkv_mode 'mt' or 'full' (eviction would drop later input)")
    if mode == "oracle" and vllm_config.compilation_config.cudagraph_mode.has_full_cudagraphs():
        # its decode runs in torch, outside the kernels a full CUDA graph replays
        raise ValueError("rocketkv_mode 'oracle' (an ablation) needs a server without full CUDA graphs: "
                         "--enforce-eager or -cc.cudagraph_mode=PIECEWISE")


def _validate_requests() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    def make(original):
        @functools.wraps(original)
        def process_inputs(self, request_id, prompt, params, *args, resumable: bool = False, **kwargs):
            check_request(self.vllm_config, params, resumable)
            return original(self, request_id, prompt, params, *args, resumable=resumable, **kwargs)

        return process_inputs

    _wrap(InputProcessor, "process_inputs", make)


def _rocketkv_managers(kv_cache_manager) -> list:
    from rocketkv_vllm.vllm_glue.kv_manager import RocketKVManager

    return [m for m in kv_cache_manager.coordinator.single_type_managers if isinstance(m, RocketKVManager)]


def _ship_scheduler_stats() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    from rocketkv_vllm.vllm_glue.metrics import StatsShipper, add_stats_field

    add_stats_field()

    def make(original):
        @functools.wraps(original)
        def update_from_output(self, scheduler_output, model_runner_output):
            managers = _rocketkv_managers(self.kv_cache_manager)
            if not managers:
                return original(self, scheduler_output, model_runner_output)
            shipper = self.__dict__.setdefault("_rocketkv_stats", StatsShipper())
            if self.log_stats:
                shipper.count_decode_rows(managers, scheduler_output)
            outputs = original(self, scheduler_output, model_runner_output)
            shipper.ship(managers, outputs, self.log_stats)
            return outputs

        return update_from_output

    _wrap(Scheduler, "update_from_output", make)


def _export_metrics() -> None:
    """The frontend's stat loggers (LLMEngine and AsyncLLM alike) gain RocketKV's, after vLLM's
    Prometheus logger, which unregisters every `vllm:` series when it starts."""
    from vllm.v1.metrics.loggers import StatLoggerManager

    from rocketkv_vllm.vllm_glue.metrics import RocketKVStatLogger

    def make(original):
        @functools.wraps(original)
        def init(self, vllm_config, *args, **kwargs):
            original(self, vllm_config, *args, **kwargs)
            if _uses_rocketkv(vllm_config):
                self.stat_loggers.append(RocketKVStatLogger(vllm_config, self.engine_indexes))

        return init

    _wrap(StatLoggerManager, "__init__", make)


def register() -> None:
    """Entry point of the `vllm.general_plugins` group."""
    global _registered
    if _registered:
        return
    check_vllm_version()
    _register_backend_name()
    _select_on_cpu()
    _use_v1_model_runner()
    _validate_config_at_startup()
    _validate_requests()
    _register_kv_manager()
    _emit_rocketkv_spec()
    _track_requests_in_scheduler()
    _publish_batch_rows()
    _no_full_graph_for_prompt_chunks()
    window_alignment.install()
    _ship_scheduler_stats()
    _export_metrics()
    _registered = True
    logger.debug("RocketKV plugin registered; patched vLLM internals: %s", ", ".join(map(str, PATCHED)))
