"""Every vLLM internal the plugin patches, and the vLLM versions it was written against.

The plugin reaches into vLLM's private classes (plugin.py says why each hook exists), so
a vLLM upgrade can silently break it: `check_vllm_version` refuses other versions before
anything is patched, and tests/test_patches.py checks that each entry below exists in
the installed vLLM. plugin.py wraps only what PATCHED lists.
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = ">=0.26.0,<0.27"
SKIP_VERSION_CHECK_ENV = "ROCKETKV_SKIP_VERSION_CHECK"


@dataclass(frozen=True)
class Internal:
    owner: str  # "module:Class" (or a module alone)
    attribute: str
    why: str

    def resolve_owner(self):
        module, _, cls = self.owner.partition(":")
        target = importlib.import_module(module)
        return getattr(target, cls) if cls else target

    def __str__(self) -> str:
        return f"{self.owner.replace(':', '.')}.{self.attribute}"


# Methods replaced by a wrapper that calls the original (plugin._wrap).
PATCHED = (
    Internal("vllm.platforms.cpu:CpuPlatform", "get_attn_backend_cls",
             "the CPU platform ignores the requested backend and always picks CPU_ATTN"),
    Internal("vllm.config:VllmConfig", "_get_v2_model_runner_unsupported_features",
             "keep RocketKV on the V1 model runner, the one the batch-row hook targets"),
    Internal("vllm.engine.arg_utils:EngineArgs", "create_engine_config",
             "validate --additional-config's rocketkv section at start-up, in the front-end process"),
    Internal("vllm.v1.engine.input_processor:InputProcessor", "process_inputs",
             "reject bad rocketkv_* request settings (HTTP 400) and evicting streaming-input sessions"),
    Internal("vllm.model_executor.layers.attention.attention:Attention", "get_kv_cache_spec",
             "RocketKV layers emit RocketKVSpec, whose manager frees evicted blocks"),
    Internal("vllm.v1.core.kv_cache_manager:KVCacheManager", "get_computed_blocks",
             "tell RocketKVManager each request's budget, mode and prompt length"),
    Internal("vllm.v1.core.kv_cache_manager:KVCacheManager", "allocate_slots",
             "tell RocketKVManager each request's budget, mode and prompt length"),
    Internal("vllm.v1.worker.gpu_model_runner:GPUModelRunner", "_build_attention_metadata",
             "publish the request of each batch row to the metadata builder"),
    Internal("vllm.v1.worker.gpu_model_runner:GPUModelRunner", "_dummy_run",
             "mark profiling, warm-up and capture batches as dummy (no request rows): exact attention"),
    Internal("vllm.v1.worker.gpu_model_runner:GPUModelRunner", "_determine_batch_execution_and_padding",
             "no full CUDA graph for a step that completes a prompt (SnapKV++ compaction is eager)"),
    Internal("vllm.v1.core.sched.scheduler:Scheduler", "__init__",
             "window_alignment: sets need_mamba_block_aligned_split so that vLLM calls the split below"),
    Internal("vllm.v1.core.sched.scheduler:Scheduler", "_mamba_block_aligned_split",
             "window_alignment: no prefill chunk ends inside the SnapKV++ observation window"),
    Internal("vllm.v1.core.sched.scheduler:Scheduler", "update_from_output",
             "metrics: RocketKV's counters travel in the step's SchedulerStats"),
    Internal("vllm.v1.metrics.loggers:StatLoggerManager", "__init__",
             "metrics: the frontend's stat loggers gain RocketKV's vllm:rocketkv_* series"),
)

# Other internals the plugin writes to or calls at registration.
USED = (
    Internal("vllm.v1.attention.backends.registry:AttentionBackendEnum", "_member_map_",
             "the name `rocketkv` resolves to the CUSTOM member"),
    Internal("vllm.v1.attention.backends.registry:AttentionBackendEnum", "CUSTOM",
             "the backend slot RocketKV registers itself to"),
    Internal("vllm.v1.attention.backends.registry", "register_backend", "registers the CUSTOM slot"),
    Internal("vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry", "_ensure_registered",
             "built-in specs register only into an empty registry: register them before RocketKVSpec"),
    Internal("vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry", "register",
             "RocketKVSpec is managed by RocketKVManager"),
)

# OpenAI request models whose vllm_xargs annotation (`str | int | float | list[...]` values,
# XARGS_VALUE) reads JSON true as 1; on RocketKV servers they are rebuilt with bool first
# in the union so that `"rocketkv_budget": true` reaches the validation as a bool.
XARGS_REQUESTS = (
    "vllm.entrypoints.openai.completion.protocol:CompletionRequest",
    "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest",
    "vllm.entrypoints.openai.responses.protocol:ResponsesRequest",
    "vllm.entrypoints.speech_to_text.transcription.protocol:TranscriptionRequest",
)
XARGS_VALUE = str | int | float | list[str | int | float]
XARGS_VALUE_WITH_BOOL = bool | str | int | float | list[bool | str | int | float]


def is_patched(owner: type, attribute: str) -> bool:
    return any(p.attribute == attribute and p.resolve_owner() is owner for p in PATCHED)


def check_vllm_version(installed: str | None = None) -> None:
    """Raise RuntimeError unless the installed vLLM is in SUPPORTED_VLLM (or the check is skipped)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if installed is None:
        import vllm

        installed = vllm.__version__
    try:
        # local labels (0.26.0+cpu) and dev/rc builds of a supported release count as that release
        supported = SpecifierSet(SUPPORTED_VLLM).contains(Version(installed).public, prereleases=True)
    except InvalidVersion:
        supported = False
    if supported:
        return
    message = (
        f"rocketkv_vllm supports vLLM {SUPPORTED_VLLM} (it patches vLLM internals, listed in "
        f"rocketkv_vllm/vllm_glue/patches.py); the installed vLLM is {installed}. Install a supported "
        f"vLLM, or uninstall rocketkv_vllm (or leave it out with VLLM_PLUGINS), or set "
        f"{SKIP_VERSION_CHECK_ENV}=1 to try anyway."
    )
    if os.environ.get(SKIP_VERSION_CHECK_ENV) == "1":
        logger.warning("%s is set: %s", SKIP_VERSION_CHECK_ENV, message)
        return
    raise RuntimeError(message)
