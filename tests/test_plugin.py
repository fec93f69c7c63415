"""The vLLM plugin's hooks, checked directly (no engine)."""
from types import SimpleNamespace

import pytest

from rocketkv_vllm.vllm_glue import plugin

plugin.register()

from vllm.config import AttentionConfig  # noqa: E402
from vllm.platforms.cpu import CpuPlatform  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "rocketkv"]
    assert entry.value == "rocketkv_vllm.vllm_glue.plugin:register"


@pytest.mark.parametrize("name", ["rocketkv", "RocketKV", "ROCKETKV", "custom"])
def test_backend_name_resolves_to_custom(name):
    assert AttentionConfig(backend=name).backend is AttentionBackendEnum.CUSTOM
    assert AttentionBackendEnum.CUSTOM.get_path() == plugin.BACKEND_PATH


def test_unknown_backend_still_rejected():
    with pytest.raises(ValueError, match="Unknown attention backend"):
        AttentionConfig(backend="rocketkvx")


def test_cpu_platform_honours_rocketkv_and_keeps_its_default():
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, None) == plugin.BACKEND_PATH
    stock = CpuPlatform.get_attn_backend_cls(None, _selector())
    assert stock == AttentionBackendEnum.CPU_ATTN.get_path()


def _selector():
    return SimpleNamespace(use_mla=False, use_sparse=False)


def test_register_is_idempotent():
    plugin.register()
    plugin._registered = False
    plugin.register()  # wrappers must not stack
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, None) == plugin.BACKEND_PATH


def _vllm_config(mode: str = "rocketkv", backend=AttentionBackendEnum.CUSTOM):
    return SimpleNamespace(
        attention_config=SimpleNamespace(backend=backend), additional_config={"rocketkv": {"mode": mode}},
    )


@pytest.mark.parametrize(
    "extra", [{"rocketkv_budget": 0}, {"rocketkv_mode": "fast"}, {"rocketkv_budget": "9"}, {"rocketkv_budgte": 9}]
)
def test_request_validation_rejects_bad_settings(extra):
    with pytest.raises(ValueError, match=next(iter(extra))):
        plugin.check_request(_vllm_config(), SamplingParams(extra_args=extra))


def test_request_validation_passes_good_and_foreign_settings():
    plugin.check_request(_vllm_config(), SamplingParams(extra_args={"rocketkv_budget": 64, "rocketkv_mode": "MT", "other": 1}))
    plugin.check_request(_vllm_config(), SamplingParams())


def test_requests_are_checked_by_the_input_processor():
    from vllm.v1.engine.input_processor import InputProcessor

    processor = SimpleNamespace(vllm_config=_vllm_config())
    with pytest.raises(ValueError, match="rocketkv_budget"):
        InputProcessor.process_inputs(processor, "r", "hi", SamplingParams(extra_args={"rocketkv_budget": -1}), ())


def test_other_backends_refuse_rocketkv_settings_and_ignore_the_rest():
    stock = _vllm_config(backend=AttentionBackendEnum.FLASH_ATTN)
    with pytest.raises(ValueError, match="rocketkv_budget: this server does not use the RocketKV attention backend"):
        plugin.check_request(stock, SamplingParams(extra_args={"rocketkv_budget": 64}))
    plugin.check_request(stock, SamplingParams(extra_args={"other": 1}))
    plugin.check_request(stock, SamplingParams())


@pytest.fixture
def foreign_custom_backend():
    """The CUSTOM slot registered to another plugin's backend; RocketKV's registration restored after."""
    from vllm.v1.attention.backends.registry import register_backend

    other = "other_plugin.backend.OtherBackend"
    register_backend(AttentionBackendEnum.CUSTOM, other)
    yield other
    register_backend(AttentionBackendEnum.CUSTOM, plugin.BACKEND_PATH)


