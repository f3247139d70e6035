"""Compile Triton kernels for the GPU without a GPU, and check what ptxas says.

The interpreter (``TRITON_INTERPRET=1``) accepts code the compiler rejects, so every
kernel is also compiled for real: ``triton.compile(ASTSource(...), target=GPUTarget(
"cuda", arch, 32))`` lowers it to PTX (no driver or device is needed for that), then the
``ptxas`` that Triton ships is run with ``-v`` on the PTX, and its register, spill and
shared-memory figures are read back.

Why a subprocess.  Under ``TRITON_INTERPRET=1`` (which ``tests/conftest.py`` sets on a
machine without a GPU) ``@triton.jit`` returns ``InterpretedFunction`` objects, the
helpers a kernel calls are ``InterpretedFunction`` objects too, and running the
interpreter patches ``triton.language`` in place.  None of that can be compiled.  So when
the current process cannot compile a kernel, the kernels are compiled in a fresh Python
process started without ``TRITON_INTERPRET``: it re-imports each kernel's module (by
module name, falling back to its file), so every ``@triton.jit`` there, helpers
included, is a real ``JITFunction``.  One process serves a whole batch of kernels.  A
kernel must therefore be reachable as a module attribute (module level, not defined
inside a function).  Where the process already has real ``JITFunction`` objects (on a
GPU machine, no interpreter) everything is compiled in process.

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
        "archs": (90, 80),                # restrict the architectures checked
        "divisible_by_16": ["q_ptr", ...],# args specialised as 16-divisible; default:
                                          # every pointer argument (what a launch on
                                          # torch-allocated tensors gets)
        "options": {"maxnreg": 128},      # extra triton.compile options
    }

Signature types are Triton's: ``*fp16``, ``*bf16``, ``*fp32``, ``*i32``, ``i32``,
``i64``, ``fp32``, ``i1``, ...  ``expand_configs`` turns one base spec and a list of
``triton.Config`` (an autotuner's ``configs``) into one spec per configuration.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

# occupancy / ctas_per_sm live with the launchers that size persistent grids by them
from sft_kernels.ops._triton_utils import ARCH_LIMITS, ctas_per_sm, occupancy  # noqa: F401
from sft_kernels.ops._triton_utils import interpreting as _interpreting

# Shared memory one block may use (the opt-in maximum), by compute capability.
SMEM_LIMIT = {arch: lim.smem_per_block for arch, lim in ARCH_LIMITS.items()}


@dataclass
class CompileReport:
    name: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int  # Triton's dynamic shared memory plus any static smem ptxas reports
    uses_wgmma: bool
    uses_mma: bool
    ptx_len: int
    num_warps: int = 4
    num_stages: int = 3
    stack_bytes: int = 0
    compile_seconds: float = 0.0
    ptxas_log: str = field(default="", repr=False)
    # what the tensor cores are asked to do, read from TTGIR and PTX (see analyse_dots)
    dots: list = field(default_factory=list)  # per tt.dot / warp_group_dot: shape, layout, redundancy
    redundancy: float = 1.0  # MMA work issued / MMA work of the tile shapes (1.0 = none replicated)
    mma_shapes: dict = field(default_factory=dict)  # PTX instruction shape -> static count
    perf_warnings: list = field(default_factory=list)  # ptxas "Potential Performance Loss" lines
    async_copies: int = 0  # cp.async instructions in the PTX (pointer loads pipelined to smem)
    tma_copies: int = 0  # cp.async.bulk.tensor instructions (TMA)

    @property
    def ctas_per_sm(self) -> int:
        return ctas_per_sm(self.arch, self.registers, self.num_warps, self.shared_bytes)


@dataclass
class SpecResult:
    """Outcome of compiling one spec for one architecture."""

    name: str
    arch: int
    report: Optional[CompileReport]
    error: Optional[str]
    failures: list


class CompileError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------
# Resolving kernels
# --------------------------------------------------------------------------------------


def _unwrap(obj):
    """The JITFunction / InterpretedFunction under autotune / heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        InterpretedFunction = ()
    seen = 0
    while not isinstance(obj, (JITFunction, InterpretedFunction)):
        inner = getattr(obj, "fn", None)
        if inner is None or seen > 10:
            raise TypeError(f"{obj!r} is not a @triton.jit function")
        obj, seen = inner, seen + 1
    return obj


def _python_fn(obj):
    return _unwrap(obj).fn


