"""A DeepSpeed training script on both kernels: ZeRO and Ulysses sequence parallelism.

    deepspeed --num_gpus 8 examples/train_ds.py --zero 3 --sp 4                 # 2 data x 4 sequence parallel
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/train_ds.py --zero 2 --sp 2   # CPU, gloo
"""

import argparse

import deepspeed
import torch
import torch.nn as nn
import torch.nn.functional as F

from sft_kernels import BlockDiagonalLinear, SFTAttention
from sft_kernels.integrations.deepspeed import register, ulysses_group

p = argparse.ArgumentParser()
p.add_argument("--zero", type=int, default=2)
p.add_argument("--sp", type=int, default=1, help="sequence parallel (Ulysses) group size")
p.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
args = p.parse_args()

deepspeed.init_distributed()  # nccl on GPUs, gloo with DS_ACCELERATOR=cpu
register()  # get_accelerator().create_op_builder("SFTKernelsBuilder") now works
sp_group, dp_rank = ulysses_group(args.sp) if args.sp > 1 else (None, torch.distributed.get_rank())
sp_rank = torch.distributed.get_rank(sp_group) if sp_group is not None else 0
VOCAB, C, L = 256, 256, 1024  # L % sp == 0; heads (8 q, 4 kv) % sp == 0


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


model = nn.Sequential(nn.Embedding(VOCAB, C), Block(), Block(), nn.Linear(C, VOCAB))
config = {
    "train_micro_batch_size_per_gpu": 2,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    "zero_optimization": {"stage": args.zero},
    "bf16": {"enabled": True},
    "gradient_clipping": 1.0,
}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

for step in range(10):
    # ranks of one sequence-parallel group share a batch and each take L/sp consecutive tokens
    g = torch.Generator().manual_seed(step * 1000 + dp_rank)
    ids = torch.randint(0, VOCAB, (2, L), generator=g)
    labels = F.pad(ids[:, 1:], (0, 1), value=-100)  # shift on the full sequence, then slice
    shard = slice(sp_rank * (L // args.sp), (sp_rank + 1) * (L // args.sp))
    ids, labels = ids[:, shard].to(engine.device), labels[:, shard].to(engine.device)
    logits = engine(ids).float()
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    engine.backward(loss)  # ZeRO averages over all ranks = the mean over the full sequences
    engine.step()
    if engine.global_rank == 0:
        print(f"step {step} loss {loss.item():.4f}")
engine.save_checkpoint("ckpt")
