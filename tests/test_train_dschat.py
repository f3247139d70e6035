"""``sft-kernels train`` as DeepSpeed-Chat step 1: its data forms, splits and cache, its objective
and perplexity, evaluation after every epoch, LoRA, tensorboard, refused resumes, and a
DeepSpeed-Chat run script's argument list on 2 CPU ranks.

Oracles are written here: split sizes from DeepSpeed-Chat's rounding rule, the texts
DeepSpeed-Chat builds from a row, the two perplexity formulas computed in float64 from the
model's own logits, LoRA's forward from its definition, and the exported (folded) model
against the trained LoRA model's logits.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from sft_kernels.train import build_parser, main, run  # noqa: E402
from sft_kernels.train.data import (IGNORE_INDEX, default_data_path, eval_batches, load_jsonl,  # noqa: E402
                                    phase_one_indices, prepare)
from sft_kernels.train.lora import LoRALinear, apply_lora, fold_into_state, only_optimize_lora  # noqa: E402
from sft_kernels.train.tokenizer import ByteTokenizer  # noqa: E402

FAST = ["--no_progress", "--max_seq_len", "64", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8"]


def _shipped(n=None):
    rows = load_jsonl(default_data_path())
    return rows[:n] if n else rows


def _as_dschat(rows):
    """prompt/response rows as DeepSpeed-Chat's local/jsonfile rows (prompt, chosen, rejected)."""
    return [{"prompt": r["prompt"], "chosen": r["response"].strip(), "rejected": "I do not know."} for r in rows]


def _args(*flags):
    return build_parser().parse_args([*map(str, flags)])


# ----------------------------------------------------------------------------- data
def test_split_sizes_follow_dschat_rounding():
    # DeepSpeed-Chat: cumulative boundaries round(share * n), shifted so the last equals n
    # (n=1: [0, 0, 0, 0] shifted by 1 gives phase 1 the one row; n=2: [0, 0, 1, 2] gives it none)
    for n, split, expected in [(100, "2,4,4", 20), (7, "2,4,4", 1), (10, "10,0,0", 10), (9, "6,2,2", 5),
                               (3, "1,1,1", 1), (1, "2,4,4", 1), (2, "2,4,4", 0)]:
        idx = phase_one_indices(n, split, seed=5)
        assert len(idx) == expected, (n, split, idx)
        assert len(set(idx)) == len(idx) and all(0 <= i < n for i in idx)
    assert phase_one_indices(50, "2,4,4", 5) == phase_one_indices(50, "2,4,4", 5)
    assert phase_one_indices(50, "2,4,4", 5) != phase_one_indices(50, "2,4,4", 6)


def _write_local_jsonfile(d, train_rows, eval_rows, as_array=True):
    os.makedirs(d / "data", exist_ok=True)
    for name, rows in (("train.json", train_rows), ("eval.json", eval_rows)):
        text = json.dumps(rows) if as_array else "".join(json.dumps(r) + "\n" for r in rows)
        (d / "data" / name).write_text(text)


