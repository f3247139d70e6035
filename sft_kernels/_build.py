"""Build and load the CUDA C++ extension (``sft_kernels/csrc/``): ahead of time or just in time.

Two builds give one module API (csrc/binding.cpp, ``TORCH_EXTENSION_NAME``):

- ahead of time: ``SFT_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation .`` builds ``sft_kernels._C``;
- just in time: :func:`load` compiles the same sources with ninja through
  ``torch.utils.cpp_extension.load`` into a module named ``sft_kernels_C`` (this is what
  the DeepSpeed op builder calls).

:func:`extension` returns whichever exists: the ahead-of-time module, else (only when
``SFT_KERNELS_JIT=1``) a just-in-time build, so that importing the package never starts a
multi-minute compile by surprise.

Environment: ``TORCH_CUDA_ARCH_LIST`` (default ``"8.0;9.0+PTX"``: sm_80 and sm_90 cubins and
compute_90 PTX, so GPUs newer than the list still get kernels, JIT-compiled by the driver),
``MAX_JOBS`` (parallel nvcc jobs, read by torch's ninja driver), ``SFT_KERNELS_JIT``.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib
import os
import re
import shutil
import sys
import tempfile
from typing import Dict, List, Optional

JIT_NAME = "sft_kernels_C"
AOT_NAME = "sft_kernels._C"
# sm_80 and sm_90 machine code, plus compute_90 PTX that the driver compiles for newer GPUs
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# -O3 and fast math as in setup.py; -lineinfo keeps profiles readable at no runtime cost.
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]
CXX_FLAGS = ["-O3"]  # the language standard is torch's (C++20 for torch 2.14 headers)


def csrc_dir() -> str:
    """The kernel sources: ``sft_kernels/csrc/``, shipped inside the package (wheel and
    source checkout alike), as DeepSpeed ships its ``csrc``."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


def sources() -> List[str]:
    """Every translation unit of the extension (``csrc/*.cu``, ``*.cpp``).

    Raises FileNotFoundError naming the folder when none is there (an install that left
    the package data out), rather than handing an empty list to a build.
    """
    root = csrc_dir()
    found = sorted(glob.glob(os.path.join(root, "*.cu"))) + sorted(glob.glob(os.path.join(root, "*.cpp")))
    if not any(s.endswith(".cu") for s in found):
        raise FileNotFoundError(
            f"sft_kernels: no CUDA sources under {root}; this install of sft_kernels lacks its package data "
            "(reinstall it from a wheel or sdist built by `pip wheel .`, which ship sft_kernels/csrc)")
    return found


def cuda_home() -> str:
    """The CUDA toolkit root: the first of $CUDA_HOME, $CUDA_PATH, the directory above the
    real nvcc, /usr/local/cuda that holds include/cuda_runtime.h.

    torch derives CUDA_HOME from ``which nvcc``; with nvcc wrapped or linked into
    /usr/local/bin (as on the CI machine) that gives /usr/local, whose include/ lacks
    cuda_runtime.h, and the binding (a .cpp compiled by the host compiler) fails.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return next((c for c in candidates if c), "/usr/local/cuda")


def include_dirs() -> List[str]:
    """The kernel sources' folder and the CUDA toolkit headers (setup.py passes the same)."""
    dirs = [csrc_dir()]
    inc = os.path.join(cuda_home(), "include")
    if os.path.exists(os.path.join(inc, "cuda_runtime.h")):
        dirs.append(inc)
    return dirs


def library_dirs() -> List[str]:
    """Where libcudart is (torch would look under its own, possibly wrong, CUDA_HOME)."""
    home = cuda_home()
    return [d for d in (os.path.join(home, "lib64"), os.path.join(home, "lib"), os.path.join(home, "targets",
            "x86_64-linux", "lib")) if glob.glob(os.path.join(d, "libcudart.so*"))][:1]


def arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST


