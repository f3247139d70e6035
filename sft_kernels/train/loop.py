"""``sft-kernels train``: distributed setup, DeepSpeed engine, evaluation, training, checkpoints.

Output directory after a run (nothing is written without ``--output_dir``, as in DeepSpeed-Chat)::

    output_dir/config.json, model.safetensors      AutoModelForCausalLM.from_pretrained(output_dir)
    output_dir/<tokenizer files>                   load_tokenizer(output_dir) (see tokenizer.py)
    output_dir/ds_checkpoint/global_step<N>/       DeepSpeed engine state (model, optimizer,
    output_dir/ds_checkpoint/latest                 scheduler, step counters) to resume from, and
                                                   sft_kernels_state.json (settings, history)
    output_dir/metrics.json                        every evaluation and every step's loss, all runs

Evaluation: before training and after every epoch (DeepSpeed-Chat's schedule), plus at the
end when ``--max_steps`` stops inside an epoch. Two perplexities, over the same eval set:

- ``dschat_perplexity`` = exp(mean over ranks of the mean over that rank's eval batches of
  the batch's mean token loss), DeepSpeed-Chat's ``evaluation()``;
- ``perplexity`` = exp(sum of token losses / number of tokens), all ranks together.

They differ when batches hold different numbers of supervised tokens (the batch-mean form
weights a token of a short batch more). The train loss logged per step is the mean over
the ranks of the step's loss (each micro-batch's mean token loss, averaged over the
gradient accumulation steps).

Steps and schedule, as DeepSpeed-Chat's step 1: an epoch is every micro-batch of the
rank's ``DistributedSampler`` share, the last one partial (see data.py); the optimizer steps
every ``--gradient_accumulation_steps`` micro-batches counted across epochs (an accumulation
may straddle two epochs; one left incomplete at the end is not applied); the learning-rate
schedule runs over ``num_train_epochs * ceil(micro-batches per epoch / accumulation)`` steps
(``get_scheduler(..., num_warmup_steps=--num_warmup_steps)``). ``metrics.json`` records the
rate each step applied (``train_lrs_this_run``).

Resume: when ``output_dir/ds_checkpoint/latest`` exists the engine state is loaded and the
micro-batches the checkpoint consumed are skipped (batch order is a function of seed,
epoch and rank, see data.py), so ``--max_steps 3`` then ``--max_steps 6`` on the same directory
trains the same six steps as one ``--max_steps 6`` run. Settings that would change the run
(:data:`RESUME_SETTINGS`: learning-rate schedule, window, data, ZeRO stage, world size, ...)
are compared with the checkpoint's before DeepSpeed is started, and a difference is refused
with a message naming each one; ``--max_steps``, ``--save_steps``, logging flags,
``--attn_implementation`` and ``--context_parallel_mode`` (the same function, the same batches) and
``--gradient_checkpointing`` may change.
``metrics.json`` carries the history of the runs before the resume.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, NoReturn, Optional

import torch

CHECKPOINT_SUBDIR = "ds_checkpoint"
STATE_FILE = "sft_kernels_state.json"
# what a resumed run must share with its checkpoint (anything else may change)
RESUME_SETTINGS = ("model_name_or_path", "data", "max_seq_len", "loss_on", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "seed", "learning_rate", "lr_scheduler_type", "num_warmup_steps",
                   "num_train_epochs", "weight_decay", "window", "qkv_groups", "dropout", "lora_dim",
                   "lora_module_name", "only_optimize_lora", "lora_learning_rate", "zero_stage", "dtype", "offload",
                   "world_size", "add_eot_token", "eot_token", "context_parallel_size", "shuffle_each_epoch")
PERPLEXITY_DEFINITIONS = {
    "dschat_perplexity": "exp(mean over ranks of the mean over the rank's eval batches of each batch's mean token "
                         "loss): DeepSpeed-Chat's evaluation()",
    "perplexity": "exp(sum of all eval token losses / number of eval tokens), all ranks together (token-weighted)",
}


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



def resolve_dtype(args) -> str:
    """``--dtype`` or its default: fp16 on CUDA (DeepSpeed-Chat's default), fp32 on CPU."""
    if args.dtype:
        return args.dtype
    return "fp16" if torch.cuda.is_available() else "fp32"


def ds_config(args, world_size: int) -> Dict:
    """The DeepSpeed configuration (DeepSpeed-Chat's ``get_train_ds_config`` shape)."""
    dtype = resolve_dtype(args)
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
        "fp16": {"enabled": dtype == "fp16", "loss_scale_window": 100},
        "bf16": {"enabled": dtype == "bf16"},
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        "tensorboard": {"enabled": bool(args.enable_tensorboard),
                        "output_path": os.path.join(args.tensorboard_path, "ds_tensorboard_logs", ""),
                        "job_name": "step1_model_tensorboard"},
    }


