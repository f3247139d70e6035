"""Sliding-window attention against the baselines a user would otherwise pick.

Providers, side by side in one process:
  sdpa_causal     dense causal ``scaled_dot_product_attention`` (flash backend on GPU)
  sdpa_band_mask  SDPA with a dense boolean band mask (what Hugging Face does for a window)
  flex            FlexAttention with a sliding-window block mask (compiled)
  cudnn           cuDNN SDPA with a band through ``nvidia-cudnn-frontend`` (GPU, when installed)
  sft_triton / sft_cuda / sft_torch   this package's backends

FLOPs (useful work only): forward ``4 * keys_seen * head_dim * heads * batch`` where
keys_seen counts the (query, key) pairs inside the band (for sdpa_causal: inside the
causal triangle, its own useful work); backward is 2.5x forward. Bytes (gbps): the
minimum traffic, q, k, v, o for the forward plus q, k, v, o, dO read and dQ, dK, dV
written for the backward.

    python -m sft_kernels.bench.attention [--quick | --headline | --toy] [--providers a,b] [--device cpu|cuda] [--out DIR]

``--headline``: the target shapes only (GPU: bf16, batch 2, 16 heads, head_dim 128, causal
window 4096, L = 16k and 32k, fwd and fwd+bwd), what ``scripts/gpu_check.sh`` times first,
then the same shape at L = 16k with Gemma2's soft-cap (50) and with GPT-OSS-style sinks.

A config's ``mod`` (absent: none) is ``"softcap"`` (``softcap=50``) or ``"sinks"`` (a
``(heads,)`` parameter). Providers without the modifier are skipped for it, with the reason;
FlexAttention runs the soft-cap as a ``score_mod``.
``--toy``: tiny shapes that exercise every step of the script on CPU in seconds (the GPU
check's ``--dry-run``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from . import common  # noqa: E402

from sft_kernels import sliding_window_attention  # noqa: E402
from sft_kernels.backends import backend_status  # noqa: E402
from sft_kernels.window import band_mask, isqrt, keys_seen  # noqa: E402

OP = "sliding_window_attention"
BASELINE = "sdpa_causal"
SOFTCAP = 50.0  # Gemma2's attn_logit_softcapping
MOD_PROVIDERS = {"softcap": ("sft_triton", "sft_torch", "flex"), "sinks": ("sft_triton", "sft_torch")}


def resolve(window, L):
    """Keys per query (including self) for a causal window spec."""
    return max(1, isqrt(L)) if window == "sqrt" else min(int(window), L)


def setup(cfg, device):
    """Inputs for one configuration: q, k, v (B, L, H, D) and dO."""
    b, L, h, d = cfg["batch"], cfg["seqlen"], cfg["heads"], cfg["head_dim"]
    dtype = getattr(torch, cfg["dtype"])
    grad = cfg["mode"] == "fwd+bwd"
    q, k, v = (torch.randn(b, L, h, d, device=device, dtype=dtype, requires_grad=grad) for _ in range(3))
    do = torch.randn(b, L, h, d, device=device, dtype=dtype)
    return q, k, v, do


def modifiers(cfg, device):
    """The op's score-modifier arguments for ``cfg['mod']``: {} / softcap / sinks."""
    mod = cfg.get("mod")
    if mod is None:
        return {}
    if mod == "softcap":
        return {"softcap": SOFTCAP}
    if mod == "sinks":
        torch.manual_seed(0)
        return {"sinks": torch.randn(cfg["heads"], device=device, requires_grad=cfg["mode"] == "fwd+bwd")}
    raise ValueError(f"unknown mod {mod!r}")


def flops(cfg, impl):
    L, w = cfg["seqlen"], resolve(cfg["window"], cfg["seqlen"])
    pairs = keys_seen(L, L, -1, 0) if impl == "sdpa_causal" else keys_seen(L, L, w - 1, 0)
    fwd = 4.0 * pairs * cfg["head_dim"] * cfg["heads"] * cfg["batch"]
    return fwd * (3.5 if cfg["mode"] == "fwd+bwd" else 1.0)


