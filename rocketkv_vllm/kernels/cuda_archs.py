"""Which GPUs the CUDA extension (rocketkv_vllm._C) holds kernel images for.

setup.py (and CMakeLists.txt) record the architectures they compiled for in _C_archs.txt
next to the extension: a TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", "Hopper") or nvcc's names
("sm_90 compute_90"). A device runs the extension when an entry covers its capability:
- SASS for sm_XY runs on capability X.Z with Z >= Y (same major);
- PTX for compute_XY is JIT-compiled for any capability >= X.Y;
- arch-specific code (9.0a, sm_100a) runs on exactly that capability, family code
  (10.0f) on the same major.
"""
from __future__ import annotations

import re
from pathlib import Path

ARCHS_FILE = Path(__file__).resolve().parent.parent / "_C_archs.txt"

# torch.utils.cpp_extension's names for TORCH_CUDA_ARCH_LIST
NAMED_ARCHS = {
    "Kepler+Tesla": "3.7", "Kepler": "3.5+PTX", "Maxwell+Tegra": "5.3", "Maxwell": "5.0;5.2+PTX",
    "Pascal": "6.0;6.1+PTX", "Volta+Tegra": "7.2", "Volta": "7.0+PTX", "Turing": "7.5+PTX",
    "Ampere+Tegra": "8.7", "Ampere": "8.0;8.6+PTX", "Ada": "8.9+PTX", "Hopper": "9.0+PTX",
    "Blackwell+Tegra": "11.0", "Blackwell": "10.0;10.3;12.0;12.1+PTX",
}
_DOTTED = re.compile(r"(\d+)\.(\d+)([af]?)(\+PTX)?")
_NVCC = re.compile(r"(sm|compute)_(\d+?)(\d)([af]?)")


def parse(arch_list: str) -> list[tuple[int, int, str, bool]]:
    """(major, minor, suffix, is_ptx) per compiled image; ValueError on an entry it cannot read."""
    images = []
    for entry in re.split(r"[\s;,]+", arch_list.strip()):
        if not entry:
            continue
        if entry in NAMED_ARCHS:
            images += parse(NAMED_ARCHS[entry])
        elif match := _DOTTED.fullmatch(entry):
            major, minor, suffix, ptx = int(match[1]), int(match[2]), match[3], bool(match[4])
            images.append((major, minor, suffix, False))
            if ptx:
                images.append((major, minor, suffix, True))
        elif match := _NVCC.fullmatch(entry):
            images.append((int(match[2]), int(match[3]), match[4], match[1] == "compute"))
        else:
            raise ValueError(f"unreadable CUDA architecture {entry!r} in {arch_list!r}")
    return images


def covers(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether code compiled for arch_list runs on a device of this compute capability."""
    for major, minor, suffix, ptx in parse(arch_list):
        if suffix == "a":
            runs = (major, minor) == capability
        elif ptx:
            runs = (major, minor) <= capability
        else:  # SASS, or family code: later minors of the same major
            runs = major == capability[0] and minor <= capability[1]
        if runs:
            return True
    return False


def recorded() -> str | None:
    """The architectures the installed extension was built for (None: not recorded)."""
    try:
        return ARCHS_FILE.read_text().strip() or None
    except FileNotFoundError:
        return None
