"""``sft-kernels train --context_parallel_size N``: the sharding of each batch's sequence
dimension over a context-parallel group, and a loss whose gradients are the unsharded ones.

Layout (:func:`sft_kernels.parallel.context_parallel_groups` with ``C = N``, no Ulysses): the
world is ``D = world / N`` data-parallel replicas of ``N`` consecutive ranks; rank ``j`` of a
replica holds the ``j``-th of ``N`` consecutive blocks of every sequence of its replica's
batch. The data sampler runs over the ``D`` replicas (all ranks of a replica read the same
batch).

Per micro-batch on every rank of a replica: the right-padded ``(batch, L)`` batch is padded
to ``L' = N ceil(L / N)`` (pad id, mask 0, label -100), the labels are shifted *before*
sharding (the label of a block's last token is the first token of the next block), the
position_ids are the global ``0 .. L'-1``, and the block ``[j L'/N, (j+1) L'/N)`` goes
through the model, whose ``sft_sliding_window`` layers exchange halos
(:func:`sft_kernels.integrations.transformers.register` with ``context_parallel_group``).
The block's loss ``l_j`` is the sum of its tokens' losses over the number of label tokens of
the whole micro-batch, so ``sum_j l_j`` is the unsharded mean token loss, and the gradient of
the replicated parameters is ``sum_j grad l_j`` (the halo exchange returns each block's share
of its neighbours' gradients in the backward).

DeepSpeed. The parameters are replicated on all ranks, so ZeRO partitions and reduces over all
of them, as plain data parallelism over the world: DeepSpeed averages the ranks' gradients,
and each rank backpropagates ``N l_j``, whose average over the world is ``sum_j grad l_j``
averaged over the replicas. (DeepSpeed's own sequence-parallel ``mpu`` interface, which should
sum over a sequence's ranks, does so in ZeRO 0-2 but not in ZeRO-3's default reduce-scatter
path of DeepSpeed 0.19.8, which averages over them: gradients 1/N, measured as a halved gradient
norm at N = 2. Scaling the loss is right on every path.) DeepSpeed's own sample counters and
``train_batch_size`` therefore count each sequence N times; this command's logs and metrics count
it once.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


class ContextShards:
    """This rank's block of each batch (module docstring), and the losses over the group."""

    def __init__(self, groups, size: int, pad_id: int):
        self.group = groups.context_parallel_group
        self.index = groups.shard_index
        self.size = size
        self.pad_id = pad_id

    def shard(self, batch: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, int]:
        """``(model inputs of this block, its shifted labels, label tokens of the whole batch)``."""
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        b, length = ids.shape
        padded = self.size * math.ceil(length / self.size)
        extra = padded - length
        if extra:
            ids = F.pad(ids, (0, extra), value=self.pad_id)
            mask = F.pad(mask, (0, extra), value=0)
            labels = F.pad(labels, (0, extra), value=IGNORE_INDEX)
        shifted = torch.full_like(labels, IGNORE_INDEX)
        shifted[:, :-1] = labels[:, 1:]  # before sharding: a block's last token is labelled by the next block
        n = padded // self.size
        cols = slice(self.index * n, (self.index + 1) * n)
        pos = torch.arange(padded, device=ids.device).unsqueeze(0).expand(b, padded)
        inputs = {"input_ids": ids[:, cols], "attention_mask": mask[:, cols], "position_ids": pos[:, cols]}
        return inputs, shifted[:, cols], int((shifted != IGNORE_INDEX).sum())

    @staticmethod
    def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of the token losses of this block in fp32 (transformers' causal-LM loss does the same)."""
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")

    def train_loss(self, engine, batch) -> Tuple[torch.Tensor, float]:
        """(this rank's loss to backpropagate: ``N l_j``, see the module docstring; the whole
        micro-batch's mean token loss)."""
        inputs, labels, count = self.shard(batch)
        logits = engine(**inputs).logits
        loss = self.token_loss_sum(logits, labels) / max(count, 1)
        shown = loss.detach().clone()
        torch.distributed.all_reduce(shown, group=self.group)
        return loss * self.size, shown.item()
