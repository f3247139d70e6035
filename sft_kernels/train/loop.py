"""``sft-kernels train``: distributed setup, DeepSpeed engine, evaluation, training, checkpoints.

Output directory after a run::

    output_dir/config.json, model.safetensors      AutoModelForCausalLM.from_pretrained(output_dir)
    output_dir/<tokenizer files>                   load_tokenizer(output_dir) (see tokenizer.py)
    output_dir/ds_checkpoint/global_step<N>/       DeepSpeed engine state (model, optimizer,
    output_dir/ds_checkpoint/latest                 scheduler, step counters) to resume from
    output_dir/metrics.json                        eval loss/perplexity before and after, per-step loss

Resume: when ``output_dir/ds_checkpoint/latest`` exists the engine state is loaded and the
micro-batches the checkpoint consumed are skipped (batch order is a function of seed and
epoch, see data.py), so ``--max_steps 3`` then ``--max_steps 6`` on the same directory
trains the same six steps as one ``--max_steps 6`` run.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import warnings
from typing import Dict, List, Optional

import torch

CHECKPOINT_SUBDIR = "ds_checkpoint"


# ----------------------------------------------------------------------------- setup
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(local_rank: int):
    """Environment for ``deepspeed.init_distributed`` and the device of this rank.

    Without a visible CUDA device DeepSpeed must be told to use its CPU accelerator
    (``DS_ACCELERATOR=cpu``, read when deepspeed is first imported) and gloo; a single
    process started without the launcher gets RANK/WORLD_SIZE/MASTER_* defaults.
    """
    use_cuda = torch.cuda.is_available()
    if not use_cuda:  # DeepSpeed >= 0.16 also falls back to CPU by itself; older ones picked CUDA for a CUDA torch
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    import logging

    deepspeed.utils.logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    accel = get_accelerator()
    if use_cuda and accel.device_name() == "cpu":
        raise RuntimeError("CUDA is visible but DeepSpeed chose its CPU accelerator (DS_ACCELERATOR=cpu set?)")
    local = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    return device, torch.distributed.get_rank(), torch.distributed.get_world_size()


def ds_config(args, world_size: int) -> Dict:
    """The DeepSpeed configuration (DeepSpeed-Chat's ``get_train_ds_config`` shape)."""
    zero = {"stage": args.zero_stage, "stage3_param_persistence_threshold": 1e4,
            "stage3_max_live_parameters": 3e7, "stage3_prefetch_bucket_size": 3e7}
    if args.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if args.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "steps_per_print": 10**9,
        "zero_optimization": zero,
        "fp16": {"enabled": args.dtype == "fp16", "loss_scale_window": 100},
        "bf16": {"enabled": args.dtype == "bf16"},
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
    }


def _check_args(args) -> None:
    if args.offload and args.zero_stage == 0:
        raise ValueError("--offload moves ZeRO state to CPU and needs --zero_stage 1, 2 or 3")
    if args.max_steps is not None and args.max_steps < 0:
        raise ValueError(f"--max_steps must be >= 0, got {args.max_steps}")
    if args.dtype == "fp16" and not torch.cuda.is_available():
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise ValueError("--dtype fp16: DeepSpeed's CPU accelerator supports fp16 only where oneDNN has fp16 "
                             "kernels (not on this CPU); use --dtype bf16 or fp32")