def test_local_jsonfile_saved_dataset_and_jsonl_sources(tmp_path, monkeypatch):
    """local/jsonfile (a JSON array, DeepSpeed-Chat's text " prompt chosen"), a save_to_disk
    directory (Dahoas form, "prompt" + "chosen"), a JSON lines file (held-out eval), blended,
    and the sft-only path used whole."""
    import datasets

    monkeypatch.chdir(tmp_path)
    rows = [dict(r, prompt=f"[{i}] " + r["prompt"]) for i, r in enumerate(_as_dschat(_shipped(200)))]  # all distinct
    _write_local_jsonfile(tmp_path, rows[:50], rows[50:60])
    hub = [{"prompt": "\n\nHuman: " + r["prompt"] + " Assistant:", "chosen": " " + r["chosen"], "rejected": " no"}
           for r in rows[60:100]]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(hub[:30]),
                          "test": datasets.Dataset.from_list(hub[30:])}).save_to_disk(str(tmp_path / "hub"))
    (tmp_path / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[100:140]))
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _shipped(220)[200:220]))
    tok = ByteTokenizer()
    args = _args("--data_path", "local/jsonfile", str(tmp_path / "hub"), str(tmp_path / "one.jsonl"),
                 "--sft_only_data_path", str(tmp_path / "sft.jsonl"), "--data_split", "2,4,4",
                 "--data_output_path", str(tmp_path / "cache"), "--max_seq_len", "512")
    data = prepare(args, tok)
    # 20% of each split of each --data_path dataset; the .jsonl's 20% (8) loses 10% (1) to eval;
    # the sft-only file whole (20 rows, 2 to eval)
    assert "local/jsonfile (10 train / 2 eval)" in data.description
    assert f"{tmp_path / 'hub'} (6 train / 2 eval)" in data.description
    assert f"{tmp_path / 'one.jsonl'} (7 train / 1 eval)" in data.description
    assert f"{tmp_path / 'sft.jsonl'} (18 train / 2 eval)" in data.description
    assert len(data.train) == 41 and len(data.eval) == 7 and data.dropped == 0
    texts = {tok.decode(e.input_ids) for e in data.train}
    local_texts = {" " + r["prompt"] + " " + r["chosen"] for r in rows[:50]}
    hub_texts = {r["prompt"] + r["chosen"] for r in hub[:30]}
    sft_texts = {r["prompt"] + r["response"] for r in _shipped(220)[200:220]}
    assert len(texts & local_texts) == 10 and len(texts & hub_texts) == 6 and sft_texts <= texts | {
        tok.decode(e.input_ids) for e in data.eval}
    for e in data.train:  # bos + text + eos, every token its own label (--loss_on full)
        assert e.input_ids[0] == tok.bos_token_id and e.input_ids[-1] == tok.eos_token_id
        assert e.labels == e.input_ids
    assert not data.from_cache
    again = prepare(args, tok)
    assert again.from_cache and again.cache_file == data.cache_file
    assert [e.input_ids for e in again.train] == [e.input_ids for e in data.train]
    # editing a data file changes the key (DeepSpeed-Chat's cache would serve the old data)
    (tmp_path / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[100:150]))
    edited = prepare(args, tok)
    assert not edited.from_cache and edited.cache_file != data.cache_file
    assert f"{tmp_path / 'one.jsonl'} (9 train / 1 eval)" in edited.description


def test_loss_on_response_masks_exactly_the_prompt(tmp_path):
    tok = ByteTokenizer()
    row = {"prompt": "Human: hi Assistant:", "chosen": "yo", "rejected": "no"}
    (tmp_path / "d.jsonl").write_text((json.dumps(row) + "\n") * 4)
    common = ["--data_path", str(tmp_path / "d.jsonl"), "--data_split", "10,0,0", "--data_output_path", ""]
    full = prepare(_args(*common), tok).train[0]
    resp = prepare(_args(*common, "--loss_on", "response"), tok).train[0]
    text = " " + row["prompt"] + " " + row["chosen"]
    assert full.input_ids == resp.input_ids == [tok.bos_token_id] + [b + 3 for b in text.encode()] + [tok.eos_token_id]
    n_prompt = 1 + len((" " + row["prompt"]).encode())
    assert resp.labels == [IGNORE_INDEX] * n_prompt + full.input_ids[n_prompt:]
    assert full.labels == full.input_ids


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\n', "need 'prompt' and 'chosen'"),
    ('{"prompt": 3, "chosen": "b"}\n', "'prompt' must be a string"),
    ('[1, 2]', "not an object"),
    ('{"prompt": "a", "chosen": "b"\n', "not JSON"),
])
def test_bad_rows_are_refused_with_the_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_jsonl(str(tmp_path / "bad.jsonl"))


def test_null_fields_are_skipped_as_dschat_skips_them(tmp_path):
    rows = [{"prompt": "p", "chosen": None, "rejected": "x"}] + _as_dschat(_shipped(10))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = prepare(_args("--data_path", str(tmp_path / "d.jsonl"), "--data_split", "10,0,0",
                         "--data_output_path", ""), ByteTokenizer())
    assert data.dropped == 1 and len(data.train) + len(data.eval) == 10


