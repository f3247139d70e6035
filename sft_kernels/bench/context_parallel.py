"""Context parallelism for sliding-window attention: halo exchange vs Ulysses vs all-gather of K/V.

Three ways to run one attention layer (forward + backward) over a sequence of L tokens
split into P shards of n = L/P consecutive tokens, one per rank:

  halo          ``sft_kernels.context_parallel_attention``: each rank receives the ``W - 1``
                keys/values before its shard (from as many ranks as the window spans) and
                returns their dK/dV in the backward.
  ulysses       DeepSpeed-Ulysses' pattern, modelled with ``all_to_all_single`` calls of the
                right sizes: all-to-all Q, K, V (sequence -> heads), the whole sequence with
                H/P heads per rank, all-to-all O back; the backward does the reverse
                all-to-alls of dO, dQ, dK, dV. Needs ``heads % P == 0``.
  allgather_kv  all-gather K and V, each rank attends its queries to the gathered keys,
                reduce-scatter dK/dV in the backward (what ring attention moves in total).
  local_only    the shard alone, no communication and no halo: the compute floor (not a
                correct result for the shard's first W - 1 queries).

Bytes sent per rank per layer step (forward + backward; ``e`` bytes per element):

  halo          (rows sent + rows returned) * 2 * heads_kv * head_dim * e, from the halo
                plan; an interior rank sends ``W - 1`` rows forward and returns ``W - 1``:
                ``4 (W - 1) heads_kv head_dim e`` once n >= W - 1, independent of L
                (fewer at the sequence ends, fewer when n < W - 1); plus the consistency
                all-gather of 10 float64 (80 B to each other rank).
  ulysses       2 * (2 heads + 2 heads_kv) * n * head_dim * e * (P - 1) / P (8 all-to-alls,
                each keeping 1/P of its tensor at home).
  allgather_kv  4 * heads_kv * n * head_dim * e * (P - 1) (all-gather of K and V; the
                reduce-scatter of dK/dV sends the same amount).

Packed rows (``batch == 1``): the same length packed from sequences of W/4 .. 4W tokens (seeded),
as TRL packing / ``DataCollatorWithFlattening`` feed it:

  halo_packed     ``sft_kernels.parallel.context_parallel_packed_attention``: each sequence that
                  crosses a shard boundary sends only its own keys, as far as its window reaches
                  (``packed_halo_bytes``); a sequence inside a shard sends nothing.
  ulysses_packed  the all-to-alls above, the whole row's packed attention (cu_seqlens) per head
                  group: the same bytes as one sequence.
  ALST            DeepSpeed's Ulysses for HF models with this backend as its core: modelled
                  (``alst_bytes``, equal to the bytes counted on DeepSpeed's calls in
                  ``tests/test_alst.py``), not run here (it needs a model and DeepSpeed).

The measured bytes are counted on the calls the run makes (``batch_isend_irecv`` tensors,
``all_to_all_single`` / ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` inputs times
the fraction each sends away) and must equal the model on every rank; the analytic table
at the headline shape (P = 8..64, L = 128k..1M, W = 4096, 32 heads, head_dim 128, bf16;
MHA and GQA with 8 KV heads) uses the same model. Step time: median over repeats of the
slowest rank, wall clock, gloo on CPU (P processes share the machine's cores; the repeats
of the four impls are interleaved so that load from elsewhere hits them alike).

    python -m sft_kernels.bench.context_parallel [--quick] [--worlds 2 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from . import common  # noqa: E402

OP = "context_parallel_attention"
IMPLS = ("halo", "ulysses", "allgather_kv", "local_only")
PACKED_IMPLS = ("halo_packed", "ulysses_packed")
BASELINE = "ulysses"
CPU_SHAPE = dict(batch=1, heads=8, kv_heads=4, head_dim=64, window=256, dtype="float32")  # GQA 2:1
LENGTHS = {False: [264, 512, 1024, 2048, 4096, 8192, 16384], True: [264, 2048]}  # from just above W
HEADLINE = dict(window=4096, heads=32, head_dim=128, dtype="bfloat16", worlds=[8, 16, 32, 64],
                lengths=[131072, 262144, 524288, 1048576], kv_heads=[32, 8])
META_BYTES = 10 * 8  # the consistency all-gather: 10 float64 to each other rank
ELEM = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


# ----------------------------------------------------------------------------- the model
def model_bytes(impl: str, world: int, seqlen: int, window: int, heads: int, kv_heads: int, head_dim: int,
                elem: int):
    """Bytes each rank sends per layer step (forward + backward), causal window of ``window`` keys.

    Returns a list, one value per rank.
    """
    from sft_kernels.parallel import halo_plan

    n = seqlen // world
    row = 2 * kv_heads * head_dim * elem  # one key row: K and V (or dK and dV)
    if impl == "halo":
        left = min(window, seqlen) - 1
        out = []
        for r in range(world):
            plan = halo_plan(r, world, n, left, 0)
            out.append((plan.rows_sent() + plan.rows_returned()) * row + META_BYTES * (world - 1))
        return out
    if impl == "ulysses":
        return [2 * (2 * heads + 2 * kv_heads) * n * head_dim * elem * (world - 1) // world] * world
    if impl == "allgather_kv":
        return [2 * row * n * (world - 1)] * world
    return [0] * world


def alst_bytes(world: int, seqlen: int, heads: int, kv_heads: int, head_dim: int, elem: int, batch: int = 1,
               padding_gather: bool = True) -> int:
    """Bytes each rank sends per layer step (forward + backward) under DeepSpeed's ALST
    (``UlyssesSPAttentionHF``, DeepSpeed 0.19.8) with this package's core through
    :func:`sft_kernels.parallel.alst.register_alst`, ``batch`` rows of ``seqlen`` tokens:

    - q, k, v to heads and the output back: ``2 (2 heads + 2 kv) n head_dim e (P - 1) / P``
      with ``kv = heads_kv`` replicated up to ``P`` when ``heads_kv < P`` (ALST repeats K/V heads
      before the all-to-all);
    - its all-gather of the int64 position_ids, every layer: ``8 n (P - 1)``;
    - register_alst's all-gather of the shard's padding (one byte a token), every layer: ``n (P - 1)``.

    Counted on the calls in ``tests/test_alst.py``. Independent of the window: ALST moves every
    head of every token whatever the window, and packed rows move the same bytes as one sequence.
    """
    n = seqlen // world
    kv = kv_heads * max(1, world // kv_heads)
    heads_part = 2 * (2 * heads + 2 * kv) * n * head_dim * elem * (world - 1) // world
    return batch * (heads_part + 8 * n * (world - 1) + (n * (world - 1) if padding_gather else 0))


def packed_halo_bytes(world: int, cu_seqlens, window, kv_heads: int, head_dim: int, elem: int) -> list:
    """Bytes each rank sends per layer step (forward + backward) for one packed row through
    :func:`sft_kernels.parallel.context_parallel_packed_attention`: the rows its plan sends (each
    sequence's own keys before a boundary, as far as its window reaches) as K and V forward, and
    the dK/dV of the rows it received back to their owners; plus the consistency all-gather of 7
    float64. Counted on the calls in ``tests/test_packed_context_parallel.py``."""
    from sft_kernels.parallel.packed import packed_halo_plan

    row = 2 * kv_heads * head_dim * elem
    out = []
    for r in range(world):
        plan = packed_halo_plan(r, world, cu_seqlens, window)
        out.append((plan.rows_sent() + plan.rows_received()) * row + 7 * 8 * (world - 1))
    return out


def packed_row(seqlen: int, window: int, seed: int) -> list:
    """``cu_seqlens`` of one row of ``seqlen`` tokens packed from sequences of ``window // 4`` to
    ``4 window`` tokens (the last one cut at the row's end), drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = max(1, window // 4), 4 * window
    cu = [0]
    while cu[-1] < seqlen:
        cu.append(min(seqlen, cu[-1] + int(torch.randint(lo, hi + 1, (1,), generator=g))))
    return cu


def ulysses_possible(world: int, heads: int, kv_heads: int) -> bool:
    return heads % world == 0 and kv_heads % world == 0


def flops(shape) -> float:
    """Useful attention FLOPs of the whole sequence, forward + backward (3.5 x forward)."""
    from sft_kernels.window import keys_seen

    L, w = shape["seqlen"], shape["window"]
    return 3.5 * 4 * keys_seen(L, L, min(w, L) - 1, 0) * shape["head_dim"] * shape["heads"] * shape["batch"]


# ----------------------------------------------------------------------------- one rank
class _Counter:
    """Bytes this rank hands to the network, by wrapping the torch.distributed calls."""

    def __init__(self, dist):
        self.bytes = 0
        self.world = dist.get_world_size()
        orig = {name: getattr(dist, name) for name in
                ("batch_isend_irecv", "all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor",
                 "all_gather")}

        def nbytes(t):
            return t.numel() * t.element_size()

        def batch_isend_irecv(ops):
            self.bytes += sum(nbytes(op.tensor) for op in ops if op.op is dist.isend)
            return orig["batch_isend_irecv"](ops)

        def counted(name, split):
            """``name``, counting this rank's input once per other rank, or (``split``) the
            share of it each other rank gets."""
            def call(output, input, *a, **k):
                sent = nbytes(input) * (self.world - 1)
                self.bytes += sent // self.world if split else sent
                return orig[name](output, input, *a, **k)

            return call

        for name, fn in dict(batch_isend_irecv=batch_isend_irecv,
                             all_to_all_single=counted("all_to_all_single", True),
                             all_gather_into_tensor=counted("all_gather_into_tensor", False),
                             reduce_scatter_tensor=counted("reduce_scatter_tensor", True),
                             all_gather=counted("all_gather", False)).items():
            setattr(dist, name, fn)
        self._orig = orig
        self._dist = dist

    def take(self) -> int:
        b, self.bytes = self.bytes, 0
        return b


def _seq_to_heads(x, world, dist):
    """(B, n, H, D) sequence shard -> (B, P n, H/P, D) head shard (one all-to-all)."""
    b, n, h, d = x.shape
    send = x.reshape(b, n, world, h // world, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)  # recv[p] = rank p's tokens, my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, world * n, h // world, d)


def _heads_to_seq(x, world, dist):
    """(B, P n, H/P, D) -> (B, n, H, D): the inverse all-to-all."""
    b, L, hp, d = x.shape
    n = L // world
    send = x.reshape(b, world, n, hp, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)  # recv[p] = my tokens, rank p's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, n, world * hp, d)


class _AllToAll(torch.autograd.Function):
    """Ulysses' all-to-all: sequence shards to head shards (``to_heads``) or back; the
    backward runs the other direction."""

    @staticmethod
    def forward(ctx, x, world, dist, to_heads):
        ctx.world, ctx.dist, ctx.to_heads = world, dist, to_heads
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, world, dist)

    @staticmethod
    def backward(ctx, g):
        back = _heads_to_seq if ctx.to_heads else _seq_to_heads
        return back(g.contiguous(), ctx.world, ctx.dist), None, None, None


class _GatherKV(torch.autograd.Function):
    """All-gather along the sequence forward, reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, world, dist):
        ctx.world, ctx.dist = world, dist
        b, n = x.shape[:2]
        out = x.new_empty((world * b,) + tuple(x.shape[1:]))  # rank p's shard at rows [p b, (p+1) b)
        dist.all_gather_into_tensor(out, x.contiguous())
        return out.view(world, b, *x.shape[1:]).permute(1, 0, 2, 3, 4).reshape(b, world * n, *x.shape[2:])

    @staticmethod
    def backward(ctx, g):
        world, dist = ctx.world, ctx.dist
        b, L = g.shape[:2]
        send = g.reshape(b, world, L // world, *g.shape[2:]).permute(1, 0, 2, 3, 4).reshape(world * b, L // world,
                                                                                         *g.shape[2:])
        out = g.new_empty((b,) + tuple(send.shape[1:]))
        dist.reduce_scatter_tensor(out, send.contiguous())
        return out, None, None


def worker(args) -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    from sft_kernels import context_parallel_attention, sliding_window_attention
    from sft_kernels.parallel import context_parallel_packed_attention

    counter = _Counter(dist)
    sh = dict(CPU_SHAPE, **json.loads(args.shape or "{}"))
    dtype = getattr(torch, sh["dtype"])
    w = sh["window"]
    records, packed = [], []
    for L in args.lengths:
        n = L // world
        g = torch.Generator().manual_seed(L)
        q = torch.randn(sh["batch"], n, sh["heads"], sh["head_dim"], generator=g).to(dtype).requires_grad_(True)
        k = torch.randn(sh["batch"], n, sh["kv_heads"], sh["head_dim"], generator=g).to(dtype).requires_grad_(True)
        v = torch.randn(sh["batch"], n, sh["kv_heads"], sh["head_dim"], generator=g).to(dtype).requires_grad_(True)
        do = torch.randn(sh["batch"], n, sh["heads"], sh["head_dim"], generator=g).to(dtype)

        def run(impl):
            if impl == "halo":
                return context_parallel_attention(q, k, v, window_size=w, causal=True, backend="torch")
            if impl == "ulysses":
                qh, kh, vh = (_AllToAll.apply(t, world, dist, True) for t in (q, k, v))
                out = sliding_window_attention(qh, kh, vh, window_size=w, causal=True, backend="torch")
                return _AllToAll.apply(out, world, dist, False)
            if impl == "allgather_kv":
                kf, vf = (_GatherKV.apply(t, world, dist) for t in (k, v))
                end = (rank + 1) * n  # keys up to this shard's end: bottom-right aligned with its queries
                return sliding_window_attention(q, kf[:, :end], vf[:, :end], window_size=w, causal=True, backend="torch")
            return sliding_window_attention(q, k, v, window_size=w, causal=True, backend="torch")

        def measure(impls, run, model, shape, into):
            """One counted warm-up step of each impl, then interleaved timed repeats (load from
            other processes on the machine hits every impl alike); a record each into ``into``."""
            def step(impl):
                out = run(impl)
                out.backward(do)
                q.grad = k.grad = v.grad = None
                return out.detach()

            outs, sent, times = {}, {}, {impl: [] for impl in impls}
            for impl in impls:
                counter.take()
                outs[impl] = step(impl)  # warm-up, and the bytes of one layer step
                sent[impl] = counter.take()
            for _ in range(args.repeats):
                for impl in impls:
                    dist.barrier()
                    t0 = time.perf_counter()
                    step(impl)
                    times[impl].append(time.perf_counter() - t0)
            counter.take()
            for impl in impls:
                ms = torch.tensor([statistics.median(times[impl]) * 1e3])
                dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the group waits for its slowest rank
                per_rank = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
                dist.all_gather(per_rank, torch.tensor([sent[impl]]))
                counter.take()
                per_rank = [int(x) for x in per_rank]
                into.append(dict(op=OP, impl=impl, device="cpu", dtype=sh["dtype"], shape=shape, ms=float(ms),
                                 bytes_per_rank=per_rank, bytes_model=model(impl), bytes_max=max(per_rank),
                                 # flops(): one sequence's band; a packed row's sequences see fewer keys
                                 tflops=None if shape.get("packed") else flops(shape) / (float(ms) * 1e-3) / 1e12,
                                 gbps=None, peak_mem_bytes=None))
                if rank == 0:
                    common.progress(f"P={world} L={L} {impl}: {float(ms):.1f} ms, {max(per_rank)} B/rank")
            return outs

        def exact_alike(outs, impls, ref, what):
            for impl in impls:
                err = float((outs[impl] - outs[ref]).norm() / outs[impl].norm())
                if err > 1e-5:
                    raise AssertionError(f"P={world} L={L}{what}: {impl} and {ref} differ by {err:.2e}")

        heads, kv_heads, d, e = sh["heads"], sh["kv_heads"], sh["head_dim"], ELEM[sh["dtype"]]
        shape = dict(batch=sh["batch"], seqlen=L, world=world, shard=n, window=w, heads=heads, kv_heads=kv_heads,
                     head_dim=d, causal=True)
        outs = measure(IMPLS, run, lambda impl: model_bytes(impl, world, L, w, heads, kv_heads, d, e), shape, records)
        # the three exact methods give one answer (local_only is not a correct result)
        exact_alike(outs, ("ulysses", "allgather_kv"), "halo", "")
        if sh["batch"] != 1:
            continue
        cu = packed_row(L, w, seed=L)
        cu_t = torch.tensor(cu, dtype=torch.int32)
        longest = max(b - a for a, b in zip(cu, cu[1:]))

        def run_packed(impl):
            if impl == "halo_packed":
                return context_parallel_packed_attention(q, k, v, cu, w, causal=True, backend="torch")
            qh, kh, vh = (_AllToAll.apply(t, world, dist, True)[0] for t in (q, k, v))  # (L, H/P, D), the row
            out = sliding_window_attention(qh, kh, vh, window_size=w, causal=True, backend="torch", cu_seqlens_q=cu_t,
                                           cu_seqlens_k=cu_t, max_seqlen_q=longest, max_seqlen_k=longest)
            return _AllToAll.apply(out[None], world, dist, False)

        def packed_model(impl):
            if impl == "halo_packed":
                return packed_halo_bytes(world, cu, w, kv_heads, d, e)
            return model_bytes("ulysses", world, L, w, heads, kv_heads, d, e)

        pshape = dict(shape, packed=True, sequences=len(cu) - 1, cu_seqlens=cu,
                      alst_bytes_model=alst_bytes(world, L, heads, kv_heads, d, e))
        outs = measure(PACKED_IMPLS, run_packed, packed_model, pshape, packed)
        exact_alike(outs, ("ulysses_packed",), "halo_packed", " packed")
    if rank == 0:
        with open(args.result, "w") as f:
            json.dump(dict(records=records, packed=packed), f)
    dist.barrier()
    dist.destroy_process_group()
    # Skip the interpreter's teardown: about 1 run in 30 on the loaded CI machine, gloo's exit-time
    # destructors abort a rank ("terminate called without an active exception") after all work is
    # done and written. Everything above has finished and been flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------- launcher
def launch(world: int, lengths, repeats: int, tmp: str, shape: dict) -> list:
    store = os.path.join(tmp, f"store{world}")
    result = os.path.join(tmp, f"result{world}.json")
    env = dict(os.environ, WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", __spec__.name, "--worker", "--store", store, "--result", result,
           "--lengths", *map(str, lengths), "--repeats", str(repeats), "--shape", json.dumps(shape)]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r))) for r in range(world)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"a rank of the P={world} run failed: exit codes {codes}")
    with open(result) as f:
        return json.load(f)


def headline_table():
    rows = []
    h = HEADLINE
    elem = ELEM[h["dtype"]]
    for kv in h["kv_heads"]:
        for world in h["worlds"]:
            for L in h["lengths"]:
                halo = max(model_bytes("halo", world, L, h["window"], h["heads"], kv, h["head_dim"], elem))
                uly = model_bytes("ulysses", world, L, h["window"], h["heads"], kv, h["head_dim"], elem)[0]
                ag = model_bytes("allgather_kv", world, L, h["window"], h["heads"], kv, h["head_dim"], elem)[0]
                rows.append(dict(kv_heads=kv, world=world, seqlen=L, shard=L // world, halo=halo, ulysses=uly,
                                 ulysses_possible=ulysses_possible(world, h["heads"], kv), allgather_kv=ag,
                                 halo_over_ulysses=halo / uly))
    return rows


def measured_p_check(worlds, shape):
    """Model only, at the measured P: for every L in (W, 8W] (L % P == 0), MHA and the measured
    heads, does halo send fewer bytes than Ulysses (max over ranks), and is it constant once
    n >= W - 1? Returns one summary row per (P, kv_heads)."""
    w, hq, d, e = shape["window"], shape["heads"], shape["head_dim"], ELEM[shape["dtype"]]
    rows = []
    for world in worlds:
        for kv in sorted({hq, shape["kv_heads"]}, reverse=True):
            not_below, const = [], set()
            for L in range(w + world - w % world, 8 * w + 1, world):
                if L <= w:
                    continue
                halo = max(model_bytes("halo", world, L, w, hq, kv, d, e))
                if halo >= model_bytes("ulysses", world, L, w, hq, kv, d, e)[0]:
                    not_below.append(L)
                if L // world >= w - 1:
                    const.add(halo)
            rows.append(dict(world=world, heads=hq, kv_heads=kv, lengths=f"{w + 1}..{8 * w}",
                             halo_not_below_ulysses=f"L in [{not_below[0]}, {not_below[-1]}]" if not_below else "none",
                             halo_bytes_once_n_ge_w=sorted(const)))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two lengths, fewer repeats")
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--out", default=None, help="output directory (default: see common.result_dir)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (default: a sweep)")
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)  # JSON overrides of CPU_SHAPE (tests)
    p.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _mib(b):
    return f"{b / 2**20:,.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    env = common.environment("cpu")
    env["processes_share_cores"] = str(os.cpu_count())
    lengths = args.lengths or LENGTHS[args.quick]
    shape = dict(CPU_SHAPE, **json.loads(args.shape or "{}"))
    repeats = args.repeats or (3 if args.quick else 5)
    records, packed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            got = launch(world, lengths, repeats, tmp, shape)
            records += got["records"]
            packed += got["packed"]
    for recs, baseline in ((records, BASELINE), (packed, "ulysses_packed")):
        for r in recs:
            r["env"] = env
            base = next(x for x in recs if x["impl"] == baseline and x["shape"] == r["shape"])
            r["speedup_vs"] = {"baseline": baseline, "ratio": base["ms"] / r["ms"]}
            if r["bytes_per_rank"] != r["bytes_model"]:
                raise AssertionError(f"measured bytes {r['bytes_per_rank']} != model {r['bytes_model']} for "
                                     f"{r['impl']} {r['shape']}")
    table = headline_table()
    checks = measured_p_check(args.worlds, shape)
    out_dir = common.result_dir(args.out, "cpu", env)
    common.write_json(dict(env=env, records=records, packed=packed, headline=dict(HEADLINE, rows=table),
                           measured_p_check=checks), os.path.join(out_dir, "context_parallel.json"))
    with open(os.path.join(out_dir, "context_parallel.md"), "w") as f:
        f.write(f"# context-parallel attention, {env['device_name']}, commit {env['commit']}, {env['date']}\n\n")
        s = shape
        f.write(f"torch {env['torch']}, gloo, P processes of 1 thread each on {env['processes_share_cores']} shared "
                f"CPU cores. One attention layer, forward + backward, batch {s['batch']}, {s['heads']} heads "
                f"({s['kv_heads']} KV heads), head_dim {s['head_dim']}, causal window {s['window']} keys, "
                f"{s['dtype']}. bytes/rank: the most any rank sends per layer step (forward + backward), "
                "counted on the calls made; every rank's count equals the model in "
                "`python -m sft_kernels.bench.context_parallel`. ms: median step time of the slowest rank. "
                "speedup = ulysses ms / this ms.\n\n")
        cols = ["P", "L", "n", "impl", "ms", "bytes/rank (MiB)", "vs ulysses bytes", "speedup"]
        rows = []
        for r in records:
            sh = r["shape"]
            uly = next(x for x in records if x["impl"] == "ulysses" and x["shape"] == sh)
            rows.append({"P": sh["world"], "L": sh["seqlen"], "n": sh["shard"], "impl": r["impl"],
                         "ms": f"{r['ms']:.1f}",
                         "bytes/rank (MiB)": _mib(r["bytes_max"]),
                         "vs ulysses bytes": f"{r['bytes_max'] / uly['bytes_max']:.3f}",
                         "speedup": f"{r['speedup_vs']['ratio']:.2f}"})
        f.write(common.markdown_table(rows, cols) + "\n\n")
        if packed:
            f.write("## Packed rows\n\nThe same lengths, one row packed from sequences of W/4 .. 4W tokens (seeded). "
                    "bytes/rank counted on the calls, equal to the model on every rank; ALST: DeepSpeed's Ulysses "
                    "for HF models with this backend as its core on the same shape, modelled (`alst_bytes`, equal "
                    "to the bytes counted on DeepSpeed's calls in tests/test_alst.py), not run. speedup = "
                    "ulysses_packed ms / this ms.\n\n")
            cols = ["P", "L", "sequences", "impl", "ms", "bytes/rank (MiB)", "vs ulysses bytes", "ALST bytes/rank (MiB)",
                    "speedup"]
            rows = []
            for r in packed:
                sh = r["shape"]
                uly = next(x for x in packed if x["impl"] == "ulysses_packed" and x["shape"] == sh)
                rows.append({"P": sh["world"], "L": sh["seqlen"], "sequences": sh["sequences"], "impl": r["impl"],
                             "ms": f"{r['ms']:.1f}", "bytes/rank (MiB)": _mib(r["bytes_max"]),
                             "vs ulysses bytes": f"{r['bytes_max'] / uly['bytes_max']:.3f}",
                             "ALST bytes/rank (MiB)": _mib(sh["alst_bytes_model"]),
                             "speedup": f"{r['speedup_vs']['ratio']:.2f}"})
            f.write(common.markdown_table(rows, cols) + "\n\n")
        f.write("Model at the measured P for every L in (W, 8W] with L % P == 0, for the measured heads and for "
                "MHA (heads_kv = heads): where halo does not send fewer bytes than Ulysses (the most any rank "
                "sends), and halo's bytes once n >= W - 1 (one value: constant in L). With MHA at P = 4 and "
                "W < L < 2W both move whole shards and tie (halo + the 10-number check).\n\n")
        cols = ["P", "heads", "kv_heads", "L", "halo not below ulysses", "halo bytes once n >= W-1"]
        rows = [{"P": c["world"], "heads": c["heads"], "kv_heads": c["kv_heads"], "L": c["lengths"],
                 "halo not below ulysses": c["halo_not_below_ulysses"],
                 "halo bytes once n >= W-1": ", ".join(map(str, c["halo_bytes_once_n_ge_w"]))} for c in checks]
        f.write(common.markdown_table(rows, cols) + "\n\n")
        h = HEADLINE
        f.write(f"## Analytic: bytes per rank per layer step at the headline shape\n\n"
                f"W = {h['window']} keys (causal), {h['heads']} query heads, head_dim {h['head_dim']}, {h['dtype']}; "
                "the model above, checked against the measured counts. halo: the most any rank sends (an interior "
                "rank: W - 1 rows of K and V forward, their dK/dV back). Ulysses needs heads % P == 0 and "
                "kv_heads % P == 0; where it cannot run its figure is what it would move, marked n/a.\n\n")
        cols = ["kv_heads", "P", "L", "n", "halo MiB", "ulysses MiB", "allgather_kv MiB", "halo / ulysses"]
        rows = [{"kv_heads": r["kv_heads"], "P": r["world"], "L": r["seqlen"], "n": r["shard"],
                 "halo MiB": _mib(r["halo"]),
                 "ulysses MiB": _mib(r["ulysses"]) + ("" if r["ulysses_possible"] else " (n/a)"),
                 "allgather_kv MiB": _mib(r["allgather_kv"]), "halo / ulysses": f"{r['halo_over_ulysses']:.3f}"}
                for r in table]
        f.write(common.markdown_table(rows, cols) + "\n")
    print(f"\nwrote {out_dir}/context_parallel.json and context_parallel.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
