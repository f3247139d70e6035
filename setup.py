"""sft_kernels: fused sliding-window attention and block-diagonal matmul for SFT.

``pip install -e .`` installs the Python package (Triton and PyTorch paths).
``SFT_KERNELS_BUILD_CUDA=1 pip install -e .`` also builds the CUDA C++ extension ahead of
time; ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default "8.0;9.0+PTX") and
``MAX_JOBS`` the parallel compile jobs.
"""

import importlib.util
import os

from setuptools import find_packages, setup

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
        # accelerate: transformers' HfDeepSpeedConfig (ZeRO-3 partitioned loading) requires it;
        # datasets: --data_path directories written by save_to_disk; tensorboard: --enable_tensorboard
        "deepspeed": ["deepspeed>=0.15", "accelerate>=1.1", "datasets", "tensorboard"],
        "hf": ["transformers>=5.0"],
        "train": ["deepspeed>=0.15", "transformers>=5.0", "accelerate>=1.1", "datasets", "tensorboard", "tqdm"],
    },
    entry_points={"console_scripts": ["sft-kernels=sft_kernels.cli:console_main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
