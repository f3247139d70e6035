"""One process of tests/test_alst.py's HF Trainer run: accelerate's
``ParallelismConfig(sp_backend="deepspeed", sp_size=2)`` with this package's attention as ALST's
core (``sft_kernels.parallel.alst.alst_parallelism_config``) on 2 gloo ranks, or (world of 1)
the same Trainer, DeepSpeed config and data without sequence parallelism.

A tiny fp32 Mistral (window 5) from a config, 4 AdamW steps (DeepSpeed's optimizer, ZeRO-1),
micro batch 2 of rows of 24 tokens: packed rows (position_ids restarting), right- and
left-padded rows; then ``Trainer.evaluate`` on padded rows. Prints ``RESULT {json}``: the
step losses, gradient norms and the eval loss. ``ALST_CONTROL=deepspeed-entry``: the same
run with ALST's own entry (padding masks dropped), which must differ. ``ALST_EXCHANGE=halo|auto``:
this backend's own exchange over ALST's group instead; ``ALST_ROWS=right``: right-padded rows
only; ``ALST_WINDOW``: the model's window (5).

argv: out_dir
"""

import json
import os
import sys

import torch

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
if WORLD > 1:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # accelerate on CPU leaves deepspeed.comm uninitialised
torch.set_num_threads(1)

from transformers import AutoModelForCausalLM, MistralConfig, Trainer, TrainingArguments  # noqa: E402

from sft_kernels.integrations import transformers as sft_hf  # noqa: E402
from sft_kernels.parallel.alst import alst_parallelism_config  # noqa: E402

NAME = sft_hf.register()
L, VOCAB = 24, 61
ROWS = os.environ.get("ALST_ROWS", "mixed")  # "right": right-padded rows only (the halo's inputs)


class Rows(torch.utils.data.Dataset):
    """Row i: packed (sequences across the shard boundary at 12), right- or left-padded."""

    def __init__(self, n, seed):
        self.n, self.seed = n, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed + i)
        ids = torch.randint(1, VOCAB, (L,), generator=g)
        pos = torch.arange(L)
        mask = torch.ones(L, dtype=torch.long)
        kind = 1 if ROWS == "right" else i % 3
        if kind == 0:
            pos = torch.cat([torch.arange(n) for n in (7, 9, 8)])
        elif kind == 1:
            mask[15 + i % 5:] = 0
        else:
            mask[:3 + i % 7] = 0
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        labels[pos == 0] = -100  # no label predicts a packed sequence's first token from the previous one
        return {"input_ids": ids * mask, "attention_mask": mask, "position_ids": pos, "labels": labels}


cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, max_position_embeddings=256, attention_dropout=0.0,
                    use_cache=False, pad_token_id=0, sliding_window=int(os.environ.get("ALST_WINDOW", "5")))
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, attn_implementation=NAME)
ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 1},
             "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
EXCHANGE = os.environ.get("ALST_EXCHANGE", "ulysses")  # "halo" / "auto": this backend's exchange instead
extra = {"parallelism_config": alst_parallelism_config(WORLD, exchange=EXCHANGE)} if WORLD > 1 else {}
if WORLD > 1 and os.environ.get("ALST_CONTROL") == "deepspeed-entry":
    # the control: the same config, but DeepSpeed's classmethod as shipped (install() undone), so
    # ALST's own entry drops the padding masks
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    UlyssesSPAttentionHF.register_with_transformers = classmethod(
        UlyssesSPAttentionHF.register_with_transformers.__func__.__wrapped__)
args = TrainingArguments(output_dir=sys.argv[1], per_device_train_batch_size=2, per_device_eval_batch_size=2,
                         max_steps=4, logging_steps=1, report_to=[], learning_rate=1e-2, lr_scheduler_type="constant",
                         deepspeed=ds_config, use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True, **extra)
trainer = Trainer(model=model, args=args, train_dataset=Rows(16, 0), eval_dataset=Rows(4, 100))
from sft_kernels.integrations.transformers.context_parallel import record_exchanges  # noqa: E402

with record_exchanges() as exchanges:  # each layer call under this backend's context parallelism
    trainer.train()
logs = [h for h in trainer.state.log_history if "loss" in h and "eval_loss" not in h]
result = {"losses": [float(h["loss"]) for h in logs], "grad_norms": [float(h["grad_norm"]) for h in logs],
          "eval_loss": float(trainer.evaluate()["eval_loss"]),
          "exchanges": sorted({e["exchange"] for e in exchanges}), "layer_calls": len(exchanges)}
print("RESULT " + json.dumps(result), flush=True)
if WORLD > 1:
    from sft_kernels.train.loop import exit_process

    exit_process(0)