def _is_jit(obj) -> bool:
    from triton.runtime.jit import JITFunction

    try:
        return isinstance(_unwrap(obj), JITFunction)
    except TypeError:
        return False


def _is_kernel_like(obj) -> bool:
    try:
        _unwrap(obj)
        return True
    except TypeError:
        return False


@dataclass(frozen=True)
class _FnRef:
    module: str
    qualname: str
    file: str

    @classmethod
    def of(cls, obj) -> "_FnRef":
        py = _python_fn(obj)
        if "<locals>" in py.__qualname__:
            raise CompileError(
                f"kernel {py.__qualname__} is defined inside a function; the compile check "
                "re-imports kernels, so define it at module level")
        return cls(py.__module__, py.__qualname__, py.__code__.co_filename)

    def resolve(self):
        import importlib
        import importlib.util

        mod = None
        if self.module != "__main__":
            try:
                mod = importlib.import_module(self.module)
            except ImportError:
                mod = None
        if mod is None or not _same_file(getattr(mod, "__file__", None), self.file):
            modname = f"_sft_compile_check_{abs(hash(self.file))}"
            mod = sys.modules.get(modname)
            if mod is None:
                spec = importlib.util.spec_from_file_location(modname, self.file)
                mod = importlib.util.module_from_spec(spec)
                sys.modules[modname] = mod
                spec.loader.exec_module(mod)
        obj = mod
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return _unwrap(obj)


def _same_file(a, b) -> bool:
    try:
        return bool(a) and os.path.samefile(a, b)
    except OSError:
        return False


def _to_wire(value):
    """Replace kernels inside constexpr values by references (for the subprocess)."""
    if _is_kernel_like(value):
        return _FnRef.of(value)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_to_wire(v) for v in value)
    return value


def _from_wire(value):
    if isinstance(value, _FnRef):
        return value.resolve()
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_from_wire(v) for v in value)
    return value


# --------------------------------------------------------------------------------------
# Compiling in this process
# --------------------------------------------------------------------------------------