def _check_args(args) -> None:
    if args.deepspeed_config or args.deepscale_config:
        raise ValueError("--deepspeed_config: the DeepSpeed configuration is built from the flags (--zero_stage, "
                         "--dtype, --offload, batch sizes), as DeepSpeed-Chat's main.py builds it; drop the flag")
    if args.offload and args.zero_stage == 0:
        raise ValueError("--offload moves ZeRO state to CPU and needs --zero_stage 1, 2 or 3")
    if args.save_steps and not args.output_dir:
        raise ValueError("--save_steps writes checkpoints into --output_dir; give one")
    if getattr(args, "offload_checkpoints", False) and not args.gradient_checkpointing:
        raise ValueError("--offload_checkpoints moves the checkpoints' inputs to CPU and needs "
                         "--gradient_checkpointing")
    cp = getattr(args, "context_parallel_size", 1)
    if cp > 1:
        if args.attn_implementation != "sft_sliding_window":
            raise ValueError(f"--context_parallel_size {cp} splits each sequence over ranks, which only the "
                             "sft_sliding_window attention handles (halo exchange, or as ALST's core); "
                             f"--attn_implementation {args.attn_implementation} would attend within each block only")
        if getattr(args, "context_parallel_mode", "auto") == "ulysses":
            if args.qkv_groups > 1:
                raise ValueError("--context_parallel_mode ulysses runs through transformers' attention registry, "
                                 "which the SFTAttention layers of --qkv_groups > 1 do not call (each rank would "
                                 "attend within its block); use --context_parallel_mode auto or halo")
            if args.per_device_eval_batch_size != args.per_device_train_batch_size:
                raise ValueError(f"--context_parallel_mode ulysses: DeepSpeed's ALST attention is built for one "
                                 f"batch size (--per_device_train_batch_size {args.per_device_train_batch_size}); "
                                 f"give --per_device_eval_batch_size {args.per_device_train_batch_size}")
        world = torch.distributed.get_world_size()
        if world % cp:
            raise ValueError(f"--context_parallel_size {cp} must divide the world size {world} (world = context "
                             "parallel x data parallel)")
    dtype = resolve_dtype(args)
    if dtype == "fp16" and not torch.cuda.is_available():
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise ValueError("--dtype fp16: DeepSpeed's CPU accelerator supports fp16 only where oneDNN has fp16 "
                             "kernels (not on this CPU); use --dtype bf16 or fp32")
    if args.enable_tensorboard:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard's backend)
        except ImportError:
            raise ValueError("--enable_tensorboard needs the tensorboard package: pip install tensorboard") from None


NO_DECAY = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight")


def optimizer_groups(model, weight_decay: float, lora_learning_rate: float) -> List[Dict]:
    """DeepSpeed-Chat's three groups: decayed weights; LoRA factors (decayed, at their own
    learning rate); biases and norm weights (no decay). Frozen parameters are left out."""
    from .lora import LORA_PARAM_NAMES

    decay, lora, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        low = name.lower()
        if any(k in low for k in NO_DECAY):
            no_decay.append(p)
        elif any(k in low for k in LORA_PARAM_NAMES):
            lora.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": lora, "weight_decay": weight_decay, "lr": lora_learning_rate},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _optimizer(model, args):
    groups = optimizer_groups(model, args.weight_decay, args.lora_learning_rate)
    if not groups:
        raise ValueError("no trainable parameter (check --only_optimize_lora / --lora_module_name)")
    if args.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=args.learning_rate, betas=(0.9, 0.95))
    # torch's AdamW instead of DeepSpeed's FusedAdam: the same update without a JIT build. Not
    # fused=True: the parameters are still on the CPU here (DeepSpeed moves them to the device).
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95))


