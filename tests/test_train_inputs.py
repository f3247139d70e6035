"""Inputs both training entry points refuse before training, with one line that names the problem:
a model directory without a usable tokenizer (transformers 5 loads an empty tokenizer there,
which encodes every text to nothing), and ``--max_seq_len`` above the model's
``max_position_embeddings``. ``sft-kernels train`` runs in this process;
``python -m sft_kernels.dschat`` runs the stand-in step-1 script (tests/dschat_standin) as one
process without a launcher.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from _procs import ROOT, Group, prebuild_deepspeed_cpu_ops  # noqa: E402

from sft_kernels.train import main  # noqa: E402

STANDIN = os.path.join(ROOT, "tests", "dschat_standin", "training", "step1_supervised_finetuning", "main.py")
MAX_POSITIONS = 256


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama with the byte tokenizer saved as a Hugging Face one, the same model without
    any tokenizer file, and a prompt/chosen data file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft_kernels.train.tokenizer import ByteTokenizer

    root = tmp_path_factory.mktemp("inputs")
    tok = ByteTokenizer().to_hf()
    config = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=MAX_POSITIONS,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "with_tokenizer")
    tok.save_pretrained(root / "with_tokenizer")
    model.save_pretrained(root / "llama_no_tokenizer")  # transformers 5 raises here
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(vocab_size=264, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                             word_embed_proj_dim=32)).save_pretrained(root / "no_tokenizer")  # ... and is silent here
    rows = [{"prompt": f"Human: What is {a} + {b}? Assistant:", "chosen": f"{a + b}", "rejected": "no"}
            for a, b in [(1, 2), (13, 4), (7, 7), (20, 22), (5, 9), (31, 3), (8, 40), (2, 2)]]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _train(root, capsys, model, *flags):
    out = root / f"out-{model}-{len(flags)}"
    rc = main(["--model_name_or_path", str(root / model), "--data_path", str(root / "train.jsonl"), "--data_split",
               "10,0,0", "--data_output_path", "", "--output_dir", str(out), "--no_progress", "--max_steps", "1",
               "--max_seq_len", "64", *flags])
    return rc, capsys.readouterr().err, out


def test_train_refuses_a_directory_without_a_tokenizer(models, capsys):
    """An OPT directory without tokenizer files: transformers 5 loads a GPT2Tokenizer of one
    token; a Llama one: it raises. Either way one line naming the tokenizer."""
    for model, why in (("no_tokenizer", "GPT2Tokenizer with 1 token(s) encodes text to no tokens"),
                       ("llama_no_tokenizer", "transformers could not load one")):
        rc, err, out = _train(models, capsys, model)
        assert rc == 2 and not out.exists(), err
        lines = [line for line in err.splitlines() if "error" in line]
        assert len(lines) == 1 and lines[0].startswith(f"sft-kernels train: error: --model_name_or_path "
                                                       f"{models / model}: no usable tokenizer: "), err
        assert why in lines[0], err
    rc, err, _ = _train(models, capsys, "with_tokenizer")  # the control: the same model with its tokenizer
    assert rc == 0, err


def test_train_refuses_max_seq_len_above_the_positions(models, capsys):
    rc, err, out = _train(models, capsys, "with_tokenizer", "--max_seq_len", str(MAX_POSITIONS + 1))
    assert rc == 2 and not out.exists(), err
    assert f"--max_seq_len {MAX_POSITIONS + 1} is above the model's max_position_embeddings {MAX_POSITIONS}" in err


def test_dschat_refuses_both_in_one_line(models):
    """The stand-in script run alone through ``python -m sft_kernels.dschat``: a directory
    without tokenizer files, and --max_seq_len past the positions, each end with exit status 2
    and one error line (no traceback, no training step); the control runs."""
    prebuild_deepspeed_cpu_ops()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET")}
    env.update(PYTHONPATH=ROOT, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "sft_kernels.dschat", STANDIN, "--data_path", str(models / "train.jsonl"),
            "--max_steps", "1", "--deepspeed"]
    cases = {"no_tokenizer": ["--model_name_or_path", str(models / "no_tokenizer")],
             "max_seq_len": ["--model_name_or_path", str(models / "with_tokenizer"),
                             "--max_seq_len", str(MAX_POSITIONS + 1)],
             "control": ["--model_name_or_path", str(models / "with_tokenizer"), "--max_seq_len", str(MAX_POSITIONS)]}
    g = Group([base + c for c in cases.values()], [env] * len(cases), cwd=str(models), merge_stderr=False)
    rcs = dict(zip(cases, g.wait()))
    assert rcs == {"no_tokenizer": 2, "max_seq_len": 2, "control": 0}, g.report()
    expected = {"no_tokenizer": f"no usable tokenizer in '{models / 'no_tokenizer'}'",
                "max_seq_len": f"--max_seq_len {MAX_POSITIONS + 1} is above the model's max_position_embeddings "
                               f"{MAX_POSITIONS}"}
    for i, (case, message) in enumerate(expected.items()):
        errors = [line for line in g.errors(i).splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("sft_kernels.dschat: error: ") and message in errors[0], \
            g.report()
        assert "Traceback" not in g.errors(i) and "step 0 loss" not in g.output(i), g.report()
    assert "rank 0 step 0 loss" in g.output(2) and "rank 0 done" in g.output(2), g.report()
