"""``sft-kernels demo``: the README's main job on whatever this machine has.

1. the environment and backend table (``sft-kernels info``);
2. every op, on every backend that runs here, against its float64 dense reference
   (on a machine without a GPU the Triton kernels run through Triton's interpreter in a
   child process, since ``TRITON_INTERPRET`` must be set before they are defined);
3. the quick benchmarks, written to ``bench_out/`` with their tables printed;
4. a short ``sft-kernels train`` on the embedded model and shipped dataset, which prints
   the evaluation perplexity before and after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import torch

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def check(device: str, backend: str) -> bool:
    """Both ops on ``backend`` against their float64 dense references on the CPU; prints the
    relative errors, True when all are below 1e-4. Runs in a child process (``python -m
    sft_kernels.demo DEVICE BACKEND``): the Triton interpreter is switched on by the
    environment before the kernels are defined."""
    from sft_kernels import block_diag_matmul, block_diag_matmul_reference, sliding_window_attention
    from sft_kernels import sliding_window_attention_reference

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 97, h, 64, device=device, requires_grad=True) for h in (8, 2, 2))
    out = sliding_window_attention(q, k, v, window_size=16, causal=True, backend=backend)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, _ = sliding_window_attention_reference(q64, k64, v64, window_size=16, causal=True)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), torch.ones_like(ref))
    errs = [_rel(out.cpu(), ref), _rel(dq.cpu(), rq), _rel(dk.cpu(), rk), _rel(dv.cpu(), rv)]
    print(f"  sliding_window_attention  backend={backend:6s} on {device}: fwd {errs[0]:.1e}  dq {errs[1]:.1e}  "
          f"dk {errs[2]:.1e}  dv {errs[3]:.1e}", flush=True)
    ok = max(errs) < 1e-4
    sizes_in, sizes_out = [16, 48, 32], [32, 16, 64]
    x = torch.randn(37, sum(sizes_in), device=device, requires_grad=True)
    w = torch.randn(sum(a * b for a, b in zip(sizes_in, sizes_out)), device=device, requires_grad=True)
    y = block_diag_matmul(x, w, sizes_in, sizes_out, backend=backend)
    blocks, o = [], 0
    for n, m in zip(sizes_in, sizes_out):
        blocks.append(w.detach().cpu().double()[o:o + m * n].view(m, n))
        o += m * n
    e = _rel(y.cpu(), block_diag_matmul_reference(x.detach().cpu().double(), blocks))
    print(f"  block_diag_matmul         backend={backend:6s} on {device}: fwd {e:.1e}", flush=True)
    return ok and e < 1e-4


def _check(device: str, backend: str, interpret: bool) -> bool:
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-m", "sft_kernels.demo", device, backend], env=env)
    return res.returncode == 0


def run_demo(quick: bool = True) -> int:
    from .info import report

    t0 = time.time()
    report()
    print("\nChecking the kernels against the float64 dense references (relative errors):", flush=True)
    ok = True
    if torch.cuda.is_available():
        ok &= _check("cuda", "triton", interpret=False)
        ok &= _check("cuda", "torch", interpret=False)
    else:
        ok &= _check("cpu", "torch", interpret=False)
        print("  (no GPU: the Triton kernels run in Triton's interpreter on CPU tensors)", flush=True)
        ok &= _check("cpu", "triton", interpret=True)
    if not ok:
        print("demo: a kernel disagrees with its reference", file=sys.stderr)
        return 1
    print("\nBenchmarks (quick sweep; full sweep: sft-kernels bench):", flush=True)
    from .bench import run

    rc = run(["attention", "block_diag"], quick=quick, out="bench_out", device=None)
    print("\nShort supervised fine-tuning run (sft-kernels train, embedded model, shipped dataset):", flush=True)
    from .train import main as train_main

    out = os.path.join("bench_out", "sft_output")
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (an existing output_dir would resume)
    epochs = ["--num_train_epochs", "2"] if quick else []
    rc = max(rc, train_main(["--output_dir", out, *epochs]))
    print(f"\ndemo finished in {time.time() - t0:.0f} s; results in bench_out/")
    return rc


if __name__ == "__main__":  # the child of _check: python -m sft_kernels.demo DEVICE BACKEND
    sys.exit(0 if check(sys.argv[1], sys.argv[2]) else 1)
