"""Backend registry and ``backend="auto"`` dispatch.

Every op takes ``backend="auto" | "triton" | "cuda" | "torch"``:

- ``torch``: the pure-PyTorch implementation; any device; memory-efficient.
- ``triton``: the Triton kernels; CUDA tensors, or CPU tensors when the process runs
  with ``TRITON_INTERPRET=1`` (the Triton interpreter: slow, for tests).
- ``cuda``: the compiled CUDA C++ extension ``sft_kernels._C``; CUDA tensors.
- ``auto``: per call, Triton on CUDA tensors (when Triton imports), PyTorch on CPU.
  ``cuda`` is chosen by ``auto`` only for shape classes where it was verified on a GPU
  and measured faster; each op records that rule next to its dispatch.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Dict

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")

BUILD_HINT = (
    "build it ahead of time with `SFT_KERNELS_BUILD_CUDA=1 pip install -e .` "
    "(needs nvcc and a CUDA build of torch)"
)


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why not, or what it runs on


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton does not import ({exc.__class__.__name__}: {exc}); `pip install triton`"
    return ""


@functools.lru_cache(maxsize=None)
def _cuda_ext_error() -> str:
    try:
        importlib.import_module("sft_kernels._C")
    except ImportError as exc:
        csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
        has_sources = os.path.isdir(csrc) and any(f.endswith(".cu") for f in os.listdir(csrc))
        if not has_sources:
            return "this version ships no CUDA C++ kernels yet (csrc/ is empty); use backend='triton'"
        return f"the CUDA extension sft_kernels._C is not built ({exc}); {BUILD_HINT}"
    return ""


def backend_status() -> Dict[str, BackendStatus]:
    """Availability of each concrete backend on this machine, with a reason when not."""
    status = {"torch": BackendStatus("torch", True, "pure PyTorch, any device")}
    err = _triton_import_error()
    if err:
        status["triton"] = BackendStatus("triton", False, err)
    elif torch.cuda.is_available():
        status["triton"] = BackendStatus("triton", True, "CUDA tensors")
    elif triton_interpret():
        status["triton"] = BackendStatus("triton", True, "CPU tensors through TRITON_INTERPRET=1 (slow)")
    else:
        status["triton"] = BackendStatus(
            "triton",
            False,
            "no CUDA device: Triton kernels need a GPU (TRITON_INTERPRET=1 runs them on CPU tensors, slowly)",
        )
    err = _cuda_ext_error()
    if err:
        status["cuda"] = BackendStatus("cuda", False, err)
    elif not torch.cuda.is_available():
        status["cuda"] = BackendStatus("cuda", False, "extension built, but no CUDA device to run it on")
    else:
        status["cuda"] = BackendStatus("cuda", True, "CUDA tensors")
    return status


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """The concrete backend for one call of ``op`` on tensors living on ``device``.

    Raises ``ValueError`` naming the fix when the requested backend cannot run there.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = device.type == "cuda"
    if backend == "auto":
        if on_cuda and not _triton_import_error():
            return "triton"
        return "torch"
    if backend == "torch":
        return "torch"
    if backend == "triton":
        err = _triton_import_error()
        if err:
            raise ValueError(f"{op}: backend='triton' unavailable: {err}")
        if on_cuda or (device.type == "cpu" and triton_interpret()):
            return "triton"
        raise ValueError(
            f"{op}: backend='triton' needs CUDA tensors (got {device}); on CPU use backend='torch' "
            "or 'auto', or set TRITON_INTERPRET=1 before importing sft_kernels to run the kernels "
            "in Triton's interpreter"
        )
    # backend == "cuda"
    err = _cuda_ext_error()
    if err:
        raise ValueError(f"{op}: backend='cuda' unavailable: {err}")
    if not on_cuda:
        raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}")
    return "cuda"
