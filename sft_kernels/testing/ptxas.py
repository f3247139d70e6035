"""ptxas and what it says: the assembler Triton ships, run with ``-v`` on a kernel's PTX
(cached in Triton's cache under a hash of the PTX), its log parsed for registers, spills,
stack and static shared memory and for performance warnings (C7512 / C7515: serialised
wgmma), and the TTGIR / PTX read for what the tensor cores are asked to do
(:func:`analyse_dots`, :func:`mma_shapes`). No Triton compile here: :mod:`.runner` lowers
a kernel to PTX and hands it over.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
import tempfile


class CompileError(RuntimeError):
    pass


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
