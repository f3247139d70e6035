"""Only the optional ahead-of-time CUDA build; everything else is in pyproject.toml.

``SFT_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation .`` (torch must be importable by
the build) builds the CUDA C++ extension ``sft_kernels._C``
ahead of time; ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default "8.0;9.0+PTX") and
``MAX_JOBS`` the parallel compile jobs. Without it the package is pure Python: the Triton
and PyTorch paths need no build, and the CUDA extension can be built just in time from
the shipped sources (``SFT_KERNELS_JIT=1``, or DeepSpeed's op builder).
"""

import importlib.util
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("SFT_KERNELS_BUILD_CUDA", "0") == "1":
    # one definition of the build (sources, flags, CUDA_HOME, arch list) shared with the
    # just-in-time build and DeepSpeed's op builder: sft_kernels/_build.py
    spec = importlib.util.spec_from_file_location("_sft_build", os.path.join("sft_kernels", "_build.py"))
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    os.environ.setdefault("CUDA_HOME", b.cuda_home())  # before torch reads it at import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", b.DEFAULT_ARCH_LIST)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules.append(
        CUDAExtension(
            b.AOT_NAME,
            [os.path.relpath(src) for src in b.sources()],
            include_dirs=b.include_dirs(),
            library_dirs=b.library_dirs(),
            extra_compile_args={"cxx": b.CXX_FLAGS, "nvcc": b.NVCC_FLAGS + ["-Xptxas=-v"]},
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
