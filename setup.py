"""Build linkbreaker_ext._C (the guard-head C++/CUDA op library).

Metadata lives in pyproject.toml; this file only declares the extension.

Environment knobs:
  LINKBREAKER_CPU_ONLY=1   build the CPU kernel only (no nvcc needed)
  TORCH_CUDA_ARCH_LIST     CUDA archs to compile for (default "9.0", i.e. H100/H200)
  CUDA_HOME                CUDA toolkit root (defaults to /usr/local/cuda if it has nvcc)
  MAX_JOBS                 parallel compile jobs (ninja)

Build with:  pip install --no-build-isolation -e .
"""
import os
import shutil
import sys

# Must happen before importing torch.utils.cpp_extension, which resolves CUDA_HOME at
# import time (a bare /usr/local/bin/nvcc would otherwise make it pick /usr/local).
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

from setuptools import setup  # noqa: E402

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def _want_cuda() -> bool:
    if os.environ.get("LINKBREAKER_CPU_ONLY", "0") not in ("", "0"):
        return False
    if torch.version.cuda is None:
        return False
    nvcc = None
    if CUDA_HOME is not None:
        cand = os.path.join(CUDA_HOME, "bin", "nvcc")
        if os.path.exists(cand):
            nvcc = cand
    if nvcc is None:
        nvcc = shutil.which("nvcc")
    return nvcc is not None and CUDA_HOME is not None


def _extension():
    sources = [
        os.path.join(CSRC, "guard_head.cpp"),
        os.path.join(CSRC, "python_module.cpp"),
        os.path.join(CSRC, "cpu", "guard_head_kernel.cpp"),
    ]
    cxx_flags = ["-O3"]
    define_macros = []
    if _want_cuda():
        sources.append(os.path.join(CSRC, "cuda", "guard_head_kernel.cu"))
        define_macros.append(("LINKBREAKER_WITH_CUDA", None))
        print(
            f"[linkbreaker_ext] building CUDA + CPU kernels (CUDA_HOME={CUDA_HOME}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})",
            file=sys.stderr,
        )
        return CUDAExtension(
            name="linkbreaker_ext._C",
            sources=sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        )
    print("[linkbreaker_ext] building CPU-only kernels", file=sys.stderr)
    return CppExtension(
        name="linkbreaker_ext._C",
        sources=sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
