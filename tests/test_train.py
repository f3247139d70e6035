"""``sft-kernels train``: labels, tokenizer, end-to-end DeepSpeed runs on CPU, checkpoints, resume.

The runs use the embedded default model (random init, byte tokenizer) on the shipped
dataset with tiny settings (``--max_steps`` 6-8, ``--max_seq_len 64``) in this process
(DeepSpeed's CPU accelerator, gloo, world size 1). Runs shared by several tests are
module-scoped fixtures.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from sft_kernels.train import build_parser, main, run  # noqa: E402
from sft_kernels.train.data import (IGNORE_INDEX, TrainBatches, collate, default_data_path, encode,  # noqa: E402
                                    encode_all, load_jsonl, split)
from sft_kernels.train.model import parse_window_arg  # noqa: E402
from sft_kernels.train.tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402

TINY = ["--max_seq_len", "64", "--no_progress", "--per_device_eval_batch_size", "32"]


def _run(out_dir, *flags):
    args = build_parser().parse_args(["--output_dir", str(out_dir), "--data_output_path", str(out_dir) + "-data",
                                      *TINY, *map(str, flags)])
    return run(args)


def _params(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _loss_falls(losses):
    values = [v for _, v in losses]
    k = max(1, len(values) // 3)
    return sum(values[-k:]) / k < sum(values[:k]) / k


# ----------------------------------------------------------------------------- data and tokenizer
def test_collator_labels_ignore_prompt_and_padding():
    tok = ByteTokenizer()
    rows = [{"prompt": "Human: hi\nAssistant:", "response": " yo"},
            {"prompt": "Q:", "response": " a much longer answer"}]
    examples = [encode(r, tok, 64, loss_on="response") for r in rows]
    batch = collate(examples, tok.pad_token_id)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape == (2, max(len(e.input_ids) for e in examples))
    for i, row in enumerate(rows):
        n_prompt = 1 + len(row["prompt"].encode())  # bos + prompt bytes
        n = n_prompt + len(row["response"].encode()) + 1  # + response + eos
        assert ids[i, 0] == tok.bos_token_id
        assert (labels[i, :n_prompt] == IGNORE_INDEX).all(), "prompt tokens must not be supervised"
        assert torch.equal(labels[i, n_prompt:n], ids[i, n_prompt:n]), "response tokens are their own labels"
        assert labels[i, n - 1] == tok.eos_token_id, "the eos after the response is supervised"
        assert (labels[i, n:] == IGNORE_INDEX).all() and (ids[i, n:] == tok.pad_token_id).all()
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert tok.decode(ids[i, n_prompt:n - 1].tolist()) == row["response"]


def test_truncation_keeps_prompt_labels_masked_and_drops_empty_responses():
    tok = ByteTokenizer()
    long_prompt = {"prompt": "x" * 100, "response": " y"}
    short = {"prompt": "Q", "response": " abcdefghij"}
    kept, dropped = encode_all([long_prompt, short], tok, 8, loss_on="response")
    assert dropped == 1 and len(kept) == 1
    ex = kept[0]
    assert len(ex.input_ids) == 8 and ex.labels[:2] == [IGNORE_INDEX] * 2 and ex.labels[2:] == ex.input_ids[2:]


def test_split_and_batches_are_deterministic_and_disjoint():
    tok = ByteTokenizer()
    examples, _ = encode_all(load_jsonl(default_data_path()), tok, 64)
    assert len(examples) >= 300, "the shipped dataset holds a few hundred examples"
    train_a, eval_a = split(examples, 0.1, seed=3)
    train_b, eval_b = split(examples, 0.1, seed=3)
    assert [e.input_ids for e in eval_a] == [e.input_ids for e in eval_b]
    assert len(eval_a) == round(0.1 * len(examples)) and len(train_a) + len(eval_a) == len(examples)
    assert not {id(e) for e in train_a} & {id(e) for e in eval_a}
    for shuffle_each_epoch in (False, True):
        batches = TrainBatches(train_a, 8, 3, seed=3, shuffle_each_epoch=shuffle_each_epoch)
        assert batches.micro_per_epoch == math.ceil(len(train_a) / 8)  # the last batch partial
        assert batches.schedule_steps_per_epoch == math.ceil(batches.micro_per_epoch / 3)
        first = list(batches.epoch(1))
        resumed = list(batches.epoch(1, start_micro=4))
        assert len(first) == batches.micro_per_epoch and len(first[-1]["input_ids"]) == (len(train_a) % 8 or 8)
        for a, b in zip(first[4:], resumed):
            assert torch.equal(a["input_ids"], b["input_ids"])
        # DeepSpeed-Chat's main.py never calls set_epoch: the same order every epoch
        same = torch.equal(next(batches.epoch(0))["input_ids"], first[0]["input_ids"])
        assert same != shuffle_each_epoch


def test_byte_tokenizer_reloads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = ByteTokenizer()
    tok.save_pretrained(tmp_path)
    text = "Human: héllo ✓ 12 + 30?\nAssistant:\t\x00\xff"
    assert tok.decode(tok.encode(text)) == text
    assert isinstance(load_tokenizer(str(tmp_path)), ByteTokenizer)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id, len(hf)) == (0, 1, 2, 259)


@pytest.mark.parametrize("value, expected", [("64", 64), ("sqrt", "sqrt"), ("-1", None), ("none", None)])
def test_window_flag(value, expected):
    assert parse_window_arg(value) == expected


@pytest.mark.parametrize("value", ["0", "-2", "abc", "1.5"])
def test_window_flag_rejects(value):
    with pytest.raises(ValueError, match="--window_size"):
        parse_window_arg(value)


@pytest.mark.parametrize("flags, message", [
    (["--offload"], "--offload"),
    (["--attn_implementation", "eager", "--window_size", "sqrt"], "sqrt"),
    (["--attn_implementation", "eager", "--qkv_groups", "2"], "qkv_groups"),
    (["--eval_fraction", "1.5"], "eval_fraction"),
    pytest.param(["--dtype", "fp16"], "fp16", marks=pytest.mark.skipif(
        torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_fp16_supported(),
        reason="fp16 is refused only where DeepSpeed's CPU accelerator lacks oneDNN fp16")),
    (["--deepspeed_config", "ds.json"], "--deepspeed_config"),
    (["--only_optimize_lora"], "--only_optimize_lora needs --lora_dim"),
    (["--lora_dim", "4", "--lora_module_name", "decoder.layers."], "matches no nn.Linear"),
    (["--add_eot_token"], "--add_eot_token"),
    (["--data_path", "Dahoas/rm-static"], "not downloaded"),
    (["--data_split", "10,0,0", "--data_path", "local/jsonfile"], "local/jsonfile"),
], ids=["offload-needs-zero", "sqrt-needs-sft", "groups-need-sft", "eval-fraction", "fp16-on-this-cpu",
        "deepspeed-config", "only-lora-needs-lora", "lora-no-match", "eot-byte-tokenizer", "hub-name",
        "no-local-jsonfile"])
def test_bad_flag_combinations_fail_with_a_message(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)  # no data/train.json here
    assert main(["--output_dir", str(tmp_path), "--data_output_path", str(tmp_path / "data"), "--max_steps", "1",
                 *TINY, *flags]) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- end-to-end runs
@pytest.fixture(scope="module")
def zero0_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero0")
    metrics, model = _run(out, "--max_steps", 8, "--zero_stage", 0)
    return out, metrics, model


def test_zero0_loss_finite_and_falls_and_perplexity_drops(zero0_run):
    out, metrics, _ = zero0_run
    losses = metrics["train_losses"]
    assert [s for s, _ in losses] == list(range(1, 9))
    assert all(math.isfinite(v) for _, v in losses)
    assert _loss_falls(losses), losses
    before, after = metrics["eval_before"], metrics["eval_after"]
    assert after["perplexity"] < before["perplexity"], (before, after)
    assert math.isclose(before["perplexity"], math.exp(before["loss"]), rel_tol=1e-9)
    # a random 259-way model starts near uniform: perplexity in the hundreds
    assert 100 < before["perplexity"] < 1000
    on_disk = json.load(open(os.path.join(out, "metrics.json")))
    assert on_disk["eval_after"] == after and on_disk["steps"] == 8


def _probe_batch():
    tok = ByteTokenizer()
    rows = [{"prompt": "Human: What is 12 + 7?\nAssistant:", "response": " 19"},
            {"prompt": "Human: Reverse the word stone.\nAssistant:", "response": " enots"}]
    return collate([encode(r, tok, 64, loss_on="response") for r in rows], tok.pad_token_id)


def test_checkpoint_reloads_with_from_pretrained_identical_logits(zero0_run):
    from transformers import AutoModelForCausalLM

    out, _, trained = zero0_run
    batch = _probe_batch()
    mask = batch["attention_mask"].bool()
    trained.eval()
    with torch.no_grad():
        ref = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        same = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="sft_sliding_window").eval()
        got = same(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        eager = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
        got_eager = eager(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert same.config.sliding_window == 32
    for (n, p), (n2, p2) in zip(trained.named_parameters(), same.named_parameters()):
        assert n == n2 and torch.equal(p, p2), n
    assert torch.equal(got[mask], ref[mask]), "same weights, same attention: bit-identical logits"
    # eager with the same sliding window: the same function up to fp32 rounding
    err = (got_eager[mask] - ref[mask]).norm() / ref[mask].norm()
    assert err < 1e-5, err


def test_zero3_with_gradient_checkpointing_trains_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    metrics, _ = _run(tmp_path, "--max_steps", 6, "--zero_stage", 3, "--gradient_checkpointing")
    losses = metrics["train_losses"]
    assert len(losses) == 6 and all(math.isfinite(v) for _, v in losses) and _loss_falls(losses), losses
    assert metrics["eval_after"]["perplexity"] < metrics["eval_before"]["perplexity"]
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert sum(p.numel() for p in reloaded.parameters()) == metrics["parameters"]
    assert all(p.abs().sum() > 0 for p in reloaded.parameters()), "every gathered ZeRO-3 parameter was written"


def test_zero2_bf16_with_gradient_accumulation(tmp_path):
    metrics, _ = _run(tmp_path, "--max_steps", 4, "--zero_stage", 2, "--dtype", "bf16",
                      "--gradient_accumulation_steps", 2, "--per_device_train_batch_size", 4)
    losses = metrics["train_losses"]
    assert len(losses) == 4 and all(math.isfinite(v) for _, v in losses) and _loss_falls(losses), losses
    assert metrics["eval_after"]["perplexity"] < metrics["eval_before"]["perplexity"]


def test_qkv_groups_block_diagonal_export_is_the_same_function(tmp_path):
    """qkv_groups=2 trains SFTAttention with block-diagonal QKV; the export writes dense
    projections with zero off-diagonal blocks, which compute the same logits."""
    from transformers import AutoModelForCausalLM

    metrics, trained = _run(tmp_path, "--max_steps", 4, "--qkv_groups", 2)
    assert all(math.isfinite(v) for _, v in metrics["train_losses"])
    params = _params(tmp_path)
    q = params["model.layers.0.self_attn.q_proj.weight"]  # (Hq D, C) = (256, 256), 2 groups
    assert q[:128, 128:].abs().max() == 0 and q[128:, :128].abs().max() == 0 and q[:128, :128].abs().max() > 0
    batch = _probe_batch()
    mask = batch["attention_mask"].bool()
    trained.eval()
    with torch.no_grad():
        ref = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        dense = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
        got = dense(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    err = (got[mask] - ref[mask]).norm() / ref[mask].norm()
    assert err < 1e-5, err


def test_resume_continues_where_the_checkpoint_stopped(tmp_path):
    """3 steps, then 3 more resumed in the same output_dir == 6 steps in one run."""
    full, _ = _run(tmp_path / "full", "--max_steps", 6)
    first, _ = _run(tmp_path / "split", "--max_steps", 3)
    assert first["steps"] == 3 and os.path.exists(tmp_path / "split" / "ds_checkpoint" / "latest")
    second, _ = _run(tmp_path / "split", "--max_steps", 6)
    assert second["resumed_from_step"] == 3 and second["steps"] == 6
    assert [s for s, _ in second["train_losses_this_run"]] == [4, 5, 6]
    assert second["train_losses"][:3] == first["train_losses"], "metrics.json keeps the steps before the resume"
    assert second["eval_before"] == first["eval_before"], "the pre-training evaluation is carried over"
    assert second["evals"][:2] == first["evals"] and len(second["evals"]) == 3
    assert [r["resumed_from_step"] for r in second["runs"]] == [None, 3]
    on_disk = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert [s for s, _ in on_disk["train_losses"]] == [1, 2, 3, 4, 5, 6]
    expected = dict((s, v) for s, v in full["train_losses"])
    for s, v in second["train_losses"]:
        assert v == pytest.approx(expected[s], rel=1e-6, abs=0), (s, v, expected[s])
    a, b = _params(tmp_path / "full"), _params(tmp_path / "split")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7, msg=name)
    # a third call with nothing left to do trains no step and keeps the result
    third, _ = _run(tmp_path / "split", "--max_steps", 6)
    assert third["train_losses_this_run"] == [] and third["steps"] == 6
    assert third["train_losses"] == second["train_losses"] and len(third["runs"]) == 3






def test_fine_tune_from_the_exported_checkpoint(zero0_run, tmp_path):
    """--model_name_or_path = a previous output_dir: its weights, its (byte) tokenizer and its
    window; the evaluation before training reproduces that run's final evaluation."""
    out, first, _ = zero0_run
    metrics, model = _run(tmp_path, "--model_name_or_path", out, "--max_steps", 2)
    assert model.config.sliding_window == 32
    assert metrics["eval_before"]["tokens"] == first["eval_after"]["tokens"]
    assert metrics["eval_before"]["loss"] == pytest.approx(first["eval_after"]["loss"], rel=1e-6)


