"""``sft-kernels info``: versions, device and, per backend, whether it runs here and why not.

Modelled on DeepSpeed's ``ds_report``.
"""

from __future__ import annotations

import importlib
import platform
import sys
from typing import List, Tuple


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # not installed, or broken
        return f"not installed ({exc.__class__.__name__})" if isinstance(exc, ImportError) else f"broken: {exc}"
    return getattr(mod, "__version__", "unknown")


def collect() -> dict:
    import torch

    from . import __version__
    from .backends import backend_status

    env = {
        "sft_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
    }
    gpus: List[Tuple[str, str]] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append((torch.cuda.get_device_name(i), f"sm_{major}{minor}"))
    return {"env": env, "gpus": gpus, "backends": backend_status()}


def deepspeed_op_line() -> str:
    """ds_report-style line for the DeepSpeed op builder (imports deepspeed: a few seconds)."""
    try:
        from .integrations.deepspeed import compatibility_report

        return compatibility_report()
    except ImportError as exc:
        return f"SFTKernelsBuilder (sft_kernels) ...... deepspeed not importable ({exc})"


def report(file=None) -> None:
    file = file or sys.stdout
    info = collect()
    width = max(len(k) for k in info["env"]) + 2
    print("sft_kernels environment", file=file)
    print("-" * 60, file=file)
    for key, val in info["env"].items():
        print(f"{key:<{width}}{val}", file=file)
    if info["gpus"]:
        for i, (name, cc) in enumerate(info["gpus"]):
            print(f"{'GPU ' + str(i):<{width}}{name} ({cc})", file=file)
    else:
        print(f"{'GPU':<{width}}none (no CUDA device visible)", file=file)
    print("", file=file)
    print("backend  available  notes", file=file)
    print("-" * 60, file=file)
    for st in info["backends"].values():
        mark = "[YES]" if st.available else "[NO] "
        print(f"{st.name:<8} {mark:<10} {st.reason}", file=file)
    print("", file=file)
    print("DeepSpeed op", file=file)
    print("-" * 60, file=file)
    print(deepspeed_op_line(), file=file)
