"""Test utilities: compile Triton kernels for the GPU without a GPU (``compile_check``)."""

from .compile_check import (
    SMEM_LIMIT,
    CompileError,
    CompileReport,
    SpecResult,
    check_specs,
    compile_kernel,
    expand_configs,
    run_specs,
)

__all__ = [
    "SMEM_LIMIT",
    "CompileError",
    "CompileReport",
    "SpecResult",
    "check_specs",
    "compile_kernel",
    "expand_configs",
    "run_specs",
]