def test_a_custom_slot_held_by_another_plugin_is_refused(foreign_custom_backend):
    with pytest.raises(RuntimeError) as error:
        plugin._register_backend_name()
    assert foreign_custom_backend in str(error.value) and plugin.BACKEND_PATH in str(error.value)


def test_hooks_ignore_another_plugins_custom_backend(foreign_custom_backend):
    assert not plugin._uses_rocketkv(_vllm_config())
    with pytest.raises(ValueError, match="does not use the RocketKV attention backend"):
        plugin.check_request(_vllm_config(), SamplingParams(extra_args={"rocketkv_budget": 64}))
    # the CPU platform keeps its own choice instead of resolving the other plugin's class
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, _selector()) == AttentionBackendEnum.CPU_ATTN.get_path()


def test_the_rocketkv_slot_is_recognised():
    assert plugin._uses_rocketkv(_vllm_config())
    assert not plugin._uses_rocketkv(_vllm_config(backend=AttentionBackendEnum.FLASH_ATTN))


def _processor(mode: str):
    return SimpleNamespace(vllm_config=_vllm_config(mode))


def test_streaming_sessions_cannot_evict():
    from vllm.v1.engine.input_processor import InputProcessor

    with pytest.raises(ValueError, match="streaming-input sessions"):
        InputProcessor.process_inputs(_processor("rocketkv"), "r", "hi", SamplingParams(), (), resumable=True)
    with pytest.raises(ValueError, match="streaming-input sessions"):
        InputProcessor.process_inputs(_processor("mt"), "r", "hi", SamplingParams(extra_args={"rocketkv_mode": "rocketkv"}), (), resumable=True)
    # MT sessions pass the guard (and then fail on the fake processor, past it)
    with pytest.raises(AttributeError):
        InputProcessor.process_inputs(_processor("mt"), "r", "hi", SamplingParams(), (), resumable=True)


def test_prompt_chunks_keep_steps_off_full_graphs():
    import numpy as np
    from types import SimpleNamespace

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    decoding = SimpleNamespace(num_computed_tokens_cpu=np.array([40, 12, 0]), num_prompt_tokens=np.array([30, 12, 50]))
    assert not plugin.holds_prompt_chunk(decoding, 2)
    assert plugin.holds_prompt_chunk(decoding, 3)  # the third request's last prompt token
    assert getattr(GPUModelRunner._determine_batch_execution_and_padding, "_rocketkv_wrapped", False)


def test_summary_group_follows_the_server_mode_unless_set():
    from rocketkv_vllm.config import RocketKVConfig
    from rocketkv_vllm.kv_layout import FEW_CHANNEL_GROUP

    assert RocketKVConfig().layout_summary_group() == 0  # whole rows: scoring reads every channel
    assert RocketKVConfig(mode="mt").layout_summary_group() == FEW_CHANNEL_GROUP
    assert RocketKVConfig(mode="mt", summary_group=0).layout_summary_group() == 0
    assert RocketKVConfig(summary_group=16).layout_summary_group() == 16
    for bad in (3, -8, "8", True):
        with pytest.raises(ValueError, match="summary_group"):
            RocketKVConfig(summary_group=bad)


def test_engine_config_is_checked_at_start_up(foreign_custom_backend):
    with pytest.raises(RuntimeError, match=foreign_custom_backend):
        plugin.check_engine_config(_vllm_config())  # the slot was taken over after RocketKV registered


@pytest.mark.parametrize("section,field", [({"budget": True}, "rocketkv.budget"), ({"pagesize": 8}, "rocketkv.pagesize")])
def test_bad_server_settings_stop_start_up(section, field):
    config = SimpleNamespace(attention_config=SimpleNamespace(backend=AttentionBackendEnum.CUSTOM),
                             additional_config={"rocketkv": section})
    with pytest.raises(ValueError, match=field):
        plugin.check_engine_config(config)
    config.attention_config.backend = AttentionBackendEnum.FLASH_ATTN  # not RocketKV's business
    plugin.check_engine_config(config)
