"""Memory-efficient PyTorch path (what ``backend="auto"`` runs on CPU tensors).

Queries are processed in chunks of ``C`` rows; a chunk attends only the key range its band
can reach, ``[lo, hi)``, so work and memory are O(L * (C + w)) and no L x L tensor is
ever built. The mask is applied only to chunks that cross the band's edges. Forward
saves ``out`` and the log-sum-exp; backward recomputes the scores chunk by chunk
(FlashAttention's recomputation, in plain PyTorch), so activations stay O(L * D).

Thread policy. A chunk is ~15 small ops. Run with PyTorch's intra-op threads, every op is
an OpenMP parallel region that ends at a barrier, and when one thread of the team is
descheduled (another process wants the core) every region waits for it: at L=16384,
8 heads, D=64, causal window 256, fwd+bwd on 2 cores, 0.87 s idle became 26-41 s beside
one CPU-bound process, while dense SDPA (one large op) only doubled. So the chunks are
grouped into tasks and the tasks run on a small pool of worker threads, one per intra-op
thread, each running its ops single-threaded (no barrier inside an op, no spinning team):
a worker on a busy core simply takes fewer tasks. At that shape on the 2-core CI machine
while other jobs loaded it (load average 12-16): the chunk loop on the intra-op team
32-45 s, dense causal SDPA 29-33 s; this path 1.8 s, and 2.7 s with a pinned busy loop
beside it (sft_kernels/bench/attention.py times both conditions). Larger ops alone do not
get there within the memory budget: under that load one batched matmul of 8 x (128 x 64 @
64 x 384) took 18 ms on the 2-thread team against 1.1 ms on one thread, and the team only
caught up at 8192 rows (~100 ms of work per op), while the O(L * w) peak-memory target
leaves room for the scores of a few chunks at a time.

Tasks never share an output element: the forward's tasks own disjoint query rows; the
backward's dK/dV spans of neighbouring row groups overlap, so it runs in two phases (even
groups, then odd groups, each group at least ``left + right`` rows tall so that the groups
of one phase touch disjoint keys). That also fixes the order of every sum: runs with the
same thread count give identical results. Where a window is so wide that there are few row
groups (unbounded windows: one), tasks also split the batch and kv heads. Calls with
little work run inline in the calling thread.

All functions take one padded batch ``(B, L, H, D)``; packed (varlen) input is a list of
``(1, L_i, H, D)`` views, one per sequence, scheduled together.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ...window import WindowSpec, band_mask, packed_sequences

# Query rows per chunk. Swept with the single-threaded workers on the CI machine (fp32, B=1,
# H=8, D=64, L=16384, causal window 256, fwd+bwd; CPU seconds, the work itself, as the machine
# was loaded by other jobs): 32 -> 0.80-0.87, 64 -> 0.80-0.85, 96 -> 0.97-0.99,
# 128 -> 0.91-1.08, 256 -> 1.43-1.45. 64 has half the ops of 32 for the same work.
CHUNK = 64
# Upper bound on the score tensors of all chunks in flight at once (one per worker),
# elements (for wide / unbounded windows).
MAX_SCORE_ELEMS = 1 << 24
# Calls whose scores (batch * heads * query rows * keys in reach, summed) stay below this
# run inline in the calling thread: about a millisecond of forward work at head_dim 64, where
# handing tasks to the workers would cost about as much as it saves.
INLINE_WORK = 1 << 18
# Tasks aimed at per worker thread (several, so a worker on a busy core takes fewer).
TASKS_PER_THREAD = 8


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(lq: int, lk: int, left: int, right: int, rows: int, r0: int = 0, r1: Optional[int] = None):
    """Yield (qs, qe, lo, hi, needs_mask) for the query chunks of ``rows`` rows in [r0, r1)."""
    off = lk - lq
    r1 = lq if r1 is None else r1
    for qs in range(r0, r1, rows):
        qe = min(qs + rows, r1)
        lo = 0 if left < 0 else max(0, qs + off - left)
        hi = lk if right < 0 else min(lk, qe - 1 + off + right + 1)
        # the mask matters only if some (row, key) pair in [qs,qe) x [lo,hi) is out of band
        cut_left = left >= 0 and (qe - 1 + off - left) > lo
        cut_right = right >= 0 and (qs + off + right) < hi - 1
        yield qs, qe, lo, hi, cut_left or cut_right


def _reach(lk: int, left: int, right: int) -> int:
    """Keys one query can see at most."""
    return lk if (left < 0 or right < 0) else min(lk, left + right + 1)


def _rows_per_chunk(lq: int, lk: int, left: int, right: int, batch_heads: int) -> int:
    band = _reach(lk, left, right)
    rows = CHUNK
    while rows > 16 and batch_heads * rows * (rows + band) > MAX_SCORE_ELEMS:
        rows //= 2
    return max(1, min(rows, lq))


def _q_chunk(x: torch.Tensor, qs: int, qe: int, hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [qs, qe) of (B, L, Hq, D) -> (B, Hkv, G * C, D) in the compute dtype (a chunk-sized copy)."""
    b, _, h, d = x.shape
    c = qe - qs
    return x[:, qs:qe].to(dtype).view(b, c, hkv, h // hkv, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, (h // hkv) * c, d)


def _kv_range(x: torch.Tensor, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    """Keys [lo, hi) of (B, Lk, Hkv, D) -> (B, Hkv, R, D); the kv heads are never repeated."""
    return x[:, lo:hi].to(dtype).permute(0, 2, 1, 3)


def _to_rows(t: torch.Tensor, b: int, hkv: int, g: int, c: int) -> torch.Tensor:
    """(B, Hkv, G * C, D) -> (B, C, Hkv * G, D), the caller's layout for a chunk of rows."""
    return t.view(b, hkv, g, c, -1).permute(0, 3, 1, 2, 4).reshape(b, c, hkv * g, -1)


# ----------------------------------------------------------------------------- one task
def _capped_scores(qc, kr, scale, softcap, grad=False):
    """Scores of a chunk, soft-capped (``c * tanh(s / c)``) when ``softcap > 0``; with ``grad``
    also the cap's derivative for the backward (None without a cap), as ``1 / cosh^2(s / c)``:
    ``1 - tanh^2`` from the rounded tanh cancels where the cap saturates (|tanh| -> 1)."""
    s = torch.matmul(qc, kr.transpose(-1, -2)).mul_(scale)
    if softcap <= 0:
        return s, None
    u = s.div_(softcap)
    cap_grad = torch.cosh(u).reciprocal_().square_() if grad else None  # 0 where cosh overflows: the limit
    return u.tanh_().mul_(softcap), cap_grad


def _sink_column(sinks, b, c):
    """(Hkv, G) sink logits -> (B, Hkv, G * C, 1), the layout of a chunk's score rows."""
    hkv, g = sinks.shape
    return sinks.view(1, hkv, g, 1, 1).expand(b, hkv, g, c, 1).reshape(b, hkv, g * c, 1)


def _scored_chunks(q, k, left, right, scale, rows, r0, r1, softcap, grad=False):
    """The query chunks of rows [r0, r1) that see a key, each as (qs, qe, lo, hi, the chunk's
    queries (B, Hkv, G * C, D), its keys [lo, hi) (B, Hkv, R, D), both in the compute dtype,
    its scores masked to the band and soft-capped, the cap's derivative (with ``grad``)).
    A chunk that sees no key is skipped: its rows keep the caller's zeros and lse."""
    b, lq, hq, _ = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    cdt = _compute_dtype(q.dtype)
    for qs, qe, lo, hi, needs_mask in _chunks(lq, lk, left, right, rows, r0, r1):
        if hi <= lo:
            continue  # no key in reach: zeros, lse -inf
        qc, kr = _q_chunk(q, qs, qe, hkv, cdt), _kv_range(k, lo, hi, cdt)
        s, cap_grad = _capped_scores(qc, kr, scale, softcap, grad)
        if needs_mask:
            keep = band_mask(lq, lk, left, right, q.device, rows=(qs, qe), cols=(lo, hi))
            s.view(b, hkv, hq // hkv, qe - qs, hi - lo).masked_fill_(~keep, float("-inf"))
        yield qs, qe, lo, hi, qc, kr, s, cap_grad
        del qc, kr, s, cap_grad  # held by the caller alone: a chunk's tensors are not kept into the next


def _fwd_rows(q, k, v, out, lse, left, right, scale, rows, r0, r1, softcap=0.0, sinks=None):
    """Query rows [r0, r1) of q (B, Lq, Hq, D) against k/v (B, Lk, Hkv, D): writes out
    (B, Lq, Hq, D) and lse (B, Hkv, G, Lq) there (pre-filled with 0 and -inf, or with the
    sink logits when ``sinks`` (Hkv, G) is given: what a row that sees no key keeps).

    Works on the caller's layout a chunk at a time: besides out and lse, memory is one
    chunk's scores (no full-size transposed copies of q, k or v).
    """
    b, hq, hkv = q.shape[0], q.shape[2], k.shape[2]
    g = hq // hkv
    cdt = _compute_dtype(q.dtype)
    for qs, qe, lo, hi, _, _, s, _ in _scored_chunks(q, k, left, right, scale, rows, r0, r1, softcap):
        c = qe - qs
        m = s.amax(dim=-1, keepdim=True)
        if sinks is not None:  # the sink: one more logit in the denominator, value 0
            sink = _sink_column(sinks, b, c)
            m = torch.maximum(m, sink)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows with no key
        p = s.sub_(m).exp_()
        l = p.sum(dim=-1, keepdim=True)
        if sinks is not None:
            l = l + torch.exp(sink - m)
        o = torch.matmul(p, _kv_range(v, lo, hi, cdt)).div_(torch.where(l == 0, torch.ones_like(l), l))
        out[:, qs:qe] = _to_rows(o, b, hkv, g, c)
        lse[:, :, :, qs:qe] = (m + torch.log(l)).view(b, hkv, g, c).to(lse.dtype)


def _bwd_rows(do, q, k, v, out, lse, dq, dk, dv, left, right, scale, rows, r0, r1, softcap=0.0, delta_out=None):
    """Gradients of :func:`_fwd_rows` for query rows [r0, r1); scores recomputed per chunk.

    ``out`` is the rows' whole attention output (as in FlashAttention's backward, delta =
    rowsum(dO * O) comes from it): the context-parallel merge runs this backward on a part
    of each row's keys with the merged output and LSE, where rowsum(P * dP) over the part
    would be wrong.

    ``lse`` is (B, Hkv, G, Lq) in the compute dtype with +inf on rows that see no key (so
    p = 0 there). dq (B, Lq, Hq, D) gets rows [r0, r1); dk/dv (B, Lk, Hkv, D, compute dtype)
    are accumulated over the keys those rows see. Memory: one chunk's scores.
    """
    b, hq, hkv = q.shape[0], q.shape[2], k.shape[2]
    g = hq // hkv
    cdt = _compute_dtype(q.dtype)
    for qs, qe, lo, hi, qc, kr, s, cap_grad in _scored_chunks(q, k, left, right, scale, rows, r0, r1, softcap,
                                                              grad=True):
        c = qe - qs
        doc = _q_chunk(do, qs, qe, hkv, cdt)
        vr = _kv_range(v, lo, hi, cdt)
        p = s.sub_(lse[:, :, :, qs:qe].reshape(b, hkv, g * c, 1)).exp_()  # lse holds any sink
        dv[:, lo:hi] += torch.matmul(p.transpose(-1, -2), doc).transpose(1, 2)  # sums the G query heads
        dp = torch.matmul(doc, vr.transpose(-1, -2))
        delta = doc.mul(_q_chunk(out, qs, qe, hkv, cdt)).sum(-1, keepdim=True)  # rowsum(dO * O)
        if delta_out is not None:  # (B, Hkv, G, Lq) for the sinks' gradient: rowsum(P * dP) (with
            # sinks every row is whole here), from the compute-precision P, not the rounded O
            delta_out[:, :, :, qs:qe] = torch.matmul(p.unsqueeze(-2), dp.unsqueeze(-1)).view(b, hkv, g, c)
        ds = p.mul_(dp.sub_(delta))
        if cap_grad is not None:
            ds.mul_(cap_grad)  # d(c tanh(s / c)) / ds
        dq[:, qs:qe] = _to_rows(torch.matmul(ds, kr).mul_(scale), b, hkv, g, c)
        dk[:, lo:hi] += torch.matmul(ds.transpose(-1, -2), qc).mul_(scale).transpose(1, 2)


# ----------------------------------------------------------------------------- scheduling
@dataclass(frozen=True)
class _Seq:
    """One attention problem: (B, Lq, ...) views of the inputs / outputs, its window."""

    lq: int
    lk: int
    left: int
    right: int
    tensors: Tuple[torch.Tensor, ...]  # sliced per task along batch (dim 0) and heads


@dataclass(frozen=True)
class _Task:
    seq: int
    r0: int
    r1: int
    b0: int
    b1: int
    h0: int  # kv heads [h0, h1); query heads [h0 * G, h1 * G)
    h1: int


def _splits(n: int, parts: int) -> List[Tuple[int, int]]:
    parts = max(1, min(n, parts))
    edges = [n * i // parts for i in range(parts + 1)]
    return [(a, z) for a, z in zip(edges, edges[1:])]


def _head_splits(row_tasks: int, want: int, b: int, hkv: int) -> List[Tuple[int, int, int, int]]:
    """(b0, b1, h0, h1) slices so that row_tasks * len(slices) reaches ``want`` if it can."""
    parts = min(b * hkv, max(1, math.ceil(want / max(row_tasks, 1))))
    ph = min(hkv, parts)
    pb = min(b, math.ceil(parts / ph))
    return [(b0, b1, h0, h1) for b0, b1 in _splits(b, pb) for h0, h1 in _splits(hkv, ph)]


def _plan(seqs: Sequence[_Seq], b: int, hkv: int, rows: Sequence[int], threads: int, backward: bool):
    """Phases of tasks; the tasks of one phase write disjoint output elements. With one
    thread: one task per row group, every head in it (the chunk loop of a serial run)."""
    want = TASKS_PER_THREAD * threads if threads > 1 else 1
    if not backward:
        chunks = sum(math.ceil(s.lq / r) for s, r in zip(seqs, rows))
        per_task = max(1, chunks // want)
        groups = [(i, r0, min(r0 + per_task * r, s.lq)) for i, (s, r) in enumerate(zip(seqs, rows))
                  for r0 in range(0, s.lq, per_task * r)]
        phases = [groups]
    else:
        # Row groups at least left + right rows tall: the key spans of groups g and g + 2 are
        # disjoint, so the even groups can run together, then the odd ones.
        phases = [[], []]
        for i, (s, r) in enumerate(zip(seqs, rows)):
            if s.left < 0 or s.right < 0:
                tall = s.lq
            else:
                tall = r * max(1, math.ceil((s.left + s.right) / r))
            for n, r0 in enumerate(range(0, s.lq, tall)):
                phases[n % 2].append((i, r0, min(r0 + tall, s.lq)))
        phases = [p for p in phases if p]
    out = []
    for groups in phases:
        heads = _head_splits(len(groups), want, b, hkv)
        out.append([_Task(i, r0, r1, *hs) for i, r0, r1 in groups for hs in heads])
    return out


_POOL_LOCK = threading.Lock()
# threads -> pool of that many workers, for this process (os.getpid() at creation). Never
# shut down while the process lives: a caller thread with another intra-op thread count
# gets its own pool rather than closing one another caller may be using.
_POOLS: Dict[int, ThreadPoolExecutor] = {}
_POOLS_PID = os.getpid()


def _worker_init(barrier: threading.Barrier) -> None:
    torch.get_num_threads()  # this thread's lazy intra-op initialisation, before the change
    torch.set_num_threads(1)  # its ops run single-threaded: no OpenMP team, no barrier
    barrier.wait(timeout=60)


def _forget_pools() -> None:  # after fork(): the child has none of the parent's threads
    global _POOLS, _POOLS_PID
    _POOLS, _POOLS_PID = {}, os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def _executor(threads: int) -> Optional[ThreadPoolExecutor]:
    """The pool of ``threads`` single-threaded workers (created on first use), or None."""
    with _POOL_LOCK:
        if _POOLS_PID != os.getpid():
            _forget_pools()
        if threads in _POOLS:
            return _POOLS[threads]
        barrier = threading.Barrier(threads + 1)
        pool = ThreadPoolExecutor(threads, thread_name_prefix="sft_kernels_swa", initializer=_worker_init,
                                  initargs=(barrier,))
        try:
            for _ in range(threads):  # each waits in the initializer, so each submit starts a thread
                pool.submit(int)
            barrier.wait(timeout=60)
        except (threading.BrokenBarrierError, RuntimeError):
            pool.shutdown(wait=False)
            return None
        finally:
            # set_num_threads(1) in a worker also set the default that threads started later
            # initialise from; give it back (this thread keeps its own count)
            torch.set_num_threads(threads)
        _POOLS[threads] = pool
        return pool


def _in_worker(fn: Callable[[_Task], None], task: _Task) -> None:
    with torch.no_grad():  # a worker thread has its own grad mode; the inputs may require grad
        fn(task)


def _run(phases: List[List[_Task]], fn: Callable[[_Task], None], work: int, threads: int) -> None:
    """Run every task; a phase finishes before the next starts. Same task order inline."""
    pool = _executor(threads) if threads > 1 and work >= INLINE_WORK else None
    for tasks in phases:
        if pool is None:
            for t in tasks:
                fn(t)
            continue
        futures = [pool.submit(_in_worker, fn, t) for t in tasks]
        wait(futures)
        for f in futures:
            f.result()  # re-raise a task's error


def _work(seqs: Sequence[_Seq], b: int, hq: int) -> int:
    return sum(b * hq * s.lq * min(_reach(s.lk, s.left, s.right), s.lk) for s in seqs)


def _slice(t: torch.Tensor, task: _Task, heads: int, hkv: int, dim: int) -> torch.Tensor:
    """Batch [b0, b1) and the task's heads of ``t``: ``heads`` heads at dimension ``dim``."""
    per = heads // hkv
    return t[task.b0:task.b1].narrow(dim, task.h0 * per, (task.h1 - task.h0) * per)


# ----------------------------------------------------------------------------- forward / backward
def _schedule(seqs: Sequence[_Seq], b: int, hq: int):
    """(intra-op threads, work, workers to plan for, query rows per chunk of each seq): what
    the forward and the backward both plan their tasks from."""
    threads = torch.get_num_threads()
    work = _work(seqs, b, hq)
    par = threads if work >= INLINE_WORK else 1
    return threads, work, par, [_rows_per_chunk(s.lq, s.lk, s.left, s.right, b * hq * par) for s in seqs]


def _forward(seqs: List[_Seq], b: int, hq: int, hkv: int, scale: float, softcap: float = 0.0, sinks=None) -> None:
    """Each seq's tensors: q, k, v, out (B, L, H, D) and lse (B, Hkv, G, Lq); ``sinks``
    (Hkv, G) in the compute dtype, or None."""
    threads, work, par, rows = _schedule(seqs, b, hq)

    def run(t: _Task) -> None:
        s = seqs[t.seq]
        q, k, v, out, lse = s.tensors
        _fwd_rows(_slice(q, t, hq, hkv, 2), _slice(k, t, hkv, hkv, 2), _slice(v, t, hkv, hkv, 2),
                  _slice(out, t, hq, hkv, 2), _slice(lse, t, hkv, hkv, 1), s.left, s.right, scale, rows[t.seq],
                  t.r0, t.r1, softcap, None if sinks is None else sinks[t.h0:t.h1])

    _run(_plan(seqs, b, hkv, rows, par, backward=False), run, work, threads)


def _backward(seqs: List[_Seq], b: int, hq: int, hkv: int, scale: float, softcap: float = 0.0) -> None:
    """Each seq's tensors: do, q, k, v, out (B, L, H, D), lse (B, Hkv, G, Lq; +inf on empty
    rows), dq (B, Lq, Hq, D), dk, dv (B, Lk, Hkv, D, compute dtype, zeroed), delta (B, Hkv, G,
    Lq, zeroed: rowsum(P * dP) is written there, for the sinks' gradient) or None."""
    threads, work, par, rows = _schedule(seqs, b, hq)

    def run(t: _Task) -> None:
        s = seqs[t.seq]
        do, q, k, v, out, lse, dq, dk, dv, delta = s.tensors
        _bwd_rows(_slice(do, t, hq, hkv, 2), _slice(q, t, hq, hkv, 2), _slice(k, t, hkv, hkv, 2),
                  _slice(v, t, hkv, hkv, 2), _slice(out, t, hq, hkv, 2), _slice(lse, t, hkv, hkv, 1),
                  _slice(dq, t, hq, hkv, 2),
                  _slice(dk, t, hkv, hkv, 2), _slice(dv, t, hkv, hkv, 2), s.left, s.right, scale, rows[t.seq],
                  t.r0, t.r1, softcap, None if delta is None else _slice(delta, t, hkv, hkv, 1))

    _run(_plan(seqs, b, hkv, rows, par, backward=True), run, work, threads)


def _bwd_lse(lse: torch.Tensor, b: int, hkv: int, g: int, lq: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, Hq, Lq) lse -> (B, Hkv, G, Lq) in the compute dtype, +inf where -inf (p = 0)."""
    lse = lse.reshape(b, hkv, g, lq).to(dtype)
    return torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)


def _empty_lse(shape, hkv, g, sinks, dtype, device):
    """LSE of rows that see no key, ``shape`` ending in (Hkv, G, L): -inf, or each head's
    sink logit (the sink takes all the mass). A new tensor (never a view of the sinks)."""
    lse = torch.full(shape, float("-inf"), dtype=dtype, device=device)
    if sinks is not None:
        lse.copy_(sinks.view((1,) * (len(shape) - 3) + (hkv, g, 1)).expand(shape))
    return lse


def attention_fwd(
    q, k, v, spec: WindowSpec, scale: float, cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Padded ``(B, L, H, D)`` or packed ``(T, H, D)`` input -> (out, lse).

    Empty input (batch 0, no query or no key) gives zeros and an lse of -inf (the sink's
    logit with ``sinks``, ``(heads_q,)``).
    """
    hq, hkv = q.shape[-2], k.shape[-2]
    g = hq // hkv
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse_dtype = _lse_dtype(q.dtype)
    sinks = None if sinks is None else sinks.to(_compute_dtype(q.dtype)).view(hkv, g)
    if cu_seqlens_q is None:
        b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        lse = _empty_lse((b, hkv, g, lq), hkv, g, sinks, lse_dtype, q.device)
        if q.numel() and k.numel():
            left, right = spec.resolve(lk)
            _forward([_Seq(lq, lk, left, right, (q, k, v, out, lse))], b, hq, hkv, scale, softcap, sinks)
        return out, lse.view(b, hq, lq)
    lse = _empty_lse((hkv, g, q.shape[0]), hkv, g, sinks, lse_dtype, q.device)
    if not (q.numel() and k.numel()):  # no tokens: cu_seqlens are not even read
        return out, lse.view(hq, q.shape[0])
    seqs = [
        _Seq(qe - qs, ke - ks, left, right,
             (q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], out[None, qs:qe], lse[None, :, :, qs:qe]))
        for qs, qe, ks, ke, left, right in packed_sequences(cu_seqlens_q, cu_seqlens_k, spec)
        if qe > qs and ke > ks
    ]
    if seqs:
        _forward(seqs, 1, hq, hkv, scale, softcap, sinks)
    return out, lse.view(hq, q.shape[0])


def attention_bwd(do, q, k, v, out, lse, spec: WindowSpec, scale, cu_seqlens_q, cu_seqlens_k, softcap=0.0,
                  sinks=None):
    """Gradients (dq, dk, dv, dsinks); dsinks is None without sinks. ``out`` is the forward's
    output (delta = rowsum(dO * O)), or, for a part of each row's keys, the whole rows'
    merged output with their merged ``lse``. The sinks' gradient takes rowsum(P * dP) (rows
    are whole with sinks), exact in the compute precision.

    Empty input gives zero (or empty) gradients.
    """
    hq, hkv = q.shape[-2], k.shape[-2]
    g = hq // hkv
    cdt = _compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=k.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=v.device)
    # with sinks: rowsum(P * dP) per row, like lse ((B, Hkv, G, Lq) or (Hkv, G, T)); 0 where no key
    delta = None if sinks is None else torch.zeros(lse.shape[:-2] + (hkv, g, lse.shape[-1]), dtype=cdt,
                                                   device=q.device)
    if cu_seqlens_q is None:
        b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        if q.numel() and k.numel():
            left, right = spec.resolve(lk)
            lse4 = _bwd_lse(lse, b, hkv, g, lq, cdt)
            _backward([_Seq(lq, lk, left, right, (do, q, k, v, out, lse4, dq, dk, dv, delta))], b, hq, hkv, scale,
                      softcap)
    elif q.numel() and k.numel():
        seqs = []
        for qs, qe, ks, ke, left, right in packed_sequences(cu_seqlens_q, cu_seqlens_k, spec):
            if qe == qs or ke == ks:
                continue
            lse4 = _bwd_lse(lse[:, qs:qe], 1, hkv, g, qe - qs, cdt)
            seqs.append(_Seq(qe - qs, ke - ks, left, right,
                             (do[None, qs:qe], q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], out[None, qs:qe], lse4,
                              dq[None, qs:qe], dk[None, ks:ke], dv[None, ks:ke],
                              None if delta is None else delta[None, :, :, qs:qe])))
        if seqs:
            _backward(seqs, 1, hq, hkv, scale, softcap)
    return dq, dk.to(k.dtype), dv.to(v.dtype), None if sinks is None else _sink_grad(delta, lse, sinks)


def _sink_grad(delta, lse, sinks):
    """d sink_h = -sum over rows of P_sink * delta, P_sink = exp(sink_h - lse): ``delta`` is the
    backward's rowsum(P * dP) (exact in the compute dtype, 0 on rows that see no key), ``lse``
    (B, Hq, L) or (Hq, T)."""
    delta = delta.reshape(lse.shape)
    p_sink = torch.exp(sinks.to(delta.dtype).view(-1, 1) - lse.to(delta.dtype))
    dims = tuple(d for d in range(lse.dim()) if d != lse.dim() - 2)
    return -(p_sink * delta).sum(dims).to(sinks.dtype)
