"""The PyTorch path's task scheduling (issue 16): worker threads, row groups, phases.

The path splits a call into tasks (query row groups, and batch / kv-head slices where the
window leaves few groups) that run on single-threaded worker threads; the backward runs in
two phases so that no two concurrent tasks add into the same dK/dV rows. Small calls run
inline, so these tests force the pool (``INLINE_WORK = 0``) and shrink the chunk to a few
rows, which puts many chunks, groups and both phases into shapes the float64 reference
checks quickly. Expected values come from ``sliding_window_attention_reference`` and from
the window's definition written out here; nothing is computed by the code under test.
"""

import multiprocessing as mp
import threading

import pytest
import torch

from helpers import TOL, assert_close, assert_rel
from sft_kernels import sliding_window_attention, sliding_window_attention_reference
from sft_kernels.ops.sliding_window_attention import torch_impl

LOW = (torch.float16, torch.bfloat16)

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, window_size, causal)
CASES = {
    # several row groups (left + right = 19 -> groups of 24 rows at chunk 8) in both phases
    "causal_w20_gqa": (2, 100, 100, 4, 2, 16, (19, 0), True),
    # window wider than a chunk on both sides; spans cut at the sequence's start and end
    "bidir_41_30_mqa": (1, 120, 120, 3, 1, 16, (41, 30), False),
    # Lq - Lk > 128: the first chunks and groups see no key at all
    "q_longer_by_150_left5": (1, 200, 50, 2, 2, 16, (5, 0), True),
    "q_longer_by_140_causal": (1, 190, 50, 2, 1, 8, (-1, 0), True),
    # Lq < Lk: spans start far into the keys
    "q_shorter_w31": (2, 40, 130, 2, 2, 16, (30, 0), True),
    # unbounded windows: one row group, tasks split the batch and kv heads instead
    "full_gqa": (2, 70, 70, 4, 2, 16, (-1, -1), False),
    "left_unbounded_right3_mqa": (2, 90, 90, 3, 1, 8, (-1, 3), False),
    # one key per query: dq = 0 exactly, every group its own span
    "diagonal": (1, 50, 50, 2, 2, 8, (0, 0), False),
    "int_window_bidir": (1, 97, 97, 2, 2, 16, 17, False),
    "sqrt_causal": (1, 150, 150, 4, 2, 16, "sqrt", True),
    # enough row groups that tasks keep several kv heads (forward and backward): the GQA
    # head mapping inside one task
    "gqa_many_groups": (1, 400, 400, 6, 2, 16, (7, 0), True),
    "gqa_many_groups_bidir": (2, 300, 280, 4, 2, 8, (3, 4), False),
}
# cases whose plan (at chunk 8, 2 threads) has tasks with more than one kv head
MULTI_HEAD_TASKS = ("gqa_many_groups", "gqa_many_groups_bidir")


@pytest.fixture
def pooled(monkeypatch):
    """Every call through the worker pool, 8-row chunks."""
    monkeypatch.setattr(torch_impl, "INLINE_WORK", 0)
    monkeypatch.setattr(torch_impl, "CHUNK", 8)


@pytest.fixture(params=[2, 3], ids=["2threads", "3threads"])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def _inputs(b, lq, lk, hq, hkv, d, dtype, gen=None):
    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    return rand(b, lq, hq, d), rand(b, lk, hkv, d), rand(b, lk, hkv, d)


def _check(q, k, v, window, causal, **kw):
    dtype = q.dtype
    out, lse = sliding_window_attention(q, k, v, window_size=window, causal=causal, return_lse=True, backend="torch", **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = sliding_window_attention_reference(q64, k64, v64, window, causal, **kw)
    low = None
    if dtype in LOW:
        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
        low, _ = sliding_window_attention_reference(ql, kl, vl, window, causal, upcast=False, **kw)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "out", None if low is None else low.detach())
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~finite), "rows without keys: lse -inf"
    tol = TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]
    assert_rel(lse[finite], ref_lse[finite], tol, "lse")
    do = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    want = torch.autograd.grad(ref, (q64, k64, v64), do)
    lows = torch.autograd.grad(low, (ql, kl, vl), do.to(dtype)) if low is not None else (None,) * 3
    for name, g, r, lg in zip(("dq", "dk", "dv"), got, want, lows):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert_close(g, r, dtype, name, lg)
    return out, got


@pytest.mark.parametrize("name", list(CASES))
def test_pooled_against_reference(name, pooled, threads):
    b, lq, lk, hq, hkv, d, window, causal = CASES[name]
    _check(*_inputs(b, lq, lk, hq, hkv, d, torch.float64), window, causal)