def _numel(p) -> int:
    return int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()


def local_parameter_bytes(model) -> int:
    """Bytes of parameter storage this rank holds: the partition under ZeRO-3, else the whole."""
    total = 0
    for p in model.parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(engine, batches, device, shards=None, rows: int = 0) -> Dict[str, float]:
    """Both perplexities (module docstring) over the supervised (label != -100) tokens.

    ``shards`` (a :class:`~sft_kernels.train.context_parallel.ContextParallel`) with ``rows``, the
    eval batch size: each rank of a context-parallel group evaluates its block of the same
    batches (DeepSpeed's adapter shards them); token sums add up over all ranks, a batch's mean
    is taken over its whole group."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # token loss sum, token count
    means = torch.zeros(2, dtype=torch.float64, device=device)  # sum of batch means, batches (this rank)
    if shards is not None:
        from .context_parallel import INPUTS

        batches = (block for block, _micro in shards.micro_batches(batches, 0, rows))
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        if shards is not None:
            labels = batch["shift_labels"]
            inputs = {k: batch[k] for k in INPUTS}
            loss = shards.token_loss_sum(engine(**inputs).logits, labels).double()
            n = (labels != -100).sum().double()
            total += torch.stack([loss, n])
            whole = torch.stack([loss, n])
            torch.distributed.all_reduce(whole, group=shards.group)  # the batch over its whole group
            if whole[1] > 0:
                means += torch.stack([whole[0] / whole[1], torch.ones_like(n)])
            continue
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                                 ignore_index=-100, reduction="sum").double()
        n = (labels != -100).sum().double()
        total += torch.stack([loss, n])
        if n > 0:
            means += torch.stack([loss / n, torch.ones_like(n)])
    # DeepSpeed-Chat all-reduces each rank's mean of batch means and divides by the world size;
    # a rank without eval batches (fewer eval examples than ranks) is left out of that mean. (With
    # context parallelism the ranks of a group hold the same means: the mean over replicas.)
    rank_mean = torch.stack([means[0] / means[1].clamp_min(1), (means[1] > 0).double()])
    torch.distributed.all_reduce(total)
    torch.distributed.all_reduce(rank_mean)
    engine.train()
    loss = (total[0] / total[1]).item()
    dschat = (rank_mean[0] / rank_mean[1]).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(total[1].item()),
            "dschat_loss": dschat, "dschat_perplexity": math.exp(min(dschat, 700.0))}


def _eval_line(tag: str, r: Dict[str, float]) -> str:
    return (f"{tag}: perplexity {r['dschat_perplexity']:.4f} (DeepSpeed-Chat: exp of the mean of batch-mean losses), "
            f"{r['perplexity']:.4f} (token-weighted: exp of total loss / {r['tokens']} tokens); "
            f"loss {r['dschat_loss']:.4f} / {r['loss']:.4f}")


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

    def write(self, msg: str) -> None:
        """Print a line above the bar (rank 0)."""
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- resume
def run_settings(args, world: int, data_key: str) -> Dict:
    """The values of :data:`RESUME_SETTINGS` for this invocation."""
    from .model import window_setting

    window = window_setting(args)
    values = {k: getattr(args, k) for k in RESUME_SETTINGS if hasattr(args, k)}
    values.update(data=data_key, window=window, dtype=resolve_dtype(args), world_size=world)
    cp = getattr(args, "context_parallel_size", 1)
    values["context_parallel_size"] = cp if cp > 1 else None  # None: as in checkpoints written before the flag
    values["shuffle_each_epoch"] = True if getattr(args, "shuffle_each_epoch", False) else None  # likewise
    if not values.get("lora_dim"):  # the LoRA details mean nothing without LoRA
        for k in ("lora_module_name", "only_optimize_lora", "lora_learning_rate"):
            values[k] = None
    if not values.get("add_eot_token"):
        values["eot_token"] = None
    return values


def _state_path(ckpt_dir: str, tag: str) -> str:
    return os.path.join(ckpt_dir, tag, STATE_FILE)


def read_resume_state(ckpt_dir: str) -> Optional[Dict]:
    """The state saved beside the newest checkpoint, or None when there is no checkpoint."""
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(latest):
        return None
    tag = open(latest).read().strip()
    path = _state_path(ckpt_dir, tag)
    if not os.path.exists(path):
        raise ValueError(f"cannot resume from {os.path.join(ckpt_dir, tag)}: it has no {STATE_FILE} (written by "
                         "another program or an older sft-kernels), so its settings cannot be checked; use another "
                         "--output_dir")
    with open(path) as f:
        state = json.load(f)
    state["tag"] = tag
    return state


def check_resume(state: Dict, settings: Dict, ckpt_dir: str) -> None:
    """ValueError naming every setting that differs from the checkpoint's."""
    saved = state["settings"]
    diffs = [k for k in RESUME_SETTINGS if saved.get(k) != settings.get(k)]
    if not diffs:
        return
    lines = []
    for k in diffs:
        if k == "data":
            lines.append("  data: the data (files, their contents, --data_path / --sft_only_data_path / --data_split / "
                         "--eval_fraction, or the tokenizer) differs from the checkpoint's")
        else:
            lines.append(f"  {k}: checkpoint {saved.get(k)!r}, this run {settings.get(k)!r}")
    raise ValueError(f"cannot resume from {os.path.join(ckpt_dir, state['tag'])}: these settings differ from the "
                     "ones it was trained with, and resuming would silently change the run:\n" + "\n".join(lines)
                     + "\nrun with the checkpoint's values, or use another --output_dir to start afresh")


