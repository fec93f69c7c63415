"""RocketKV's log lines: the settings once at start-up, warnings once where a path falls back."""
import logging

import pytest
import torch
from vllm import logger as vllm_logger

from rocketkv_vllm.config import RocketKVConfig
from rocketkv_vllm.kernels import cuda_ops
from rocketkv_vllm.vllm_glue import logs


@pytest.fixture
def records():
    """Records of the `vllm.rocketkv` logger; vLLM's `_once` caches cleared so each test starts fresh."""
    for cached in (vllm_logger._print_info_once, vllm_logger._print_warning_once):
        cached.cache_clear()
    caught: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = caught.append
    logs.logger.addHandler(handler)
    yield caught
    logs.logger.removeHandler(handler)


def test_settings_line_names_every_effective_setting():
    line = logs.settings_line(RocketKVConfig(budget=512, mode="mt"), 16, "Triton", flash_prefill=3)
    assert line == ("RocketKV: budget 512, mode mt, page size 2, block size 16, summaries channel-major, groups of "
                    "1 channel, window 32, exact decode up to 16384 kept tokens (mt: 0), kernels Triton, "
                    "dense prefill FlashAttention 3")
    assert "exact decode up to 0 kept tokens (mt: 0)" in logs.settings_line(RocketKVConfig(dense_below=0), 16, "x", None)
    assert "summaries whole rows" in logs.settings_line(RocketKVConfig(), 16, "Triton", flash_prefill=None)
    assert "groups of 8 channels" in logs.settings_line(RocketKVConfig(summary_group=8), 16, "x", flash_prefill=None)
    assert logs.settings_line(RocketKVConfig(), 16, "x", flash_prefill=None).endswith("dense prefill torch reference")
    assert logs.settings_line(RocketKVConfig(), 16, "x", 3).endswith("dense prefill FlashAttention 3")
    assert "every request decodes exactly (16-token pages)" in logs.settings_line(RocketKVConfig(), 16, "x", 3)


@pytest.mark.parametrize("backend,device,name", [
    ("reference", "cpu", "torch reference"),
    ("triton", "cpu", "Triton (interpreter)"),
    ("triton", "cuda", "Triton"),
    ("triton+cuda", "cuda", "CUDA C++ (write_kv, HSA top-k) + Triton"),
])
def test_kernels_in_use(backend, device, name):
    assert logs.kernels_in_use(backend, torch.device(device)) == name


def test_settings_logged_once_per_engine_on_cpu_without_warnings(records):
    for _ in range(3):  # one builder per layer group and worker: still one line
        logs.log_settings(RocketKVConfig(budget=256), 16, torch.device("cpu"), torch.float32, 64)
    assert [(r.levelno, r.getMessage()) for r in records] == [(logging.INFO, logs.settings_line(
        RocketKVConfig(budget=256), 16, logs.kernels_in_use(logs.get_ops_backend(torch.device("cpu")), torch.device("cpu")), None))]


def test_cuda_fallbacks_warn_once(records, monkeypatch):
    """On a GPU without the CUDA C++ extension or FlashAttention for the dtype: one warning each."""
    monkeypatch.setattr(logs, "get_ops_backend", lambda device: "triton")
    monkeypatch.setattr(cuda_ops, "available", lambda: False)
    for _ in range(2):
        logs.log_settings(RocketKVConfig(), 16, torch.device("cuda"), torch.float32, 64)
    levels = [r.levelno for r in records]
    assert levels.count(logging.INFO) == 1 and levels.count(logging.WARNING) == 2
    warnings = " ".join(r.getMessage() for r in records if r.levelno == logging.WARNING)
    assert "rocketkv_vllm._C" in warnings and "float32" in warnings
