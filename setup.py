"""sft_kernels: fused sliding-window attention and block-diagonal matmul for SFT.

``pip install -e .`` installs the Python package (Triton and PyTorch paths).
``SFT_KERNELS_BUILD_CUDA=1 pip install -e .`` also builds the CUDA C++ extension ahead of
time; ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default "8.0;9.0") and
``MAX_JOBS`` the parallel compile jobs.
"""

import glob
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
if os.environ.get("SFT_KERNELS_BUILD_CUDA", "0") == "1":
    sources = sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        raise SystemExit("SFT_KERNELS_BUILD_CUDA=1 but csrc/ holds no CUDA sources in this version")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext_modules.append(
        CUDAExtension(
            "sft_kernels._C",
            sources,
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-Xptxas=-v"]},
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(
    name="sft_kernels",
    version="0.1.0",
    description="Fused sliding-window attention and block-diagonal matmul kernels for long-sequence SFT",
    packages=find_packages(include=["sft_kernels", "sft_kernels.*"]),
    package_data={"sft_kernels": ["data/*.jsonl"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0; platform_system=='Linux'", "numpy"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ninja", "pybind11", "matplotlib"],
        "deepspeed": ["deepspeed>=0.15"],
        "hf": ["transformers>=4.48"],
    },
    entry_points={"console_scripts": ["sft-kernels=sft_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