def _save_ds(engine, ckpt_dir, step, micro, settings, history, rank) -> None:
    tag = f"global_step{step}"
    # DeepSpeed writes 'latest' at the end of save_checkpoint; the state must exist by then
    if rank == 0:
        os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)
        with open(_state_path(ckpt_dir, tag), "w") as f:
            json.dump({"step": step, "micro": micro, "settings": settings, "history": history}, f)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"step": step})


def _load_metrics_history(output_dir: Optional[str]) -> List[Dict]:
    path = os.path.join(output_dir, "metrics.json") if output_dir else None
    if not path or not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            return list(json.load(f).get("runs", []))
    except (json.JSONDecodeError, OSError):
        return []


# ----------------------------------------------------------------------------- main
def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def train(args) -> Dict:
    """Run one training invocation; returns the metrics dict also written to metrics.json."""
    return run(args)[0]


@dataclass
class _Plan:
    """How many micro-batches and optimizer steps this invocation runs (module docstring)."""

    gas: int  # gradient accumulation steps
    micro_per_epoch: int  # micro-batches per epoch per rank (of its replica under context parallelism)
    schedule_steps: int  # the learning-rate schedule's length over all epochs
    total_micro: int  # micro-batches consumed at the end (--max_steps caps it)

    @property
    def total_steps(self) -> int:
        return self.total_micro // self.gas


def _plan(args, batches) -> _Plan:
    gas, mpe = args.gradient_accumulation_steps, batches.micro_per_epoch
    # DeepSpeed-Chat: get_scheduler over num_train_epochs * ceil(len(train_dataloader) / gas) steps;
    # DeepSpeed steps the optimizer every gas micro-batches counted across epochs
    total_micro = args.num_train_epochs * mpe
    if args.max_steps is not None:
        total_micro = min(total_micro, args.max_steps * gas)
    return _Plan(gas, mpe, args.num_train_epochs * batches.schedule_steps_per_epoch, total_micro)


@dataclass
class _State:
    """Where the run stands: what a checkpoint saves and a resume restores."""

    step: int = 0  # optimizer steps
    micro: int = 0  # micro-batches (per rank) consumed
    history: Dict = field(default_factory=lambda: {"train_losses": [], "evals": []})
    resumed_from: Optional[int] = None


@dataclass
class _Ranks:
    device: torch.device
    rank: int
    world: int
    dp_rank: int  # the sampler's rank and world: data-parallel replicas
    dp_world: int
    cp: int  # --context_parallel_size
    cp_mode: Optional[str]  # --context_parallel_mode where cp > 1


