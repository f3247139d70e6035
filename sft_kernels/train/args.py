"""Command-line flags of ``sft-kernels train``: DeepSpeed-Chat step 1's, then this package's own.

The first groups are DeepSpeed-Chat's ``training/step1_supervised_finetuning/main.py``
flags with its names and defaults, so a DeepSpeed-Chat run script's argument list runs
unchanged apart from paths. The defaults that differ on purpose (each says why in its
help and in the README):

==========================  ==========================  =============================================
flag                        DeepSpeed-Chat              here
==========================  ==========================  =============================================
``--model_name_or_path``    required                    optional: the embedded small model
``--data_path``             ``Dahoas/rm-static``        the shipped ``sft_tiny.jsonl`` (no download)
``--dtype``                 ``fp16`` (fp16/bf16)        ``fp16`` on CUDA, ``fp32`` on CPU (DeepSpeed's
                                                        CPU accelerator has no fp16 here); fp32 added
``--output_dir``            None: nothing saved         the same; None also means no metrics.json
                                                        and no checkpoint to resume from
==========================  ==========================  =============================================

This package's additions are in the last groups (``--loss_on``, ``--window_size``,
``--attn_implementation``, ``--qkv_groups``, ``--eval_fraction``, ``--max_steps``,
``--save_steps``, ``--no_progress``, ``--context_parallel_size``, ``--context_parallel_mode``,
``--shuffle_each_epoch``). New
flags go into
:func:`add_package_args` (or a new
``add_*`` function called from :func:`build_parser`).
"""

from __future__ import annotations

import argparse

from .model import ATTN_IMPLEMENTATIONS, parse_window_arg

DESCRIPTION = """Step-1 supervised fine-tuning with DeepSpeed-Chat's command line, on this package's kernels.

Without --model_name_or_path a small Llama-style (Mistral-architecture) model with a
byte-level tokenizer is built from an embedded configuration and trained from random
initialisation on the shipped dataset. On CPU it runs with DeepSpeed's CPU accelerator
and the gloo backend; on GPUs launch it with the deepspeed launcher:

    deepspeed --num_gpus 8 --module sft_kernels.train --model_name_or_path DIR --zero_stage 3 --dtype bf16

(--module, not the sft-kernels command: the launcher puts --local_rank=N right after the
program name, where only ``python -m sft_kernels.train`` accepts it.)

Data, batches and schedule as DeepSpeed-Chat's step-1 main.py: its split (numpy RandomState
with --seed), DistributedSampler for training and evaluation (last partial batch kept),
get_scheduler over num_train_epochs x ceil(micro-batches per epoch / accumulation) steps,
and for a --model_name_or_path with a Hugging Face tokenizer its pad token (eos; [PAD] for llama
models without one) and embedding resize (8 x ceil(len(tokenizer) / 8), shrinking too).

Objective: by default the loss covers every token of prompt + response (DeepSpeed-Chat's
step 1); --loss_on response masks the prompt. Evaluation runs before training and after
every epoch and prints two perplexities: DeepSpeed-Chat's, exp(mean over eval batches of
each batch's mean token loss), and the token-weighted one, exp(total loss / total tokens).

If --output_dir already holds a DeepSpeed checkpoint the run resumes from it (settings
that would change the run are refused).
"""

PHASE1_SPLIT_DEFAULT = "2,4,4"


def _positive_int(value: str) -> int:
    v = int(value)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return v


def _non_negative_int(value: str) -> int:
    v = int(value)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return v


