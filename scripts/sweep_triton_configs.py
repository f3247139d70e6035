"""Compile candidate tile configurations of the Triton kernels and report what ptxas and
the TTGIR say, without a GPU: how the autotune lists in the kernel modules were chosen.

For each candidate: registers, spills, shared memory, CTAs per SM, the MMA instruction
shapes, the MMA redundancy (warps doing the same products, see
``compile_check.analyse_dots``) and ptxas's serialisation warnings (C7512 / C7515).
Candidates that spill, replicate MMA work or serialise wgmma are marked; the rest are
the admissible ones an autotune list may hold.

    python scripts/sweep_triton_configs.py --op swa --kinds fwd,dkdv,dq --dims 64,128,256 \\
        --archs 90 --dtype fp16 --json /tmp/sweep.json
    python scripts/sweep_triton_configs.py --dtype fp32 --dot-prec tf32 --archs 90,80   # allow_tf32

Runs in worker processes (``--workers``); ~1-2 s per candidate and architecture.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

from sft_kernels.testing import compile_check as cc

SWA_SPACE = {
    "fwd": dict(bm=(64, 128), bn=(32, 64, 128), warps=(4, 8), stages=(2, 3, 4)),
    "dkdv": dict(bm=(16, 32, 64), bn=(64, 128), warps=(4, 8), stages=(1, 2, 3)),
    "dq": dict(bm=(64, 128), bn=(16, 32, 64), warps=(4, 8), stages=(1, 2, 3)),
}
# fp32 with tf32 dots (allow_tf32): fp32 operands take twice fp16's registers and shared
# memory, so smaller tiles (one stage: the D = 256 backward, where two did not fit)
TF32_SPACE = {
    "fwd": dict(bm=(16, 32, 64, 128), bn=(16, 32, 64), warps=(4, 8), stages=(2,)),
    "dkdv": dict(bm=(16, 32), bn=(32, 64, 128), warps=(4, 8), stages=(1, 2)),
    "dq": dict(bm=(16, 32, 64, 128), bn=(16, 32, 64), warps=(4, 8), stages=(1, 2)),
}
# 4 warps (one warpgroup) on 128 rows puts 128 x D fp32 accumulators on 128 threads: every
# such candidate spilled at D >= 128 in the first sweep, so they are left out
SKIP = {("dkdv", 128, 4), ("dq", 128, 4)}


def swa_candidates(kinds, dims, dtype, tma, dot_prec=""):
    from sft_kernels.ops.sliding_window_attention import triton_kernels as tk

    specs = []
    for kind in kinds:
        sp = (TF32_SPACE if dot_prec == "tf32" and dtype == "fp32" else SWA_SPACE)[kind]
        for d in dims:
            for bm, bn, w, s in itertools.product(sp["bm"], sp["bn"], sp["warps"], sp["stages"]):
                rows = bn if kind == "dkdv" else bm
                if (kind, rows, w) in SKIP and d >= 128:
                    continue
                specs.append(tk.compile_spec(kind, dtype, d, (bm, bn, w, s), tma=tma and kind == "fwd",
                                             dot_prec=dot_prec))
    return specs


def row(res):
    r = res.report
    if r is None:
        return dict(name=res.name, arch=res.arch, error=(res.error or "")[:200])
    return dict(name=res.name, arch=res.arch, regs=r.registers, spill=r.spill_stores + r.spill_loads,
                smem_kb=round(r.shared_bytes / 1024, 1), ctas_per_sm=r.ctas_per_sm, redundancy=round(r.redundancy, 3),
                mma=",".join(f"{k}x{v}" for k, v in sorted(r.mma_shapes.items())), serialised=bool(r.perf_warnings),
                ok=not res.failures)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", default="swa", choices=["swa"])
    ap.add_argument("--kinds", default="fwd,dkdv,dq")
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--archs", default="90")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--tma", action="store_true", help="forward in its tensor-descriptor variant")
    ap.add_argument("--dot-prec", default="", help="the dots' input_precision (default: a launch's; tf32: "
                    "fp32 under allow_tf32)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    specs = swa_candidates(args.kinds.split(","), [int(d) for d in args.dims.split(",")], args.dtype, args.tma,
                           args.dot_prec)
    results = cc.run_specs(specs, tuple(int(a) for a in args.archs.split(",")), mode="subprocess",
                           workers=args.workers, timeout=7200)
    rows = [row(r) for r in results]
    for r in rows:
        if "error" in r:
            print(f"{r['name']:55s} sm{r['arch']} ERROR {r['error']}")
            continue
        flag = "ok " if r["ok"] else "BAD"
        print(f"{flag} {r['name']:55s} sm{r['arch']} regs={r['regs']:3d} spill={r['spill']:4d} smem={r['smem_kb']:6.1f}K "
              f"ctas={r['ctas_per_sm']} red={r['redundancy']:.2f} ser={int(r['serialised'])} {r['mma']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
