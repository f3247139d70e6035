"""``sft-kernels train`` reproduces DeepSpeed-Chat's step 1 (DeepSpeedExamples,
``applications/DeepSpeed-Chat``: ``training/step1_supervised_finetuning/main.py`` and
``dschat/utils/data/data_utils.py``, ``dschat/utils/utils.py``, ``dschat/utils/model/model_utils.py``).

Oracles are written here from DeepSpeed-Chat's source, importing nothing of this package's
data code:

- the phase-1 split: ``np.random.RandomState(seed).shuffle(arange(n, uint32))`` and the
  rounded, shifted boundaries of ``get_raw_dataset_split_index``, with the same seed for the
  train and the eval split and for every dataset; blending and ``--sft_only_data_path`` as
  ``create_prompt_dataset`` concatenates and reshuffles;
- the samplers: ``DistributedSampler``'s algorithm (``randperm`` seeded ``seed + epoch``,
  padded by repetition, ``[rank::world]``) with main.py's defaults (seed 0, ``set_epoch`` never
  called), batches with the last one partial;
- the step count and learning rates: main.py's ``num_update_steps_per_epoch`` and the cosine
  schedule with warmup written out;
- the tokenizer's pad token and the embedding size of ``load_hf_tokenizer`` / ``create_hf_model``.

``test_real_dschat_step1_perplexities``: with ``SFT_KERNELS_DSCHAT_DIR`` set to a DeepSpeed-Chat
checkout (``.../applications/DeepSpeed-Chat``), its own main.py (through ``python -m
sft_kernels.dschat``) and ``sft-kernels train`` run one epoch on 2 CPU ranks with the same
argument list; their perplexities before training agree within 0.2% and after the epoch within
1% (measured: 0.00% and 0.02%).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from sft_kernels.train import build_parser, run  # noqa: E402
from sft_kernels.train.data import Example, TrainBatches, eval_batches, prepare  # noqa: E402
from sft_kernels.train.tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402

SEED = 1234


def _args(*flags):
    return build_parser().parse_args([*map(str, flags)])


def dschat_phase1_index(n, data_split, seed):
    """get_raw_dataset_split_index(..., split_index=0, data_size=n), written out."""
    splits = [float(s) for s in data_split.split(",")]
    splits = [s / sum(splits) for s in splits]
    bounds = [0]
    for i, s in enumerate(splits):
        bounds.append(bounds[i] + int(round(s * float(n))))
    diff = bounds[-1] - n
    for i in range(1, len(bounds)):
        bounds[i] -= diff
    assert bounds[-1] == n
    return dschat_shuffle(seed, n)[bounds[0]:bounds[1]]


def dschat_shuffle(seed, n):
    """get_shuffle_idx(seed, n)."""
    idx = np.arange(start=0, stop=n, step=1, dtype=np.uint32)
    np.random.RandomState(seed=seed).shuffle(idx)
    return idx.tolist()


def sampler_indices(n, world, rank, seed=0, epoch=0):
    """torch's DistributedSampler(shuffle=True, drop_last=False) after set_epoch(epoch), written out."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    total = math.ceil(n / world) * world
    pad = total - n
    perm += (perm * math.ceil(pad / len(perm)))[:pad]
    return perm[rank:total:world]


def _rows(tag, n):
    return [{"prompt": f"Human: {tag} question {i}? Assistant:", "chosen": f"answer {tag}{i}", "rejected": "no"}
            for i in range(n)]


def _text(row):  # LocalJsonFileDataset.get_prompt_and_chosen
    return " " + row["prompt"] + " " + row["chosen"]


def _texts(examples):
    tok = ByteTokenizer()
    return [tok.decode(e.input_ids) for e in examples]


