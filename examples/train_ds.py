"""A DeepSpeed training script on both kernels: ZeRO and Ulysses sequence parallelism.

    deepspeed --num_gpus 8 examples/train_ds.py --zero 3 --sp 4                     # 2 data x 4 sequence parallel
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/train_ds.py --zero 2 --sp 2   # CPU, gloo

A small byte-level language model (SFTAttention with block-diagonal QKV, BlockDiagonalLinear
MLP) learns the shipped SFT dataset (sft_kernels/data/sft_tiny.jsonl: every example as
``bos + prompt + response + eos`` in bytes, packed into sequences of --seq_len tokens).
Ranks of one sequence-parallel group share a batch and each hold seq_len/sp consecutive
tokens; different groups read different batches. The printed loss is the full-sequence
loss: the mean over every token of every rank's shard (all ranks summed), which is what one
process holding the whole batch would report. It starts near ln(259) = 5.56 (measured 5.90
on 2 CPU ranks, --sp 2 --seq_len 128, fp32) and falls to 1.2 within 40 steps. The DeepSpeed
checkpoint goes to --output_dir.

The first DeepSpeed run on a CPU machine also JIT-builds DeepSpeed's own CPU communication
op (a minute or more, once; cached in torch's extension directory).
"""

import argparse
import json
import os

import deepspeed
import torch
import torch.nn as nn
import torch.nn.functional as F

from sft_kernels import BlockDiagonalLinear, SFTAttention
from sft_kernels.integrations.deepspeed import register, ulysses_group

p = argparse.ArgumentParser()
p.add_argument("--zero", type=int, default=2)
p.add_argument("--sp", type=int, default=1, help="sequence parallel (Ulysses) group size")
p.add_argument("--steps", type=int, default=100)
p.add_argument("--seq_len", type=int, default=256, help="tokens per sequence (a multiple of --sp)")
p.add_argument("--batch", type=int, default=4, help="sequences per data-parallel group and step")
p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
p.add_argument("--output_dir", default="train_ds_output")
p.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
args = p.parse_args()

deepspeed.init_distributed()  # nccl on GPUs, gloo with DS_ACCELERATOR=cpu
register()  # get_accelerator().create_op_builder("SFTKernelsBuilder") now works
world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
sp_group, dp_rank = ulysses_group(args.sp) if args.sp > 1 else (None, rank)
sp_rank = torch.distributed.get_rank(sp_group) if sp_group is not None else 0
dp_size = world // args.sp
VOCAB, C, L = 259, 256, args.seq_len  # byte ids 3..258, pad 0, eos 1, bos 2; heads (8 q, 4 kv) % sp == 0
if L % args.sp:
    raise SystemExit(f"--seq_len {L} must be a multiple of --sp {args.sp}")

# the shipped dataset as one stream of byte tokens, cut into sequences of L + 1 (inputs and next tokens)
from sft_kernels.train.data import default_data_path  # noqa: E402

stream = []
for line in open(default_data_path()):
    row = json.loads(line)
    stream += [2] + [b + 3 for b in (row["prompt"] + row["response"]).encode()] + [1]
data = torch.tensor(stream[: len(stream) // (L + 1) * (L + 1)]).view(-1, L + 1)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn = SFTAttention(C, num_heads=8, num_kv_heads=4, window_size=128, qkv_groups=2,
                                 sequence_parallel_group=sp_group)
        self.up = BlockDiagonalLinear([C // 4] * 4, [C] * 4)  # 4 independent blocks
        self.down = BlockDiagonalLinear([C] * 4, [C // 4] * 4)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.down(F.gelu(self.up(self.n2(x))))


torch.manual_seed(0)
model = nn.Sequential(nn.Embedding(VOCAB, C), Block(), Block(), nn.LayerNorm(C), nn.Linear(C, VOCAB))
config = {
    "train_micro_batch_size_per_gpu": args.batch,
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-3}},
    "zero_optimization": {"stage": args.zero},
    "bf16": {"enabled": args.dtype == "bf16"},
    "gradient_clipping": 1.0,
    "steps_per_print": 10**9,
}
# the ranks of a sequence-parallel group hold the same batch: DeepSpeed's data-parallel average
# over all ranks then equals the average over the dp groups of the full-sequence gradient
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

shard = slice(sp_rank * (L // args.sp), (sp_rank + 1) * (L // args.sp))
for step in range(args.steps):
    g = torch.Generator().manual_seed(step * 1000 + dp_rank)
    rows = data[torch.randint(0, len(data), (args.batch,), generator=g)]
    ids, labels = rows[:, :-1], rows[:, 1:]  # next-token labels on the full sequence, then sliced
    ids, labels = ids[:, shard].to(engine.device), labels[:, shard].to(engine.device)
    logits = engine(ids).float()
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
    engine.backward(loss)
    engine.step()
    # full-sequence loss over every rank's tokens (every shard holds the same number of tokens)
    total = torch.tensor([loss.item() * labels.numel(), labels.numel()], dtype=torch.float64, device=engine.device)
    torch.distributed.all_reduce(total)
    if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
        print(f"step {step} loss {total[0].item() / total[1].item():.4f}", flush=True)
engine.save_checkpoint(os.path.join(args.output_dir, "ds_checkpoint"))
if rank == 0:
    print(f"wrote {os.path.join(args.output_dir, 'ds_checkpoint')}", flush=True)