def _start(args) -> _Ranks:
    """The process group and the flags checked against it. Context parallelism: DeepSpeed's
    sequence-parallel layout (groups of ``cp`` consecutive ranks; context_parallel.py)."""
    device, rank, world = setup_distributed(args.local_rank)
    _check_args(args)
    cp = getattr(args, "context_parallel_size", 1)
    if cp == 1:
        return _Ranks(device, rank, world, rank, world, 1, None)
    return _Ranks(device, rank, world, rank // cp, world // cp, cp, getattr(args, "context_parallel_mode", "auto"))


def _load_data(args, ranks: _Ranks):
    """(tokenizer, prepared data, the train batches of this rank's replica)."""
    from .data import TrainBatches, prepare
    from .model import check_max_seq_len, max_positions
    from .tokenizer import load_tokenizer

    check_max_seq_len(args.max_seq_len, max_positions(args), args.model_name_or_path or "the embedded model")
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model_name_or_path)
    if args.add_eot_token:
        tokenizer.add_special_token(args.eot_token)
    data = prepare(args, tokenizer, int(os.environ.get("LOCAL_RANK", "0")), barrier=torch.distributed.barrier)
    batches = TrainBatches(data.train, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.seed,
                           ranks.dp_rank, ranks.dp_world, tokenizer.pad_token_id,  # context parallel: the replica's
                           shuffle_each_epoch=getattr(args, "shuffle_each_epoch", False))
    return tokenizer, data, batches


def _data_line(args, data, plan: _Plan) -> str:
    return (f"data: {data.description}"
            + (f"; {data.dropped} dropped (no supervised token within --max_seq_len, or no prompt/chosen)"
               if data.dropped else "")
            + (f"; {'cache hit' if data.from_cache else 'cached to'} {data.cache_file}" if data.cache_file else "")
            + f"; {plan.micro_per_epoch} micro-batches per epoch per rank, {plan.total_steps} optimizer steps "
              f"(schedule over {plan.schedule_steps}); loss on the "
              f"{'whole sequence' if args.loss_on == 'full' else 'response tokens'}")


def _build_engine(args, tokenizer, ranks: _Ranks, plan: _Plan, shards=None):
    """(DeepSpeed engine, its model line for the log, parameter counts for the metrics); the
    context-parallel attention set up on the model (``shards``: its ContextParallel)."""
    import deepspeed
    from transformers import get_scheduler

    from .model import build_model, model_window

    config = ds_config(args, ranks.world)  # DeepSpeed sees every rank as data parallel (see context_parallel.py)
    group = shards.exchange_group() if ranks.cp_mode in ("auto", "halo") else None
    model = build_model(args, tokenizer, ds_config=config, context_parallel_group=group)
    if ranks.cp_mode == "ulysses":
        shards.attach_ulysses(model, args.per_device_train_batch_size)
    if getattr(args, "loss_chunk_tokens", 0):  # issue 22: no L x V logits; grad_scale: what backward applies
        from ..integrations.transformers.loss import tiled_loss  # (DeepSpeed's 1/gas, the N of N l_j)

        tiled_loss(model, args.loss_chunk_tokens, grad_scale=ranks.cp / plan.gas)
    if getattr(args, "mlp_chunk_tokens", 0):
        from ..modules.tiled_mlp import tiled_mlp

        tiled_mlp(model, args.mlp_chunk_tokens)
    sizes = {"parameters": sum(_numel(p) for p in model.parameters()),
             "trainable_parameters": sum(_numel(p) for p in model.parameters() if p.requires_grad),
             "rank0_parameter_bytes_at_load": local_parameter_bytes(model)}
    optimizer = _optimizer(model, args)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=plan.schedule_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config, dist_init_required=False)
    line = (f"model: {type(model).__name__} {sizes['parameters'] / 1e6:.2f}M parameters "
            f"({sizes['trainable_parameters'] / 1e6:.3f}M trained"
            + (f", LoRA r={args.lora_dim} on '{args.lora_module_name}'" if args.lora_dim else "")
            + f"), attention {args.attn_implementation}, window {model_window(model, args)}, qkv_groups "
              f"{args.qkv_groups}, ZeRO {args.zero_stage} ({sizes['rank0_parameter_bytes_at_load'] / 2**20:.1f} MiB of "
              f"parameters on rank 0 at load), {resolve_dtype(args)}, {ranks.world} process(es) on {ranks.device.type}"
            + (f" ({ranks.dp_world} data parallel x {ranks.cp} context parallel, {ranks.cp_mode})"
               if ranks.cp > 1 else ""))
    return engine, line, sizes


