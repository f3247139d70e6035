"""``sft-kernels train --context_parallel_size 2`` under DeepSpeed on 2 CPU ranks (gloo) against
the same run on one process without context parallelism (same global batch, same ZeRO stage:
DeepSpeed reports the gradient norm from stage 1 on).

The embedded model (window 32) at ``--max_seq_len 64``: each rank holds half of every
sequence (32 tokens), so every layer's window reaches into the other rank's block. ZeRO-2, and
ZeRO-3 with gradient checkpointing, partition over both ranks; gradient clipping (1.0) is
active. A control run with the window one key narrower shows the bound can see a halo-sized
difference.
"""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from _procs import Group, free_port, prebuild_deepspeed_cpu_ops, rank_envs  # noqa: E402

from sft_kernels.train import build_parser, main, run  # noqa: E402

STEPS = 3
FLAGS = ["--max_seq_len", "64", "--no_progress", "--per_device_eval_batch_size", "32", "--max_steps", str(STEPS),
         "--per_device_train_batch_size", "8", "--eval_fraction", "0.05"]
# fp32 arithmetic in a different order (two halves, halo merge by log-sum-exp, gradients summed
# over ranks) through 3 AdamW steps: differences of 1-2 fp32 ulps (2^-23 = 1.2e-7 relative).
# Measured at these flags (DeepSpeed-Chat's batch order), largest of 3 steps: ZeRO-2: step losses
# 8.5e-8, gradient norms 8.3e-8, eval losses 1.2e-7; ZeRO-3 with gradient checkpointing: 1.7e-7,
# 1.2e-7, 1.0e-7; with --seed 42 --max_seq_len 96, ZeRO-2: 1.1e-7, 9.7e-8, 6.0e-8
BOUND = 1e-6
# the window one key narrower moves at least one of the compared values (step losses, gradient
# norms, eval losses) by this much: measured 5.0e-3 (a gradient norm); the step losses alone
# 4.3e-4, 4.1e-4, 1.5e-5 (the third step's below this since the batch order became DeepSpeed-Chat's)
CONTROL_MIN = 1e-4
# ZeRO-2; ZeRO-3 (its reduce-scatter path is where DeepSpeed's sequence-parallel scaling was wrong)
# with gradient checkpointing (the halo exchange runs again in the recomputed forward)
STAGES = {"zero2": ["--zero_stage", "2"], "zero3-checkpointing": ["--zero_stage", "3", "--gradient_checkpointing"]}


def _one_process(tmp, *extra):
    args = build_parser().parse_args(["--output_dir", str(tmp), "--data_output_path", str(tmp) + "-data", *FLAGS,
                                      *extra])
    return run(args)[0]


_RUNS = {}


def _runs(stage_name, tmp_path_factory):
    """(the context-parallel run's metrics, the one-process run's), once per stage per session."""
    if stage_name not in _RUNS:
        prebuild_deepspeed_cpu_ops()
        stage = STAGES[stage_name]
        cp_dir = tmp_path_factory.mktemp("cp2")
        flags = ["--output_dir", str(cp_dir), "--data_output_path", str(cp_dir) + "-data", *FLAGS, *stage,
                 "--context_parallel_size", "2"]
        g = Group([[sys.executable, "-m", "sft_kernels.train", f"--local_rank={rank}", *flags] for rank in range(2)],
                  rank_envs(2, free_port(), pythonpath=False))
        assert g.wait() == [0, 0], g.report()
        cp = json.loads((cp_dir / "metrics.json").read_text())
        _RUNS[stage_name] = cp, _one_process(tmp_path_factory.mktemp("ref"), *stage)
    return _RUNS[stage_name]


@pytest.fixture(scope="module", params=list(STAGES))
def runs(request, tmp_path_factory):
    return _runs(request.param, tmp_path_factory)


def _rel(a, b):
    return abs(a - b) / abs(b)


def test_step_losses_equal_one_process_without_context_parallelism(runs):
    cp, ref = runs
    assert cp["world_size"] == 2 and cp["context_parallel_size"] == 2 and ref["world_size"] == 1
    steps = [s for s, _ in ref["train_losses"]]
    assert steps == [s for s, _ in cp["train_losses"]] == list(range(1, STEPS + 1))
    for (s, a), (_, b) in zip(cp["train_losses"], ref["train_losses"]):
        assert _rel(a, b) <= BOUND, f"step {s}: {a!r} vs {b!r}"
    # AdamW barely sees a uniform scale of the gradients: the norms (before clipping) pin it,
    # e.g. gradients averaged over the two ranks instead of summed
    norms = zip(cp["train_grad_norms_this_run"], ref["train_grad_norms_this_run"])
    for (s, a), (_, b) in norms:
        assert a is not None and _rel(a, b) <= BOUND, f"step {s}: gradient norm {a!r} vs {b!r}"
    for key in ("eval_before", "eval_after"):  # evaluation shards the sequences too
        assert cp[key]["tokens"] == ref[key]["tokens"]
        for m in ("loss", "dschat_loss"):
            assert _rel(cp[key][m], ref[key][m]) <= BOUND, (key, m, cp[key][m], ref[key][m])
    assert cp["eval_after"]["loss"] < cp["eval_before"]["loss"]


def test_control_window_off_by_one_is_outside_the_bound(tmp_path_factory):
    """One control, with ZeRO-2: what the bound can see."""
    cp, ref = _runs("zero2", tmp_path_factory)
    control = _one_process(tmp_path_factory.mktemp("ctl"), *STAGES["zero2"], "--window_size", "31")

    def compared(m):  # what test_step_losses_equal_one_process_without_context_parallelism bounds
        return ([v for _, v in m["train_losses"]] + [v for _, v in m["train_grad_norms_this_run"]]
                + [m[k][e] for k in ("eval_before", "eval_after") for e in ("loss", "dschat_loss")])

    diffs = [_rel(c, r) for c, r in zip(compared(control), compared(ref))]
    assert max(diffs) > CONTROL_MIN >= 100 * BOUND, diffs
    assert max(_rel(a, c) for a, c in zip(compared(cp), compared(control))) > CONTROL_MIN


@pytest.mark.parametrize("flags, message", [
    (["--context_parallel_size", "2"], "must divide the world size 1"),
])
def test_bad_context_parallel_flags(tmp_path, capsys, flags, message):
    assert main(["--output_dir", str(tmp_path), *FLAGS, *flags]) == 2
    assert message in capsys.readouterr().err
