"""Training with halo context parallelism (optionally Ulysses inside each shard) and data parallelism.

    torchrun --nproc_per_node 8 examples/train_context_parallel.py --cp 4 --sp 2     # 4 halo x 2 Ulysses
    torchrun --nnodes 4 --nproc_per_node 8 ... --cp 4 --sp 8                          # Ulysses in a node, halo across
    torchrun --nproc_per_node 4 examples/train_context_parallel.py --cp 2 --device cpu  # 2 data x 2 context, gloo

Every rank holds L / (cp * sp) consecutive tokens of its replica's sequences
(``shard_index`` of :func:`sft_kernels.parallel.context_parallel_groups`); the ranks of one
replica share a batch, replicas take different batches. The task can be learned inside the
window: each sequence repeats a random block of ``PERIOD`` tokens, so the next token is the
one ``PERIOD - 1`` positions back (the loss stays near ln 64 for about 50 steps, then falls as
attention learns to look back). Prints the loss of the whole global batch at each step.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from sft_kernels import SFTAttention
from sft_kernels.parallel import context_parallel_groups

p = argparse.ArgumentParser()
p.add_argument("--cp", type=int, default=2, help="context parallel (halo) group size")
p.add_argument("--sp", type=int, default=1, help="Ulysses group size inside each context-parallel shard")
p.add_argument("--seqlen", type=int, default=1024)
p.add_argument("--window", type=int, default=64)
p.add_argument("--steps", type=int, default=150)
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = p.parse_args()

if args.device == "cuda":
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
if args.sp > 1:
    import deepspeed  # DeepSpeed-Ulysses' DistributedAttention communicates through deepspeed.comm

    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
groups = context_parallel_groups(args.cp, args.sp)
replicas = dist.get_world_size() // groups.num_shards
VOCAB, C, PERIOD, L = 64, 128, 8, args.seqlen
assert L % groups.num_shards == 0, "the sequence length must be a multiple of cp * sp"
n = L // groups.num_shards
torch.manual_seed(0)  # the same initial weights on every rank


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn = SFTAttention(C, num_heads=4, num_kv_heads=2, window_size=args.window,
                                 context_parallel_group=groups.context_parallel_group,
                                 sequence_parallel_group=groups.sequence_parallel_group)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


model = nn.Sequential(nn.Embedding(VOCAB, C), Block(), Block(), nn.LayerNorm(C), nn.Linear(C, VOCAB)).to(args.device)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
for step in range(args.steps):
    g = torch.Generator().manual_seed(step * 1000 + groups.data_parallel_rank)  # one batch per replica
    ids = torch.randint(0, VOCAB, (2, PERIOD), generator=g).repeat(1, L // PERIOD + 1)[:, :L]
    labels = F.pad(ids[:, 1:], (0, 1), value=-100)  # shift on the full sequence, then slice
    shard = slice(groups.shard_index * n, (groups.shard_index + 1) * n)
    ids, labels = ids[:, shard].to(args.device), labels[:, shard].to(args.device)
    logits = model(ids)
    # this shard's share of the replica's mean loss: the sum over shards is the replica's loss
    count = 2 * (L - 1)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum") / count
    opt.zero_grad()
    loss.backward()
    for prm in model.parameters():  # sum over the shards of a replica, mean over replicas
        dist.all_reduce(prm.grad)
        prm.grad /= replicas
    total = loss.detach().clone()
    dist.all_reduce(total)
    opt.step()
    if dist.get_rank() == 0:
        print(f"step {step}: loss {float(total) / replicas:.4f}", flush=True)
dist.barrier()
dist.destroy_process_group()