def io_bytes(cfg):
    elem = torch.finfo(getattr(torch, cfg["dtype"])).bits // 8
    t = cfg["batch"] * cfg["seqlen"] * cfg["heads"] * cfg["head_dim"] * elem
    return t * (4 + (8 if cfg["mode"] == "fwd+bwd" else 0))


# ----------------------------------------------------------------------------- providers
def _sdpa_layout(x):
    return x.transpose(1, 2)  # (B, H, L, D) view


def make_call(impl, cfg, q, k, v):
    """A zero-argument forward for ``impl``, or raise RuntimeError with the reason to skip."""
    L, w = cfg["seqlen"], resolve(cfg["window"], cfg["seqlen"])
    mod = cfg.get("mod")
    if mod is not None and impl not in MOD_PROVIDERS[mod]:
        raise RuntimeError(f"{impl} has no {mod}")
    if impl.startswith("sft_"):
        backend, extra = impl[4:], modifiers(cfg, q.device)
        return lambda: sliding_window_attention(q, k, v, window_size=w, causal=True, backend=backend, **extra)
    if impl == "sdpa_causal":
        if q.is_cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def call():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(*map(_sdpa_layout, (q, k, v)), is_causal=True).transpose(1, 2)

            return call
        return lambda: F.scaled_dot_product_attention(*map(_sdpa_layout, (q, k, v)), is_causal=True).transpose(1, 2)
    if impl == "sdpa_band_mask":
        mask = band_mask(L, L, w - 1, 0, device=q.device)
        return lambda: F.scaled_dot_product_attention(*map(_sdpa_layout, (q, k, v)), attn_mask=mask).transpose(1, 2)
    if impl == "flex":
        flex, block, softcap = _flex(L, w, str(q.device))
        mods = {"score_mod": softcap} if mod == "softcap" else {}
        return lambda: flex(*map(_sdpa_layout, (q, k, v)), block_mask=block, **mods).transpose(1, 2)
    raise ValueError(impl)


def _softcap_mod(score, b, h, q_idx, kv_idx):
    return SOFTCAP * torch.tanh(score / SOFTCAP)


