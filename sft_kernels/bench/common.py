"""What every benchmark shares: environment tags, timing, peak memory, result files.

Timing: on GPU ``triton.testing.do_bench`` (CUDA events, median); on CPU the median of
wall-clock repeats after one warm-up call. Peak memory: on GPU
``torch.cuda.max_memory_allocated`` above what the inputs hold; on CPU the growth of the
resident set (VmHWM) of a fresh child process running the call once, because an
allocator that keeps freed pages makes in-process CPU figures meaningless.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkout_root() -> Optional[str]:
    """The source checkout this package runs from (the folder holding ``.git`` and
    ``benchmarks/``), or None for an installed package."""
    root = os.path.dirname(_PACKAGE_DIR)
    if os.path.isdir(os.path.join(root, ".git")) and os.path.isdir(os.path.join(root, "benchmarks")):
        return root
    return None


def git_commit() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes to tracked files); for an
    installed package, ``v<version>``."""
    root = checkout_root()
    if root is None:
        from sft_kernels import __version__

        return f"v{__version__}"
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=root)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=root).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def environment(device: str) -> Dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    env = {
        "device_name": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        "cpu_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
    }
    return env


def time_ms(fn: Callable[[], object], device: str, rep_ms: int = 100) -> float:
    """Median time of one call in milliseconds.

    GPU: CUDA events through ``triton.testing.do_bench``. CPU: one warm-up call, then
    enough repeats for about half a second (3 to 15).
    """
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    fn()  # warm-up (first-call allocation, lazy init)
    t0 = time.perf_counter()
    fn()
    times = [time.perf_counter() - t0]
    for _ in range(max(3, min(15, int(0.5 / max(times[0], 1e-6)))) - 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child_peak_main(make: Callable[[], Callable[[], object]], warm: Optional[Callable[[], Callable[[], object]]] = None) -> None:
    """In the child: build the inputs, then report the RSS growth of one call as JSON.

    ``warm`` builds the same call at a tiny size; it runs first so that one-time costs
    (lazy imports, first dispatch of a custom op: ~170 MB of code and metadata) are not
    counted as the op's memory.
    """
    if warm is not None:
        warm()()
    fn = make()
    base = _status_bytes("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    fn()
    print(json.dumps({"peak_bytes": max(0, _status_bytes("VmHWM") - base)}))


def cpu_child_json(module: str, args: List[str], timeout: float = 600) -> Optional[dict]:
    """Run ``python -m module --measure-memory ARGS`` in a fresh process and return the last
    JSON object it printed; None if it fails (the child's last stderr line is reported).

    A fixed malloc mmap threshold makes freed large blocks go back to the OS at once,
    so the resident-set peak tracks live memory rather than the allocator's caching.
    """
    if not os.path.exists("/proc/self/status"):
        return None
    cmd = [sys.executable, "-m", module, "--measure-memory", *args]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None
    for line in reversed(out.stdout.strip().splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            return record
    progress(f"  memory probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return None


def cpu_peak_bytes(module: str, args: List[str], timeout: float = 600) -> Optional[int]:
    """The ``peak_bytes`` a :func:`child_peak_main` child reports (:func:`cpu_child_json`)."""
    record = cpu_child_json(module, args, timeout)
    return int(record["peak_bytes"]) if record and "peak_bytes" in record else None


def result_dir(out: Optional[str], device: str, env: Optional[Dict[str, str]] = None) -> str:
    """``out``, or ``<results>/<device>/<date>-<commit>/`` with the commit the run measured
    (``env``, read when the run started). ``<results>`` is the checkout's
    ``benchmarks/results`` (where measured results are committed), or ``./sft_kernels_results``
    when the package is installed."""
    if out is None:
        env = env or environment(device)
        name = "cpu" if device == "cpu" else torch.cuda.get_device_name().replace(" ", "_")
        run = f"{env['date']}-{env['commit']}"
        root = checkout_root()
        base = os.path.join(root, "benchmarks", "results") if root else os.path.abspath("sft_kernels_results")
        out = os.path.join(base, name, run)
    os.makedirs(out, exist_ok=True)
    return out


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a note) when matplotlib is not
    installed: the JSON and Markdown results do not need it (``pip install sft_kernels[bench]``)."""
    try:
        import matplotlib
    except ImportError:
        progress("matplotlib is not installed: no plots (pip install 'sft_kernels[bench]'); JSON and tables written")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_json(records: List[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(records, f, indent=1)


def markdown_table(records: List[dict], columns: List[str], fmt: Dict[str, Callable] = None) -> str:
    fmt = fmt or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        lines.append("| " + " | ".join(fmt.get(c, str)(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def append_partial(out: Optional[str], name: str, record: dict) -> None:
    """Append one record to ``<out>/<name>.partial.jsonl`` as soon as it is measured, so a
    run cut off by a time limit (``scripts/gpu_check.sh``) still leaves its numbers."""
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.partial.jsonl"), "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- targets
def target(name: str, ratio: Optional[float], required: float) -> dict:
    """One target of a benchmark: ``ratio`` (None where a record is missing) against the
    ``required`` minimum; ``met`` is None when it was not measured."""
    return dict(name=name, ratio=ratio, required=required, met=None if ratio is None else ratio >= required)


def target_line(t: dict) -> str:
    ratio = "not measured" if t["ratio"] is None else f"{t['ratio']:.2f}x"
    verdict = "" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
    return f"{t['name']}: {ratio} (needs >= {t['required']}) {verdict}".rstrip()


def print_report(table: str, targets: List[dict], wrote: str) -> None:
    """The end of a benchmark run: its table, one line per target, where its files went."""
    print(table)
    print()
    for t in targets:
        print("target " + target_line(t))
    print(f"\nwrote {wrote}")