# ----------------------------------------------------------------------------- data
def test_split_and_blend_follow_dschat(tmp_path, monkeypatch):
    """One local/jsonfile dataset (train and eval with the same seed); then two --data_path
    datasets blended and an --sft_only_data_path appended, each order checked."""
    monkeypatch.chdir(tmp_path)
    os.makedirs(tmp_path / "data")
    a_train, a_eval = _rows("a", 37), _rows("A", 23)
    (tmp_path / "data" / "train.json").write_text(json.dumps(a_train))
    (tmp_path / "data" / "eval.json").write_text(json.dumps(a_eval))
    common = ["--data_split", "3,4,3", "--seed", SEED, "--data_output_path", "", "--max_seq_len", 512]
    one = prepare(_args("--data_path", "local/jsonfile", *common), ByteTokenizer())
    assert _texts(one.train) == [_text(a_train[i]) for i in dschat_phase1_index(37, "3,4,3", SEED)]
    assert _texts(one.eval) == [_text(a_eval[i]) for i in dschat_phase1_index(23, "3,4,3", SEED)]

    os.makedirs(tmp_path / "b")
    b_train, b_eval = _rows("b", 29), _rows("B", 11)
    (tmp_path / "b" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b_train))
    (tmp_path / "b" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b_eval))
    os.makedirs(tmp_path / "s")
    s_train, s_eval = _rows("s", 9), _rows("S", 4)
    (tmp_path / "s" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in s_train))
    (tmp_path / "s" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in s_eval))
    got = prepare(_args("--data_path", "local/jsonfile", str(tmp_path / "b"), "--sft_only_data_path",
                        str(tmp_path / "s"), *common), ByteTokenizer())
    for split, a, b, s in (("train", a_train, b_train, s_train), ("eval", a_eval, b_eval, s_eval)):
        blended = [_text(a[i]) for i in dschat_phase1_index(len(a), "3,4,3", SEED)] + [
            _text(b[i]) for i in dschat_phase1_index(len(b), "3,4,3", SEED)]
        blended = [blended[i] for i in dschat_shuffle(SEED, len(blended))]
        whole = blended + [_text(s[i]) for i in dschat_phase1_index(len(s), "10,0,0", SEED)]
        expected = [whole[i] for i in dschat_shuffle(SEED, len(whole))]
        assert _texts(getattr(got, split)) == expected, split


# ----------------------------------------------------------------------------- samplers and batches
def _numbered(n):
    """Examples whose first token is their index (+3, the byte tokenizer's offset)."""
    return [Example([i + 3, 1], [i + 3, 1]) for i in range(n)]


def _firsts(batches):
    return [b["input_ids"][:, 0].sub(3).tolist() for b in batches]


@pytest.mark.parametrize("n, world, batch", [(13, 2, 2), (16, 2, 8), (5, 3, 4), (9, 1, 4)])
def test_train_and_eval_batches_are_main_pys_dataloaders(n, world, batch):
    examples = _numbered(n)
    for rank in range(world):
        mine = sampler_indices(n, world, rank)
        expected = [mine[i:i + batch] for i in range(0, len(mine), batch)]  # the last one partial
        batches = TrainBatches(examples, batch, 1, seed=SEED, rank=rank, world_size=world)
        assert batches.micro_per_epoch == len(expected)
        for epoch in (0, 1, 3):  # main.py never calls set_epoch: every epoch the same
            assert _firsts(batches.epoch(epoch)) == expected, (rank, epoch)
        assert _firsts(batches.epoch(1, start_micro=1)) == expected[1:]
        assert _firsts(eval_batches(examples, batch, rank, world, 0)) == expected
        reshuffled = TrainBatches(examples, batch, 1, seed=SEED, rank=rank, world_size=world,
                                  shuffle_each_epoch=True)
        for epoch in (0, 2):
            mine = sampler_indices(n, world, rank, seed=SEED, epoch=epoch)
            assert _firsts(reshuffled.epoch(epoch)) == [mine[i:i + batch] for i in range(0, len(mine), batch)]


# ----------------------------------------------------------------------------- steps, schedule, resume
@pytest.fixture(scope="module")
def straddle_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("straddle")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows("t", 13)))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows("e", 3)))
    return d


def _straddle_flags(data, out, *extra):
    return ["--data_path", data, "--data_split", "10,0,0", "--per_device_train_batch_size", 2,
            "--gradient_accumulation_steps", 2, "--num_train_epochs", 2, "--num_warmup_steps", 1, "--max_seq_len", 64,
            "--per_device_eval_batch_size", 2, "--no_progress", "--output_dir", out, "--data_output_path", "", *extra]


