"""Command-line flags of ``sft-kernels train`` (DeepSpeed-Chat step-1 names, plus a few).

The defaults are the embedded run: a 3M-parameter Mistral-architecture model on the
shipped dataset, about two minutes on two CPU cores.
"""

from __future__ import annotations

import argparse

from .model import ATTN_IMPLEMENTATIONS, parse_window_arg

DESCRIPTION = """Step-1 supervised fine-tuning (DeepSpeed-Chat style) with this package's kernels.

Without --model_name_or_path a small Llama-style (Mistral-architecture) model with a
byte-level tokenizer is built from an embedded configuration and trained from random
initialisation on the shipped dataset. On CPU it runs with DeepSpeed's CPU accelerator
and the gloo backend in one process; on GPUs launch it with the deepspeed launcher:

    deepspeed --num_gpus 8 --module sft_kernels.train --model_name_or_path DIR --zero_stage 3 --dtype bf16

(--module, not the sft-kernels command: the launcher puts --local_rank=N right after the
program name, where only ``python -m sft_kernels.train`` accepts it.)

If --output_dir already holds a DeepSpeed checkpoint the run resumes from it.
"""


def _positive_int(value: str) -> int:
    v = int(value)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return v


def _window(value: str) -> str:
    try:
        parse_window_arg(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def build_parser(prog: str = "sft-kernels train", add_help: bool = True) -> argparse.ArgumentParser:
    """The flags; ``add_help=False`` to use it as ``parents=[...]`` of a subcommand parser."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                                add_help=add_help)
    g = p.add_argument_group("model and data")
    g.add_argument("--model_name_or_path", default=None,
                   help="local Hugging Face model directory (default: the embedded small model, random init)")
    g.add_argument("--data_path", default=None,
                   help="JSON lines with 'prompt' and 'response' (default: the shipped sft_tiny.jsonl)")
    g.add_argument("--eval_fraction", type=float, default=0.1, help="share of examples held out for evaluation")
    g.add_argument("--max_seq_len", type=_positive_int, default=128, help="tokens per example after truncation")
    g.add_argument("--attn_implementation", choices=ATTN_IMPLEMENTATIONS, default="sft_sliding_window",
                   help="attention: this package's kernels (default), or transformers' eager / sdpa")
    g.add_argument("--window_size", type=_window, default="32",
                   help="sliding window: W keys including self, 'sqrt' (floor(sqrt(L)) keys; sft_sliding_window "
                        "only), or -1 for none (default 32)")
    g.add_argument("--qkv_groups", type=_positive_int, default=1,
                   help="g > 1: block-diagonal Q/K/V projections in g groups (SFTAttention through patch_model)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--per_device_train_batch_size", type=_positive_int, default=8)
    g.add_argument("--per_device_eval_batch_size", type=_positive_int, default=16)
    g.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1)
    g.add_argument("--learning_rate", type=float, default=1e-3)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--num_train_epochs", type=_positive_int, default=6)
    g.add_argument("--lr_scheduler_type", default="cosine",
                   choices=["linear", "cosine", "constant", "constant_with_warmup"],
                   help="schedule over num_train_epochs (a --max_steps cap does not shorten it)")
    g.add_argument("--num_warmup_steps", type=int, default=10)
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps in all")
    g.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("DeepSpeed")
    g.add_argument("--zero_stage", type=int, choices=[0, 1, 2, 3], default=0)
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    g.add_argument("--offload", action="store_true", help="ZeRO-Offload: optimizer (and at stage 3 parameters) on CPU")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="sft_output",
                   help="Hugging Face checkpoint, DeepSpeed checkpoint (ds_checkpoint/), metrics.json")
    g.add_argument("--save_steps", type=int, default=0,
                   help="also write a DeepSpeed checkpoint every N optimizer steps (0: at the end only)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar (a line every 10%% of the run)")
    return p
