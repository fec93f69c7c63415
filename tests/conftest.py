import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter, which triton fixes when a
# @triton.jit function is defined (its own standard library included): switch it on before
# any test module imports triton (vLLM does).
if not torch.cuda.is_available():
    assert "triton.language" not in __import__("sys").modules, "triton was imported before conftest"
    os.environ.setdefault("TRITON_INTERPRET", "1")


# pytest-xdist (the README runs two workers): vLLM's CPU workers bind every engine to core 0,
# so each test worker's engines get a core of their own, and its torch ops one thread.
_xdist_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _xdist_worker and not torch.cuda.is_available():
    _cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(_cores[int(_xdist_worker.removeprefix("gw")) % len(_cores)]))
    torch.set_num_threads(1)

# modules whose cases spread over the xdist workers one by one (many short Triton-interpreter
# runs); every other module stays on one worker (--dist loadgroup), so that its engines and
# servers start once
SPREAD_MODULES = {"test_kernels.py"}


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped when torch.cuda.is_available() is False)")
    config.addinivalue_line("markers", "xdist_group(name): tests pytest-xdist runs on one worker (--dist loadgroup)")


@pytest.hookimpl(tryfirst=True)  # (before xdist's own hook reads the groups)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name not in SPREAD_MODULES:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
