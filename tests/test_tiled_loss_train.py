"""``sft-kernels train --loss_chunk_tokens N [--mlp_chunk_tokens M]``: the same run as with full
logits and the plain MLP -- per-step losses, gradient norms and evaluation losses -- with
gradient accumulation (DeepSpeed scales the loss by 1/gas, which must reach the lm_head weight
gradient too), at ZeRO 0 (the package's own chunked loss) and ZeRO-3 (DeepSpeed's
TiledFusedLogitsLoss on the partitioned head). In this process, world size 1, fp32."""

from __future__ import annotations

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from sft_kernels.train import build_parser, run  # noqa: E402

FLAGS = ["--max_seq_len", "64", "--no_progress", "--per_device_eval_batch_size", "32", "--max_steps", "3",
         "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "4", "--eval_fraction", "0.05"]
REL_CP = 1e-6  # test_train_context_parallel's bound for context parallel against one process (measured: below)
REL = 2e-6  # measured: losses within 1.4e-7 (ZeRO 0) and 5.4e-8 (ZeRO-3); grad_scale 1 instead of 1/gas: 8.7e-4


def _run(out_dir, *flags):
    args = build_parser().parse_args(["--data_output_path", str(out_dir) + "-data", *FLAGS, *map(str, flags)])
    metrics, _ = run(args)
    return metrics


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.mark.parametrize("zero", [0, 3])
def test_tiled_run_equals_full_logits_run(tmp_path, zero):
    ref = _run(tmp_path / "full", "--zero_stage", zero)
    extra = ["--mlp_chunk_tokens", 50] if zero == 0 else []
    got = _run(tmp_path / "tiled", "--zero_stage", zero, "--loss_chunk_tokens", 37, *extra)
    assert len(got["train_losses"]) == 3
    for (s1, a), (s2, b) in zip(got["train_losses"], ref["train_losses"]):
        assert s1 == s2 and _rel(a, b) <= REL, (s1, a, b)
    for a, b in zip(got["train_grad_norms_this_run"], ref["train_grad_norms_this_run"]):
        assert (a[1] is None) == (b[1] is None) and (a[1] is None or _rel(a[1], b[1]) <= REL), (a, b)
    assert zero == 0 or ref["train_grad_norms_this_run"][0][1] is not None  # ZeRO-3 computes norms: compared
    assert _rel(got["eval_after"]["loss"], ref["eval_after"]["loss"]) <= REL


def test_context_parallel_tiled_run_equals_one_process_full_logits(tmp_path):
    """2 gloo ranks, each holding half of every sequence, ZeRO-3 (DeepSpeed's path on the tied,
    partitioned head): the block losses N l_j through shift_labels / num_items_in_batch, scaled
    by N and 1/gas, give the one-process full-logits run's losses."""
    import json
    import sys

    from _procs import Group, free_port, prebuild_deepspeed_cpu_ops, rank_envs

    prebuild_deepspeed_cpu_ops()
    cp_dir = tmp_path / "cp2"
    flags = ["--output_dir", str(cp_dir), "--data_output_path", str(cp_dir) + "-data", *FLAGS, "--zero_stage", "3",
             "--context_parallel_size", "2", "--loss_chunk_tokens", "21"]
    g = Group([[sys.executable, "-m", "sft_kernels.train", f"--local_rank={rank}", *flags] for rank in range(2)],
              rank_envs(2, free_port(), pythonpath=False))
    assert g.wait() == [0, 0], g.report()
    got = json.loads((cp_dir / "metrics.json").read_text())
    ref = _run(tmp_path / "ref", "--zero_stage", 3)
    assert len(got["train_losses"]) == 3
    for (s1, a), (s2, b) in zip(got["train_losses"], ref["train_losses"]):
        assert s1 == s2 and _rel(a, b) <= REL_CP, (s1, a, b)


def test_offload_checkpoints_run_equals_the_checkpointed_run(tmp_path, monkeypatch):
    """--offload_checkpoints (DeepSpeed's activation-checkpoint offload) around every micro-batch's
    forward and backward: the same losses, gradient norms and evaluation as plain checkpointing.
    DeepSpeed's CPU accelerator is made to say it is not synchronized, so its copy-out / copy-back
    code really runs (on CPU it otherwise declines to copy; see tests/test_activation_offload.py)."""
    from deepspeed.accelerator import get_accelerator

    import sft_kernels.modules.activation_offload as offload_module

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        pytest.skip("the CPU check (DeepSpeed's accelerator here is not its CPU one)")
    ref = _run(tmp_path / "gc", "--gradient_checkpointing")
    monkeypatch.setattr(accelerator, "is_synchronized_device", lambda: False)
    made = []
    real = offload_module.checkpoint_offload
    monkeypatch.setattr(offload_module, "checkpoint_offload", lambda model, **kw: made.append(real(model, **kw)) or made[-1])
    got = _run(tmp_path / "offload", "--gradient_checkpointing", "--offload_checkpoints")
    assert len(made) == 1  # one context for the run (its CPU buffers pooled across steps)
    s = made[0].stats  # the last micro-batch's: every layer's input but the newest went out and came back
    assert s.offloaded_tensors == s.restored_tensors and s.offloaded_tensors >= 1, s
    assert len(got["train_losses"]) == 3  # the copies are exact, so is the run
    assert got["train_losses"] == ref["train_losses"]
    assert got["train_grad_norms_this_run"] == ref["train_grad_norms_this_run"]
    assert got["eval_after"]["loss"] == ref["eval_after"]["loss"]


def test_offload_checkpoints_needs_checkpointing(tmp_path):
    with pytest.raises(ValueError, match="--offload_checkpoints .* needs --gradient_checkpointing"):
        _run(tmp_path / "bad", "--offload_checkpoints")