def _ptxas_path(arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except Exception:
        pass
    try:
        import triton

        return triton.knobs.nvidia.ptxas.path
    except Exception:
        pass
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if os.path.exists(path):
        return path
    raise CompileError("cannot find ptxas (neither Triton's bundled one nor TRITON_PTXAS_PATH)")


def gpu_name(arch: int) -> str:
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


_RE_MMA_ATTR = re.compile(r"^#(\w+) = #ttg\.nvidia_mma<\{versionMajor = (\d+).*?warpsPerCTA = \[([\d, ]+)\]"
                          r".*?instrShape = \[([\d, ]+)\]", re.M)
_RE_DOT = re.compile(r"= (ttng\.warp_group_dot|tt\.dot) .*?: (?:!ttg\.memdesc|tensor)<(\d+)x(\d+)x\w+.*?"
                     r"-> tensor<(\d+)x(\d+)x\w+, #(\w+)>")
_RE_PTX_MMA = re.compile(r"\b(?:wgmma\.mma_async\.sync\.aligned|mma\.sync\.aligned)\.(m\d+n\d+k\d+)")


def analyse_dots(ttgir: str) -> tuple[list, float]:
    """Every dot of a TTGIR module with its MMA layout, and the kernel's MMA redundancy.

    An MMA layout places ``warpsPerCTA`` warps over the output tile, each warp covering
    ``16 x instrShape[1]`` (Hopper: a warpgroup of 4 warps issues one m64nNk16 wgmma;
    Ampere: ``16 x 8`` mma.sync). Where the warps cover more rows or columns than the tile
    has, warps compute the same products: Triton puts every warp on the M axis of a dot
    whose result feeds another dot (``warpsPerCTA = [num_warps, 1]``), so 8 warps on a
    64-row dot do its work twice. ``redundancy`` weights each dot by its M x N x K.
    """
    layouts = {}
    for m in _RE_MMA_ATTR.finditer(ttgir):
        layouts[m.group(1)] = (int(m.group(2)), [int(x) for x in m.group(3).split(",")],
                               [int(x) for x in m.group(4).split(",")])
    dots, useful, issued = [], 0, 0
    for m in _RE_DOT.finditer(ttgir):
        op, _am, k, rows, cols, lay = m.groups()
        k, rows, cols = int(k), int(rows), int(cols)
        if lay not in layouts:
            continue  # an FMA dot (no MMA layout)
        version, warps, instr = layouts[lay]
        cover_m = warps[0] * 16
        cover_n = warps[1] * (instr[1] if len(instr) > 1 else 8)
        red = max(1.0, cover_m / rows) * max(1.0, cover_n / cols)
        dots.append({"op": "wgmma" if op.startswith("ttng") else "mma", "mnk": [rows, cols, k],
                     "warps_per_cta": warps, "instr_shape": instr, "mma_version": version,
                     "redundancy": red})
        useful += rows * cols * k
        issued += rows * cols * k * red
    return dots, (issued / useful if useful else 1.0)


def mma_shapes(ptx: str) -> dict:
    out = {}
    for shape in _RE_PTX_MMA.findall(ptx):
        out[shape] = out.get(shape, 0) + 1
    return out


_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_RE_PROPS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict:
    """Registers (max over functions), spills and stack (summed), static smem (max)."""
    regs = [int(x) for x in _RE_USED.findall(log)]
    props = [tuple(map(int, m)) for m in _RE_PROPS.findall(log)]
    smem = [int(x) for x in _RE_SMEM.findall(log)]
    if not regs:
        raise CompileError(f"could not parse ptxas output:\n{log}")
    return {
        "registers": max(regs),
        "stack_bytes": max((p[0] for p in props), default=0),
        "spill_stores": sum(p[1] for p in props),
        "spill_loads": sum(p[2] for p in props),
        "static_smem": max(smem, default=0),
    }


def perf_warnings(log: str) -> list:
    """ptxas's performance warnings, e.g. C7515 / C7512: wgmma serialised (each wgmma then
    waits for the previous one, losing the tensor-core pipeline)."""
    return [line.strip() for line in log.splitlines()
            if "Potential Performance Loss" in line or re.search(r"\(C75(?:12|15)\)", line)]


def run_ptxas(ptx: str, arch: int, enable_fp_fusion: bool = True, ptx_options: str = "") -> tuple[dict, str]:
    """Assemble ``ptx`` with Triton's ptxas (same flags Triton uses) and parse ``-v``.

    The log is kept in Triton's own cache (``~/.triton/cache``, or ``TRITON_CACHE_DIR``)
    under a hash of the PTX, so a rerun of unchanged kernels skips ptxas.
    """
    ptxas = _ptxas_path(arch)
    cache, fname = None, "ptxas_v.log"
    try:
        from triton.runtime.cache import get_cache_manager

        st = os.stat(ptxas)
        key = hashlib.sha256(
            f"sft-ptxas-v1|{ptxas}|{st.st_size}|{st.st_mtime_ns}|{arch}|{enable_fp_fusion}|{ptx_options}|".encode()
            + ptx.encode()).hexdigest()
        cache = get_cache_manager(key)
        hit = cache.get_file(fname)
        if hit:
            with open(hit) as f:
                log = f.read()
            return parse_ptxas_log(log), log
    except Exception:  # noqa: BLE001 - the cache is an optimisation only
        cache = None
    stats, log = _run_ptxas_uncached(ptxas, ptx, arch, enable_fp_fusion, ptx_options)
    if cache is not None:
        try:
            cache.put(log, fname, binary=False)
        except Exception:  # noqa: BLE001
            pass
    return stats, log


@functools.lru_cache(maxsize=None)
def _triton_passes_regalloc() -> bool:
    try:
        import inspect

        from triton.backends.nvidia import compiler as nv

        return "regAllocOptLevel" in inspect.getsource(nv.CUDABackend.make_cubin)
    except Exception:  # noqa: BLE001
        return False


def _run_ptxas_uncached(ptxas: str, ptx: str, arch: int, enable_fp_fusion: bool,
                        ptx_options: str = "") -> tuple[dict, str]:
    with tempfile.TemporaryDirectory(prefix="sft_ptxas_") as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        base = [ptxas, "-lineinfo", "-v"] + ([] if enable_fp_fusion else ["--fmad=false"])
        base += (ptx_options or "").split()
        tail = [f"--gpu-name={gpu_name(arch)}", src, "-o", os.path.join(tmp, "k.cubin")]
        proc = None
        # Triton 3.8 passes --regAllocOptLevel=2 (a ptxas 13.x workaround), 3.6 does not:
        # mirror the installed Triton, and retry without it should ptxas reject it
        for extra in ((["--regAllocOptLevel=2"], []) if _triton_passes_regalloc() else ([], )):
            proc = subprocess.run(base + extra + tail, capture_output=True, text=True)
            if proc.returncode == 0:
                break
        if proc.returncode != 0:
            raise CompileError(f"ptxas failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    log = proc.stdout + proc.stderr
    return parse_ptxas_log(log), log


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
        divisible_by_16 = [k for k, t in full_sig.items() if t.startswith("*")]
    attrs = {}
    for k in divisible_by_16:
        attrs[(arg_names.index(k), )] = [["tt.divisibility", 16]]
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
                [sys.executable, "-m", "sft_kernels.testing.compile_check", job, out],
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


def spec_failures(spec: dict, arch: int, report: Optional[CompileReport], error: Optional[str]) -> list:
    tag = f"{spec['name']} [{gpu_name(arch)}]"
    if error is not None:
        return [f"{tag}: compile failed: {error}"]
    out = []
    if report.spill_stores or report.spill_loads:
        out.append(f"{tag}: register spills: {report.spill_stores} B stored, {report.spill_loads} B loaded "
                   f"({report.registers} registers, num_warps={report.num_warps})")
    limit = SMEM_LIMIT.get(arch)
    if limit is not None and report.shared_bytes > limit:
        out.append(f"{tag}: shared memory {report.shared_bytes} B over the {limit} B limit "
                   f"(num_stages={report.num_stages})")
    for w in report.perf_warnings:
        out.append(f"{tag}: ptxas performance warning: {w}")
    if spec.get("expect_mma"):
        bad = [d for d in report.dots if d["redundancy"] > 1.0]
        if bad:
            desc = "; ".join(f"{d['op']} {d['mnk'][0]}x{d['mnk'][1]}x{d['mnk'][2]} on warpsPerCTA={d['warps_per_cta']}"
                             f" ({d['redundancy']:.2f}x)" for d in bad)
            out.append(f"{tag}: redundant MMA layout, {report.redundancy:.2f}x the tile's MMA work "
                       f"(num_warps={report.num_warps}): {desc}")
        if arch >= 90 and not report.uses_wgmma:
            out.append(f"{tag}: expected wgmma in the Hopper build, found "
                       f"{'mma.sync only' if report.uses_mma else 'no tensor-core MMA'}")
        elif arch < 90 and not report.uses_mma:
            out.append(f"{tag}: expected mma.sync, found no tensor-core MMA")
    return out


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


# --------------------------------------------------------------------------------------
# The op modules' specs, and the per-config report
# --------------------------------------------------------------------------------------


def op_specs():
    """(specs, problems): every ``compile_specs()`` of the ``sft_kernels.ops.*.triton*``
    modules; ``problems`` lists modules that do not import or specs that are malformed."""
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
        fn = getattr(mod, "compile_specs", None)
        if fn is None or id(fn) in seen_fns:
            continue
        seen_fns.add(id(fn))
        try:
            got = list(fn())
        except Exception as e:  # noqa: BLE001
            problems.append(f"{info.name}.compile_specs() raised {type(e).__name__}: {e}")
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


def report_table(results: Sequence[SpecResult]) -> str:
    """Markdown: registers, spills, shared memory, CTAs/SM, MMA shapes, redundancy and
    ptxas performance warnings per (kernel config, architecture)."""
    lines = ["| kernel config | arch | regs | spill B | smem KiB | CTAs/SM | MMA instructions (static count) "
             "| redundancy | serialised | async copies |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rep = r.report
        if rep is None:
            lines.append(f"| {r.name} | {gpu_name(r.arch)} | compile failed | | | | | | | |")
            continue
        shapes = ", ".join(f"{k} x{v}" for k, v in sorted(rep.mma_shapes.items()))
        copies = f"{rep.tma_copies} TMA" if rep.tma_copies else str(rep.async_copies)
        lines.append(f"| {r.name} | {gpu_name(r.arch)} | {rep.registers} | {rep.spill_stores + rep.spill_loads} "
                     f"| {rep.shared_bytes / 1024:.0f} | {rep.ctas_per_sm} | {shapes} | {rep.redundancy:.2f} "
                     f"| {'yes' if rep.perf_warnings else 'no'} | {copies} |")
    return "\n".join(lines)


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
    if len(sys.argv) == 3 and sys.argv[1].endswith(".pkl"):
        # run the worker from the importable module, not from __main__, so that pickled
        # classes resolve to one module
        from sft_kernels.testing.compile_check import _worker_main as _main

        _main(sys.argv[1], sys.argv[2])
    else:
        from sft_kernels.testing.compile_check import main as _report

        sys.exit(_report())