@functools.lru_cache(maxsize=None)
def _flex(L, w, device):
    """(compiled flex_attention, block mask, softcap score_mod) for one (L, w): one
    ``torch.compile`` object for the whole run, so fwd and fwd+bwd at one shape share the
    forward's compile (it recompiles per length and per score_mod, as it must)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise RuntimeError(f"FlexAttention unavailable: {exc}")

    def window_mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < w)

    return _flex_compiled(), create_block_mask(window_mask, None, None, L, L, device=device), _softcap_mod


@functools.lru_cache(maxsize=None)
def _flex_compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _cudnn_fn(cfg, q, k, v, do):
    """cuDNN's SDPA with a causal band of ``w`` keys through the ``nvidia-cudnn-frontend``
    graph API: forward (stats kept for training) and, for fwd+bwd, the backward graph.

    The band is cuDNN's ``diagonal_band_left_bound = w`` with ``right_bound = 0`` (top-left
    aligned, L_q = L_k): key j is kept for query i when i - w < j <= i, the same w keys
    including self as ``window_size=w, causal=True`` here.
    """
    try:
        import cudnn
    except ImportError as exc:
        raise RuntimeError(f"nvidia-cudnn-frontend is not importable ({exc}); pip install nvidia-cudnn-frontend")
    if not q.is_cuda:
        raise RuntimeError("cuDNN runs on CUDA tensors only")
    L, w = cfg["seqlen"], resolve(cfg["window"], cfg["seqlen"])
    b, _, h, d = q.shape
    dt = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[q.dtype]
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    train = cfg["mode"] != "fwd"
    # cuDNN's dims are (b, h, s, d); the (b, s, h, d) tensors are passed as such views
    qt, kt, vt = (x.detach().transpose(1, 2) for x in (q, k, v))
    o = torch.empty_like(q).transpose(1, 2)
    stats = torch.empty(b, h, L, 1, dtype=torch.float32, device=q.device)
    band = dict(diagonal_band_left_bound=w, diagonal_band_right_bound=0,
                diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT)

    def graph():
        return cudnn.pygraph(io_data_type=dt, intermediate_data_type=cudnn.data_type.FLOAT,
                             compute_data_type=cudnn.data_type.FLOAT, handle=handle)

    def finish(g):
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        return torch.empty(g.get_workspace_size(), device=q.device, dtype=torch.uint8)

    fg = graph()
    tq, tk, tv = (fg.tensor_like(x) for x in (qt, kt, vt))
    to, ts = fg.sdpa(name="sdpa", q=tq, k=tk, v=tv, generate_stats=train, attn_scale=d ** -0.5, **band)
    to.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride()))
    if train:
        ts.set_output(True).set_data_type(cudnn.data_type.FLOAT)
    fws = finish(fg)
    fpack = {tq: qt, tk: kt, tv: vt, to: o}
    if train:
        fpack[ts] = stats

    def fwd():
        fg.execute(fpack, fws, handle=handle)
        return o

    if not train:
        return fwd
    bg = graph()
    dot = do.transpose(1, 2)
    dq, dk, dv = (torch.empty_like(x) for x in (qt, kt, vt))
    bq, bk, bv, bo, bdo, bs = (bg.tensor_like(x) for x in (qt, kt, vt, o, dot, stats))
    gq, gk, gv = bg.sdpa_backward(name="sdpa_backward", q=bq, k=bk, v=bv, o=bo, dO=bdo, stats=bs,
                                  attn_scale=d ** -0.5, **band)
    for t, ref in ((gq, dq), (gk, dk), (gv, dv)):
        t.set_output(True).set_dim(list(ref.shape)).set_stride(list(ref.stride()))
    bws = finish(bg)
    bpack = {bq: qt, bk: kt, bv: vt, bo: o, bdo: dot, bs: stats, gq: dq, gk: dk, gv: dv}

    def fwd_bwd():
        fg.execute(fpack, fws, handle=handle)
        bg.execute(bpack, bws, handle=handle)
        return dq, dk, dv

    return fwd_bwd


def make_fn(impl, cfg, q, k, v, do):
    if impl == "cudnn" and cfg.get("mod") is not None:
        raise RuntimeError(f"cudnn has no {cfg['mod']} here")
    if impl == "cudnn":
        return _cudnn_fn(cfg, q, k, v, do)
    call = make_call(impl, cfg, q, k, v)
    if cfg["mode"] == "fwd":
        return call
    return lambda: torch.autograd.grad(call(), (q, k, v), do)


def providers(device):
    status = backend_status()
    names = ["sdpa_causal", "sdpa_band_mask", "flex"] + (["cudnn"] if device == "cuda" else [])
    for backend in ("triton", "cuda", "torch"):
        st = status[backend]
        if backend == "torch" or (st.available and device == "cuda"):
            names.append("sft_" + backend)
    return names


# ----------------------------------------------------------------------------- sweeps
HEADLINE = dict(batch=2, heads=16, head_dim=128, dtype="bfloat16", window=4096)


def headline(device):
    """The target shapes (issue 3): GPU bf16 d128 causal window 4096 at L = 16k, 32k."""
    if device != "cuda":
        raise SystemExit("bench_attention: --headline is a GPU run; use --toy on CPU")
    for L in (16384, 32768):
        for mode in ("fwd", "fwd+bwd"):
            yield dict(HEADLINE, seqlen=L, mode=mode)
    for mod in ("softcap", "sinks"):  # issue 13: the modifiers at the headline shape
        for mode in ("fwd", "fwd+bwd"):
            yield dict(HEADLINE, seqlen=16384, mode=mode, mod=mod)


def toy(device):
    """Tiny shapes: every code path of the benchmark (records, tables, plots) in seconds."""
    for L in (64, 128):
        for mode in ("fwd", "fwd+bwd"):
            yield dict(batch=1, heads=2, head_dim=16, dtype="float32" if device == "cpu" else "bfloat16",
                       seqlen=L, window=32, mode=mode)
    for mod in ("softcap", "sinks"):
        yield dict(batch=1, heads=2, head_dim=16, dtype="float32" if device == "cpu" else "bfloat16",
                   seqlen=128, window=32, mode="fwd+bwd", mod=mod)


def sweep(device, quick):
    if device == "cuda":
        base = dict(batch=2, heads=16, dtype="bfloat16")
        lengths = [4096, 16384, 32768] if quick else [1024, 2048, 4096, 8192, 16384, 32768]
        windows = [4096, "sqrt"] if quick else [256, 1024, 4096, "sqrt"]
        dims = [128] if quick else [64, 128]
        for d in dims:
            for L in lengths:
                for w in windows:
                    for mode in ("fwd", "fwd+bwd"):
                        yield dict(base, seqlen=L, window=w, head_dim=d, mode=mode)
        return
    base = dict(batch=1, heads=8, head_dim=64, dtype="float32")
    lengths = [4096, 16384] if quick else [1024, 4096, 16384]
    windows = [256, "sqrt"] if quick else [256, 1024, 4096, "sqrt"]
    for L in lengths:
        for w in windows:
            yield dict(base, seqlen=L, window=w, mode="fwd+bwd")
    yield dict(base, seqlen=16384, window=256, mode="fwd")
    for mod in ("softcap", "sinks"):
        yield dict(base, seqlen=16384, window=256, mode="fwd+bwd", mod=mod)


def skip_on_cpu(impl, cfg):
    """Baselines too slow to repeat on 2 CPU cores outside the target shape."""
    if impl == "sdpa_band_mask" and cfg["window"] != 256:
        return "dense band mask timed at window 256 only on CPU (its cost does not depend on the window)"
    if impl == "flex":
        return "FlexAttention on CPU compiles a C++ kernel per shape through Inductor; timed on GPU only"
    return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (the README's demo)")
    parser.add_argument("--headline", action="store_true", help="the target shapes only (GPU)")
    parser.add_argument("--toy", action="store_true", help="tiny shapes (plumbing check, CPU)")
    parser.add_argument("--providers", default=None, help="comma-separated subset of the providers")
    parser.add_argument("--out", default=None, help="result folder (default: see common.result_dir)")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory child processes")
    parser.add_argument("--no-competing", action="store_true",
                        help="CPU: skip the target shape's second run beside a CPU-bound process")
    parser.add_argument("--measure-memory", nargs=1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run(args):
    """Run the sweep; returns the records (a child memory probe returns [])."""
    if args.measure_memory:  # child process for CPU peak memory
        impl, cfg = json.loads(args.measure_memory[0])

        def make(c=cfg):
            q, k, v, do = setup(c, "cpu")
            return make_fn(impl, c, q, k, v, do)

        common.child_peak_main(make, warm=lambda: make(dict(cfg, seqlen=64, window=8)))
        return []

    device = args.device
    env = common.environment(device)
    impls = providers(device)
    if args.providers:
        wanted = args.providers.split(",")
        impls = [i for i in impls if i in wanted] + [i for i in wanted if i not in impls and i == "cudnn"]
    records, baseline_ms = [], {}
    if args.headline:
        configs = list(headline(device))
    elif args.toy:
        configs = list(toy(device))
    else:
        configs = list(sweep(device, args.quick))
    for n, cfg in enumerate(configs):
        q, k, v, do = setup(cfg, device)
        for impl in impls:
            shape = dict(cfg)
            rec = dict(op=OP, impl=impl, device=device, dtype=cfg["dtype"], shape=shape, env=env)
            base_key = (cfg["seqlen"], cfg["head_dim"], cfg["mode"])
            reason = skip_on_cpu(impl, cfg) if device == "cpu" else None
            if impl == "sdpa_causal" and base_key in baseline_ms and cfg.get("mod") is None:
                continue  # window-independent: measured once per (L, D, mode)
            if reason is None:
                try:
                    fn = make_fn(impl, cfg, q, k, v, do)
                    rec["ms"] = common.time_ms(fn, device)
                    # CPU: filled for the target shape by measure_cpu_memory (child processes)
                    rec["peak_mem_bytes"] = common.cuda_peak_bytes(fn) if device == "cuda" else None
                except Exception as exc:  # noqa: BLE001 - a provider that cannot run is recorded as skipped
                    reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            if reason is not None:
                rec["skipped"] = reason
                records.append(rec)
                common.append_partial(args.out, "attention", rec)
                if args.out:
                    write_markdown(args.out, records, progress=f"partial: {n + 1} of {len(configs)} configs")
                continue
            if impl == "sdpa_causal":
                baseline_ms[base_key] = rec["ms"]
            fl = flops(cfg, impl)
            rec["flops"] = fl
            rec["tflops"] = fl / rec["ms"] / 1e9
            rec["gbps"] = io_bytes(cfg) / rec["ms"] / 1e6
            rec["flops_basis"] = "causal" if impl == "sdpa_causal" else "band"
            records.append(rec)
            common.append_partial(args.out, "attention", rec)
            if args.out:
                write_markdown(args.out, records, progress=f"partial: {n + 1} of {len(configs)} configs")
            common.progress(f"[{n + 1}/{len(configs)}] L={cfg['seqlen']} w={cfg['window']} D={cfg['head_dim']} "
                            f"{cfg['mode']:8s} {cfg.get('mod') or '':7s} {impl:15s} {rec['ms']:9.2f} ms  "
                            f"{rec['tflops']:7.2f} TFLOP/s")
        del q, k, v, do
    for rec in records:
        base = baseline_ms.get((rec["shape"]["seqlen"], rec["shape"]["head_dim"], rec["shape"]["mode"]))
        if "ms" in rec and base:
            rec["speedup_vs"] = {"baseline": BASELINE, "ratio": base / rec["ms"]}
    if device == "cpu":
        load = os.getloadavg()  # the machine's own load besides this run (1, 5, 15 min)
        for rec in records:
            rec["condition"], rec["loadavg"] = "idle", load
        if not (args.no_competing or args.toy):  # the competing run is the full CPU target shape
            records += measure_cpu_competing(env)
    if device == "cpu" and not args.no_memory:
        measure_cpu_memory(records)
    return records


def measure_cpu_memory(records):
    """Peak memory of the CPU target shape (fresh child process per provider)."""
    target = CPU_TARGET
    for rec in records:
        if rec["shape"] == target and "ms" in rec and rec.get("condition") != "competing":
            common.progress(f"peak memory: {rec['impl']} at the target shape (child process)")
            rec["peak_mem_bytes"] = common.cpu_peak_bytes(__spec__.name, [json.dumps([rec["impl"], target])])


def summarize(records):
    rows = []
    for r in records:
        s = r["shape"]
        competing = r.get("condition") == "competing"
        rows.append(dict(
            L=s["seqlen"], window=s["window"], D=s["head_dim"], mode=s["mode"], mod=s.get("mod") or "",
            impl=r["impl"] + (" (beside a CPU-bound process)" if competing else ""),
            ms=r.get("ms"), tflops=r.get("tflops"),
            speedup=(r.get("speedup_vs") or {}).get("ratio"),
            mem_mb=(r["peak_mem_bytes"] / 2**20) if r.get("peak_mem_bytes") is not None else None,
        ))
    f = lambda x: "" if x is None else f"{x:.2f}"  # noqa: E731
    return common.markdown_table(rows, ["L", "window", "D", "mode", "mod", "impl", "ms", "tflops", "speedup", "mem_mb"],
                                 {"ms": f, "tflops": f, "speedup": f, "mem_mb": lambda x: "" if x is None else f"{x:.0f}"})


def plot(records, path_prefix):
    plt = common.pyplot()
    if plt is None:
        return
    groups = {}
    for r in records:
        if "ms" not in r or r.get("condition") == "competing":
            continue
        s = r["shape"]
        if s.get("mod"):
            continue  # one length per modifier: in the table, not a curve
        key = (s["window"], s["head_dim"], s["mode"])
        groups.setdefault(key, {}).setdefault(r["impl"], []).append((s["seqlen"], r["ms"], r["tflops"]))
    paths = []
    for (w, d, mode), by_impl in groups.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for impl, pts in sorted(by_impl.items()):
            pts.sort()
            xs = [p[0] for p in pts]
            axes[0].plot(xs, [p[1] for p in pts], marker="o", label=impl)
            axes[1].plot(xs, [p[2] for p in pts], marker="o", label=impl)
        for ax, ylabel in zip(axes, ("ms (median)", "useful TFLOP/s")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        axes[0].set_yscale("log")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"sliding-window attention, window={w}, head_dim={d}, {mode}")
        fig.tight_layout()
        path = f"{path_prefix}_w{w}_d{d}_{mode.replace('+', '')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


CPU_TARGET = dict(batch=1, heads=8, head_dim=64, dtype="float32", seqlen=16384, window=256, mode="fwd+bwd")
# Timed a second time at CPU_TARGET beside a CPU-bound process (issue 16: many small parallel
# regions stall when one thread of the team is descheduled; one large op only slows down).
CPU_COMPETING_IMPLS = ("sdpa_causal", "sft_torch")
_BUSY_LOOP = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nprint('ready', flush=True)\nwhile True:\n    pass\n"


@contextlib.contextmanager
def competing_process():
    """A CPU-bound process beside the benchmark: a pure-Python busy loop pinned to one core
    (the last one this process may use), started before and killed after the block. It runs
    in its own session, as another program would (with autogroup scheduling a session's
    processes share one group's CPU share)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    proc = subprocess.Popen([sys.executable, "-c", _BUSY_LOOP, str(cpus[-1])], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the competing process did not start")
        time.sleep(0.2)  # let it reach its loop
        yield {"pid": proc.pid, "cpu": cpus[-1], "cpus": len(cpus)}
    finally:
        proc.kill()
        proc.wait()


def measure_cpu_competing(env):
    """CPU_TARGET timed again for CPU_COMPETING_IMPLS beside :func:`competing_process`;
    records with ``condition="competing"`` and their ratio to SDPA timed in the same condition."""
    cfg = dict(CPU_TARGET)
    q, k, v, do = setup(cfg, "cpu")
    records = []
    with competing_process() as comp:
        for impl in CPU_COMPETING_IMPLS:
            load = os.getloadavg()
            rec = dict(loadavg=load, op=OP, impl=impl, device="cpu", dtype=cfg["dtype"], shape=dict(cfg), env=env,
                       condition="competing", competitor=f"pure-Python busy loop pinned to CPU {comp['cpu']} "
                                                         f"(of {comp['cpus']})", peak_mem_bytes=None)
            rec["ms"] = common.time_ms(make_fn(impl, cfg, q, k, v, do), "cpu")
            rec["flops"] = flops(cfg, impl)
            rec["tflops"] = rec["flops"] / rec["ms"] / 1e9
            rec["gbps"] = io_bytes(cfg) / rec["ms"] / 1e6
            rec["flops_basis"] = "causal" if impl == "sdpa_causal" else "band"
            records.append(rec)
            common.progress(f"[competing] L={cfg['seqlen']} w={cfg['window']} {cfg['mode']:8s} {impl:15s} "
                            f"{rec['ms']:9.2f} ms")
    base = next(r["ms"] for r in records if r["impl"] == BASELINE)
    for rec in records:
        rec["speedup_vs"] = {"baseline": BASELINE, "ratio": base / rec["ms"]}
    return records


def targets(records, device):
    """Issue 3's targets, checked from the records of this run."""
    def find(impl, condition="idle", **shape):
        for r in records:
            if (r["impl"] == impl and "ms" in r and r.get("condition", "idle") == condition
                    and r["shape"].get("mod") == shape.get("mod")
                    and all(r["shape"].get(k) == v for k, v in shape.items())):
                return r
        return None

    out = []
    if device == "cpu":
        mine, dense, band = (find(i, **CPU_TARGET) for i in ("sft_torch", "sdpa_causal", "sdpa_band_mask"))
        if dense is None:  # sdpa_causal is recorded once per (L, D, mode)
            dense = find("sdpa_causal", seqlen=16384, head_dim=64, mode="fwd+bwd")
        ratio = dense["ms"] / mine["ms"] if mine and dense else None
        out.append(common.target("CPU L=16k w=256 fp32 fwd+bwd: sft_torch speedup over dense causal SDPA", ratio, 4.0))
        mine_c, dense_c = (find(i, "competing", **CPU_TARGET) for i in ("sft_torch", "sdpa_causal"))
        ratio = dense_c["ms"] / mine_c["ms"] if mine_c and dense_c else None
        out.append(common.target("CPU L=16k w=256 fp32 fwd+bwd beside a CPU-bound process: sft_torch speedup over "
                                 "dense causal SDPA (same condition)", ratio, 4.0))
        pm, pb = (mine or {}).get("peak_mem_bytes"), (band or {}).get("peak_mem_bytes")
        ratio = pb / pm if pm and pb else None
        out.append(common.target("CPU L=16k w=256: SDPA band-mask peak memory / sft_torch peak memory", ratio, 8.0))
        return out
    for L in (16384, 32768):
        for mode in ("fwd", "fwd+bwd"):
            shape = dict(batch=2, heads=16, head_dim=128, window=4096, seqlen=L, mode=mode)
            mine, flex = find("sft_triton", **shape), find("flex", **shape)
            dense = find("sdpa_causal", seqlen=L, head_dim=128, mode=mode)
            ratio = flex["ms"] / mine["ms"] if mine and flex else None
            out.append(common.target(f"H200 L={L} w=4096 {mode}: FlexAttention time / sft_triton time", ratio, 1.0))
            ratio = mine["tflops"] / dense["tflops"] if mine and dense else None
            out.append(common.target(f"H200 L={L} w=4096 {mode}: sft_triton useful TFLOP/s / dense causal SDPA's",
                                     ratio, 0.8))
    return out


def write_markdown(out_dir, records, tg=None, progress=""):
    """``attention.md``: the table of the measured records, the targets, the skipped
    providers. Rewritten after every record while the sweep runs (``progress`` says how
    far it got), so a run cut off by a time limit leaves its table; returns the table."""
    env = records[0]["env"]
    measured = [r for r in records if "ms" in r]
    skipped = [r for r in records if "skipped" in r]
    table = summarize(measured)
    with open(os.path.join(out_dir, "attention.md"), "w") as f:
        f.write(f"# sliding-window attention, {env['device_name']}, commit {env['commit']}, {env['date']}"
                f"{' (' + progress + ')' if progress else ''}\n\n")
        f.write(f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['cpu_threads']} CPU threads. "
                "speedup = dense causal SDPA time / this time; tflops counts useful FLOPs only.\n\n")
        f.write(table + "\n")
        if tg is not None:
            f.write("\n## Targets\n\n" + "".join(f"- {common.target_line(t)}\n" for t in tg))
        if skipped:
            f.write("\n## Skipped\n\n" + "".join(
                f"- {s['impl']} L={s['shape']['seqlen']} w={s['shape']['window']} {s['shape']['mode']}"
                f"{' ' + s['shape']['mod'] if s['shape'].get('mod') else ''}: {s['skipped']}\n"
                for s in skipped))
    return table


def main(argv=None):
    args = parse_args(argv)
    records = run(args)
    if not records:
        return 0
    env = records[0]["env"]
    out_dir = common.result_dir(args.out, args.device, env)
    tg = targets(records, args.device)
    measured = [r for r in records if "ms" in r]
    skipped = [dict(impl=r["impl"], shape=r["shape"], reason=r["skipped"]) for r in records if "skipped" in r]
    common.write_json(dict(env=env, records=measured, skipped=skipped, targets=tg),
                      os.path.join(out_dir, "attention.json"))
    table = write_markdown(out_dir, records, tg)
    plot(measured, os.path.join(out_dir, "attention"))
    common.print_report(table, tg, f"{out_dir}/attention.json, attention.md and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