def _restore(engine, ckpt_dir: Optional[str], saved: Optional[Dict], gas: int, rank: int) -> _State:
    """The checkpoint's engine state and counters, or a fresh start."""
    if saved is None:
        return _State()
    path, _client = engine.load_checkpoint(ckpt_dir, tag=saved["tag"])
    if path is None:
        raise RuntimeError(f"could not load the DeepSpeed checkpoint in {ckpt_dir}")
    step = int(saved["step"])
    state = _State(step, int(saved.get("micro", step * gas)), saved["history"], step)
    _say(rank, f"resumed from {path} at step {step}")
    return state


class _Evaluator:
    """One evaluation of the eval set (:func:`evaluate`), recorded in the history and logged."""

    def __init__(self, args, engine, data, tokenizer, ranks: _Ranks, shards, plan: _Plan, state: _State):
        self.args, self.engine, self.data, self.tokenizer = args, engine, data, tokenizer
        self.ranks, self.shards, self.plan, self.state = ranks, shards, plan, state
        self.progress = None  # the training's progress bar while there is one: lines go above it

    def __call__(self, tag: str) -> Dict:
        from .data import eval_batches

        batches = eval_batches(self.data.eval, self.args.per_device_eval_batch_size, self.ranks.dp_rank,
                               self.ranks.dp_world, self.tokenizer.pad_token_id)
        step, micro = self.state.step, self.state.micro
        r = dict(evaluate(self.engine, batches, self.ranks.device, self.shards, self.args.per_device_eval_batch_size),
                 epoch=micro / self.plan.micro_per_epoch, step=step, micro=micro)
        if r["epoch"] == int(r["epoch"]):
            r["epoch"] = int(r["epoch"])
        self.state.history["evals"].append(r)
        if self.progress is None:
            _say(self.ranks.rank, _eval_line(tag, r))
        else:
            self.progress.write(_eval_line(tag, r))
        if self.args.enable_tensorboard:
            self.engine.monitor.write_events([(f"Eval/{k}", r[k], step) for k in
                                              ("dschat_perplexity", "perplexity", "dschat_loss", "loss")])
        return r


def _micro_batches(args, batches, epoch: int, start: int, shards):
    """``(micro-batch, its Micro or None)`` of an epoch from micro-batch ``start``: this rank's
    batches, or under context parallelism its block of each of its replica's (DeepSpeed's adapter)."""
    if shards is None:
        return ((batch, None) for batch in batches.epoch(epoch, start))
    return shards.micro_batches(batches.epoch(epoch, start), start, args.per_device_train_batch_size)


def _micro_batch_loss(args, engine, batch, micro, shards):
    """(the loss this rank backpropagates, the micro-batch's loss to show: the whole micro-batch's
    mean token loss, also under context parallelism)."""
    if shards is None:
        loss = engine(**batch).loss
        return loss, loss.item()
    return shards.train_loss(engine, batch, micro, chunked=bool(getattr(args, "loss_chunk_tokens", 0)))


@dataclass
class _Trained:
    """What the training loop measured in this invocation."""

    seconds: float = 0.0
    tokens: int = 0  # tokens trained on, all replicas
    steps: int = 0  # optimizer steps in this invocation
    grad_norms: List = field(default_factory=list)  # [step, norm before clipping or None]
    lrs: List = field(default_factory=list)  # [step, learning rate the step applied]