def _window(value: str) -> str:
    try:
        parse_window_arg(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _data_split(value: str) -> str:
    try:
        parts = [float(s) for s in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated proportions such as 2,4,4, got {value!r}") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected three non-negative proportions (phase 1, 2, 3) with a positive sum, got {value!r}")
    return value


def add_dschat_args(p: argparse.ArgumentParser) -> None:
    """DeepSpeed-Chat step 1's flags (names, types, defaults; differences documented above)."""
    g = p.add_argument_group("data (DeepSpeed-Chat)")
    g.add_argument("--data_path", nargs="*", default=None,
                   help="one or more datasets: 'local/jsonfile' (data/train.json + data/eval.json, as DeepSpeed-Chat), "
                        "a directory with train.json[l] (+ eval.json[l]), a .json/.jsonl file, or a directory written "
                        "by datasets' save_to_disk; rows hold prompt + chosen (DeepSpeed-Chat) or prompt + response. "
                        "Default: the shipped sft_tiny.jsonl, used whole (as an --sft_only_data_path)")
    g.add_argument("--data_split", type=_data_split, default=PHASE1_SPLIT_DEFAULT,
                   help="proportions for phases 1,2,3 of each --data_path dataset (its train and eval splits); step 1 "
                        "uses the first share (default 2,4,4: 20%%)")
    g.add_argument("--sft_only_data_path", nargs="*", default=[],
                   help="datasets used whole for step 1 (not split by --data_split)")
    g.add_argument("--data_output_path", default="/tmp/data_files/",
                   help="cache of the tokenized datasets, reused when the data files, split, seed, tokenizer and "
                        "max_seq_len are unchanged (keep it on node-local storage; '' for no cache)")
    g.add_argument("--max_seq_len", type=_positive_int, default=512, help="tokens per example after truncation")
    g = p.add_argument_group("model (DeepSpeed-Chat)")
    g.add_argument("--model_name_or_path", default=None,
                   help="local Hugging Face model directory (default, unlike DeepSpeed-Chat where it is required: the "
                        "embedded small model, random init)")
    g.add_argument("--dropout", type=float, default=None,
                   help="set the config's dropout, attention_dropout, hidden_dropout, activation_dropout (default: "
                        "keep the model's)")
    g.add_argument("--add_eot_token", action="store_true", help="add --eot_token to the tokenizer as a special token")
    g.add_argument("--eot_token", default="<|endoftext|>")
    g.add_argument("--lora_dim", type=_non_negative_int, default=0, help="> 0: LoRA of this rank on the matched linears")
    g.add_argument("--lora_module_name", default="decoder.layers.",
                   help="LoRA replaces the nn.Linear modules whose name contains this string")
    g.add_argument("--only_optimize_lora", action="store_true", help="train the LoRA parameters only")
    g.add_argument("--lora_learning_rate", type=float, default=5e-4,
                   help="learning rate of the LoRA parameters (their own parameter group, as DeepSpeed-Chat)")
    g.add_argument("--compute_fp32_loss", action="store_true",
                   help="loss from fp32 logits (the loss here is always computed in fp32, as transformers' does; "
                        "accepted for DeepSpeed-Chat's scripts)")
    g = p.add_argument_group("optimisation (DeepSpeed-Chat)")
    g.add_argument("--per_device_train_batch_size", type=_positive_int, default=16)
    g.add_argument("--per_device_eval_batch_size", type=_positive_int, default=16)
    g.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1)
    g.add_argument("--learning_rate", type=float, default=1e-3)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--num_train_epochs", type=_positive_int, default=1)
    g.add_argument("--lr_scheduler_type", default="cosine",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                            "constant_with_warmup"],
                   help="schedule over num_train_epochs (a --max_steps cap does not shorten it)")
    g.add_argument("--num_warmup_steps", type=_non_negative_int, default=0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g = p.add_argument_group("DeepSpeed (DeepSpeed-Chat)")
    g.add_argument("--zero_stage", type=int, choices=[0, 1, 2, 3], default=0)
    g.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="default fp16 on CUDA (DeepSpeed-Chat's), fp32 on CPU; fp32 is this package's addition")
    g.add_argument("--offload", action="store_true", help="ZeRO-Offload: optimizer (and at stage 3 parameters) on CPU")
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    # deepspeed.add_config_arguments' flags, without importing deepspeed to build the parser
    g.add_argument("--deepspeed", action="store_true", help="accepted (this command always runs DeepSpeed)")
    g.add_argument("--deepspeed_config", default=None,
                   help="refused: the DeepSpeed configuration is built from the flags, as in DeepSpeed-Chat")
    g.add_argument("--deepscale", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--deepscale_config", default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("output and logging (DeepSpeed-Chat)")
    g.add_argument("--output_dir", default=None,
                   help="Hugging Face checkpoint (LoRA fused), DeepSpeed checkpoint (ds_checkpoint/), metrics.json; "
                        "default None: nothing is written, as in DeepSpeed-Chat")
    g.add_argument("--print_loss", action="store_true", help="print every rank's loss at every micro-batch")
    g.add_argument("--enable_tensorboard", action="store_true",
                   help="DeepSpeed's tensorboard monitor plus this command's eval scalars")
    g.add_argument("--tensorboard_path", default="step1_tensorboard",
                   help="events go to TENSORBOARD_PATH/ds_tensorboard_logs/step1_model_tensorboard/")


def add_package_args(p: argparse.ArgumentParser) -> None:
    """This package's flags (not in DeepSpeed-Chat)."""
    g = p.add_argument_group("this package")
    g.add_argument("--loss_on", choices=["full", "response"], default="full",
                   help="full: loss on every token of prompt + response (DeepSpeed-Chat); response: the prompt "
                        "tokens are masked (-100)")
    g.add_argument("--attn_implementation", choices=ATTN_IMPLEMENTATIONS, default="sft_sliding_window",
                   help="attention: this package's kernels (default), or transformers' eager / sdpa")
    g.add_argument("--window_size", type=_window, default=None,
                   help="sliding window: W keys including self, 'sqrt' (floor(sqrt(L)) keys; sft_sliding_window "
                        "only), or -1 for none. Default: the model's own (config.sliding_window where it has one, "
                        "else none); 32 for the embedded model")
    g.add_argument("--qkv_groups", type=_positive_int, default=1,
                   help="g > 1: block-diagonal Q/K/V projections in g groups (SFTAttention through patch_model)")
    g.add_argument("--eval_fraction", type=float, default=0.1,
                   help="share held out for evaluation from a dataset that has no eval split of its own (a single "
                        "file, the shipped dataset)")
    g.add_argument("--max_steps", type=_non_negative_int, default=None,
                   help="stop after this many optimizer steps in all")
    g.add_argument("--save_steps", type=_non_negative_int, default=0,
                   help="also write a DeepSpeed checkpoint every N optimizer steps (0: at the end only)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar (a line every 10%% of the run)")
    g.add_argument("--shuffle_each_epoch", action="store_true",
                   help="a new training order every epoch (the train sampler seeded with --seed, set_epoch(epoch)); "
                        "default: DeepSpeed-Chat's main.py, whose DistributedSampler (seed 0, no set_epoch) gives "
                        "every epoch the same order")
    g.add_argument("--context_parallel_size", type=_positive_int, default=1,
                   help="N > 1: each sequence is split into N consecutive blocks held by the N ranks of a group "
                        "(world size = N x data-parallel size; DeepSpeed's sequence-parallel groups); DeepSpeed's "
                        "UlyssesSPDataLoaderAdapter shards the batches, the ranks of a group share them, ZeRO "
                        "partitions over all ranks. Needs --attn_implementation sft_sliding_window")
    g.add_argument("--context_parallel_mode", choices=["auto", "halo", "ulysses"], default="auto",
                   help="with --context_parallel_size N > 1: auto (default): each layer takes the halo or "
                        "DeepSpeed's Ulysses, whichever sends fewer bytes (sft_kernels.parallel.hybrid: the halo "
                        "for sliding-window layers, Ulysses for full-attention layers of hybrid models from N = 5 "
                        "with MHA); halo: every layer exchanges only the keys/values its window reaches "
                        "(sft_kernels.context_parallel_attention; bytes per rank constant in the length); ulysses: "
                        "DeepSpeed's ALST all-to-all of heads in every layer with this package's attention as its "
                        "core (heads and KV heads divisible by N or N by them; --per_device_eval_batch_size = "
                        "--per_device_train_batch_size)")
    g.add_argument("--loss_chunk_tokens", type=_non_negative_int, default=0,
                   help="N > 0: the loss from the last hidden states N tokens at a time, never an L x vocab logits "
                        "tensor (sft_kernels.integrations.transformers.tiled_loss; DeepSpeed's TiledFusedLogitsLoss "
                        "under ZeRO-3); same loss and gradients. 0: full logits")
    g.add_argument("--mlp_chunk_tokens", type=_non_negative_int, default=0,
                   help="N > 0: every layer's MLP N tokens at a time (DeepSpeed's TiledMLP through "
                        "sft_kernels.modules.tiled_mlp); same outputs and gradients, one more MLP forward. 0: plain")
    g.add_argument("--offload_checkpoints", action="store_true",
                   help="with --gradient_checkpointing: each layer's checkpointed input waits in CPU memory from the "
                        "forward to the backward (ALST's activation checkpoint offload: DeepSpeed's "
                        "CheckpointHiddenStatesOffload through sft_kernels.modules.activation_offload); same loss and "
                        "gradients; the memory it saves is on a GPU (on CPU there is nothing to offload to)")


def build_parser(prog: str = "sft-kernels train", add_help: bool = True) -> argparse.ArgumentParser:
    """The flags; ``add_help=False`` to use it as ``parents=[...]`` of a subcommand parser."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                                add_help=add_help)
    add_dschat_args(p)
    add_package_args(p)
    return p
