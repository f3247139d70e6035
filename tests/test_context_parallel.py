"""Halo context parallelism on 2 and 4 CPU processes (gloo) against one process holding the
whole sequence: ``context_parallel_attention`` (outputs, LSE, gradients; float64 and
fp32/bf16; windows smaller than, equal to and larger than a shard; causal and two-sided;
int, sqrt and explicit windows; GQA/MQA), ``SFTAttention(context_parallel_group=...)``
(rotary offsets, right padding, Ulysses inside on 4 ranks), the errors, and a short
training run whose per-step losses must match.

Each world size is one launch of ``tests/context_parallel_worker.py`` (process start-up
dominates); every rank writes its measurements and the tests below read them.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from sft_kernels.parallel import halo_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "context_parallel_worker.py")
TOL64 = 1e-10  # float64: the same arithmetic up to summation order (measured ~1e-15)
TOL = {"float32": 1e-5, "bfloat16": 1e-2}
# A rank that makes no progress for this long is stuck (a real hang, not a slow machine: on a
# loaded 2-core runner one case takes seconds, and each case reports progress).
STALL_S = 600


def _launch(world: int, out, run_triton: bool):
    store = out / "store"
    env = dict(os.environ, PYTHONPATH=ROOT, WORLD_SIZE=str(world), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    if run_triton:
        env["TRITON_INTERPRET"] = "1"  # CPU tensors through Triton's interpreter
    else:
        env.pop("TRITON_INTERPRET", None)
    procs, logs = [], []
    for rank in range(world):
        log = open(out / f"log{rank}.txt", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, str(out), str(store), "1" if run_triton else "0"],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    last = time.time()
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            if any(c not in (None, 0) for c in codes):
                break  # one rank failed: the others would wait for it in a collective
            stamps = [os.path.getmtime(out / f"progress{r}") for r in range(world) if (out / f"progress{r}").exists()]
            last = max([last] + stamps)
            if time.time() - last > STALL_S:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    text = "\n".join(f"--- rank {r}\n" + (out / f"log{r}.txt").read_text()[-4000:] for r in range(world))
    assert all(p.returncode == 0 for p in procs), f"a rank failed or stalled:\n{text}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def ranks2(request, tmp_path_factory):
    run_triton = request.config._sft_triton_mode != "none"  # one case through the Triton interpreter
    return _launch(2, tmp_path_factory.mktemp("cp2"), run_triton)


@pytest.fixture(scope="module")
def ranks4(tmp_path_factory):
    pytest.importorskip("deepspeed")  # the Ulysses-inside cases
    return _launch(4, tmp_path_factory.mktemp("cp4"), False)


@pytest.fixture(params=[2, 4], ids=["P2", "P4"])
def ranks(request):
    return request.getfixturevalue(f"ranks{request.param}")


def _errs(ranks, prefix):
    for r, data in enumerate(ranks):
        for name, errs in data["results"].items():
            if name.startswith(prefix):
                yield r, name, errs


def test_op_float64_matches_one_process(ranks):
    names = set()
    for r, name, errs in _errs(ranks, "op/"):
        if errs["dtype_out"] != "torch.float64" or "triton" in name:
            continue
        names.add(name)
        bad = {k: v for k, v in errs.items() if k != "dtype_out" and not v < TOL64}
        assert not bad, f"rank {r} {name}: relative errors above {TOL64}: {bad}"
    assert len(names) >= 16, sorted(names)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_op_low_precision(ranks, dtype):
    seen = 0
    for r, name, errs in _errs(ranks, "op/"):
        if errs["dtype_out"] != f"torch.{dtype}" or "triton" in name:
            continue
        seen += 1
        for key in ("out", "lse", "dq", "dk", "dv"):
            assert errs[key] < TOL[dtype], f"rank {r} {name} {key}: {errs[key]:.2e}"
            if f"base_{key}" in errs:  # at most twice the error of plain PyTorch in bf16 on one process
                assert errs[key] <= 2 * errs[f"base_{key}"] + 1e-4, (r, name, key, errs)
    assert seen == len(ranks)


@pytest.mark.interpret
def test_op_triton_kernel_as_local_kernel(ranks2):
    """Two processes only: the interpreter is slow."""
    seen = 0
    for r, name, errs in _errs(ranks2, "op/triton"):
        seen += 1
        for key in ("out", "lse", "dq", "dk", "dv"):
            assert errs[key] < TOL["float32"], f"rank {r} {name} {key}: {errs[key]:.2e}"
    assert seen == 2, "the Triton case did not run on both ranks"


def test_errors_are_raised_on_every_rank(ranks):
    expected = {
        "unequal-lengths": "ValueError: context_parallel_attention: every rank of the group must hold the same number",
        "group-does-not-divide-L": "The group size P must divide the sequence length L",
        "window-differs": "the window resolves differently across the group (window left",
        "heads-differ": "heads_kv differs across the group",
        "packed": "packed (varlen) input",
        "layer-left-padding": "is not right-padded across the sequence",
        "layer-hole": "'hole'",
        "layer-twosided-padding": "needs causal=True",
    }
    for r, data in enumerate(ranks):
        for name, text in expected.items():
            assert text in data["errors"][name], (r, name, data["errors"][name])
        msg = data["errors"]["one-rank-bad-dtype"]
        if r == 1:
            assert msg.startswith("TypeError") and "floating-point" in msg, msg
        else:
            assert "rank(s) [1] of the group rejected their inputs" in msg, msg


def test_layer_matches_one_process(ranks):
    names = set()
    for r, name, errs in _errs(ranks, "layer/"):
        names.add(name)
        assert errs.pop("pad_rows_max", 0.0) == 0.0
        assert len(errs) >= 4  # out, dx and at least two parameter gradients
        bad = {k: v for k, v in errs.items() if not v < TOL64}
        assert not bad, f"rank {r} {name}: relative errors above {TOL64}: {bad}"
    expected = {"gqa-int-window-bias", "sqrt-qkv-groups", "twosided-norope", "right-padding-int", "right-padding-sqrt"}
    if len(ranks) == 4:
        expected |= {"ulysses-inside-int", "ulysses-inside-padding-sqrt"}
    assert {n.split("/", 1)[1] for n in names} == expected


def test_training_losses_match_one_process(ranks):
    for r, data in enumerate(ranks):
        run = data["results"]["training"]
        ref, par = run["losses_ref"], run["losses_par"]
        assert len(ref) == len(par) == 4
        assert ref[-1] < ref[0]  # it trains
        for step, (a, b) in enumerate(zip(par, ref)):
            assert abs(a - b) <= 1e-10 * abs(b), f"rank {r} step {step}: {a!r} vs {b!r}"
        assert run["param_err"] < 1e-10


# ----------------------------------------------------------------------------- the plan, in-process
def _needed(rank, world, n, left, right):
    """Global key positions rank ``rank`` needs outside its shard, from the definition."""
    L, lo, hi = world * n, rank * n, (rank + 1) * n
    keys = set()
    for i in range(lo, hi):
        keys |= {j for j in range(max(0, i - left), min(L, i + right + 1)) if not lo <= j < hi}
    return keys


@pytest.mark.parametrize("world,n,left,right", [(2, 7, 3, 0), (4, 5, 5, 0), (4, 5, 12, 0), (4, 5, 19, 19),
                                                (3, 4, 0, 9), (8, 3, 7, 2), (4, 6, 0, 0)])
def test_halo_plan_covers_exactly_the_window(world, n, left, right):
    sent = {r: {} for r in range(world)}
    for rank in range(world):
        plan = halo_plan(rank, world, n, left, right)
        got = set()
        for p in plan.recv_left + plan.recv_right:
            got |= {p.peer * n + j for j in range(p.start, p.stop)}
        assert got == _needed(rank, world, n, left, right)
        pos = [p.peer * n + j for p in plan.recv_left for j in range(p.start, p.stop)]
        assert pos == sorted(pos) and (not pos or pos[-1] == rank * n - 1)  # contiguous, ends at the shard
        for p in plan.send_left + plan.send_right:
            sent[p.peer][rank] = (p.start, p.stop)
    for rank in range(world):  # every receive has the matching send
        plan = halo_plan(rank, world, n, left, right)
        assert {p.peer: (p.start, p.stop) for p in plan.recv_left + plan.recv_right} == sent[rank]


def test_requires_initialised_distributed():
    from sft_kernels import context_parallel_attention

    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        context_parallel_attention(q, q, q, window_size=3)


# ----------------------------------------------------------------------------- benchmark and example
def _bench():
    from sft_kernels.bench import context_parallel

    return context_parallel


def test_bench_model_halo_constant_in_L_and_below_ulysses():
    """The Done-when of the issue, on the model the benchmark checks its counts against."""
    b = _bench()
    for c in b.measured_p_check([2, 4], b.CPU_SHAPE):  # every L in (W, 8W] at the measured P
        assert len(c["halo_bytes_once_n_ge_w"]) == 1, c  # constant in L
        if c["kv_heads"] == b.CPU_SHAPE["kv_heads"]:
            assert c["halo_not_below_ulysses"] == "none", c
    rows = b.headline_table()
    for kv in b.HEADLINE["kv_heads"]:
        for world in b.HEADLINE["worlds"]:
            mine = [r for r in rows if r["kv_heads"] == kv and r["world"] == world]
            assert len({r["halo"] for r in mine}) == 1  # 128k..1M: the same halo
            for r in mine:
                if r["ulysses_possible"]:
                    assert r["halo"] < r["ulysses"], r


def test_bench_runs_and_counts_match_the_model(tmp_path):
    """Two gloo processes at a tiny shape; main() itself fails if a count differs from the model."""
    b = _bench()
    shape = dict(heads=4, kv_heads=2, head_dim=16, window=24)
    assert b.main(["--worlds", "2", "--lengths", "64", "128", "--repeats", "1", "--shape", json.dumps(shape),
                   "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "context_parallel.json").read_text())
    recs = data["records"]
    assert {r["impl"] for r in recs} == {"halo", "ulysses", "allgather_kv", "local_only"}
    keys = {"op", "impl", "device", "dtype", "shape", "ms", "tflops", "gbps", "peak_mem_bytes", "speedup_vs", "env"}
    for r in recs:
        assert not keys - set(r) and r["ms"] > 0 and r["bytes_per_rank"] == r["bytes_model"]
    halo = {r["shape"]["seqlen"]: r["bytes_max"] for r in recs if r["impl"] == "halo"}
    uly = {r["shape"]["seqlen"]: r["bytes_max"] for r in recs if r["impl"] == "ulysses"}
    assert halo[64] == halo[128] and all(halo[L] < uly[L] for L in halo)
    assert uly[128] == 2 * uly[64]
    md = (tmp_path / "context_parallel.md").read_text()
    assert "| 2 | 128 | 64 | halo |" in md
    # packed rows: the same lengths packed from sequences of 6..96 tokens, counted = modelled on
    # every rank (main() checks it), the halo sending only the crossing sequences' keys
    packed = data["packed"]
    assert {(r["impl"], r["shape"]["seqlen"]) for r in packed} == {(i, L) for i in b.PACKED_IMPLS for L in (64, 128)}
    for r in packed:
        cu = r["shape"]["cu_seqlens"]
        assert cu[0] == 0 and cu[-1] == r["shape"]["seqlen"] and r["shape"]["sequences"] == len(cu) - 1
        assert r["ms"] > 0 and r["bytes_per_rank"] == r["bytes_model"]
        if r["impl"] == "halo_packed":
            assert r["bytes_max"] < r["shape"]["alst_bytes_model"], r
            assert r["bytes_per_rank"] == b.packed_halo_bytes(2, cu, 24, 2, 16, 4)
        else:
            assert r["bytes_max"] == uly[r["shape"]["seqlen"]]  # packing does not change Ulysses' bytes
    assert max(r["shape"]["sequences"] for r in packed) >= 2  # a row that is really packed
    assert "## Packed rows" in md and "| halo_packed |" in md


def test_example_trains(tmp_path):
    """examples/train_context_parallel.py on 2 ranks (context parallel 2): the loss falls."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    env.pop("TRITON_INTERPRET", None)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    cmd = [sys.executable, os.path.join(ROOT, "examples", "train_context_parallel.py"), "--cp", "2", "--device", "cpu",
           "--seqlen", "128", "--steps", "80"]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    # generous: 80 small steps take ~10 s on an idle core, far more on a loaded CI runner
    logs = [p.communicate(timeout=1800)[0] for p in procs]
    for p, log in zip(procs, logs):
        # After destroy_process_group, about 1 exit in 20 of a gloo training process on this loaded
        # machine aborts in torch's exit-time destructors ("terminate called without an active
        # exception", SIGABRT) with all its work done; seen with the example, not reproduced in 80
        # runs of context_parallel_attention alone. Only that, as the very last output, passes.
        teardown_abort = p.returncode == -6 and log.rstrip().endswith("terminate called without an active exception")
        assert p.returncode == 0 or teardown_abort, log[-3000:]
    losses = [float(line.split()[-1]) for line in logs[0].splitlines() if line.startswith("step ")]
    assert len(losses) == 80
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses
