"""``sft-kernels train --context_parallel_size N``: the process groups DeepSpeed is given, the
sharding of each batch's sequence dimension, and the loss that equals the unsharded one.

Layout (:func:`sft_kernels.parallel.context_parallel_groups` with ``C = N``, no Ulysses): the
world is ``D = world / N`` data-parallel replicas of ``N`` consecutive ranks; rank ``j`` of a
replica holds the ``j``-th of ``N`` consecutive blocks of every sequence of its replica's
batch. The data sampler runs over the ``D`` replicas (all ranks of a replica read the same
batch).

DeepSpeed is handed an ``mpu`` with DeepSpeed's sequence-parallel interface (the one its
Ulysses training uses): the context-parallel group is its *sequence-parallel* group, all
ranks of the replicas together its *sequence-data-parallel* group, over which ZeRO partitions
parameters, gradients and optimizer state and reduces gradients (summed over the ``N`` ranks
of a sequence, averaged over the ``D`` replicas: DeepSpeed divides by ``world / N``). The
*data-parallel* group (the ranks holding the same block in every replica) sizes the global
batch (``train_batch_size = micro x accumulation x D``). There is no model parallelism: its
group is this rank alone. Every parameter is replicated on all ranks before ZeRO, so ZeRO over
all of them is what DeepSpeed does for Ulysses too; ZeRO over the data-parallel group alone
would leave the gradients of the ``N`` blocks unsummed.

Per micro-batch on every rank of a replica: the right-padded ``(batch, L)`` batch is padded
to ``L' = N ceil(L / N)`` (pad id, mask 0, label -100), the labels are shifted *before*
sharding (the label of a block's last token is the first token of the next block), the
position_ids are the global ``0 .. L'-1``, and the block ``[j L'/N, (j+1) L'/N)`` goes
through the model, whose ``sft_sliding_window`` layers exchange halos
(:func:`sft_kernels.integrations.transformers.register` with ``context_parallel_group``).
The loss of the rank is the sum of its tokens' losses over the number of label tokens of the
whole micro-batch, so the sum over the group is the unsharded mean token loss and the
gradients DeepSpeed sums are the unsharded ones.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


class ContextParallelMPU:
    """DeepSpeed's ``mpu`` interface for data x context parallelism (module docstring)."""

    def __init__(self, groups):
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        self._cp = groups.context_parallel_group
        self._dp = groups.data_parallel_group
        self._all = dist.new_group(list(range(world)))  # collective: every rank creates every group
        self._mp = None
        for r in range(world):
            g = dist.new_group([r])
            if r == rank:
                self._mp = g
        self._dist = dist

    # the data-parallel replicas (global batch size; the sampler)
    def get_data_parallel_group(self):
        return self._dp

    def get_data_parallel_world_size(self):
        return self._dist.get_world_size(self._dp)

    def get_data_parallel_rank(self):
        return self._dist.get_rank(self._dp)

    def get_data_parallel_group_ranks(self):
        return self._dist.get_process_group_ranks(self._dp)

    # the ranks sharing one sequence
    def get_sequence_parallel_group(self):
        return self._cp

    def get_sequence_parallel_world_size(self):
        return self._dist.get_world_size(self._cp)

    def get_sequence_parallel_rank(self):
        return self._dist.get_rank(self._cp)

    # ZeRO's partitioning and gradient reduction
    def get_sequence_data_parallel_group(self):
        return self._all

    def get_sequence_data_parallel_world_size(self):
        return self._dist.get_world_size(self._all)

    def get_sequence_data_parallel_rank(self):
        return self._dist.get_rank(self._all)

    # no model parallelism: this rank alone
    def get_model_parallel_group(self):
        return self._mp

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0


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
        """(this rank's loss to backpropagate, the whole micro-batch's mean token loss)."""
        inputs, labels, count = self.shard(batch)
        logits = engine(**inputs).logits
        loss = self.token_loss_sum(logits, labels) / max(count, 1)
        shown = loss.detach().clone()
        torch.distributed.all_reduce(shown, group=self.group)
        return loss, shown.item()