def _optimizer(model, args, device):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=args.learning_rate, betas=(0.9, 0.95))
    # torch's AdamW instead of DeepSpeed's FusedAdam: the same update without a JIT build. Not
    # fused=True: the parameters are still on the CPU here (DeepSpeed moves them to the device).
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95))


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(engine, batches, device) -> Dict[str, float]:
    """Token-weighted loss over the supervised (label != -100) tokens, all ranks summed."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                                 ignore_index=-100, reduction="sum")
        total += torch.stack([loss.double(), (labels != -100).sum().double()])
    torch.distributed.all_reduce(total)
    engine.train()
    loss = (total[0] / total[1]).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(total[1].item())}


# ----------------------------------------------------------------------------- progress
class _Progress:
    """tqdm when installed and wanted, else a line every ~10% of the run (rank 0 only)."""

    def __init__(self, total: int, initial: int, enabled: bool, quiet: bool):
        self.total, self.n, self.quiet, self.bar = total, initial, quiet, None
        self.every = max(1, total // 10)
        if enabled and not quiet:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, loss: float, tokens_per_s: float, lr: float) -> None:
        self.n += 1
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.update(1)
        elif self.n % self.every == 0 or self.n == self.total:
            print(f"step {self.n}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tokens/s  lr {lr:.2e}",
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- main
def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def train(args) -> Dict:
    """Run one training invocation; returns the metrics dict also written to metrics.json."""
    return run(args)[0]


def run(args):
    """:func:`train`, returning ``(metrics, model)``: the trained module unwrapped from the
    DeepSpeed engine (under ZeRO-3 its parameters stay partitioned)."""
    from .data import TrainBatches, default_data_path, encode_all, eval_batches, load_jsonl, split
    from .model import build_model, save_hf_checkpoint
    from .tokenizer import load_tokenizer

    t_start = time.perf_counter()
    device, rank, world = setup_distributed(args.local_rank)
    _check_args(args)
    import deepspeed
    from transformers import get_scheduler

    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model_name_or_path)
    data_path = args.data_path or default_data_path()
    examples, dropped = encode_all(load_jsonl(data_path), tokenizer, args.max_seq_len)
    train_set, eval_set = split(examples, args.eval_fraction, args.seed)
    batches = TrainBatches(train_set, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.seed,
                           rank, world, tokenizer.pad_token_id)
    schedule_steps = args.num_train_epochs * batches.steps_per_epoch
    total_steps = schedule_steps if args.max_steps is None else min(schedule_steps, args.max_steps)
    _say(rank, f"data: {data_path}: {len(train_set)} train / {len(eval_set)} eval examples"
               + (f" ({dropped} dropped: no response token within --max_seq_len)" if dropped else "")
               + f"; {batches.steps_per_epoch} steps per epoch, {total_steps} steps")

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = _optimizer(model, args, device)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=schedule_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config(args, world), dist_init_required=False)
    _say(rank, f"model: {type(model).__name__} {n_params / 1e6:.2f}M parameters, attention "
               f"{args.attn_implementation}, window {args.window_size}, qkv_groups {args.qkv_groups}, "
               f"ZeRO {args.zero_stage}, {args.dtype}, {world} process(es) on {device.type}")

    ckpt_dir = os.path.join(args.output_dir, CHECKPOINT_SUBDIR)
    step, eval_before, resumed_from = 0, None, None
    if os.path.exists(os.path.join(ckpt_dir, "latest")):
        path, client = engine.load_checkpoint(ckpt_dir)
        if path is None:
            raise RuntimeError(f"could not load the DeepSpeed checkpoint in {ckpt_dir}")
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "seed", "world_size"):
            have = world if key == "world_size" else getattr(args, key)
            if client.get(key) != have:
                raise ValueError(f"cannot resume from {path}: it was written with {key}={client.get(key)}, "
                                 f"this run has {have}; use another --output_dir")
        step, eval_before, resumed_from = client["step"], client.get("eval_before"), client["step"]
        _say(rank, f"resumed from {path} at step {step}")

    eval_input = lambda: eval_batches(eval_set, args.per_device_eval_batch_size, rank, world,  # noqa: E731
                                      tokenizer.pad_token_id)
    if eval_before is None:
        eval_before = evaluate(engine, eval_input(), device)
    _say(rank, f"eval before: loss {eval_before['loss']:.4f}  perplexity {eval_before['perplexity']:.3f}")

    losses: List[List[float]] = []
    progress = _Progress(total_steps, step, enabled=not args.no_progress, quiet=rank != 0)
    engine.train()
    t_train, tokens_seen = time.perf_counter(), 0
    gas = args.gradient_accumulation_steps
    while step < total_steps:
        epoch = step // batches.steps_per_epoch
        start_micro = (step % batches.steps_per_epoch) * gas
        step_loss, step_tokens, micro = 0.0, 0, 0
        for batch in batches.epoch(epoch, start_micro):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / gas
            step_tokens += int(batch["attention_mask"].sum())
            micro += 1
            if micro % gas:
                continue
            step += 1
            tokens_seen += step_tokens * world
            rate = tokens_seen / (time.perf_counter() - t_train)
            losses.append([step, step_loss])
            progress.update(step_loss, rate, engine.get_lr()[0])
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"loss is {step_loss} at step {step}")
            if args.save_steps and step % args.save_steps == 0 and step < total_steps:
                _save_ds(engine, ckpt_dir, step, args, world, eval_before)
            if step >= total_steps:
                break
            step_loss, step_tokens = 0.0, 0
    progress.close()
    train_seconds = time.perf_counter() - t_train

    eval_after = evaluate(engine, eval_input(), device)
    _say(rank, f"eval after:  loss {eval_after['loss']:.4f}  perplexity {eval_after['perplexity']:.3f} "
               f"(before {eval_before['perplexity']:.3f})")
    _save_ds(engine, ckpt_dir, step, args, world, eval_before)
    save_hf_checkpoint(engine.module, tokenizer, args.output_dir, args.zero_stage, rank)
    metrics = {
        "eval_before": eval_before,
        "eval_after": eval_after,
        "steps": step,
        "resumed_from_step": resumed_from,
        "train_losses": losses,
        "train_seconds": train_seconds,
        "train_tokens_per_s": tokens_seen / train_seconds if train_seconds > 0 and tokens_seen else None,
        "total_seconds": time.perf_counter() - t_start,
        "parameters": n_params,
        "world_size": world,
        "device": device.type,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
        "versions": _versions(),
    }
    if rank == 0:
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        print(f"wrote {args.output_dir}/ (Hugging Face checkpoint, {CHECKPOINT_SUBDIR}/, metrics.json) in "
              f"{metrics['total_seconds']:.0f} s", flush=True)
    return metrics, engine.module


def _save_ds(engine, ckpt_dir, step, args, world, eval_before) -> None:
    client = {"step": step, "eval_before": eval_before, "world_size": world,
              **{k: getattr(args, k) for k in ("per_device_train_batch_size", "gradient_accumulation_steps", "seed")}}
    engine.save_checkpoint(ckpt_dir, tag=f"global_step{step}", client_state=client)


def _versions() -> Dict[str, str]:
    import deepspeed
    import transformers

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: ``sft-kernels train [flags]`` / ``python -m sft_kernels.train [flags]``."""
    from .args import build_parser

    args = build_parser().parse_args(argv)
    try:
        train(args)
    except ValueError as exc:
        print(f"sft-kernels train: error: {exc}", file=sys.stderr)
        return 2
    return 0
