import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter, which triton fixes when a
# @triton.jit function is defined (its own standard library included): switch it on before
# any test module imports triton (vLLM does).
if not torch.cuda.is_available():
    assert "triton.language" not in __import__("sys").modules, "triton was imported before conftest"
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped when torch.cuda.is_available() is False)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