@pytest.mark.parametrize("name", MULTI_HEAD_TASKS)
def test_multi_head_cases_keep_heads_together(name):
    """The cases above really put several kv heads (and their query groups) in one task."""
    b, lq, lk, hq, hkv, d, window, causal = CASES[name]
    left, right = (window[0], 0 if causal else window[1])
    seq = torch_impl._Seq(lq, lk, left, right, ())
    for backward in (False, True):
        tasks = [t for phase in torch_impl._plan([seq], b, hkv, [8], 2, backward) for t in phase]
        assert all(t.h1 - t.h0 == hkv for t in tasks), backward


def test_serial_plan_keeps_every_head_in_one_task():
    seq = torch_impl._Seq(90, 90, -1, -1, ())
    for backward in (False, True):
        (tasks,) = torch_impl._plan([seq], 2, 4, [8], 1, backward)
        assert [(t.r0, t.r1, t.b0, t.b1, t.h0, t.h1) for t in tasks] == [(0, 90, 0, 2, 0, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["causal_w20_gqa", "bidir_41_30_mqa", "full_gqa", "q_longer_by_150_left5",
                                  "gqa_many_groups"])
def test_pooled_low_precision(name, dtype, pooled):
    b, lq, lk, hq, hkv, d, window, causal = CASES[name]
    _check(*_inputs(b, lq, lk, hq, hkv, d, dtype), window, causal)


@pytest.mark.parametrize("window, causal", [((6, 0), True), ((9, 13), False), ((-1, 0), True), ("sqrt", False)],
                         ids=["causal_w7", "bidir_9_13", "causal", "sqrt"])
def test_pooled_packed(window, causal, pooled, threads):
    """Sequences of one packed batch are scheduled together (one group or many, empty ones)."""
    lens_q, lens_k = [37, 0, 5, 64, 1, 20], [37, 3, 5, 64, 0, 45]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(lens_q), 4, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    _check(q, k, v, window, causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_pooled_backward_is_deterministic(pooled, threads):
    b, lq, lk, hq, hkv, d, window, causal = CASES["bidir_41_30_mqa"]
    q, k, v = _inputs(b, lq, lk, hq, hkv, d, torch.float32)
    do = torch.randn(b, lq, hq, d)
    runs = [torch.autograd.grad(sliding_window_attention(q, k, v, window_size=window, causal=causal, backend="torch"), (q, k, v), do)
            for _ in range(3)]
    for other in runs[1:]:
        for a, z in zip(runs[0], other):
            assert torch.equal(a, z)


def test_long_sequence_default_settings():
    """The defaults at a size that goes through the pool (L = 3000, window 300 > one chunk)."""
    assert 4 * 3000 * 300 >= torch_impl.INLINE_WORK  # batch * heads * rows * keys: the pool's side
    _check(*_inputs(1, 3000, 3000, 4, 2, 8, torch.float64), 300, True)


# ----------------------------------------------------------------------------- the plan itself
def _key_span(lq, lk, left, right, r0, r1):
    """Keys rows [r0, r1) can see, by the window's definition (bottom-right aligned)."""
    off = lk - lq
    lo = 0 if left < 0 else max(0, r0 + off - left)
    hi = lk - 1 if right < 0 else min(lk - 1, r1 - 1 + off + right)
    return lo, hi


PLAN_CASES = [
    # (batch, kv heads, [(lq, lk, left, right)], rows per chunk, threads)
    (1, 8, [(16384, 16384, 255, 0)], 64, 2),
    (1, 8, [(16384, 16384, 4095, 0)], 64, 2),
    (2, 2, [(1000, 1000, 100, 37)], 64, 4),
    (1, 1, [(300, 60, -1, 0)], 16, 2),
    (3, 1, [(500, 500, -1, -1)], 32, 3),
    (1, 4, [(90, 90, 0, 0)], 8, 2),
    (1, 2, [(37, 37, 6, 0), (5, 5, 6, 0), (64, 64, 6, 0), (20, 45, 6, 0), (200, 100, 30, 50)], 8, 3),
]


@pytest.mark.parametrize("b, hkv, seqs, rows, threads", PLAN_CASES)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_plan_covers_every_row_once_and_phases_write_disjoint_outputs(b, hkv, seqs, rows, threads, backward):
    seq_objs = [torch_impl._Seq(lq, lk, left, right, ()) for lq, lk, left, right in seqs]
    phases = torch_impl._plan(seq_objs, b, hkv, [rows] * len(seqs), threads, backward)
    covered = {}
    for tasks in phases:
        touched = {}  # (seq, batch, kv head) -> output rows the phase's tasks write
        for t in tasks:
            lq, lk, left, right = seqs[t.seq]
            assert t.r0 % rows == 0, "row groups start on chunk boundaries"
            for bi in range(t.b0, t.b1):
                for h in range(t.h0, t.h1):
                    for r in range(t.r0, t.r1):
                        key = (t.seq, bi, h, r)
                        assert key not in covered, f"query row {key} in two tasks"
                        covered[key] = True
                    # what the task writes: its query rows (out, lse, dq) and, backward, the
                    # dK/dV rows its queries see
                    writes = [("q", r) for r in range(t.r0, t.r1)]
                    if backward:
                        lo, hi = _key_span(lq, lk, left, right, t.r0, t.r1)
                        writes += [("k", j) for j in range(lo, hi + 1)]
                    for w in writes:
                        cell = (t.seq, bi, h) + w
                        assert cell not in touched, f"two tasks of one phase write {cell}"
                        touched[cell] = True
    expected = {(i, bi, h, r) for i, (lq, *_rest) in enumerate(seqs) for bi in range(b) for h in range(hkv)
                for r in range(lq)}
    assert set(covered) == expected, "every query row of every head in exactly one task"
    assert len(phases) <= (2 if backward else 1)


def test_plan_gives_every_worker_work():
    # the headline shape: many row groups; an unbounded window: batch x kv-head slices
    for seqs, b, hkv in (([(16384, 16384, 255, 0)], 1, 8), ([(4096, 4096, -1, 0)], 1, 8), ([(900, 900, -1, -1)], 2, 1)):
        seq_objs = [torch_impl._Seq(*s, ()) for s in seqs]
        for backward in (False, True):
            for tasks in torch_impl._plan(seq_objs, b, hkv, [64], 2, backward):
                assert len(tasks) >= 2


# ----------------------------------------------------------------------------- the thread policy
def test_tasks_run_single_threaded_on_workers(pooled, threads, monkeypatch):
    """Tasks run on the pool's threads, each with one intra-op thread; the caller's thread
    count is untouched, and threads started later still get the default count. (The caller's
    count is set by ``threads``: with one intra-op thread everything runs inline, and the
    environment, e.g. ``OMP_NUM_THREADS=1`` under ``make test-fast``, must not skip this.)"""
    main_threads = torch.get_num_threads()
    assert main_threads == threads
    seen = []
    fwd, bwd = torch_impl._fwd_rows, torch_impl._bwd_rows

    def spy(real):
        def f(*a, **k):
            seen.append((threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled()))
            return real(*a, **k)
        return f

    monkeypatch.setattr(torch_impl, "_fwd_rows", spy(fwd))
    monkeypatch.setattr(torch_impl, "_bwd_rows", spy(bwd))
    q, k, v = _inputs(1, 100, 100, 4, 2, 16, torch.float32)
    out = sliding_window_attention(q, k, v, window_size=(19, 0), causal=True, backend="torch")
    torch.autograd.grad(out.sum(), (q, k, v))
    assert seen and all(name.startswith("sft_kernels_swa") and n == 1 and not grad for name, n, grad in seen), seen
    assert torch.get_num_threads() == main_threads
    later = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [main_threads]


def test_task_error_reaches_the_caller(pooled, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("task failed on purpose")

    monkeypatch.setattr(torch_impl, "_fwd_rows", broken)
    q, k, v = _inputs(1, 64, 64, 2, 2, 8, torch.float32)
    with pytest.raises(RuntimeError, match="task failed on purpose"):
        sliding_window_attention(q, k, v, window_size=(9, 0), causal=True, backend="torch")


def _child(conn):
    torch_impl.INLINE_WORK, torch_impl.CHUNK = 0, 8
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 60, 2, 8, dtype=torch.float64) for _ in range(3))
    out = sliding_window_attention(q, k, v, window_size=(9, 0), causal=True, backend="torch")
    conn.send([t.numpy() for t in (q, k, v, out)])  # plain arrays: torch would share them by fd
    conn.close()


def test_pool_works_in_a_forked_child(pooled):
    """A fork()ed child (a DataLoader worker, say) builds its own pool instead of waiting
    on the parent's threads, which it does not have."""
    q, k, v = _inputs(1, 60, 60, 2, 2, 8, torch.float64)
    sliding_window_attention(q, k, v, window_size=(9, 0), causal=True, backend="torch")  # the parent's pool exists
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child,))
    proc.start()
    # generous: a hang would mean the child waits on threads it does not have; a loaded
    # 2-core machine takes a few seconds to start the child
    assert parent.poll(300), "the forked child did not answer"
    cq, ck, cv, out = (torch.from_numpy(a) for a in parent.recv())
    proc.join(60)
    ref, _ = sliding_window_attention_reference(cq, ck, cv, (9, 0), True)
    assert_rel(out, ref, TOL[torch.float64], "out in the child")
