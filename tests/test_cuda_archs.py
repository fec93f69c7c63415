"""The CUDA extension is used only on GPUs it was compiled for (else the Triton kernels run)."""
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from rocketkv_vllm.kernels import cuda_archs, cuda_ops

A100, L40S, H100, B200, RTX5090 = (8, 0), (8, 9), (9, 0), (10, 0), (12, 0)


@pytest.mark.parametrize(
    "archs,runs_on,not_on",
    [
        ("9.0", [H100], [A100, L40S, B200]),
        ("9.0+PTX", [H100, B200, RTX5090], [A100, L40S]),  # PTX JIT-compiles forward
        ("8.0", [A100, L40S], [H100, B200]),  # SASS runs on later minors of its major
        ("8.0;9.0+PTX", [A100, L40S, H100, B200], [(7, 5)]),
        ("8.0 9.0", [A100, H100], [B200]),
        ("9.0a", [H100], [B200, A100]),
        ("9.0a+PTX", [H100], [B200]),  # arch-specific PTX does not run forward
        ("10.0f", [B200, (10, 3)], [RTX5090, H100]),
        ("Hopper", [H100, B200], [A100]),
        ("Ampere", [A100, (8, 6), L40S, H100], [(7, 5)]),  # 8.6+PTX runs forward
        ("sm_90", [H100], [B200]),  # CMake's record
        ("sm_80 sm_90 compute_90", [A100, H100, B200], [(7, 0)]),
        ("sm_100a", [B200], [(10, 3)]),
        ("sm_120", [RTX5090], [B200]),
    ],
)
def test_coverage(archs, runs_on, not_on):
    assert all(cuda_archs.covers(archs, capability) for capability in runs_on)
    assert not any(cuda_archs.covers(archs, capability) for capability in not_on)


def test_unreadable_entries_are_errors():
    with pytest.raises(ValueError, match="'sm90'"):
        cuda_archs.parse("sm90")


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """Fake the record of the build (and forget built_for's memory around the test)."""
    record = tmp_path / "_C_archs.txt"
    monkeypatch.setattr(cuda_archs, "ARCHS_FILE", record)
    cuda_ops.built_for.cache_clear()
    yield record
    cuda_ops.built_for.cache_clear()


def test_extension_not_built_for_the_gpu_is_unavailable_with_one_warning(recorded, caplog):
    recorded.write_text("9.0\n")
    with caplog.at_level(logging.WARNING, logger=cuda_ops.__name__):
        assert not cuda_ops.built_for(A100)
        assert not cuda_ops.built_for(A100)
    (warning,) = caplog.records
    assert "compute capability 8.0" in warning.getMessage() and "9.0" in warning.getMessage()
    assert cuda_ops.built_for(H100)


def test_unrecorded_builds_are_trusted(recorded):
    assert cuda_ops.built_for(A100)


def test_available_asks_for_the_current_device(recorded, monkeypatch):
    recorded.write_text("9.0+PTX\n")
    monkeypatch.setattr(cuda_ops, "_C", object())
    monkeypatch.setattr(cuda_ops.torch.cuda, "is_available", lambda: True)
    for capability, expected in ((A100, False), (L40S, False), (H100, True), (B200, True)):
        monkeypatch.setattr(cuda_ops.torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert cuda_ops.available() is expected, capability


def _setup_module():
    """setup.py's helpers, without running setup()."""
    source = (Path(__file__).parent.parent / "setup.py").read_text()
    source = source[: source.index("ext_modules, cmdclass = cuda_extensions()")]
    module = SimpleNamespace()
    exec(compile(source, "setup.py", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize(
    "capabilities,expected",
    [([H100], "9.0+PTX"), ([A100, H100, A100], "8.0;9.0+PTX"), ([B200], "10.0+PTX"), ([], "9.0+PTX")],
)
def test_setup_builds_for_the_visible_gpus(capabilities, expected):
    fake_torch = SimpleNamespace(cuda=SimpleNamespace(
        device_count=lambda: len(capabilities), get_device_capability=lambda i: capabilities[i],
    ))
    assert _setup_module().local_arch_list(fake_torch) == expected
