"""Test utilities: compile Triton kernels for the GPU without a GPU and read what ptxas says
(``python -m sft_kernels.testing.compile_check``; the pieces: ``runner``, ``ptxas``,
``report``, ``kernel_refs``). Nothing at run time imports this package."""

from .ptxas import CompileError
from .report import SMEM_LIMIT, CompileReport, SpecResult
from .runner import check_specs, compile_kernel, expand_configs, run_specs

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
