"""``python -m sft_kernels.dschat main.py ...`` runs a DeepSpeed-Chat-structured step-1 script
(tests/dschat_standin, see its README) on this package's attention, on 2 CPU ranks (gloo,
ZeRO-3), started the way the deepspeed launcher starts them (``--local_rank=N`` right after
the module name).

Oracle: the same script run plainly (``python main.py``, transformers' default attention).
With no window the two compute the same function, so every rank's per-step losses agree
to fp32 rounding (bound 1e-5 relative; Adam carries ~1e-7 differences). The control: a
4-key window through the launcher changes the losses by far more than the bound, so the
comparison can fail and the kernels are on the path.
"""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from _procs import ROOT, Group, free_port, prebuild_deepspeed_cpu_ops, rank_envs  # noqa: E402

STANDIN = os.path.join(ROOT, "tests", "dschat_standin", "training", "step1_supervised_finetuning", "main.py")
STANDIN_ROOT = os.path.join(ROOT, "tests", "dschat_standin")
LOSS_RTOL = 1e-5
# The plain (oracle) run: the script as `python main.py` runs it, then os._exit once it has
# returned, as the launcher ends (sft_kernels.train.loop.exit_process says why: without it a
# finished gloo rank sometimes aborts in the interpreter's finalisation). No package code.
PLAIN = ("import os, runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); "
         "runpy.run_path(sys.argv[0], run_name='__main__'); sys.stdout.flush(); sys.stderr.flush(); os._exit(0)")


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft_kernels.train.tokenizer import ByteTokenizer

    root = tmp_path_factory.mktemp("dschat")
    tok = ByteTokenizer().to_hf()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = [{"prompt": f"Human: What is {a} + {b}? Assistant:", "chosen": f"{a + b}", "rejected": "no"}
            for a, b in [(1, 2), (13, 4), (7, 7), (20, 22), (5, 9), (31, 3), (8, 40), (2, 2), (9, 1), (4, 16),
                                 (11, 11), (3, 30)]]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prebuild_deepspeed_cpu_ops()
    return root


def _run(root, launcher_opts=None, zero=3):
    """Both ranks of one run; {rank: [loss per step]} and the logs."""
    script_args = ["--data_path", str(root / "train.jsonl"), "--model_name_or_path", str(root / "model"),
                   "--zero_stage", str(zero), "--max_steps", "3", "--deepspeed"]
    cmds = []
    for rank in range(2):
        if launcher_opts is None:
            cmds.append([sys.executable, "-u", "-c", PLAIN, STANDIN, f"--local_rank={rank}", *script_args])
        else:  # what `deepspeed --module sft_kernels.dschat ...` runs on each rank
            cmds.append([sys.executable, "-u", "-m", "sft_kernels.dschat", f"--local_rank={rank}", *launcher_opts,
                         STANDIN, *script_args])
    envs = rank_envs(2, free_port())
    for env in envs:  # plainly, dschat/ is on the path (DeepSpeed-Chat: pip install -e .); the launcher finds it
        env["PYTHONPATH"] = ROOT if launcher_opts is not None else os.pathsep.join([ROOT, STANDIN_ROOT])
    g = Group(cmds, envs, cwd=str(root))
    rcs = g.wait()
    assert rcs == [0, 0], g.report()
    losses = {}
    for rank in range(2):
        losses[rank] = [float(m) for m in re.findall(rf"rank {rank} step \d+ loss ([0-9.]+)", g.output(rank))]
        assert len(losses[rank]) == 3 and f"rank {rank} done" in g.output(rank), g.report()
    return losses, g.output(0)


@pytest.fixture(scope="module")
def runs(model_and_data):
    return {"plain": _run(model_and_data), "sft": _run(model_and_data, []),
            "sft_window4": _run(model_and_data, ["--window_size", "4"])}


def test_launcher_runs_the_script_on_every_rank_with_the_kernels(runs):
    _, log = runs["sft"]
    assert "attn_implementation sft_sliding_window" in log
    assert "partitioned at load True" in log, "ZeRO-3 loading through HfDeepSpeedConfig still partitions"
    _, plain_log = runs["plain"]
    assert "attn_implementation sft_sliding_window" not in plain_log


def test_losses_match_the_plain_script(runs):
    plain, sft = runs["plain"][0], runs["sft"][0]
    for rank in (0, 1):
        for a, b in zip(sft[rank], plain[rank]):
            assert a == pytest.approx(b, rel=LOSS_RTOL, abs=0), (rank, sft[rank], plain[rank])
    assert plain[0] != plain[1], "the ranks trained on different batches"


def test_control_window_changes_the_losses(runs):
    plain, win = runs["plain"][0], runs["sft_window4"][0]
    rel = max(abs(a - b) / b for r in (0, 1) for a, b in zip(win[r], plain[r]))
    assert rel > 100 * LOSS_RTOL, (win, plain)


def test_split_argv_and_errors():
    from sft_kernels.dschat import main, split_argv

    assert split_argv(["--local_rank=1", "--window_size", "8", "m.py", "--zero_stage", "3"]) == (
        ["--local_rank=1", "--window_size", "8"], "m.py", ["--zero_stage", "3"])
    assert split_argv(["m.py", "--local_rank=0"]) == ([], "m.py", ["--local_rank=0"])
    with pytest.raises(ValueError, match="unknown option '--bogus'"):
        split_argv(["--bogus", "m.py"])
    with pytest.raises(ValueError, match="no script"):
        split_argv(["--window_size", "8"])
    assert main(["/nonexistent/main.py"]) == 2
    assert main(["--window_size", "0", STANDIN]) == 2


def test_process_setup_without_a_launcher_under_torchrun_and_deepspeed(monkeypatch):
    """DeepSpeed-Chat's main.py initialises the process group only when given --local_rank.
    Alone: a world of one (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*) and --local_rank=0 (run end to
    end by tests/test_train_inputs.py's control); torchrun: LOCAL_RANK from the environment;
    the deepspeed launcher's --local_rank, or one already in the script's flags, kept."""
    from sft_kernels.dschat import process_setup

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert process_setup(None, ["--zero_stage", "2"]) == ["--zero_stage", "2", "--local_rank=0"]
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert process_setup(None, []) == ["--local_rank=3"]
    assert process_setup("1", []) == ["--local_rank=1"]
    assert process_setup(None, ["--local_rank", "2"]) == ["--local_rank", "2"]


def test_transformers4_names_dschat_imports_exist():
    """dschat/utils/model/model_utils.py imports no_init_weights from transformers.modeling_utils
    (transformers 4); after install() the import works and is transformers' own context manager."""
    import importlib

    from transformers import modeling_utils

    from sft_kernels.dschat import install_transformers4_names

    install_transformers4_names()
    from transformers.modeling_utils import no_init_weights

    assert no_init_weights is importlib.import_module("transformers.initialization").no_init_weights
    with no_init_weights():  # the weights' init functions are no-ops inside, restored after
        import torch

        w = torch.zeros(3)
        torch.nn.init.normal_(w)
        assert w.abs().sum() == 0
    torch.nn.init.normal_(w)
    assert w.abs().sum() > 0
    assert hasattr(modeling_utils, "no_init_weights")
