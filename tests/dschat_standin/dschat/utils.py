"""The two helpers the stand-in main.py imports (DeepSpeed-Chat keeps its in dschat/utils/utils.py)."""

import torch


def print_rank_0(msg, rank=0):
    if rank <= 0:
        print(msg, flush=True)


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}