def _train_epochs(args, engine, batches, shards, ranks: _Ranks, plan: _Plan, state: _State, evaluator: _Evaluator,
                  settings: Dict, ckpt_dir: Optional[str]) -> _Trained:
    """Micro-batches until ``plan.total_micro``: an optimizer step every ``gas``, an evaluation at
    the end of every epoch, a checkpoint every ``--save_steps`` steps."""
    device, rank, gas, mpe = ranks.device, ranks.rank, plan.gas, plan.micro_per_epoch
    progress = evaluator.progress = _Progress(plan.total_steps, state.step, enabled=not args.no_progress,
                                              quiet=rank != 0)
    engine.train()
    offload = contextlib.nullcontext()
    if getattr(args, "offload_checkpoints", False):  # issue 22; created once: its CPU buffers are pooled
        from ..modules.activation_offload import checkpoint_offload

        offload = checkpoint_offload(engine.module)
    out, t_train = _Trained(), time.perf_counter()
    step_loss, step_tokens = 0.0, 0
    while state.micro < plan.total_micro:
        epoch = state.micro // mpe
        for batch, micro in _micro_batches(args, batches, epoch, state.micro % mpe, shards):
            batch = {k: v.to(device) for k, v in batch.items()}
            with offload:  # the backward must run inside: the offloaded copies live in its bookkeeping
                loss, shown = _micro_batch_loss(args, engine, batch, micro, shards)
                if args.print_loss:
                    print(f"Epoch: {epoch}, Step: {state.micro % mpe}, Rank: {rank}, loss = {shown}", flush=True)
                engine.backward(loss)
            lr = engine.get_lr()[0]  # what this micro-batch's optimizer step (if it is one) applies
            engine.step()  # the optimizer steps at every gas-th micro-batch (DeepSpeed's own count)
            step_loss += shown / gas
            step_tokens += int(batch["attention_mask"].sum()) if micro is None else micro.tokens
            state.micro += 1
            if state.micro % gas == 0:
                state.step += 1
                out.steps += 1
                norm = engine.get_global_grad_norm()  # before clipping; None where DeepSpeed does not compute it
                out.grad_norms.append([state.step, None if norm is None else float(norm)])
                out.lrs.append([state.step, lr])
                mean = torch.tensor([step_loss], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(mean)
                step_loss = mean.item() / ranks.world
                out.tokens += step_tokens * ranks.dp_world  # the ranks of a context-parallel group share a batch
                rate = out.tokens / (time.perf_counter() - t_train)
                state.history["train_losses"].append([state.step, step_loss])
                progress.update(step_loss, rate, engine.get_lr()[0])
                if args.enable_tensorboard:
                    engine.monitor.write_events([("Train/loss", step_loss, state.step)])
                if not math.isfinite(step_loss):
                    raise FloatingPointError(f"loss is {step_loss} at step {state.step}")
                step_loss, step_tokens = 0.0, 0
            if state.micro % mpe == 0:  # end of an epoch: evaluate, as DeepSpeed-Chat does
                evaluator(f"eval after epoch {state.micro // mpe}/{args.num_train_epochs} (step {state.step})")
            if (state.micro % gas == 0 and args.save_steps and state.step % args.save_steps == 0
                    and state.micro < plan.total_micro):
                _save_ds(engine, ckpt_dir, state.step, state.micro, settings, state.history, rank)
            if state.micro >= plan.total_micro:
                break
    progress.close()
    evaluator.progress = None
    out.seconds = time.perf_counter() - t_train
    return out


def _metrics(args, ranks: _Ranks, plan: _Plan, state: _State, trained: _Trained, sizes: Dict, settings: Dict,
             t_start: float) -> Dict:
    """metrics.json (module docstring), this invocation appended to the runs before a resume."""
    history = state.history
    this_run = {
        "resumed_from_step": state.resumed_from,
        "steps": state.step,
        "train_seconds": trained.seconds,
        "train_tokens_per_s": trained.tokens / trained.seconds if trained.seconds > 0 and trained.tokens else None,
        "train_steps": trained.steps,
        "total_seconds": time.perf_counter() - t_start,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None), list))},
    }
    runs = _load_metrics_history(args.output_dir) if state.resumed_from is not None else []
    return {
        "eval_before": history["evals"][0],
        "eval_after": history["evals"][-1],
        "evals": history["evals"],
        "definitions": PERPLEXITY_DEFINITIONS,
        "steps": state.step,
        "resumed_from_step": state.resumed_from,
        "train_losses": history["train_losses"],
        "train_losses_this_run": history["train_losses"][len(history["train_losses"]) - trained.steps:],
        "train_grad_norms_this_run": trained.grad_norms,
        "train_lrs_this_run": trained.lrs,
        "micro_batches": state.micro,
        "schedule_steps": plan.schedule_steps,
        "train_seconds": trained.seconds,
        "train_tokens_per_s": this_run["train_tokens_per_s"],
        "total_seconds": this_run["total_seconds"],
        **sizes,
        "world_size": ranks.world,
        "context_parallel_size": ranks.cp,
        "context_parallel_mode": ranks.cp_mode,
        "device": ranks.device.type,
        "settings": settings,
        "args": this_run["args"],
        "runs": runs + [this_run],
        "versions": _versions(),
    }


