"""One process of tests/test_trl_sft_alst.py: TRL's ``SFTTrainer(packing=True)`` with this package's
attention as ALST's core through accelerate (``alst_parallelism_config``) on 2 gloo ranks, or (world
of 1) the same trainer, DeepSpeed config and data without sequence parallelism.

A tiny Mistral (window 5) from a config, fp32 (``bf16=False``: TRL's SFTConfig defaults to bf16, whose
weight gradients summed in two halves round differently from one sum), ZeRO-1, 3 AdamW steps over
rows of 5-29 tokens packed (best-fit) into rows of 48. TRL's padding-free collator adds the flattened
row's 1-D ``cu_seq_lens_q/k``, which DeepSpeed's ``UlyssesSPDataLoaderAdapter`` cannot shard (it
slices every tensor on dim 1: IndexError); ``alst_parallelism_config`` makes the adapter drop them
(the position_ids carry the boundaries).
``TRL_EXCHANGE=halo``: this backend's halo over ALST's group instead of ALST's all-to-all
(``alst_parallelism_config(2, exchange="halo", packed=True)``: the packed rows' sequences found
from the position_ids on each shard, each crossing sequence exchanging only its own keys).
Prints ``RESULT {json}``: step losses, gradient norms, and the exchanges the layer calls took.

argv: out_dir [sliding_window]
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

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import AutoModelForCausalLM, MistralConfig, PreTrainedTokenizerFast  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from sft_kernels.integrations import transformers as sft_hf  # noqa: E402
from sft_kernels.parallel.alst import alst_parallelism_config  # noqa: E402

NAME = sft_hf.register()
VOCAB, WINDOW = 61, int(sys.argv[2]) if len(sys.argv) > 2 else 5
tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)},
                                                                          unk_token="t1")),
                              pad_token="t0", eos_token="t2")
g = torch.Generator().manual_seed(0)
rows = Dataset.from_list([{"input_ids": torch.randint(3, VOCAB, (int(n),), generator=g).tolist()}
                          for n in torch.randint(5, 30, (32,), generator=g)])
cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, max_position_embeddings=256, attention_dropout=0.0,
                    use_cache=False, pad_token_id=0, sliding_window=WINDOW)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, attn_implementation=NAME)
ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 1},
             "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
EXCHANGE = os.environ.get("TRL_EXCHANGE", "ulysses")
extra = ({"parallelism_config": alst_parallelism_config(WORLD, exchange=EXCHANGE, packed=EXCHANGE != "ulysses")}
         if WORLD > 1 else {})
args = SFTConfig(output_dir=sys.argv[1], per_device_train_batch_size=1, max_steps=3, logging_steps=1, report_to=[],
                 learning_rate=1e-2, lr_scheduler_type="constant", deepspeed=ds_config, use_cpu=True, bf16=False,
                 save_strategy="no", seed=0, disable_tqdm=True, packing=True, max_length=48, pad_to_multiple_of=48,
                 **extra)
trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok)
# TRL's padding-free collator adds the flattened row's 1-D cu_seq_lens_q/k (and max_length_q/k);
# alst_parallelism_config's install() keeps them away from DeepSpeed's data adapter
assert "cu_seq_lens_q" in trainer.data_collator([trainer.train_dataset[0]])  # what the adapter is given
from sft_kernels.integrations.transformers.context_parallel import record_exchanges  # noqa: E402

with record_exchanges() as exchanges:  # each layer call under this backend's context parallelism
    trainer.train()
logs = [h for h in trainer.state.log_history if "loss" in h]
print("RESULT " + json.dumps({"losses": [float(h["loss"]) for h in logs],
                              "grad_norms": [float(h["grad_norm"]) for h in logs],
                              "exchanges": sorted({e["exchange"] for e in exchanges}),
                              "layer_calls": len(exchanges)}), flush=True)
if WORLD > 1:
    from sft_kernels.train.loop import exit_process

    exit_process(0)
