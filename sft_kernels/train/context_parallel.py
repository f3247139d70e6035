"""``sft-kernels train --context_parallel_size N [--context_parallel_mode auto|halo|ulysses]``:
every sequence split over the ``N`` ranks of a group, its batches sharded by DeepSpeed's
``UlyssesSPDataLoaderAdapter`` (ALST's), the attention run by this package's halo exchange, by
DeepSpeed's Ulysses all-to-all, or per layer by whichever of the two sends fewer bytes.

Layout: DeepSpeed's sequence-parallel groups (``parallel_state_sp``, the ones ALST builds): ``N``
consecutive ranks per group, ``D = world / N`` data-parallel replicas. The data sampler runs over
the replicas: the micro-batches of a replica are DeepSpeed-Chat's, in its order.

The adapter. Each rank's loader yields one batch per call; the adapter all-gathers one from every
rank of the group, shifts the labels of each whole batch (``shift_labels``: a block's last token
is labelled by the next block's first) and hands rank ``j`` the ``j``-th of ``N`` consecutive
blocks of every tensor of each, one after the other. So the replica's micro-batches are dealt
round robin (rank ``j`` of the group feeds the ``j``-th of every ``N``), and the adapter serves
every rank of the group the replica's micro-batches in the replica's order: the micro-batches one
process would train on.

What the adapter cannot do, and this module does before it (DeepSpeed 0.19.8):

- **Lengths.** It refuses a length that ``N`` does not divide (a ValueError), and it all-gathers
  the group's batches with their own lengths, which gloo refuses ("invalid tensor size at index
  1 (expected (8, 64), got (8, 58))"): the ``N`` batches of a round are padded to the longest of
  them, rounded up to a multiple of ``N`` (pad id, mask 0, label -100).
- **position_ids.** It requires them and does not make them: the global ``0 .. L'-1``.
- **Rows.** It receives every rank's batch into buffers of its own batch's row count (gloo refuses
  a mismatch), and ALST's attention is built for one micro-batch size: the last, partial batch of
  an epoch gets rows of padding (labels -100: no loss, no gradient) up to the per-device batch
  size.
- **The end of an epoch.** It gathers from every rank at once, so a rank whose loader ends first
  would leave the others waiting: when the replica's micro-batches are not a multiple of ``N``,
  the ranks past the last feed a batch of padding marked as such, and every rank skips it.
- **The loss.** It leaves that to the caller. Each micro-batch carries, as a non-tensor entry
  (which the adapter all-gathers as an object and hands out with its micro-batch), its place in
  the replica's order and the token and label-token counts of the whole batch. A block's loss
  ``l_j`` is the sum of its tokens' losses over the label tokens of the whole micro-batch, so
  ``sum_j l_j`` is the unsharded mean token loss, and the gradient of the replicated parameters
  is ``sum_j grad l_j`` (the halo exchange or ALST's all-to-all return each block's share of the
  other blocks' gradients in the backward).

The attention. ``auto`` and ``halo``: ``register(context_parallel_group=<the group>)`` before
the model is built (:func:`sft_kernels.train.model.build_model`); ``halo``: every
``sft_sliding_window`` layer exchanges halos (bytes per rank constant in ``L``); ``auto``: each
layer takes the halo or DeepSpeed's ``UlyssesSPAttentionHF``, whichever sends fewer bytes
(:mod:`sft_kernels.parallel.hybrid`: the halo for sliding-window layers, Ulysses for the
full-attention layers of hybrid models once it sends less, from ``N = 5`` with MHA; at ``N <= 4``
every layer takes the halo). ``ulysses``: :func:`sft_kernels.parallel.register_alst` on the built
model: ALST's all-to-all of heads in every layer, this backend as its core (heads and KV heads
divisible by ``N`` or ``N`` by them, ALST's rules); ALST's attention is built for one batch size,
so evaluation must use the training's.

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

import itertools
import math
from typing import Dict, Iterable, Iterator, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX

MODES = ("auto", "halo", "ulysses")
MICRO = "sft_kernels_micro"  # the non-tensor entry each micro-batch carries through the adapter
INPUTS = ("input_ids", "attention_mask", "position_ids")


class Micro(NamedTuple):
    """What a micro-batch carries through the adapter besides its tensors."""

    index: Optional[int]  # its place in the replica's order; None: the padding batch of an epoch's end
    tokens: int  # real tokens of the whole micro-batch
    label_tokens: int  # its tokens with a label after the shift


class ContextParallel:
    """This rank's place in the groups, its attention set up, the adapter's micro-batches and the
    losses over the group (module docstring)."""

    def __init__(self, size: int, mode: str, pad_id: int, device: torch.device, rank: Optional[int] = None):
        if mode not in MODES:
            raise ValueError(f"--context_parallel_mode must be one of {MODES}, got {mode!r}")
        rank = torch.distributed.get_rank() if rank is None else rank
        self.size, self.mode, self.pad_id, self.device = size, mode, pad_id, device
        self.index = rank % size  # parallel_state_sp's groups: ranks [g N, (g + 1) N); replica rank // N
        self.group = None

    def exchange_group(self):
        """The group the layers exchange over, made before the model (auto and halo modes; the
        mode reaches the backend through build_model's register(context_parallel_exchange=))."""
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

        mpu.initialize_sequence_parallel(sequence_parallel_size=self.size)
        self._set_group(mpu)
        return self.group

    def attach_ulysses(self, model, micro_batch_size: int) -> None:
        """ALST's Ulysses on the built model, this backend as its core (ulysses mode)."""
        from ..parallel import register_alst

        self._set_group(register_alst(model, sequence_parallel_size=self.size, micro_batch_size=micro_batch_size))

    def _set_group(self, mpu) -> None:
        if mpu.get_sequence_parallel_rank() != self.index:  # the layout the sampler was given
            raise RuntimeError(f"DeepSpeed's sequence-parallel rank {mpu.get_sequence_parallel_rank()} is not "
                               f"rank % {self.size} = {self.index}")
        self.group = mpu.get_sequence_parallel_group()

    # ------------------------------------------------------------------ batches
    def _prepared(self, batch: Dict[str, torch.Tensor], index: Optional[int], rows: int, width: int) -> Dict:
        """The batch as the adapter takes it: ``rows`` x ``width`` (right padding), global
        position_ids, unshifted labels, the :class:`Micro` entry."""
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        b, length = ids.shape
        pad = (0, width - length, 0, rows - b)
        micro = Micro(index, int(mask.sum()), int((labels[:, 1:] != IGNORE_INDEX).sum()))
        return {"input_ids": F.pad(ids, pad, value=self.pad_id), "attention_mask": F.pad(mask, pad, value=0),
                "labels": F.pad(labels, pad, value=IGNORE_INDEX),
                "position_ids": torch.arange(width).expand(rows, width).contiguous(), MICRO: micro}

    def _dealt(self, batches: Iterable, start: int, rows: int) -> Iterator[Dict]:
        """This rank's share of the replica's micro-batches ``start, start + 1, ...``: the ``j``-th
        of every ``N``, then a padding batch where the last round is short. Every rank collates the
        whole round (as each read every batch before the adapter) to pad its batch to the round's
        longest: the adapter gathers the batches with their own lengths, which gloo refuses
        ("invalid tensor size")."""
        it, first = iter(batches), start
        while True:
            round_ = list(itertools.islice(it, self.size))
            if not round_:
                return
            longest = max(b["input_ids"].shape[1] for b in round_)
            width = self.size * math.ceil(longest / self.size)
            if self.index < len(round_):
                yield self._prepared(round_[self.index], first + self.index, rows, width)
            else:
                shape = (rows, width)  # what collate() makes of rows of padding
                padding = {"input_ids": torch.full(shape, self.pad_id), "attention_mask": torch.zeros(shape).long(),
                           "labels": torch.full(shape, IGNORE_INDEX)}
                yield self._prepared(padding, None, rows, width)
            if len(round_) < self.size:
                return
            first += self.size

    def micro_batches(self, batches: Iterable, start: int, rows: int) -> Iterator[Tuple[Dict, Micro]]:
        """``(this rank's block of each micro-batch, its Micro)``, in the replica's order from
        ``start``, through DeepSpeed's adapter; ``rows``: the per-device batch size."""
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

        adapter = UlyssesSPDataLoaderAdapter(self._dealt(batches, start, rows), sp_rank=self.index,
                                             sp_group=self.group, sp_world_size=self.size, device=self.device)
        for served in adapter:
            micro = served.pop(MICRO)
            if micro.index is not None:
                yield {k: v.to(self.device) for k, v in served.items()}, micro

    # ------------------------------------------------------------------ losses
    @staticmethod
    def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of the token losses of this block in fp32 (transformers' causal-LM loss does the same)."""
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")

    def train_loss(self, engine, block: Dict[str, torch.Tensor], micro: Micro,
                   chunked: bool = False) -> Tuple[torch.Tensor, float]:
        """(this rank's loss to backpropagate, ``N l_j``; the whole micro-batch's mean token loss).
        ``chunked``: the model computes the loss itself from the hidden states
        (``--loss_chunk_tokens``), given the shifted labels and the whole batch's label count."""
        inputs = {k: block[k] for k in INPUTS}
        count = max(micro.label_tokens, 1)
        if chunked:
            loss = engine(**inputs, shift_labels=block["shift_labels"], num_items_in_batch=count).loss
        else:
            loss = self.token_loss_sum(engine(**inputs).logits, block["shift_labels"]) / count
        shown = loss.detach().clone()
        torch.distributed.all_reduce(shown, group=self.group)
        return loss * self.size, shown.item()