# ----------------------------------------------------------------------------- LoRA
def test_lora_linear_is_its_definition_and_starts_as_the_base():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    base = base.double()
    ref = x @ base.weight.detach().T + base.bias.detach()
    lora = LoRALinear(base, r=4)
    assert lora.lora_left_weight.abs().sum() == 0 and not lora.weight.requires_grad
    assert lora.lora_right_weight.abs().max() <= 0.5 and lora.lora_right_weight.std() > 0.1  # U(-1/sqrt(4), ..)
    torch.testing.assert_close(lora(x), ref, rtol=0, atol=0)
    with torch.no_grad():
        lora.lora_left_weight.normal_()
    A, B = lora.lora_right_weight.detach(), lora.lora_left_weight.detach()
    expected = ref + (x @ A @ B) / 4
    torch.testing.assert_close(lora(x), expected, rtol=1e-12, atol=1e-12)
    # folding W + (A B)^T / r is the same function
    state = {"l.weight": base.weight.detach().clone(), "l.bias": base.bias.detach().clone(),
             "l.lora_right_weight": A.clone(), "l.lora_left_weight": B.clone()}
    holder = torch.nn.Module()
    holder.l = lora
    assert fold_into_state(holder, state) == 1 and set(state) == {"l.weight", "l.bias"}
    torch.testing.assert_close(x @ state["l.weight"].T + state["l.bias"], expected, rtol=1e-12, atol=1e-12)


def test_apply_lora_matches_names_and_freezes():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    names = apply_lora(model, "model.layers.", 2)
    assert len(names) == 2 * 7 and "lm_head" not in names
    n = only_optimize_lora(model)
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in k for k in trainable) and n == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        apply_lora(model, "decoder.layers.", 2)


def test_optimizer_groups_as_dschat(tmp_path):
    """DeepSpeed-Chat's grouping: decayed weights at --learning_rate, LoRA factors (decayed) at
    --lora_learning_rate, biases and norm weights without decay; frozen weights left out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft_kernels.train.loop import optimizer_groups

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, attention_bias=True))
    apply_lora(model, "model.layers.", 2)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = optimizer_groups(model, 0.1, 7e-4)
    by = [sorted(names[id(p)] for p in g["params"]) for g in groups]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1, 0.0] and groups[1]["lr"] == 7e-4
    assert "lr" not in groups[0] and "lr" not in groups[2]
    assert by[0] == ["lm_head.weight", "model.embed_tokens.weight"]
    assert by[1] and all(n.endswith(("lora_right_weight", "lora_left_weight")) for n in by[1]) and len(by[1]) == 14
    assert all(n.endswith(("norm.weight", "bias")) for n in by[2]) and "model.norm.weight" in by[2]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & {n for b in by for n in b}


# ----------------------------------------------------------------------------- perplexities
def test_both_perplexities_match_their_formulas(tmp_path):
    """evaluate() on an engine (1 process, gloo) against the two formulas in float64 on the
    same model's logits. Batches of very different lengths make the two definitions differ."""
    import deepspeed

    from sft_kernels.train.loop import evaluate, setup_distributed
    from sft_kernels.train.model import build_model

    device, rank, world = setup_distributed(-1)
    tok = ByteTokenizer()
    rows = [{"prompt": "Q" * k, "response": " " + "a" * (40 - k)} for k in (1, 3, 30, 35, 2)] + [
        {"prompt": "Human: What is 2 + 2?", "response": " 4"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    args = _args("--data_path", str(tmp_path / "d.jsonl"), "--data_split", "10,0,0", "--data_output_path", "",
                 "--eval_fraction", "0.5", "--loss_on", "response")
    data = prepare(args, tok)
    model = build_model(args, tok).eval()
    engine, *_ = deepspeed.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1,
                                                           "zero_optimization": {"stage": 0}})
    got = evaluate(engine, eval_batches(data.eval, 2, 0, 1, tok.pad_token_id), device)
    sums, counts = [], []
    model.eval()
    with torch.no_grad():
        for batch in eval_batches(data.eval, 2, 0, 1, tok.pad_token_id):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
            logp = torch.log_softmax(logits[:, :-1], -1)
            labels = batch["labels"][:, 1:]
            keep = labels != IGNORE_INDEX
            nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep]
            sums.append(nll.sum().item())
            counts.append(int(keep.sum()))
    batch_means = [s / c for s, c in zip(sums, counts)]
    dschat = math.exp(sum(batch_means) / len(batch_means))
    weighted = math.exp(sum(sums) / sum(counts))
    assert got["tokens"] == sum(counts)
    assert got["dschat_perplexity"] == pytest.approx(dschat, rel=1e-5)
    assert got["perplexity"] == pytest.approx(weighted, rel=1e-5)
    assert abs(dschat - weighted) / weighted > 1e-3, "the batches must make the two definitions differ"