def test_steps_schedule_partial_batches_and_resume(straddle_data, tmp_path):
    """13 examples in batches of 2: 7 micro-batches an epoch (the last of one example). With 2
    accumulation steps over 2 epochs DeepSpeed-Chat steps the optimizer 7 times (the 4th step
    straddles the epochs) on a cosine schedule of 2 * ceil(7 / 2) = 8 steps with 1 warmup step,
    and evaluates at the end of each epoch (after steps 3 and 7). Stopping after 4 steps and
    resuming gives the same steps."""
    full, _ = run(_args(*_straddle_flags(straddle_data, tmp_path / "full")))
    assert full["schedule_steps"] == 8 and full["steps"] == 7 and full["micro_batches"] == 14
    assert [(e["epoch"], e["step"]) for e in full["evals"]] == [(0, 0), (1, 3), (2, 7)]

    def cosine(k, warmup=1, total=8):  # transformers' get_cosine_schedule_with_warmup
        if k < warmup:
            return k / warmup
        return 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))

    lrs = dict(full["train_lrs_this_run"])
    assert sorted(lrs) == list(range(1, 8))
    for step, lr in lrs.items():  # step k applies the rate after k - 1 scheduler steps
        assert lr == pytest.approx(1e-3 * cosine(step - 1), rel=1e-9, abs=1e-15), (step, lr)

    first, _ = run(_args(*_straddle_flags(straddle_data, tmp_path / "split", "--max_steps", 4)))
    assert first["steps"] == 4 and [(e["epoch"], e["step"]) for e in first["evals"]][:2] == [(0, 0), (1, 3)]
    second, _ = run(_args(*_straddle_flags(straddle_data, tmp_path / "split")))
    assert second["resumed_from_step"] == 4 and second["steps"] == 7
    expected = dict(full["train_losses"])
    for step, loss in second["train_losses"]:
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=0), (step, loss, expected[step])
    assert second["evals"][-1]["loss"] == pytest.approx(full["evals"][-1]["loss"], rel=1e-6)


# ----------------------------------------------------------------------------- tokenizer and embeddings
def _save_tokenizer(path, with_pad):
    """The byte tokenizer as a Hugging Face one, with or without a pad token."""
    tok = ByteTokenizer().to_hf()
    if not with_pad:
        tok.pad_token = None
    tok.save_pretrained(path)
    return tok


def _save_opt(path, vocab_size):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=vocab_size, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                       max_position_embeddings=64, word_embed_proj_dim=16)
    OPTForCausalLM(config).save_pretrained(path)


@pytest.mark.parametrize("folder, name_or_path, with_pad, vocab, pad, length, rows", [
    ("opt", None, True, 259, "</s>", 259, 264),            # pad = eos even where the tokenizer has one; grown
    ("opt", None, False, 300, "</s>", 259, 264),           # shrunk
    ("my-llama-7b", None, False, 259, "[PAD]", 260, 264),  # "llama" in the path: a [PAD] token is added
    ("my-llama-7b", None, True, 259, "<pad>", 259, 264),   # ... where the tokenizer has none
    ("m", "meta-llama/Llama-2-7b-hf", False, 259, "[PAD]", 260, 264),  # the name in config.json counts
    ("opt", None, False, 264, "</s>", 259, 264),           # already a multiple of 8: unchanged
], ids=["opt-grow", "opt-shrink", "llama-path-pad", "llama-path-has-pad", "llama-name-in-config", "unchanged"])
def test_pad_token_and_embedding_size_as_dschat(tmp_path, folder, name_or_path, with_pad, vocab, pad, length, rows):
    """load_hf_tokenizer: "llama" in the model's name adds [PAD] where there is no pad token,
    otherwise pad = eos; create_hf_model: 8 * ceil(len(tokenizer) / 8) embedding rows."""
    from sft_kernels.train.model import build_model

    d = tmp_path / folder
    _save_opt(d, vocab)
    _save_tokenizer(d, with_pad)
    if name_or_path:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(dict(cfg, _name_or_path=name_or_path)))
    tok = load_tokenizer(str(d))
    assert tok.tok.pad_token == pad and len(tok) == length
    assert tok.pad_token_id == tok.tok.convert_tokens_to_ids(pad)
    model = build_model(_args("--model_name_or_path", d, "--max_seq_len", 64, "--attn_implementation", "eager"), tok)
    assert model.get_input_embeddings().num_embeddings == rows
    assert model.get_output_embeddings().weight.shape[0] == rows


