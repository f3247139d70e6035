"""Backend registry and ``backend="auto"`` dispatch.

Every op takes ``backend="auto" | "triton" | "cuda" | "torch"``:

- ``torch``: the pure-PyTorch implementation; any device; memory-efficient.
- ``triton``: the Triton kernels; CUDA tensors, or CPU tensors when the process runs
  with ``TRITON_INTERPRET=1`` (the Triton interpreter: slow, for tests).
- ``cuda``: the CUDA C++ extension (``sft_kernels._C`` built ahead of time, or compiled
  just in time with ``SFT_KERNELS_JIT=1``); CUDA tensors, fp16/bf16.
- ``auto``: per call, Triton on CUDA tensors (when Triton imports), PyTorch on CPU.
  ``cuda`` is chosen by ``auto`` only for shape classes where it was verified on a GPU
  and measured faster; each op records that rule next to its dispatch.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Dict

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why not, or what it runs on


def triton_interpret() -> bool:
    """Whether Triton runs in its interpreter: Triton's own rule (``ops._triton_utils``);
    False when Triton does not import."""
    if _triton_import_error():
        return False
    from .ops._triton_utils import interpreting

    return interpreting()


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton does not import ({exc.__class__.__name__}: {exc}); `pip install triton`"
    return ""


def _cuda_ext_error() -> str:
    """'' when the CUDA extension can be had (built ahead of time, or SFT_KERNELS_JIT=1
    with nvcc), else why not and how to build it. Cheap: never compiles."""
    from . import _build

    return _build.extension_error()


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


def auto_backend(device_type: str) -> str:
    """What ``backend="auto"`` runs on tensors of ``device_type``: Triton on CUDA tensors when
    it imports, the PyTorch path everywhere else. The one place that rule is written; the
    CUDA C++ kernels are never picked by auto (verified only in the CPU emulator, unmeasured
    on a GPU: ``backend="cuda"`` asks for them)."""
    if device_type == "cuda" and not _triton_import_error():
        return "triton"
    return "torch"


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """The concrete backend for one call of ``op`` on tensors living on ``device``.

    Raises ``ValueError`` naming the fix when the requested backend cannot run there.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = device.type == "cuda"
    if backend == "auto":
        return auto_backend(device.type)
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