def gencode_flags(archs: Optional[str] = None) -> List[str]:
    """``-gencode`` flags for an arch list such as ``"8.0;9.0"`` (``+PTX`` adds PTX)."""
    flags = []
    for a in re.split(r"[;\s,]+", (archs or arch_list()).strip()):
        if not a:
            continue
        ptx = a.endswith("+PTX")
        num = a.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _capture_fds(path: str):
    """Send this process's stdout/stderr file descriptors (which ninja and nvcc inherit)
    to ``path`` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def load(
    build_directory: Optional[str] = None,
    verbose: bool = False,
    log_path: Optional[str] = None,
    ptxas_verbose: bool = False,
    extra_cuda_cflags: Optional[List[str]] = None,
    name: str = JIT_NAME,
):
    """Compile csrc/ with ninja (``torch.utils.cpp_extension.load``) and import it.

    Args:
        build_directory: where objects go (default: torch's extension cache, so a second
            call with unchanged sources only imports).
        log_path: write the full compiler output there (implies a verbose build).
        ptxas_verbose: add ``-Xptxas=-v`` (register / spill report per kernel, in the log).
        extra_cuda_cflags: more nvcc flags.
    Returns the extension module (API: csrc/binding.cpp).
    """
    from torch.utils.cpp_extension import load as torch_load

    srcs = sources()
    nvcc = list(NVCC_FLAGS) + (["-Xptxas=-v"] if ptxas_verbose else []) + list(extra_cuda_cflags or [])
    if build_directory:
        os.makedirs(build_directory, exist_ok=True)
    kwargs = dict(
        name=name,
        sources=srcs,
        extra_include_paths=include_dirs(),
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=nvcc,
        extra_ldflags=[f"-L{d}" for d in library_dirs()],
        build_directory=build_directory,
        verbose=verbose or log_path is not None,
    )
    # torch turns TORCH_CUDA_ARCH_LIST into -gencode flags; without it, on a machine with
    # no GPU, it would build every architecture it knows.
    with _env(TORCH_CUDA_ARCH_LIST=arch_list()):
        if log_path is None:
            return torch_load(**kwargs)
        with _capture_fds(log_path):
            return torch_load(**kwargs)


_PTXAS_FN = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def ptxas_report(log: str) -> List[Dict[str, object]]:
    """Parse ``-Xptxas -v`` output: one dict per (kernel, arch) with registers and spills."""
    out: List[Dict[str, object]] = []
    cur: Optional[Dict[str, object]] = None
    for line in log.splitlines():
        m = _PTXAS_FN.search(line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "spill_stores": 0, "spill_loads": 0,
                   "stack": 0}
            out.append(cur)
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(g) for g in m.groups())
        m = _PTXAS_REGS.search(line)
        if m:
            cur["registers"] = int(m.group(1))
    return out


def _nvcc_available() -> bool:
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(cuda_home(), "bin", "nvcc"))


def extension_error() -> str:
    """'' when :func:`extension` can return a module, else why not (cheap: never builds)."""
    try:
        importlib.import_module(AOT_NAME)
        return ""
    except ImportError as exc:
        aot = f"{AOT_NAME} is not built ({exc})"
    if os.environ.get("SFT_KERNELS_JIT", "0") == "1":
        if not _nvcc_available():
            return f"{aot}, and SFT_KERNELS_JIT=1 needs nvcc (CUDA_HOME)"
        return ""
    return (
        f"{aot}; build it with `SFT_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .`, or set SFT_KERNELS_JIT=1 to compile it "
        "with ninja on first use"
    )


@functools.lru_cache(maxsize=None)
def extension():
    """The CUDA extension module: ``sft_kernels._C`` if built, else a JIT build when
    ``SFT_KERNELS_JIT=1``; ImportError (with the fix) otherwise."""
    try:
        return importlib.import_module(AOT_NAME)
    except ImportError:
        pass
    err = extension_error()
    if err:
        raise ImportError(err)
    print(f"sft_kernels: compiling the CUDA extension just in time (arch {arch_list()}); this takes minutes once",
          file=sys.stderr)
    return load()


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m sft_kernels._build [build_dir]``: JIT-build, print the ptxas report."""
    import time

    argv = sys.argv[1:] if argv is None else argv
    build_dir = argv[0] if argv else tempfile.mkdtemp(prefix="sft_kernels_build_")
    log = os.path.join(build_dir, "build.log")
    t0 = time.time()
    try:
        load(build_directory=build_dir, log_path=log, ptxas_verbose=True)
    finally:
        text = open(log).read() if os.path.exists(log) else ""
    dt = time.time() - t0
    for r in ptxas_report(text):
        print(f"{r['arch']:6s} regs {r['registers']!s:>4} spill {r['spill_stores']}/{r['spill_loads']}  {r['kernel']}")
    print(f"built in {dt:.0f} s ({build_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
