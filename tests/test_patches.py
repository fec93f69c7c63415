"""The vLLM internals RocketKV patches exist in the installed vLLM, and other vLLM versions are refused."""
import pytest

from rocketkv_vllm.vllm_glue import patches, plugin

plugin.register()


@pytest.mark.parametrize("internal", patches.PATCHED + patches.USED, ids=str)
def test_listed_internal_exists_in_installed_vllm(internal):
    assert hasattr(internal.resolve_owner(), internal.attribute), f"{internal} is gone: {internal.why}"


@pytest.mark.parametrize("internal", patches.PATCHED, ids=str)
def test_every_listed_patch_is_installed(internal):
    assert getattr(internal.resolve_owner().__dict__[internal.attribute], "_rocketkv_wrapped", False)


def test_unlisted_internals_cannot_be_wrapped():
    from vllm.config import VllmConfig

    with pytest.raises(AssertionError, match="not listed in patches.PATCHED"):
        plugin._wrap(VllmConfig, "compute_hash", lambda original: original)


@pytest.mark.parametrize("version", ["0.26.0", "0.26.0+cpu", "0.26.3", "0.26.1rc1", "0.26.2.dev7+g1234abc"])
def test_supported_versions_pass(version):
    patches.check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.25.2", "0.27.0", "0.27.0.dev1", "1.0.0", "not-a-version"])
def test_other_versions_are_refused_naming_both(version, monkeypatch):
    monkeypatch.delenv(patches.SKIP_VERSION_CHECK_ENV, raising=False)
    with pytest.raises(RuntimeError) as error:
        patches.check_vllm_version(version)
    message = str(error.value)
    assert version in message and patches.SUPPORTED_VLLM in message and patches.SKIP_VERSION_CHECK_ENV in message


def test_version_check_escape_hatch(monkeypatch, caplog):
    monkeypatch.setenv(patches.SKIP_VERSION_CHECK_ENV, "1")
    with caplog.at_level("WARNING", logger=patches.__name__):
        patches.check_vllm_version("0.27.0")
    assert "0.27.0" in caplog.text


def test_installed_vllm_is_supported():
    patches.check_vllm_version()


@pytest.mark.parametrize("owner", patches.XARGS_REQUESTS)
def test_request_models_keep_json_booleans_after_the_rebuild(owner):
    module, _, name = owner.partition(":")
    model = getattr(__import__(module, fromlist=[name]), name)
    annotation = model.model_fields["vllm_xargs"].annotation
    assert annotation in (dict[str, patches.XARGS_VALUE] | None, dict[str, patches.XARGS_VALUE_WITH_BOOL] | None)
    plugin._keep_json_booleans()
    field = model.model_fields["vllm_xargs"]
    from pydantic import TypeAdapter

    parsed = TypeAdapter(field.annotation).validate_json('{"b": true, "i": 1, "f": 1.5, "s": "1", "l": [true, 2]}')
    assert parsed == {"b": True, "i": 1, "f": 1.5, "s": "1", "l": [True, 2]}
    assert type(parsed["b"]) is bool and type(parsed["i"]) is int and type(parsed["l"][0]) is bool
