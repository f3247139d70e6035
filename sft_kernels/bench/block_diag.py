"""Benchmark: block-diagonal merged matmul against what a user would otherwise write.

    python -m sft_kernels.bench.block_diag [--quick | --headline | --toy] [--providers a,b] [--out DIR]
        [--device cpu|cuda] [--plot-only JSON]

``--headline``: the target shapes of issue 4 only (GPU: T=16384, width 4096, g = 4, 8, 16,
64, bf16, plus g=16 fp16), what ``scripts/gpu_check.sh`` times; ``--toy``: tiny shapes that
run every step on CPU in seconds (the GPU check's ``--dry-run``).

Providers (same process, same inputs):

- ``dense``: ``x @ block_diag(W_1..W_g).T`` with the dense matrix built once (zeros stored
  and multiplied); its backward yields a dense weight gradient.
- ``bmm`` (equal blocks): ``torch.bmm`` over ``x.view(T, g, n).transpose(0, 1)``, then
  the transpose back to ``(T, g*m)`` that a user needs.
- ``linear_loop``: ``torch.cat([F.linear(x_i, W_i) for i], -1)``.
- ``grouped_mm`` (equal blocks, where ``torch.nn.functional.grouped_mm`` exists and
  accepts the inputs: bf16 on sm_90+), ``conv1x1`` (equal blocks): ``F.conv1d`` with
  ``groups=g`` on ``x.T``.
- ``sft_auto`` (this package, ``backend="auto"``), and on CUDA ``sft_triton`` and
  ``sft_torch``; ``d2d_copy`` (CUDA): a device-to-device copy of x, the bandwidth bar
  for memory-bound small blocks.

Modes: ``fwd`` (under ``torch.no_grad``) and ``fwd_bwd`` (forward plus backward for x,
weights, bias). Timing: ``triton.testing.do_bench`` medians on GPU, wall-clock medians
on CPU. FLOPs (useful only): forward ``2 * T * sum(m_i n_i)``, forward+backward three
times that. Bytes (the minimum any implementation moves): forward ``x + W + bias + y``,
backward adds ``dy + x + W`` read and ``dx + dW + dbias`` written. ``speedup_vs`` is
against ``dense`` of the same shape, dtype and mode.

Writes ``<out>/block_diag.json`` (``{"env", "records", "skipped", "targets"}``),
``<out>/block_diag.md`` and PNG plots made from the JSON; prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import common  # noqa: E402

from sft_kernels.backends import backend_status  # noqa: E402
from sft_kernels.ops.block_diag import block_diag_matmul  # noqa: E402

OP = "block_diag_matmul"
_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Issue 4's targets, checked from the records of one run.
CPU_TARGET = dict(tokens=4096, width=4096, g=8, dtype="fp32", mode="fwd", min_ratio=5.6)


# ----------------------------------------------------------------------------- shapes


def split_sizes(width: int, g: int, kind: str) -> List[int]:
    """Per-block sizes summing to ``width``: equal, or unequal halving (1/2, 1/4, ..., rest)."""
    if kind == "equal":
        assert width % g == 0
        return [width // g] * g
    sizes, rest = [], width
    for _ in range(g - 1):
        s = max(16, (rest // 2) // 16 * 16)
        sizes.append(s)
        rest -= s
    sizes.append(rest)
    assert rest > 0 and sum(sizes) == width
    return sizes


def sweep(device: str, quick: bool, headline: bool = False, toy: bool = False) -> List[dict]:
    """The shape list: dicts with tokens, width, g, kind, dtype, modes."""
    shapes = []

    def add(tokens, width, g, kind, dtype, modes=("fwd", "fwd_bwd")):
        shapes.append(dict(tokens=tokens, width=width, g=g, kind=kind, dtype=dtype, modes=tuple(modes)))

    if toy:
        for g in (2, 4):
            add(64, 64, g, "equal", "fp32")
        add(64, 96, 3, "unequal", "fp32")
        return shapes
    if headline:
        if device != "cuda":
            raise SystemExit("bench_block_diag: --headline is a GPU run; use --toy on CPU")
        for g in (4, 8, 16, 64):
            add(16384, 4096, g, "equal", "bf16")
        add(16384, 4096, 16, "equal", "fp16", modes=("fwd",))
        add(16384, 4096, 4, "unequal", "bf16")
        return shapes
    if device == "cuda":
        tokens_list = [4096, 16384] if quick else [1024, 4096, 16384, 65536]
        widths = [4096] if quick else [1024, 4096, 8192]
        groups = [1, 4, 8, 16, 64] if quick else [1, 2, 4, 8, 16, 64]
        for T in tokens_list:
            for w in widths:
                for g in groups:
                    add(T, w, g, "equal", "bf16")
                if not quick or T == 16384:
                    add(T, w, 4, "unequal", "bf16")
        # small blocks (<= 256): memory-bound, compared with a device-to-device copy
        add(16384, 4096, 64, "equal", "bf16")  # 64-wide blocks (already above; kept for clarity)
        add(16384, 4096, 16, "equal", "fp16")
        if not quick:
            add(16384, 4096, 8, "equal", "fp32")
    else:
        # The CPU target shape first (forward only: dense takes ~1.2 s per call on 2 cores).
        add(4096, 4096, 8, "equal", "fp32", modes=("fwd",))
        for g in [1, 4, 8, 16, 64]:
            add(1024, 1024, g, "equal", "fp32")
        add(1024, 1024, 4, "unequal", "fp32")
        add(1024, 1024, 8, "equal", "bf16", modes=("fwd",))
        if not quick:
            for T in (1024, 4096):
                for w in (1024, 2048):
                    for g in (1, 2, 4, 8, 16, 64):
                        add(T, w, g, "equal", "fp32")
                    add(T, w, 4, "unequal", "fp32")
            add(4096, 4096, 8, "equal", "bf16", modes=("fwd",))
    seen, out = set(), []
    for s in shapes:
        key = (s["tokens"], s["width"], s["g"], s["kind"], s["dtype"], s["modes"])
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


# ----------------------------------------------------------------------------- providers


class Problem:
    def __init__(self, tokens, width, g, kind, dtype, device):
        self.tokens, self.width, self.g, self.kind = tokens, width, g, kind
        self.dtype, self.device = dtype, device
        self.in_f = split_sizes(width, g, kind)
        self.out_f = list(self.in_f)
        self.equal = kind == "equal"
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.x = (torch.randn(tokens, width, generator=gen)).to(device=device, dtype=dtype)
        self.blocks = [
            (torch.randn(m, n, generator=gen) * n ** -0.5).to(device=device, dtype=dtype)
            for n, m in zip(self.in_f, self.out_f)
        ]
        self.flat = torch.cat([b.reshape(-1) for b in self.blocks])
        self.bias = (torch.randn(width, generator=gen) * 0.1).to(device=device, dtype=dtype)
        self.gy = torch.randn(tokens, width, generator=gen).to(device=device, dtype=dtype)
        self.useful_flops = 2 * tokens * sum(m * n for n, m in zip(self.in_f, self.out_f))

    def bytes(self, mode: str) -> int:
        e = self.x.element_size()
        T, N, M, W = self.tokens, self.width, self.width, self.flat.numel()
        fwd = (T * N + W + M + T * M) * e
        if mode == "fwd":
            return fwd
        return fwd + (T * M + T * N + W + T * N + W + M) * e

    def providers(self) -> Dict[str, Callable]:
        """name -> builder(requires_grad) returning (forward closure, params)."""
        p = {}
        T, g = self.tokens, self.g

        def dense(rg):
            W = torch.block_diag(*self.blocks).requires_grad_(rg)
            b = self.bias.clone().requires_grad_(rg)
            return (lambda x: F.linear(x, W, b)), [W, b]

        p["dense"] = dense

        def loop(rg):
            ws = [w.clone().requires_grad_(rg) for w in self.blocks]
            b = self.bias.clone().requires_grad_(rg)
            bs = list(torch.split(b, self.out_f))

            def f(x):
                xs = torch.split(x, self.in_f, dim=-1)
                return torch.cat([F.linear(xi, wi, bi) for xi, wi, bi in zip(xs, ws, bs)], -1)

            return f, ws + [b]

        if g > 1:
            p["linear_loop"] = loop
        if self.equal and g > 1:
            n, m = self.in_f[0], self.out_f[0]

            def bmm(rg):
                W = torch.stack(self.blocks).requires_grad_(rg)  # (g, m, n)
                b = self.bias.clone().requires_grad_(rg)

                def f(x):
                    y = torch.baddbmm(b.view(g, 1, m), x.view(T, g, n).transpose(0, 1), W.transpose(1, 2))
                    return y.transpose(0, 1).reshape(T, g * m)

                return f, [W, b]

            p["bmm"] = bmm

            def conv(rg):
                W = torch.stack(self.blocks).reshape(g * m, n, 1).requires_grad_(rg)
                b = self.bias.clone().requires_grad_(rg)
                return (lambda x: F.conv1d(x.t().unsqueeze(0), W, b, groups=g).squeeze(0).t()), [W, b]

            p["conv1x1"] = conv

            if hasattr(F, "grouped_mm"):

                def gmm(rg):
                    W = torch.stack(self.blocks).transpose(1, 2).requires_grad_(rg)  # (g, n, m)
                    return (lambda x: F.grouped_mm(x.view(T, g, n).transpose(0, 1), W).transpose(0, 1).reshape(T, g * m)), [W]

                p["grouped_mm"] = gmm

        def ours(backend):
            def build(rg):
                w = self.flat.clone().requires_grad_(rg)
                b = self.bias.clone().requires_grad_(rg)
                return (lambda x: block_diag_matmul(x, w, self.in_f, self.out_f, bias=b, backend=backend)), [w, b]

            return build

        p["sft_auto"] = ours("auto")
        if self.device == "cuda":
            p["sft_triton"] = ours("triton")
            p["sft_torch"] = ours("torch")
            if backend_status()["cuda"].available:  # the built extension (gpu_check: after its build step)
                p["sft_cuda"] = ours("cuda")
        return p


def _callable(problem: Problem, build, mode: str):
    if mode == "fwd":
        f, _ = build(False)
        x = problem.x

        def run():
            with torch.no_grad():
                return f(x)

        return run
    f, params = build(True)
    x = problem.x.clone().requires_grad_(True)
    gy = problem.gy

    def run_bwd():
        for t in params + [x]:
            t.grad = None
        y = f(x)
        y.backward(gy)

    return run_bwd


# ----------------------------------------------------------------------------- run


def measure(shapes: List[dict], device: str, env: dict, only: Optional[List[str]] = None, out: Optional[str] = None):
    records, skipped = [], []
    for s in shapes:
        dtype = _DT[s["dtype"]]
        prob = Problem(s["tokens"], s["width"], s["g"], s["kind"], dtype, device)
        shape = dict(tokens=s["tokens"], width_in=s["width"], width_out=s["width"], g=s["g"], blocks=s["kind"],
                     block_in=max(prob.in_f), block_out=max(prob.out_f))
        providers = prob.providers()
        for mode in s["modes"]:
            rows = []
            for name, build in providers.items():
                if only and name not in only:
                    continue
                if device == "cpu" and name == "dense" and mode == "fwd_bwd" and s["width"] > 2048:
                    continue  # several seconds per call on a laptop-class CPU; forward shows the point
                try:
                    fn = _callable(prob, build, mode)
                    fn()  # raises here if the provider cannot take these inputs
                    ms = common.time_ms(fn, device)
                    peak = common.cuda_peak_bytes(fn) if device == "cuda" else None
                except Exception as e:  # noqa: BLE001 - recorded, not fatal
                    skipped.append(dict(impl=name, shape=shape, dtype=s["dtype"], mode=mode,
                                        reason=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"))
                    common.append_partial(out, "block_diag", dict(skipped[-1], skipped=True))
                    continue
                flops = prob.useful_flops * (1 if mode == "fwd" else 3)
                rows.append(dict(op=OP, impl=name, device=device, dtype=s["dtype"], mode=mode, shape=shape, ms=ms,
                                 tflops=flops / (ms * 1e-3) / 1e12, gbps=prob.bytes(mode) / (ms * 1e-3) / 1e9,
                                 peak_mem_bytes=peak, env=env))
                common.append_partial(out, "block_diag", rows[-1])
                common.progress(f"  {mode:7s} T={s['tokens']:6d} w={s['width']:5d} g={s['g']:3d} {s['kind']:7s} "
                                f"{s['dtype']:4s} {name:12s} {ms:9.3f} ms")
            if device == "cuda" and mode == "fwd":
                src = prob.x
                dst = torch.empty_like(src)
                ms = common.time_ms(lambda: dst.copy_(src), device)
                rows.append(dict(op=OP, impl="d2d_copy", device=device, dtype=s["dtype"], mode=mode, shape=shape,
                                 ms=ms, tflops=0.0, gbps=2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9,
                                 peak_mem_bytes=None, env=env))
            base = next((r for r in rows if r["impl"] == "dense"), None)
            for r in rows:
                r["speedup_vs"] = (dict(baseline="dense", ratio=base["ms"] / r["ms"]) if base
                                   else dict(baseline="dense", ratio=None))
            records.extend(rows)
        del prob
    return records, skipped


def _find(records, impl, **kw):
    for r in records:
        if r["impl"] != impl:
            continue
        sh = r["shape"]
        if all((sh.get(k) == v) if k in sh else (r.get(k) == v) for k, v in kw.items()):
            return r
    return None


def targets(records: List[dict], device: str) -> List[dict]:
    """Issue 4's targets, from this run's records (None where a record is missing)."""
    out = []
    if device == "cpu":
        t = CPU_TARGET
        kw = dict(tokens=t["tokens"], width_in=t["width"], g=t["g"], blocks="equal", dtype=t["dtype"], mode=t["mode"])
        ours, dense = _find(records, "sft_auto", **kw), _find(records, "dense", **kw)
        ratio = dense["ms"] / ours["ms"] if ours and dense else None
        out.append(common.target("cpu: sft_auto vs dense, T=4096 w=4096 g=8 fp32 fwd", ratio, t["min_ratio"]))
        return out
    for mode in ("fwd", "fwd_bwd"):
        for baseline, groups, required in (("bmm", (4, 8), 0.9), ("linear_loop", (16, 64), 1.3)):
            for g in groups:
                kw = dict(tokens=16384, width_in=4096, g=g, blocks="equal", dtype="bf16", mode=mode)
                a, b = _find(records, "sft_auto", **kw), _find(records, baseline, **kw)
                ratio = b["ms"] / a["ms"] if a and b else None
                out.append(common.target(f"gpu: sft_auto vs {baseline}, T=16384 w=4096 g={g} bf16 {mode}", ratio,
                                         required))
    for g, dt in ((64, "bf16"), (16, "fp16")):
        kw = dict(tokens=16384, width_in=4096, g=g, blocks="equal", dtype=dt, mode="fwd")
        a, c = _find(records, "sft_auto", **kw), _find(records, "d2d_copy", **kw)
        ratio = a["gbps"] / c["gbps"] if a and c else None
        out.append(common.target(f"gpu: sft_auto bandwidth vs d2d copy, T=16384 w=4096 g={g} {dt} fwd", ratio, 0.7))
    return out


# ----------------------------------------------------------------------------- report


def _md(records: List[dict]) -> str:
    cols = ["mode", "dtype", "tokens", "width", "g", "blocks", "impl", "ms", "tflops", "gbps", "x dense", "peak MiB"]
    rows = []
    for r in records:
        sh = r["shape"]
        ratio = r["speedup_vs"]["ratio"]
        rows.append({
            "mode": r["mode"], "dtype": r["dtype"], "tokens": sh["tokens"], "width": sh["width_in"], "g": sh["g"],
            "blocks": sh["blocks"], "impl": r["impl"], "ms": f"{r['ms']:.3f}", "tflops": f"{r['tflops']:.2f}",
            "gbps": f"{r['gbps']:.1f}", "x dense": "" if ratio is None else f"{ratio:.2f}",
            "peak MiB": "" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.0f}",
        })
    return common.markdown_table(rows, cols)


def plot(json_path: str, out_dir: str) -> List[str]:
    """PNG plots from a stored JSON: time and TFLOP/s against groups, per mode."""
    plt = common.pyplot()
    if plt is None:
        return []
    with open(json_path) as f:
        data = json.load(f)
    recs = [r for r in data["records"] if r["shape"]["blocks"] == "equal" and r["impl"] != "d2d_copy"]
    if not recs:
        return []
    # the largest (tokens, width) with a sweep over g, in the most common dtype
    dtype = max({r["dtype"] for r in recs}, key=lambda d: sum(r["dtype"] == d for r in recs))
    recs = [r for r in recs if r["dtype"] == dtype]
    counts: Dict[tuple, set] = {}
    for r in recs:
        counts.setdefault((r["shape"]["tokens"], r["shape"]["width_in"]), set()).add(r["shape"]["g"])
    (T, W) = max(counts, key=lambda k: (len(counts[k]), k))
    recs = [r for r in recs if r["shape"]["tokens"] == T and r["shape"]["width_in"] == W]
    paths = []
    for metric, label in (("ms", "time (ms, log)"), ("tflops", "useful TFLOP/s")):
        modes = sorted({r["mode"] for r in recs})
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for impl in sorted({r["impl"] for r in recs}):
                pts = sorted((r["shape"]["g"], r[metric]) for r in recs if r["impl"] == impl and r["mode"] == mode)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            ax.set_xscale("log", base=2)
            if metric == "ms":
                ax.set_yscale("log")
            ax.set_xlabel("groups g")
            ax.set_ylabel(label)
            ax.set_title(f"{mode}, tokens={T}, width={W}, {dtype}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"block_diag_matmul on {data['env'].get('device_name', '?')} ({data['env'].get('commit', '?')})")
        fig.tight_layout()
        path = os.path.join(out_dir, f"block_diag_{metric}_vs_groups.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_block_diag", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sweep (CPU: about a minute)")
    p.add_argument("--headline", action="store_true", help="the target shapes only (GPU)")
    p.add_argument("--toy", action="store_true", help="tiny shapes (plumbing check, CPU)")
    p.add_argument("--providers", default=None, help="comma-separated subset of the providers")
    p.add_argument("--out", default=None, help="output folder (default: see common.result_dir)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--plot-only", default=None, metavar="JSON", help="only redraw the plots from a stored JSON")
    return p


def run(args_list: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(args_list)
    if args.plot_only:
        for path in plot(args.plot_only, os.path.dirname(os.path.abspath(args.plot_only))):
            print(path)
        return 0
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_block_diag: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    env = common.environment(device)
    out = common.result_dir(args.out, device, env)
    t0 = time.perf_counter()
    only = args.providers.split(",") if args.providers else None
    records, skipped = measure(sweep(device, args.quick, args.headline, args.toy), device, env, only, out)
    tg = targets(records, device)
    path = os.path.join(out, "block_diag.json")
    with open(path, "w") as f:
        json.dump(dict(env=env, records=records, skipped=skipped, targets=tg), f, indent=1)
    table = _md(records)
    with open(os.path.join(out, "block_diag.md"), "w") as f:
        f.write(f"# block_diag_matmul, {env['device_name']}, commit {env['commit']}, {env['date']}\n\n")
        f.write(f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['cpu_threads']} CPU threads\n\n")
        f.write(table + "\n\n## Targets (issue 4)\n\n")
        for t in tg:
            f.write(f"- {common.target_line(t)}\n")
        if skipped:
            f.write("\n## Skipped\n\n" + "\n".join(f"- {s['impl']} {s['mode']} {s['dtype']} g={s['shape']['g']}: "
                                                   f"{s['reason']}" for s in skipped) + "\n")
    plots = plot(path, out)
    common.print_report(table, tg, f"{path}, block_diag.md, {len(plots)} plots in {out} "
                                   f"({time.perf_counter() - t0:.0f} s)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
