"""``sft-kernels train --context_parallel_size 2`` under DeepSpeed on 2 CPU ranks (gloo) against
the same run on one process without context parallelism (same global batch; ZeRO-2 on both:
DeepSpeed reports the gradient norm there).

The embedded model (window 32) at ``--max_seq_len 64``: each rank holds half of every
sequence (32 tokens), so every layer's window reaches into the other rank's block. ZeRO-2
partitions over both ranks, gradient clipping (1.0) is active. A control run with the window
one key narrower shows the bound can see a halo-sized difference.
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
         "--per_device_train_batch_size", "8", "--eval_fraction", "0.05", "--zero_stage", "2"]
# fp32 arithmetic in a different order (two halves, halo merge by log-sum-exp, gradients summed
# over ranks) through 3 AdamW steps: measured relative differences 0 for the step losses (the same
# fp32 values), 6e-8 for the eval losses (float64 sums), 2e-7 for the gradient norms
BOUND = 1e-6
CONTROL_MIN = 1e-4  # the window one key narrower moves the losses by this much at least (measured 1.5e-4)


def _one_process(tmp, *extra):
    args = build_parser().parse_args(["--output_dir", str(tmp), "--data_output_path", str(tmp) + "-data", *FLAGS,
                                      *extra])
    return run(args)[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    prebuild_deepspeed_cpu_ops()
    cp_dir = tmp_path_factory.mktemp("cp2")
    flags = ["--output_dir", str(cp_dir), "--data_output_path", str(cp_dir) + "-data", *FLAGS,
             "--context_parallel_size", "2"]
    g = Group([[sys.executable, "-m", "sft_kernels.train", f"--local_rank={rank}", *flags] for rank in range(2)],
              rank_envs(2, free_port(), pythonpath=False))
    assert g.wait() == [0, 0], g.report()
    cp = json.loads((cp_dir / "metrics.json").read_text())
    ref = _one_process(tmp_path_factory.mktemp("ref"))
    control = _one_process(tmp_path_factory.mktemp("ctl"), "--window_size", "31")
    return cp, ref, control


def _rel(a, b):
    return abs(a - b) / abs(b)


def test_step_losses_equal_one_process_without_context_parallelism(runs):
    cp, ref, _ = runs
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


def test_control_window_off_by_one_is_outside_the_bound(runs):
    cp, ref, control = runs
    diffs = [_rel(c, r) for (_, c), (_, r) in zip(control["train_losses"], ref["train_losses"])]
    assert min(diffs) > CONTROL_MIN > 100 * BOUND, diffs
    assert all(_rel(a, c) > CONTROL_MIN for (_, a), (_, c) in zip(cp["train_losses"], control["train_losses"]))


@pytest.mark.parametrize("flags, message", [
    (["--context_parallel_size", "2"], "must divide the world size 1"),
])
def test_bad_context_parallel_flags(tmp_path, capsys, flags, message):
    assert main(["--output_dir", str(tmp_path), *FLAGS, *flags]) == 2
    assert message in capsys.readouterr().err
