"""Ulysses sequence parallelism: SFTAttention(..., sequence_parallel_group=group) on 2 CPU
processes (gloo) gives the outputs and gradients of one process holding the whole sequence.

Both ranks run every case in one launch (process start-up dominates); each rank checks its
slice of the output and of the input gradient, and the all-reduced parameter gradients,
against a single-process SFTAttention with the same weights, in float64. The two ranks are
waited on while they make progress (tests/_procs.py), after DeepSpeed's one-time CPU op build.
"""

import json
import sys

import pytest

pytest.importorskip("deepspeed")

from _procs import Group, free_port, prebuild_deepspeed_cpu_ops, rank_envs  # noqa: E402
TOL = 1e-12  # float64, relative error; the same arithmetic up to summation order

WORKER = r'''
import json, os, sys
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch
import deepspeed
import torch.distributed as dist
from sft_kernels import SFTAttention

deepspeed.init_distributed(dist_backend="gloo")
from sft_kernels.integrations.deepspeed import ulysses_group
rank, world = dist.get_rank(), dist.get_world_size()
group, dp_rank = ulysses_group(world)  # one sequence parallel group of all ranks
assert dp_rank == 0 and dist.get_world_size(group) == world
torch.set_default_dtype(torch.float64)

def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))

CASES = {
    "mha-window": dict(kw=dict(hidden_size=32, num_heads=4, window_size=5), L=12),
    "gqa-sqrt-groups": dict(kw=dict(hidden_size=32, num_heads=4, num_kv_heads=2, window_size="sqrt", qkv_groups=2,
                                    bias=True), L=16),
    "bidirectional-asym": dict(kw=dict(hidden_size=24, num_heads=2, head_dim=8, window_size=(3, 2), causal=False), L=10),
    "unbounded-causal-norope": dict(kw=dict(hidden_size=16, num_heads=2, window_size=None, rope_theta=None), L=8),
    "padding-left-right": dict(kw=dict(hidden_size=32, num_heads=4, num_kv_heads=2, window_size=4, bias=True), L=12,
                               pad=True),
}
results = {}
for name, case in CASES.items():
    torch.manual_seed(0)
    kw, L = case["kw"], case["L"]
    ref = SFTAttention(**kw)
    sp = SFTAttention(**kw, sequence_parallel_group=group)
    sp.load_state_dict(ref.state_dict())
    b = 2
    x = torch.randn(b, L, kw["hidden_size"])
    gy = torch.randn(b, L, kw["hidden_size"])
    mask = None
    if case.get("pad"):
        mask = torch.ones(b, L, dtype=torch.long)
        mask[0, :5] = 0   # left padding crossing the shard boundary's left side
        mask[1, -7:] = 0  # right padding: rank 1 holds only padding in this row
    l = L // world
    sl = slice(rank * l, (rank + 1) * l)
    xr = x.clone().requires_grad_(True)
    yr = ref(xr, attention_mask=mask)
    (yr * gy).sum().backward()
    xs = x[:, sl].clone().requires_grad_(True)
    ys = sp(xs, attention_mask=None if mask is None else mask[:, sl])
    (ys * gy[:, sl]).sum().backward()
    errs = {"out": rel(ys.detach(), yr.detach()[:, sl]), "dx": rel(xs.grad, xr.grad[:, sl])}
    if mask is not None:
        errs["pad_rows_zero"] = float(ys.detach()[mask[:, sl] == 0].abs().max()) if (mask[:, sl] == 0).any() else 0.0
    for (pn, p), (_, pr) in zip(sp.named_parameters(), ref.named_parameters()):
        g = p.grad.clone()
        dist.all_reduce(g, group=group)  # each rank holds the gradient of its own tokens
        errs["d" + pn] = rel(g, pr.grad)
    results[name] = errs

# constraints: heads divisible by the group size
errors = {}
for name, kw in {"kv_heads": dict(hidden_size=16, num_heads=4, num_kv_heads=1),
                 "heads": dict(hidden_size=18, num_heads=3)}.items():
    try:
        SFTAttention(**kw, sequence_parallel_group=group)
        errors[name] = ""
    except ValueError as e:
        errors[name] = str(e)
json.dump({"results": results, "errors": errors}, open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w"))
dist.barrier()
from sft_kernels.train.loop import exit_process  # noqa: E402
exit_process(0)  # the process group, then no interpreter finalisation (exit_process says why)
'''


@pytest.fixture(scope="module")
def ulysses_results(tmp_path_factory):
    prebuild_deepspeed_cpu_ops()
    out = tmp_path_factory.mktemp("ulysses")
    script = out / "worker.py"
    script.write_text(WORKER)
    g = Group([[sys.executable, str(script), str(out)]] * 2, rank_envs(2, free_port()))
    assert g.wait() == [0, 0], g.report(5000)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


CASE_IDS = ["mha-window", "gqa-sqrt-groups", "bidirectional-asym", "unbounded-causal-norope", "padding-left-right"]


@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("rank", [0, 1])
def test_matches_single_process(ulysses_results, case, rank):
    errs = ulysses_results[rank]["results"][case]
    assert errs.pop("pad_rows_zero", 0.0) == 0.0
    assert len(errs) >= 4  # out, dx and at least two parameter gradients
    bad = {k: v for k, v in errs.items() if not v < TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"


def test_heads_must_divide_group(ulysses_results):
    errors = ulysses_results[0]["errors"]
    assert "num_kv_heads=1 must be divisible by the sequence parallel group size 2" in errors["kv_heads"]
    assert "num_heads=3 must be divisible by the sequence parallel group size 2" in errors["heads"]


def test_requires_initialised_distributed(monkeypatch):
    import torch.distributed as dist

    from sft_kernels import SFTAttention

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match="torch.distributed to be initialised"):
        SFTAttention(16, 2, sequence_parallel_group=object())


def test_example_train_ds_learns_the_shipped_data_with_ulysses(tmp_path):
    """examples/train_ds.py on 2 CPU ranks, ZeRO-2, one Ulysses group of 2: the printed
    full-sequence loss falls well below the uniform ln(259) and the checkpoint lands under
    --output_dir (not the working directory)."""
    import math
    import os
    import re

    from _procs import ROOT

    prebuild_deepspeed_cpu_ops()
    cmd = [sys.executable, "-u", os.path.join(ROOT, "examples", "train_ds.py"), "--zero", "2", "--sp", "2",
           "--steps", "40", "--seq_len", "128", "--dtype", "fp32", "--output_dir", str(tmp_path / "out")]
    g = Group([cmd + [f"--local_rank={r}"] for r in range(2)], rank_envs(2, free_port()), cwd=str(tmp_path))
    assert g.wait() == [0, 0], g.report()
    losses = [float(x) for x in re.findall(r"step \d+ loss ([0-9.]+)", g.output(0))]
    assert len(losses) == 5 and abs(losses[0] - math.log(259)) < 1.0, losses  # a random model: near uniform
    assert losses[-1] < 2.0, losses  # measured 5.90 -> 1.17 (the rules of the templated data are learnt)
    assert (tmp_path / "out" / "ds_checkpoint" / "latest").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]