def run(args):
    """:func:`train`, returning ``(metrics, model)``: the trained module unwrapped from the
    DeepSpeed engine (under ZeRO-3 its parameters stay partitioned)."""
    from .model import save_hf_checkpoint

    t_start = time.perf_counter()
    ranks = _start(args)
    tokenizer, data, batches = _load_data(args, ranks)
    shards = None
    if ranks.cp > 1:
        from .context_parallel import ContextParallel

        shards = ContextParallel(ranks.cp, ranks.cp_mode, tokenizer.pad_token_id, ranks.device)
    plan = _plan(args, batches)
    _say(ranks.rank, _data_line(args, data, plan))

    settings = run_settings(args, ranks.world, data.key)
    ckpt_dir = os.path.join(args.output_dir, CHECKPOINT_SUBDIR) if args.output_dir else None
    saved = read_resume_state(ckpt_dir) if ckpt_dir else None
    if saved is not None:
        check_resume(saved, settings, ckpt_dir)  # before DeepSpeed sees a checkpoint it cannot load
    engine, model_line, sizes = _build_engine(args, tokenizer, ranks, plan, shards)
    _say(ranks.rank, model_line)
    state = _restore(engine, ckpt_dir, saved, plan.gas, ranks.rank)

    evaluator = _Evaluator(args, engine, data, tokenizer, ranks, shards, plan, state)
    if not state.history["evals"]:
        evaluator(f"eval before training (epoch 0/{args.num_train_epochs})")
    trained = _train_epochs(args, engine, batches, shards, ranks, plan, state, evaluator, settings, ckpt_dir)
    last = state.history["evals"][-1]
    if last.get("micro", last["step"] * plan.gas) != state.micro:  # stopped inside an epoch
        evaluator(f"eval at step {state.step} (--max_steps, epoch {state.micro / plan.micro_per_epoch:.2f})")
    eval_before, eval_after = state.history["evals"][0], state.history["evals"][-1]
    _say(ranks.rank, f"perplexity {eval_before['dschat_perplexity']:.4f} -> {eval_after['dschat_perplexity']:.4f} "
                     f"(DeepSpeed-Chat's), {eval_before['perplexity']:.4f} -> {eval_after['perplexity']:.4f} "
                     f"(token-weighted)")
    if args.output_dir:
        _save_ds(engine, ckpt_dir, state.step, state.micro, settings, state.history, ranks.rank)
        save_hf_checkpoint(engine.module, tokenizer, args.output_dir, args.zero_stage, ranks.rank)
    metrics = _metrics(args, ranks, plan, state, trained, sizes, settings, t_start)
    if ranks.rank == 0 and args.output_dir:
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        print(f"wrote {args.output_dir}/ (Hugging Face checkpoint, {CHECKPOINT_SUBDIR}/, metrics.json) in "
              f"{metrics['total_seconds']:.0f} s", flush=True)
    elif ranks.rank == 0:
        print("no --output_dir: nothing written (as DeepSpeed-Chat)", flush=True)
    return metrics, engine.module


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


def shutdown() -> None:
    """End the process group (every rank at a barrier first) if one is up."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()


def exit_process(rc: int) -> NoReturn:
    """How the command-line entry points end: the process group, then the interpreter's exit
    handlers and a flush, then ``os._exit(rc)``, skipping only the interpreter's finalisation.

    Why: a gloo worker thread that finishes a collective releases its tensors after the
    collective has completed, and that release takes the GIL. If the main thread has begun
    finalising by then, Python ends the thread inside a ``noexcept`` destructor and the process
    aborts (SIGABRT, "terminate called without an active exception") after a finished run;
    a core dump of a rank shows ``AsyncAllgatherWork::~AsyncAllgatherWork`` ->
    ``decref_pyobject`` -> ``take_gil`` -> ``pthread_exit``. ``destroy_process_group`` does not
    prevent it (DeepSpeed keeps the groups referenced, so their threads live until finalisation);
    on the loaded 2-core CI machine about one ZeRO-3 run in four ended that way."""
    try:
        shutdown()
    finally:
        threading_shutdown = getattr(threading, "_shutdown", None)
        if threading_shutdown is not None:  # join non-daemon threads, end thread pools, as at exit
            threading_shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
