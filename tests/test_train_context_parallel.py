"""``sft-kernels train --context_parallel_size 2 --context_parallel_mode auto|halo|ulysses`` under
DeepSpeed on 2 CPU ranks (gloo) against the same run on one process without context parallelism
(same global batch, same ZeRO stage: DeepSpeed reports the gradient norm from stage 1 on). Both
modes take their batches from DeepSpeed's ``UlyssesSPDataLoaderAdapter``.

The embedded model (window 32) at ``--max_seq_len 64``: each rank holds half of every
sequence (32 tokens), so every layer's window reaches into the other rank's block. Halo with
ZeRO-2, and auto (here the halo in every layer) and ALST's Ulysses with ZeRO-3 and gradient
checkpointing, partition over both
ranks; gradient clipping (1.0) is active. The eval set (30 rows in batches of 8) ends on a
partial batch. A control run with the window one key narrower shows the bound can see a
halo-sized difference. The adapter's dealing (rounds, padding, the end of an epoch) is checked
without processes.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from _procs import Group, free_port, prebuild_deepspeed_cpu_ops, rank_envs  # noqa: E402

from sft_kernels.train import build_parser, main, run  # noqa: E402

STEPS = 3
# eval batches of the training's size: ALST's attention is built for one batch size
FLAGS = ["--max_seq_len", "64", "--no_progress", "--per_device_eval_batch_size", "8", "--max_steps", str(STEPS),
         "--per_device_train_batch_size", "8", "--eval_fraction", "0.05"]
# fp32 arithmetic in a different order (two halves, halo merge by log-sum-exp, gradients summed
# over ranks) through 3 AdamW steps: differences of 1-2 fp32 ulps (2^-23 = 1.2e-7 relative).
# Measured at these flags (DeepSpeed-Chat's batch order), largest of 3 steps: halo ZeRO-2: step
# losses 8.5e-8, gradient norms 0 (the same floats), eval losses 1.1e-8; auto (the halo) ZeRO-3 with
# gradient checkpointing: 9.7e-8, 2.6e-7, 8.1e-8; Ulysses (ALST) ZeRO-3 with checkpointing: 8.4e-8, 5.6e-8,
# 8.1e-8. (Before the adapter, eval batches of 32: ZeRO-2 8.5e-8, 8.3e-8, 1.2e-7; ZeRO-3 1.7e-7,
# 1.2e-7, 1.0e-7; with --seed 42 --max_seq_len 96, ZeRO-2: 1.1e-7, 9.7e-8, 6.0e-8)
BOUND = 1e-6
# the window one key narrower moves at least one of the compared values (step losses, gradient
# norms, eval losses) by this much: measured 5.0e-3 (a gradient norm); the step losses alone
# 4.3e-4, 4.1e-4, 1.5e-5 (the third step's below this since the batch order became DeepSpeed-Chat's);
# eval losses 3.2e-4 (eval batches of 8)
CONTROL_MIN = 1e-4
# ZeRO-2; ZeRO-3 (its reduce-scatter path is where DeepSpeed's sequence-parallel scaling was wrong)
# with gradient checkpointing (the halo exchange or the all-to-all runs again in the recomputed forward)
STAGES = {"zero2": ["--zero_stage", "2"], "zero3-checkpointing": ["--zero_stage", "3", "--gradient_checkpointing"]}
# auto at N = 2: every layer of the embedded model (all windowed) takes the halo
RUNS = {"halo-zero2": ("halo", "zero2"), "auto-zero3-checkpointing": ("auto", "zero3-checkpointing"),
        "ulysses-zero3-checkpointing": ("ulysses", "zero3-checkpointing")}


def _one_process(tmp, *extra):
    args = build_parser().parse_args(["--output_dir", str(tmp), "--data_output_path", str(tmp) + "-data", *FLAGS,
                                      *extra])
    return run(args)[0]


_REFS, _RUNS = {}, {}


def _reference(stage_name, tmp_path_factory):
    """The one-process run without context parallelism, once per stage per session."""
    if stage_name not in _REFS:
        _REFS[stage_name] = _one_process(tmp_path_factory.mktemp("ref"), *STAGES[stage_name])
    return _REFS[stage_name]


def _runs(name, tmp_path_factory):
    """(the context-parallel run's metrics, the one-process run's), once per run per session."""
    if name not in _RUNS:
        prebuild_deepspeed_cpu_ops()
        mode, stage_name = RUNS[name]
        cp_dir = tmp_path_factory.mktemp("cp2")
        flags = ["--output_dir", str(cp_dir), "--data_output_path", str(cp_dir) + "-data", *FLAGS, *STAGES[stage_name],
                 "--context_parallel_size", "2", "--context_parallel_mode", mode]
        g = Group([[sys.executable, "-m", "sft_kernels.train", f"--local_rank={rank}", *flags] for rank in range(2)],
                  rank_envs(2, free_port(), pythonpath=False))
        assert g.wait() == [0, 0], g.report()
        cp = json.loads((cp_dir / "metrics.json").read_text())
        _RUNS[name] = cp, _reference(stage_name, tmp_path_factory)
    return _RUNS[name]


@pytest.fixture(scope="module", params=list(RUNS))
def runs(request, tmp_path_factory):
    return request.param, *_runs(request.param, tmp_path_factory)


def _rel(a, b):
    return abs(a - b) / abs(b)


def test_step_losses_equal_one_process_without_context_parallelism(runs):
    name, cp, ref = runs
    assert cp["world_size"] == 2 and cp["context_parallel_size"] == 2 and ref["world_size"] == 1
    assert cp["context_parallel_mode"] == RUNS[name][0] and ref["context_parallel_mode"] is None
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
    """One control, with ZeRO-2: what the bound can see. (ZeRO-3 builds the model partitioned, from
    other random draws: its runs start elsewhere, and a ZeRO-2 control says nothing about them.)"""
    cp, ref = _runs("halo-zero2", tmp_path_factory)
    control = _one_process(tmp_path_factory.mktemp("ctl"), *STAGES["zero2"], "--window_size", "31")

    def compared(m):  # what test_step_losses_equal_one_process_without_context_parallelism bounds
        return ([v for _, v in m["train_losses"]] + [v for _, v in m["train_grad_norms_this_run"]]
                + [m[k][e] for k in ("eval_before", "eval_after") for e in ("loss", "dschat_loss")])

    diffs = [_rel(c, r) for c, r in zip(compared(control), compared(ref))]
    assert max(diffs) > CONTROL_MIN >= 100 * BOUND, diffs
    assert max(_rel(a, c) for a, c in zip(compared(cp), compared(control))) > CONTROL_MIN


@pytest.mark.parametrize("flags, message", [
    (["--context_parallel_size", "2"], "must divide the world size 1"),
    (["--context_parallel_size", "2", "--context_parallel_mode", "ulysses", "--per_device_eval_batch_size", "4"],
     "give --per_device_eval_batch_size 8"),
    (["--context_parallel_size", "2", "--context_parallel_mode", "ulysses", "--qkv_groups", "2"],
     "use --context_parallel_mode auto or halo"),
    (["--context_parallel_size", "2", "--attn_implementation", "sdpa"], "only the sft_sliding_window attention"),
], ids=["world", "ulysses-eval-batch", "ulysses-qkv-groups", "sdpa"])
def test_bad_context_parallel_flags(tmp_path, capsys, flags, message):
    assert main(["--output_dir", str(tmp_path), *FLAGS, *flags]) == 2
    assert message in capsys.readouterr().err


def _rows(lengths, first):
    """A batch from collate(): row i is ``first + i`` repeated ``lengths[i]`` times, labels = ids."""
    from sft_kernels.train.data import Example, collate

    return collate([Example([first + i] * n, [first + i] * n) for i, n in enumerate(lengths)], pad_id=0)


@pytest.mark.parametrize("size, rank", [(2, 0), (2, 1), (3, 2)])
def test_the_adapter_is_fed_round_robin_with_padding_and_an_epoch_end(size, rank):
    """Rank j of a group feeds the j-th of every N micro-batches of its replica (from a resume
    point), padded to the round's longest (a multiple of N) and to the batch size in rows; past
    the last micro-batch of a short round, a batch of padding marked None."""
    from sft_kernels.train.context_parallel import MICRO, ContextParallel

    cp = ContextParallel(size, "halo", pad_id=0, device=torch.device("cpu"), rank=rank)
    lengths = [[5, 3], [7, 7], [2, 6], [4], [9, 1]]  # the fourth: a partial batch
    batches = [_rows(n, 10 * i) for i, n in enumerate(lengths)]
    dealt = list(cp._dealt(iter(batches), start=4, rows=2))
    rounds = [list(range(r, min(r + size, len(lengths)))) for r in range(0, len(lengths), size)]
    assert len(dealt) == len(rounds)
    for fed, round_ in zip(dealt, rounds):
        width = size * -(-max(batches[i]["input_ids"].shape[1] for i in round_) // size)
        assert fed["input_ids"].shape == fed["labels"].shape == fed["position_ids"].shape == (2, width)
        assert fed["position_ids"].tolist() == [list(range(width))] * 2
        if rank >= len(round_):
            assert fed[MICRO].index is None and fed["attention_mask"].sum() == 0
            assert (fed["labels"] == -100).all() and (fed["input_ids"] == 0).all()
            continue
        i = round_[rank]
        assert fed[MICRO].index == 4 + i
        src = batches[i]
        b, n = src["input_ids"].shape
        assert torch.equal(fed["input_ids"][:b, :n], src["input_ids"]) and (fed["input_ids"][:, n:] == 0).all()
        assert torch.equal(fed["attention_mask"][:b, :n], src["attention_mask"])
        assert fed["attention_mask"][b:].sum() == 0 and (fed["labels"][b:] == -100).all()
        assert fed[MICRO].tokens == sum(lengths[i])
        assert fed[MICRO].label_tokens == int((src["labels"][:, 1:] != -100).sum())
