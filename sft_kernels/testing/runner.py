"""Compile specs for the GPU without a GPU: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` lowers a kernel to PTX (no driver or device is needed
for that) and :mod:`.ptxas` assembles and reads it.

Why a subprocess.  Under ``TRITON_INTERPRET=1`` (which ``tests/conftest.py`` sets on a
machine without a GPU) ``@triton.jit`` returns ``InterpretedFunction`` objects, the
helpers a kernel calls are ``InterpretedFunction`` objects too, and running the
interpreter patches ``triton.language`` in place.  None of that can be compiled.  So when
the current process cannot compile a kernel, the kernels are compiled in a fresh Python
process started without ``TRITON_INTERPRET``: it re-imports each kernel's module (by
module name, falling back to its file: :mod:`.kernel_refs`), so every ``@triton.jit``
there, helpers included, is a real ``JITFunction``.  One process serves a whole batch of
kernels.  A kernel must therefore be reachable as a module attribute (module level, not
defined inside a function).  Where the process already has real ``JITFunction`` objects
(on a GPU machine, no interpreter) everything is compiled in process.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Iterable, Optional, Sequence

from sft_kernels.ops._triton_utils import interpreting as _interpreting

from .kernel_refs import _from_wire, _FnRef, _is_jit, _python_fn, _to_wire, _unwrap
from .ptxas import CompileError, analyse_dots, mma_shapes, perf_warnings, run_ptxas
from .report import CompileReport, SpecResult, spec_failures

def _full_signature(fn, signature: dict, constexprs: dict, divisible_by_16=None) -> dict:
    """Signature over every argument, in order; raises CompileError on a malformed spec."""
    arg_names = list(fn.arg_names)
    name = getattr(fn, "__name__", "kernel")
    unknown = [k for k in list(signature or {}) + list(constexprs or {}) if k not in arg_names]
    if unknown:
        raise CompileError(f"{name}: no such argument(s) {unknown}; arguments are {arg_names}")
    full_sig = {}
    for a in arg_names:
        if a in (constexprs or {}):
            full_sig[a] = "constexpr"
        elif a in (signature or {}) and signature[a] != "constexpr":
            full_sig[a] = signature[a]
        else:
            raise CompileError(f"{name}: argument {a!r} needs a signature type or a constexpr value")
    for k in divisible_by_16 or ():
        if full_sig.get(k, "constexpr") == "constexpr":
            raise CompileError(f"{name}: divisible_by_16 names non-runtime argument {k!r}")
    return full_sig


def _prepare(jitfn, signature: dict, constexprs: dict, divisible_by_16=None):
    arg_names = list(jitfn.arg_names)
    constexprs = dict(constexprs or {})
    full_sig = _full_signature(jitfn, signature, constexprs, divisible_by_16)
    consts = {(arg_names.index(k), ): v for k, v in constexprs.items()}
    if divisible_by_16 is None:
        divisible_by_16 = [k for k, t in full_sig.items() if isinstance(t, str) and t.startswith("*")]
    attrs = {}
    for k in divisible_by_16:  # a tuple argument: every element (Triton's attrs key by path)
        i, t = arg_names.index(k), full_sig[k]
        for path in ([(i, j) for j in range(len(t))] if isinstance(t, tuple) else [(i,)]):
            attrs[path] = [["tt.divisibility", 16]]
    return full_sig, consts, attrs


def _ast_source(jitfn, sig, consts, attrs):
    from triton.compiler import ASTSource

    try:  # triton >= 3.3: (fn, signature, constexprs=None, attrs=None)
        return ASTSource(jitfn, sig, consts, attrs)
    except TypeError:  # pragma: no cover - older layouts
        return ASTSource(fn=jitfn, signature=sig, constants=consts, attrs=attrs)


def _compile_here(jitfn, name, signature, constexprs, arch, num_warps, num_stages,
                  divisible_by_16=None, options=None) -> CompileReport:
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.perf_counter()
    sig, consts, attrs = _prepare(jitfn, signature, constexprs, divisible_by_16)
    src = _ast_source(jitfn, sig, consts, attrs)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    opts.update(options or {})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    ptx = compiled.asm["ptx"]
    if isinstance(ptx, bytes):
        ptx = ptx.decode()
    md = compiled.metadata
    shared = md.get("shared", 0) if isinstance(md, dict) else getattr(md, "shared", 0)
    fp_fusion = opts.get("enable_fp_fusion", True)
    ptx_options = (md.get("ptx_options") if isinstance(md, dict) else getattr(md, "ptx_options", None)) or ""
    stats, log = run_ptxas(ptx, arch, fp_fusion, ptx_options)
    ttgir = compiled.asm.get("ttgir", "")
    if isinstance(ttgir, bytes):
        ttgir = ttgir.decode()
    dots, redundancy = analyse_dots(ttgir)
    return CompileReport(
        name=name or jitfn.__name__,
        arch=arch,
        registers=stats["registers"],
        spill_stores=stats["spill_stores"],
        spill_loads=stats["spill_loads"],
        shared_bytes=int(shared or 0) + stats["static_smem"],
        uses_wgmma="wgmma.mma_async" in ptx,
        uses_mma="mma.sync.aligned" in ptx or "wgmma.mma_async" in ptx,
        ptx_len=len(ptx),
        num_warps=num_warps,
        num_stages=num_stages,
        stack_bytes=stats["stack_bytes"],
        compile_seconds=time.perf_counter() - t0,
        ptxas_log=log,
        dots=dots,
        redundancy=redundancy,
        mma_shapes=mma_shapes(ptx),
        perf_warnings=perf_warnings(log),
        async_copies=len(re.findall(r"\bcp\.async\.c[ag]\.shared", ptx)),
        tma_copies=len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
    )


def _format_exc(e: BaseException) -> str:
    msg = "".join(traceback.format_exception_only(type(e), e)).strip()
    return msg if len(msg) < 6000 else msg[:3000] + "\n...\n" + msg[-3000:]


# --------------------------------------------------------------------------------------
# Batches: in process or in one worker subprocess
# --------------------------------------------------------------------------------------


def _task_list(specs: Sequence[dict], archs: Iterable[int]):
    tasks = []
    for spec in specs:
        allowed = tuple(int(a) for a in spec.get("archs", archs))
        for arch in archs:
            if arch in allowed:
                tasks.append((spec, arch))
    return tasks


def _run_task_here(fn, spec, arch):
    try:
        rep = _compile_here(
            fn, spec["name"], spec.get("signature", {}),
            {k: _from_wire(v) for k, v in (spec.get("constexprs") or {}).items()},
            arch, spec.get("num_warps", 4), spec.get("num_stages", 3),
            spec.get("divisible_by_16"), spec.get("options"))
        return rep, None
    except Exception as e:  # noqa: BLE001 - every failure is a finding
        return None, _format_exc(e)


def _worker_main(job_path: str, out_path: str) -> None:
    with open(job_path, "rb") as f:
        tasks = pickle.load(f)
    results = []
    resolved = {}
    for spec, arch in tasks:
        ref = spec["fn"]
        try:
            if ref not in resolved:
                resolved[ref] = ref.resolve()
            fn = resolved[ref]
            if not _is_jit(fn):
                raise CompileError(f"{ref.qualname} did not resolve to a JITFunction (is TRITON_INTERPRET set?)")
        except Exception as e:  # noqa: BLE001
            results.append((None, f"cannot load kernel {ref.module}.{ref.qualname}: {_format_exc(e)}"))
            continue
        rep, err = _run_task_here(fn, spec, arch)
        if rep is not None:
            rep = dataclasses.asdict(rep)
        results.append((rep, err))
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


def _run_in_subprocesses(tasks, workers: int, timeout: float):
    wire = []
    for spec, arch in tasks:
        w = {k: v for k, v in spec.items() if k != "fn"}
        w["fn"] = _FnRef.of(spec["fn"])
        w["constexprs"] = {k: _to_wire(v) for k, v in (spec.get("constexprs") or {}).items()}
        wire.append((w, arch))
    workers = max(1, min(workers, len(wire)))
    chunks = [wire[i::workers] for i in range(workers)]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p) or env.get("PYTHONPATH", "")
    procs = []
    with tempfile.TemporaryDirectory(prefix="sft_compile_check_") as tmp:
        for i, chunk in enumerate(chunks):
            job, out = os.path.join(tmp, f"job{i}.pkl"), os.path.join(tmp, f"out{i}.pkl")
            try:
                with open(job, "wb") as f:
                    pickle.dump(chunk, f)
            except Exception as e:  # noqa: BLE001 - unpicklable constexpr, say which
                raise CompileError(f"cannot send specs to the compile worker: {_format_exc(e)}") from e
            # output to a file, not a pipe: Triton prints whole PTX files on ptxas errors,
            # and a full pipe would stall a worker while another one is being waited on
            logf = open(os.path.join(tmp, f"log{i}.txt"), "w+")
            p = subprocess.Popen(
                [sys.executable, "-m", "sft_kernels.testing.runner", job, out],
                env=env, stdout=logf, stderr=subprocess.STDOUT)
            procs.append((p, out, chunk, logf))
        chunk_results = []
        deadline = time.monotonic() + timeout
        for p, out, chunk, logf in procs:
            note = ""
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                note = f"timed out after {timeout:.0f}s\n"
            logf.seek(0)
            log = note + logf.read()
            logf.close()
            if p.returncode == 0 and os.path.exists(out):
                with open(out, "rb") as f:
                    res = pickle.load(f)
                res = [(CompileReport(**r) if r is not None else None, e) for r, e in res]
            else:
                msg = f"compile worker failed (rc={p.returncode}):\n{(log or '')[-4000:]}"
                res = [(None, msg)] * len(chunk)
            chunk_results.append(res)
    # undo the round-robin split
    results = [None] * len(wire)
    for i, res in enumerate(chunk_results):
        for j, r in enumerate(res):
            results[i + j * workers] = r
    return results


def run_specs(specs: Sequence[dict], archs: Sequence[int] = (90, 80), *, mode: str = "auto",
              workers: Optional[int] = None, timeout: float = 1800.0) -> list:
    """Compile every spec for every arch; a ``SpecResult`` per (spec, arch), in order.

    ``mode``: ``"inprocess"``, ``"subprocess"`` or ``"auto"`` (in process when every
    kernel is already a real JITFunction and the interpreter is off).
    """
    archs = tuple(int(a) for a in archs)
    tasks = _task_list(specs, archs)
    if not tasks:
        return []
    if mode == "auto":
        mode = "inprocess" if (not _interpreting() and all(_is_jit(s["fn"]) for s, _ in tasks)) else "subprocess"
    if mode == "inprocess":
        raw = []
        for spec, arch in tasks:
            try:
                fn = _unwrap(spec["fn"])
            except TypeError as e:
                raw.append((None, _format_exc(e)))
                continue
            raw.append(_run_task_here(fn, spec, arch))
    else:
        if workers is None:
            workers = min(os.cpu_count() or 1, max(1, len(tasks) // 8))
        raw = []
        good, idx = [], []
        for i, (spec, arch) in enumerate(tasks):
            raw.append(None)
            try:
                _FnRef.of(spec["fn"])
                _full_signature(_unwrap(spec["fn"]), spec.get("signature"), spec.get("constexprs"),
                                spec.get("divisible_by_16"))
                good.append((spec, arch))
                idx.append(i)
            except Exception as e:  # noqa: BLE001
                raw[i] = (None, _format_exc(e))
        if good:
            for i, r in zip(idx, _run_in_subprocesses(good, workers, timeout)):
                raw[i] = r
    return [SpecResult(spec["name"], arch, rep, err, spec_failures(spec, arch, rep, err))
            for (spec, arch), (rep, err) in zip(tasks, raw)]


def check_specs(specs: Sequence[dict], archs: Sequence[int] = (90, 80), **kw):
    """Compile ``specs`` for ``archs``; returns ``(reports, failures)``.

    ``failures`` holds one string per problem: a compile error, register spills, shared
    memory over the chip's limit, or (``expect_mma``) no wgmma on sm_90 / no mma on sm_80.
    """
    results = run_specs(specs, archs, **kw)
    reports = [r.report for r in results if r.report is not None]
    failures = [f for r in results for f in r.failures]
    return reports, failures


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int = 90, num_warps: int = 4,
                   num_stages: int = 3, **extra) -> CompileReport:
    """Compile one kernel for ``arch`` and report ptxas's figures; raises on a compile error.

    ``extra`` takes the optional spec keys (``divisible_by_16``, ``options``, ``name``).
    """
    spec = {"name": extra.pop("name", None) or _python_fn(fn).__name__, "fn": fn, "signature": signature,
            "constexprs": constexprs, "num_warps": num_warps, "num_stages": num_stages, **extra}
    (res, ) = run_specs([spec], (arch, ))
    if res.error is not None:
        raise CompileError(res.error)
    return res.report


def expand_configs(base: dict, configs: Iterable, name_fmt: Optional[str] = None) -> list:
    """One spec per ``triton.Config``: its kwargs join the constexprs, with its warps/stages.

    ``base`` is a spec without ``num_warps``/``num_stages`` (or with defaults).  Names are
    ``base["name"]`` plus the config's kwargs unless ``name_fmt`` (``str.format`` over the
    merged constexprs, ``num_warps`` and ``num_stages``) is given.
    """
    out = []
    for cfg in configs:
        kw = dict(getattr(cfg, "kwargs", None) or getattr(cfg, "all_kwargs", lambda: {})())
        spec = dict(base)
        spec["constexprs"] = {**(base.get("constexprs") or {}), **kw}
        spec["num_warps"] = getattr(cfg, "num_warps", base.get("num_warps", 4))
        spec["num_stages"] = getattr(cfg, "num_stages", base.get("num_stages", 3))
        if name_fmt:
            spec["name"] = name_fmt.format(**spec["constexprs"], num_warps=spec["num_warps"],
                                           num_stages=spec["num_stages"])
        else:
            tag = ",".join(f"{k}={v}" for k, v in kw.items())
            spec["name"] = f"{base['name']}[{tag},w{spec['num_warps']},s{spec['num_stages']}]"
        out.append(spec)
    return out


if __name__ == "__main__":
    # the worker, run from the importable module rather than from __main__, so that
    # pickled classes resolve to one module
    from sft_kernels.testing.runner import _worker_main as _main

    _main(sys.argv[1], sys.argv[2])