# ----------------------------------------------------------------------------- DeepSpeed-Chat itself
DSCHAT_DIR = os.environ.get("SFT_KERNELS_DSCHAT_DIR")


@pytest.mark.skipif(not DSCHAT_DIR, reason="set SFT_KERNELS_DSCHAT_DIR to DeepSpeedExamples/applications/DeepSpeed-Chat")
def test_real_dschat_step1_perplexities(tmp_path):
    """DeepSpeed-Chat's main.py (its dschat/ and main.py copied into tmp_path, run through
    ``python -m sft_kernels.dschat``, unchanged) against ``sft-kernels train`` with the same
    argument list: a tiny OPT, local/jsonfile, bf16, ZeRO-2, 2 CPU ranks, one epoch."""
    from _procs import Group, free_port, prebuild_deepspeed_cpu_ops, rank_envs
    from helpers import save_tiny_opt

    from sft_kernels.train.data import default_data_path, load_jsonl

    prebuild_deepspeed_cpu_ops()
    chat = tmp_path / "DeepSpeed-Chat"
    shutil.copytree(os.path.join(DSCHAT_DIR, "dschat"), chat / "dschat")
    step1 = chat / "training" / "step1_supervised_finetuning"
    os.makedirs(step1)
    shutil.copy(os.path.join(DSCHAT_DIR, "training", "step1_supervised_finetuning", "main.py"), step1)
    rows = [{"prompt": r["prompt"], "chosen": r["response"].strip(), "rejected": "I do not know."}
            for r in load_jsonl(default_data_path())]
    os.makedirs(chat / "data")
    (chat / "data" / "train.json").write_text(json.dumps(rows[:500]))  # phase 1: 100 train, 20 eval rows
    (chat / "data" / "eval.json").write_text(json.dumps(rows[500:]))
    save_tiny_opt(tmp_path / "opt-tiny")
    flags = ["--data_path", "local/jsonfile", "--data_split", "2,4,4", "--model_name_or_path", str(tmp_path / "opt-tiny"),
             "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--max_seq_len", "512",
             "--weight_decay", "0.", "--num_train_epochs", "1", "--gradient_accumulation_steps", "1",
             "--lr_scheduler_type", "cosine", "--num_warmup_steps", "0", "--seed", "1234", "--zero_stage", "2",
             "--deepspeed", "--dtype", "bf16"]

    def both_ranks(module_and_script, data_dir):
        cmds = [[sys.executable, "-u", "-m", *module_and_script[:1], f"--local_rank={r}", *module_and_script[1:],
                 *flags, "--data_output_path", str(tmp_path / data_dir)] for r in range(2)]
        g = Group(cmds, rank_envs(2, free_port(), pythonpath=False), cwd=str(step1))
        assert g.wait() == [0, 0], g.report()
        return g.output(0)

    theirs = [float(x) for x in re.findall(r"^ppl: ([0-9.]+)", both_ranks(["sft_kernels.dschat", "main.py"], "ds"),
                                           re.M)]
    ours = [float(x) for x in re.findall(r"^eval [^:]*: perplexity ([0-9.]+)",
                                         both_ranks(["sft_kernels.train", "--no_progress"], "ours"), re.M)]
    assert len(theirs) == len(ours) == 2, (theirs, ours)
    assert ours[0] == pytest.approx(theirs[0], rel=2e-3), (ours, theirs)
    assert ours[1] == pytest.approx(theirs[1], rel=1e-2), (ours, theirs)
    assert theirs[1] < 0.8 * theirs[0], "the epoch trained: the comparison after it is not the one before"
