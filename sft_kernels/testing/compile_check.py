"""Compile Triton kernels for the GPU without a GPU, and check what ptxas says.

The interpreter (``TRITON_INTERPRET=1``) accepts code the compiler rejects, so every
kernel is also compiled for real: ``triton.compile(ASTSource(...), target=GPUTarget(
"cuda", arch, 32))`` lowers it to PTX (no driver or device is needed for that), then the
``ptxas`` that Triton ships is run with ``-v`` on the PTX, and its register, spill and
shared-memory figures are read back.

This module collects the op modules' specs and is the command line; the work is in
:mod:`.runner` (compiling specs, in process or, under the interpreter, in worker processes:
why, in its docstring), :mod:`.ptxas` (assembling and reading ptxas / TTGIR / PTX),
:mod:`.report` (the verdict and the table) and :mod:`.kernel_refs` (kernels named across
processes). The names tests and scripts import from here are re-exported.

Spec format (what an op module's ``compile_specs()`` returns, a list of these dicts)::

    {
        "name": "swa_fwd[BM=128,BN=64,D=128,fp16]",  # unique, used as the test id
        "fn": _swa_fwd_kernel,            # the @triton.jit kernel (an autotune /
                                          # heuristics wrapper is unwrapped)
        "signature": {"q_ptr": "*fp16", "n": "i32", "scale": "fp32", ...},
                                          # every runtime argument; constexpr arguments
                                          # may be left out (filled as "constexpr")
        "constexprs": {"BLOCK_M": 128, "HEAD_DIM": 128, "DTYPE": tl.float16, ...},
                                          # every tl.constexpr argument, by name
        "num_warps": 4,
        "num_stages": 3,
        # optional:
        "expect_mma": True,               # matmul-heavy: sm_90 must use wgmma, sm_80 mma
        "mma_rows": 64,                   # the rows of the dots' tile: under 64 (wgmma's M),
                                          # expect_mma accepts mma.sync on sm_90 too
        "archs": (90, 80),                # restrict the architectures checked
        "divisible_by_16": ["q_ptr", ...],# args specialised as 16-divisible; default:
                                          # every pointer argument (what a launch on
                                          # torch-allocated tensors gets)
        "options": {"maxnreg": 128},      # extra triton.compile options
    }

Signature types are Triton's: ``*fp16``, ``*bf16``, ``*fp32``, ``*i32``, ``i32``,
``i64``, ``fp32``, ``i1``, ..., and a tuple of them for a tuple argument (``("i32", "i32")``;
``divisible_by_16`` naming it marks every element).  ``expand_configs`` turns one base spec and a list of
``triton.Config`` (an autotuner's ``configs``) into one spec per configuration.
"""

from __future__ import annotations

import sys

from sft_kernels.ops._triton_utils import ctas_per_sm, occupancy  # noqa: F401 (one occupancy rule)

from .ptxas import (  # noqa: F401
    CompileError, analyse_dots, gpu_name, mma_shapes, parse_ptxas_log, perf_warnings, run_ptxas,
)
from .report import SMEM_LIMIT, CompileReport, SpecResult, report_table, spec_failures  # noqa: F401
from .runner import check_specs, compile_kernel, expand_configs, run_specs  # noqa: F401

# --------------------------------------------------------------------------------------
# The op modules' specs, and the per-config report
# --------------------------------------------------------------------------------------


def op_specs():
    """(specs, problems): what every ``compile_specs()`` (and ``*_compile_specs()``, e.g.
    ``fp32_compile_specs``: a dtype's own config lists) of the ``sft_kernels.ops.*.triton*``
    modules returns; ``problems`` lists modules that do not import or specs that are
    malformed."""
    import importlib
    import pkgutil

    import sft_kernels.ops as ops

    specs, problems, seen_fns = [], [], set()

    def onerror(name):
        problems.append(f"cannot import package {name}")

    for info in pkgutil.walk_packages(ops.__path__, ops.__name__ + ".", onerror=onerror):
        leaf = info.name.rsplit(".", 1)[-1]
        if not leaf.startswith("triton"):
            continue
        try:
            mod = importlib.import_module(info.name)
        except Exception as e:  # noqa: BLE001 - a broken kernel module is a failure
            problems.append(f"cannot import {info.name}: {type(e).__name__}: {e}")
            continue
        for attr in sorted(a for a in vars(mod) if a == "compile_specs" or a.endswith("_compile_specs")):
            fn = getattr(mod, attr)
            if not callable(fn) or id(fn) in seen_fns:
                continue
            seen_fns.add(id(fn))
            try:
                got = list(fn())
            except Exception as e:  # noqa: BLE001
                problems.append(f"{info.name}.{attr}() raised {type(e).__name__}: {e}")
                continue
            for s in got:
                missing = {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"} - set(s)
                if missing:
                    problems.append(f"{info.name}: spec {s.get('name', '?')} lacks {sorted(missing)}")
                else:
                    specs.append(s)
    names = [s["name"] for s in specs]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        problems.append(f"duplicate spec names: {dups}")
    return specs, problems


def main(argv=None) -> int:
    """``python -m sft_kernels.testing.compile_check [--first] [--archs 90,80] [--filter S]``:
    compile the op specs and print :func:`report_table` and every failure."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sft_kernels.testing.compile_check", description=main.__doc__)
    ap.add_argument("--first", action="store_true", help="only each autotune list's first choice")
    ap.add_argument("--archs", default="90,80")
    ap.add_argument("--filter", default="", help="only specs whose name contains this")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    specs, problems = op_specs()
    specs = [s for s in specs if args.filter in s["name"] and (s.get("first_choice") or not args.first)]
    mode = "subprocess" if (args.workers or 1) > 1 else "auto"
    results = run_specs(specs, tuple(int(a) for a in args.archs.split(",")), mode=mode, workers=args.workers)
    import triton

    print(f"triton {triton.__version__}, {len(specs)} specs")
    print(report_table(results))
    failures = problems + [f for r in results for f in r.failures]
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
