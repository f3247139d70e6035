"""The benchmarks, runnable from an installed package.

    sft-kernels bench [--op attention|block_diag|e2e|context_parallel|memory|all] [--quick | --toy] [--out DIR]
    python -m sft_kernels.bench.<name> [its flags]      (``--help`` lists them)

Each module times one op (or the training step) against the baselines a user would
otherwise pick, side by side in one process; :mod:`.common` holds what they share
(environment tags, timing, peak memory, result files). Results go to ``--out``, else to
the checkout's ``benchmarks/results/<device>/<date>-<commit>/`` (where measured results are
committed) or, for an installed package, ``./sft_kernels_results/<device>/<date>-<v...>/``.
"""

import importlib.util
import os
import subprocess
import sys

# name -> (module, what it needs beyond the base install)
BENCHMARKS = {
    "attention": ("sft_kernels.bench.attention", None),
    "block_diag": ("sft_kernels.bench.block_diag", None),
    "e2e": ("sft_kernels.bench.e2e", "transformers"),
    "context_parallel": ("sft_kernels.bench.context_parallel", None),
    "memory": ("sft_kernels.bench.memory", "transformers"),
}
# what `sft-kernels bench` runs by default (context parallelism starts gloo processes: ask for it)
DEFAULT = ("attention", "block_diag", "e2e")


def run(ops, quick: bool, out, device, toy: bool = False) -> int:
    """Run ``python -m sft_kernels.bench.<op>`` for each op in a child process; returns the
    worst exit code. An op whose optional dependency is missing is skipped with a note.
    ``toy``: tiny shapes that run every step in seconds (attention, block_diag, e2e)."""
    rc = 0
    for op in ops:
        module, needs = BENCHMARKS[op]
        if needs and importlib.util.find_spec(needs) is None:
            print(f"sft-kernels bench: skipping {op}: it needs {needs} (pip install 'sft_kernels[hf]')", flush=True)
            continue
        cmd = [sys.executable, "-m", module]
        if toy and op != "context_parallel":
            cmd.append("--toy")
        elif quick or toy:
            cmd.append("--quick")
        if out:
            cmd += ["--out", os.path.join(out, op) if len(ops) > 1 else out]
        if device and op != "context_parallel":
            cmd += ["--device", device]
        print("$ " + " ".join(cmd), flush=True)
        rc = max(rc, subprocess.run(cmd).returncode)
    return rc