def test_fine_tune_a_local_llama_directory_with_its_own_tokenizer(tmp_path):
    """A Llama model (no sliding_window in its config) saved with a Hugging Face tokenizer: the
    window goes to register(); eager cannot apply it and is refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    src = tmp_path / "llama"
    tok = ByteTokenizer().to_hf()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(src)
    tok.save_pretrained(src)
    assert not isinstance(load_tokenizer(str(src)), ByteTokenizer)
    metrics, model = _run(tmp_path / "out", "--model_name_or_path", src, "--max_steps", 3, "--window_size", 16)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(math.isfinite(v) for _, v in metrics["train_losses"])
    assert metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"]
    assert main(["--output_dir", str(tmp_path / "eager"), "--model_name_or_path", str(src), "--max_steps", "1",
                 "--attn_implementation", "eager", "--window_size", "16", *TINY]) == 2


def test_two_processes_zero2_gloo_and_a_changed_world_size_is_refused(tmp_path, zero0_run, capsys):
    """World size 2 the way the deepspeed launcher starts it (RANK/WORLD_SIZE/LOCAL_RANK in the
    environment, --local_rank=N): ZeRO-2 partitions across the ranks, evaluation sums the
    shards of every rank (same token count as one process). Resuming that checkpoint with
    one process is refused before DeepSpeed touches it."""
    import sys

    from _procs import Group, free_port, prebuild_deepspeed_cpu_ops, rank_envs

    prebuild_deepspeed_cpu_ops()
    flags = ["--output_dir", str(tmp_path), "--data_output_path", str(tmp_path) + "-data", "--max_steps", "2",
             "--zero_stage", "2", *TINY]
    g = Group([[sys.executable, "-m", "sft_kernels.train", f"--local_rank={rank}", *flags] for rank in range(2)],
              rank_envs(2, free_port(), pythonpath=False))
    assert g.wait() == [0, 0], g.report()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2
    assert all(math.isfinite(v) for _, v in metrics["train_losses"])
    assert metrics["eval_before"]["tokens"] == zero0_run[1]["eval_before"]["tokens"]
    assert metrics["eval_after"]["perplexity"] < metrics["eval_before"]["perplexity"]
    flags[flags.index("--max_steps") + 1] = "3"
    assert main(flags) == 2
    assert "world_size: checkpoint 2, this run 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end-to-end benchmark
def test_e2e_benchmark_writes_records(tmp_path):
    from sft_kernels.bench import e2e as bench_e2e

    tiny = [dict(batch=1, seqlen=L, window=16, hidden=64, intermediate=128, layers=1, heads=2, kv_heads=1,
                 head_dim=32, dtype="float32") for L in (64,)]  # one length: each record spawns a memory probe
    assert bench_e2e.main(["--device", "cpu", "--out", str(tmp_path)], shape_list=tiny) == 0
    data = json.loads((tmp_path / "e2e.json").read_text())
    assert set(data) == {"env", "records", "skipped"} and not data["skipped"]
    keys = {"op", "impl", "device", "dtype", "shape", "ms", "tokens_per_s", "peak_mem_bytes", "speedup_vs", "env"}
    assert {(r["impl"], r["shape"]["seqlen"]) for r in data["records"]} == {
        (i, 64) for i in ("sdpa", "sft_sliding_window")}
    for r in data["records"]:
        assert not keys - set(r), keys - set(r)
        assert r["op"] == "sft_train_step" and r["ms"] > 0 and r["tokens_per_s"] > 0
        assert r["speedup_vs"]["baseline"] == "sdpa" and r["speedup_vs"]["ratio"] > 0
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
    assert any(r["peak_mem_bytes"] for r in data["records"]), "the child-process memory probe ran"
    assert data["env"]["transformers"] and data["env"]["commit"]
    assert "sft_sliding_window" in (tmp_path / "e2e.md").read_text()


def test_e2e_benchmark_sdpa_and_sft_compute_the_same_loss():
    """The two providers are the same model with the same window: equal first-step losses."""
    from sft_kernels.bench import e2e as bench_e2e

    shape = dict(batch=1, seqlen=96, window=16, hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1,
                 head_dim=32, dtype="float32")
    losses = [bench_e2e.setup(impl, shape, "cpu")().item() for impl in bench_e2e.IMPLS]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