# ----------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _as_dschat(_shipped(200)[:96])))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _as_dschat(_shipped(200)[96:120])))
    return d


def test_eval_after_every_epoch_lora_export_and_tensorboard(small_data, tmp_path):
    """3 epochs of 12 steps with LoRA only: an evaluation at steps 0, 12, 24, 36; only the LoRA
    factors change; the export (folded) reproduces the trained LoRA model's logits; tensorboard
    events hold the eval scalars and the train loss."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    metrics, model = run(_args("--data_path", str(small_data), "--data_split", "10,0,0", "--num_train_epochs", 3,
                               "--output_dir", out, "--data_output_path", tmp_path / "cache", "--learning_rate", 1e-2,
                               "--lora_dim", 8, "--lora_module_name", "model.layers.", "--only_optimize_lora",
                               "--lora_learning_rate", 2e-2, "--enable_tensorboard", "--tensorboard_path",
                               tmp_path / "tb", *FAST))
    assert [(e["epoch"], e["step"]) for e in metrics["evals"]] == [(0, 0), (1, 12), (2, 24), (3, 36)]
    ppl = [e["dschat_perplexity"] for e in metrics["evals"]]
    assert ppl[-1] < ppl[0] and all(b < a for a, b in zip(ppl, ppl[1:])), ppl
    assert metrics["trainable_parameters"] < 0.1 * metrics["parameters"]
    assert metrics["definitions"]["dschat_perplexity"].startswith("exp(mean over ranks")
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4 * 7
    exported = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    assert not any("lora" in k for k in exported.state_dict())
    ids = torch.tensor([[2] + [b + 3 for b in b" Human: What is 3 + 4? Assistant: 7"]])
    with torch.no_grad():
        ref = model.eval()(input_ids=ids).logits
        got = exported(input_ids=ids).logits
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    assert all(m.lora_left_weight.abs().max() > 0 for m in model.modules() if isinstance(m, LoRALinear)), \
        "every LoRA update moved off zero, so the fold is exercised"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb" / "ds_tensorboard_logs" / "step1_model_tensorboard"
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"Eval/dschat_perplexity", "Eval/perplexity", "Train/loss", "Train/Samples/lr"} <= tags, tags
    assert [e.value for e in acc.Scalars("Eval/dschat_perplexity")] == pytest.approx(ppl, rel=1e-5)
    assert len(acc.Scalars("Train/loss")) == 36


def test_lora_only_changes_lora_factors(small_data, tmp_path):
    from sft_kernels.train.model import build_model

    flags = ["--data_path", str(small_data), "--data_split", "10,0,0", "--max_steps", 3,
             "--data_output_path", tmp_path / "cache", "--lora_dim", 4, "--lora_module_name", "model.layers.",
             "--only_optimize_lora", "--zero_stage", 2, *FAST]
    before = {k: v.detach().clone() for k, v in build_model(_args(*flags), ByteTokenizer()).named_parameters()}
    _, model = run(_args(*flags))
    after = dict(model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k].detach())}
    assert changed and all("lora_left_weight" in k or "lora_right_weight" in k for k in changed), changed
    assert any("lora_left_weight" in k for k in changed)


def test_lora_under_zero3_exports_the_model_it_evaluated(small_data, tmp_path):
    """LoRA on a ZeRO-3 (partitioned) model: the folded export, evaluated here in float64,
    gives the token-weighted eval loss the engine reported at the end."""
    from transformers import AutoModelForCausalLM

    flags = ["--data_path", str(small_data), "--data_split", "10,0,0", "--max_steps", 3, "--output_dir",
             tmp_path / "out", "--data_output_path", tmp_path / "cache", "--lora_dim", 4, "--lora_module_name",
             "model.layers.", "--zero_stage", 3, "--learning_rate", 1e-2, "--lora_learning_rate", 2e-2, *FAST]
    metrics, _ = run(_args(*flags))
    assert metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"]
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
    assert not any("lora" in k for k in exported.state_dict())
    data = prepare(_args(*flags), ByteTokenizer())
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(data.eval, 8, 0, 1, 0):
            logits = exported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
            labels = batch["labels"][:, 1:]
            keep = labels != IGNORE_INDEX
            nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            total += nll[keep].sum().item()
            count += int(keep.sum())
    assert count == metrics["eval_after"]["tokens"]
    assert total / count == pytest.approx(metrics["eval_after"]["loss"], rel=1e-5)


# ----------------------------------------------------------------------------- resume refusals
@pytest.fixture(scope="module")
def checkpoint(small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = root / "data"
    shutil.copytree(small_data, data)
    flags = ["--data_path", str(data), "--data_split", "10,0,0", "--data_output_path", str(root / "cache"),
             "--output_dir", str(root / "out"), "--max_steps", "2", "--num_train_epochs", "2", *map(str, FAST)]
    assert main(flags) == 0
    return root, flags


@pytest.mark.parametrize("change, setting", [
    (["--learning_rate", "2e-3"], "learning_rate: checkpoint 0.001, this run 0.002"),
    (["--lr_scheduler_type", "linear"], "lr_scheduler_type: checkpoint 'cosine', this run 'linear'"),
    (["--num_warmup_steps", "5"], "num_warmup_steps: checkpoint 0, this run 5"),
    (["--num_train_epochs", "3"], "num_train_epochs: checkpoint 2, this run 3"),
    (["--window_size", "16"], "window: checkpoint 32, this run 16"),
    (["--zero_stage", "2"], "zero_stage: checkpoint 0, this run 2"),
    (["--data_split", "9,1,0"], "data: the data"),
    (["--max_seq_len", "48"], "max_seq_len: checkpoint 64, this run 48"),
    (["--loss_on", "response"], "loss_on: checkpoint 'full', this run 'response'"),
    ("edit-data", "data: the data"),
], ids=["lr", "schedule", "warmup", "epochs", "window", "zero-stage", "data-split", "seq-len", "objective",
        "edited-data-file"])
def test_resume_refuses_a_changed_setting(checkpoint, capsys, change, setting):
    root, flags = checkpoint
    state = root / "out" / "ds_checkpoint" / "global_step2" / "sft_kernels_state.json"
    saved = state.read_bytes()
    flags = [f if f != "2" or i == 0 or flags[i - 1] != "--max_steps" else "4" for i, f in enumerate(flags)]
    data_file = root / "data" / "train.jsonl"
    original, st = data_file.read_bytes(), os.stat(data_file)
    try:
        if change == "edit-data":
            data_file.write_bytes(original + original.splitlines(keepends=True)[0])
            change = []
        assert main(flags + change) == 2
    finally:
        data_file.write_bytes(original)
        os.utime(data_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    err = capsys.readouterr().err
    assert "cannot resume from" in err and setting in err, err
    assert state.read_bytes() == saved and not (root / "out" / "ds_checkpoint" / "global_step4").exists()


def test_resume_accepts_what_does_not_change_the_run(checkpoint):
    root, flags = checkpoint
    flags = [f if f != "2" or flags[i - 1] != "--max_steps" else "3" for i, f in enumerate(flags)]
    assert main(flags + ["--attn_implementation", "eager", "--per_device_eval_batch_size", "4", "--print_loss"]) == 0
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    assert [s for s, _ in metrics["train_losses"]] == [1, 2, 3] and metrics["resumed_from_step"] == 2


# ----------------------------------------------------------------------------- a DeepSpeed-Chat run script
# training_scripts/opt/single_node/run_1.3b.sh of DeepSpeed-Chat's step 1, as its argument list:
# only the four hub datasets, the model and $OUTPUT are replaced by local paths.
def run_script_args(data_paths, model, output, zero_stage=2):
    return ["--data_path", *data_paths,
            "--data_split", "2,4,4",
            "--model_name_or_path", model,
            "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "8",
            "--max_seq_len", "512",
            "--learning_rate", "9.65e-6",
            "--weight_decay", "0.",
            "--num_train_epochs", "16",
            "--gradient_accumulation_steps", "1",
            "--lr_scheduler_type", "cosine",
            "--num_warmup_steps", "0",
            "--seed", "1234",
            "--zero_stage", str(zero_stage),
            "--deepspeed",
            "--enable_tensorboard",
            "--tensorboard_path", output,
            "--output_dir", output]


def make_dschat_workspace(root):
    """A tiny OPT model (DeepSpeed-Chat's family) with a byte-level tokenizer, and four local
    datasets in the four forms: local/jsonfile, two save_to_disk directories, a JSON-lines folder."""
    import datasets
    from helpers import save_tiny_opt

    save_tiny_opt(root / "opt-tiny")
    rows = _as_dschat(_shipped())
    chunks = [rows[i * 100:(i + 1) * 100] for i in range(4)]  # 80 train + 20 eval each
    _write_local_jsonfile(root, chunks[0][:80], chunks[0][80:])
    for i in (1, 2):
        hub = [{"prompt": " Human: " + r["prompt"] + " Assistant:", "chosen": " " + r["chosen"],
                "rejected": " " + r["rejected"]} for r in chunks[i]]
        datasets.DatasetDict({"train": datasets.Dataset.from_list(hub[:80]),
                              "test": datasets.Dataset.from_list(hub[80:])}).save_to_disk(str(root / f"hub{i}"))
    os.makedirs(root / "jsonl", exist_ok=True)
    for name, part in (("train.jsonl", chunks[3][:80]), ("eval.jsonl", chunks[3][80:])):
        (root / "jsonl" / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return ["local/jsonfile", str(root / "hub1"), str(root / "hub2"), str(root / "jsonl")], str(root / "opt-tiny")


def test_dschat_run_script_argument_list_on_two_ranks(tmp_path):
    """Done-when of issue 14: the argument list of DeepSpeed-Chat's step-1 single-node script
    (paths replaced) runs with ``sft-kernels train`` on 2 CPU ranks and its perplexity falls
    at every epoch's evaluation (16 epochs of 4 steps at lr 9.65e-6)."""
    from _procs import Group, free_port, prebuild_deepspeed_cpu_ops, rank_envs

    prebuild_deepspeed_cpu_ops()
    data_paths, model = make_dschat_workspace(tmp_path)
    out = str(tmp_path / "output")
    exe = os.path.join(os.path.dirname(sys.executable), "sft-kernels")
    cmd = [exe, "train"] if os.path.exists(exe) else [sys.executable, "-m", "sft_kernels.cli", "train"]
    envs = rank_envs(2, free_port(), pythonpath=False)
    # --data_output_path keeps DeepSpeed-Chat's default (/tmp/data_files/); the cache key holds
    # every data file's path, size and mtime, so runs of this test never share an entry
    g = Group([cmd + run_script_args(data_paths, model, out) for _ in range(2)], envs, cwd=str(tmp_path))
    assert g.wait() == [0, 0], g.report()
    metrics = json.loads((tmp_path / "output" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["settings"]["zero_stage"] == 2
    evals = metrics["evals"]
    assert [e["epoch"] for e in evals] == list(range(17)) and evals[-1]["step"] == 64
    ppl = [e["dschat_perplexity"] for e in evals]
    assert all(b < a for a, b in zip(ppl, ppl[1:])), ppl
    assert metrics["eval_after"]["perplexity"] < metrics["eval_before"]["perplexity"]
    log = g.output(0)
    assert "local/jsonfile (16 train / 4 eval)" in log and "4 micro-batches per epoch per rank, 64 optimizer steps (schedule over 64)" in log
    assert "loss on the whole sequence" in log and "DeepSpeed-Chat: exp of the mean of batch-mean losses" in log
    assert os.path.isdir(os.path.join(out, "ds_tensorboard_logs", "step1_model_tensorboard"))
    assert os.path.exists(os.path.join(out, "model.safetensors"))
