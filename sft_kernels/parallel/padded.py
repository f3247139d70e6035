"""Right-padded rows split over ranks: the rows' real lengths from every shard's slice of the
padding mask (:func:`right_padded_lengths`), and the halo exchange run as the unpadded
single-device layer computes such rows (:func:`context_parallel_padded_attention`: one exchange
per distinct window, :func:`padded_window_rows`)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ..window import WindowArg, parse_window
from .comm import _dist, all_gather_ints
from .plan import clamp_reach


def right_padded_lengths(valid: torch.Tensor, context_parallel_group, sequence_parallel_group=None) -> List[int]:
    """Real tokens per row of a right-padded batch whose ``(batch, L)`` mask is split over ranks.

    ``valid (batch, n)`` is this rank's slice (True on tokens). Every row of the whole
    sequence must be tokens first, then padding (``L`` = all shards, in the order of
    :func:`shard_layout`); otherwise a ValueError on every rank. Left padding is refused:
    under a causal window the real tokens after the padding would see pad keys, which a
    padded (not packed) shard cannot exclude.
    """
    b, n = valid.shape
    mine = local_prefix_counts(valid)  # -1: a hole in this shard
    if sequence_parallel_group is not None:
        mine = [x for m in all_gather_ints(mine, sequence_parallel_group) for x in m]
    shards = [x for m in all_gather_ints(mine, context_parallel_group) for x in m]
    return lengths_from_shard_counts([shards[s * b:(s + 1) * b] for s in range(len(shards) // b)], n)


def local_prefix_counts(valid: torch.Tensor) -> List[int]:
    """Per row of this rank's ``(batch, n)`` mask slice: its real tokens when they are a prefix of
    the slice, else -1 (a hole, or padding before a token)."""
    n = valid.shape[1]
    count = valid.sum(dim=1)
    prefix = (torch.arange(n, device=valid.device).unsqueeze(0) < count.unsqueeze(1)) == valid
    return torch.where(prefix.all(dim=1), count, torch.full_like(count, -1)).tolist()


def lengths_from_shard_counts(per_shard: Sequence[Sequence[float]], n: int) -> List[int]:
    """Global real lengths per row from every shard's :func:`local_prefix_counts` (in sequence
    order, ``(num_shards, batch)``); ValueError unless each row is right-padded over the whole
    sequence."""
    b = len(per_shard[0]) if per_shard else 0
    lengths = []
    for row in range(b):
        counts = [int(c[row]) for c in per_shard]
        ended = False
        for s, cnt in enumerate(counts):
            if cnt < 0 or (ended and cnt > 0):
                raise ValueError(
                    f"attention_mask: row {row} is not right-padded across the sequence (real tokens per shard: "
                    f"{['hole' if c < 0 else c for c in counts]}, shard length {n}). Under context parallelism "
                    "only right padding (all tokens, then padding) is supported; left padding or holes would let "
                    "real tokens attend pad keys"
                )
            ended = ended or cnt < n
        lengths.append(sum(counts))
    return lengths


def context_parallel_padded_attention(q, k, v, lengths: Optional[Sequence[int]], window_size: WindowArg, causal: bool,
                                      softmax_scale: Optional[float], group, backend: str = "auto") -> torch.Tensor:
    """:func:`context_parallel_attention` on right-padded rows, as the unpadded single-device layer computes it.

    Row ``i`` holds ``lengths[i]`` real tokens (global, from :func:`right_padded_lengths`)
    followed by padding; ``None`` = no padding. Causal only: a real query never reaches a
    later (pad) key, so the shard runs unchanged and the caller zeroes the pad rows. The
    window of a row is resolved from its real length, as for a packed sequence: ``"sqrt"``
    gives each row its own window (rows are grouped by window, one exchange per group);
    an int ``W`` or an explicit window gives the same answer as resolving from ``L``.
    """
    from .context_parallel import context_parallel_attention

    if lengths is None:
        return context_parallel_attention(q, k, v, window_size=window_size, causal=causal, softmax_scale=softmax_scale, group=group, backend=backend)
    if not causal:
        raise ValueError(
            "context parallelism with an attention_mask needs causal=True: with a two-sided window the last real "
            "tokens would attend pad keys, which padded shards cannot exclude; drop the padding (equal-length rows) "
            "or run without context parallelism"
        )
    dist = _dist()
    by_window = padded_window_rows(lengths, window_size, q.shape[1] * dist.get_world_size(group))
    if len(by_window) == 1 and sum(len(r) for r in by_window.values()) == q.shape[0]:
        (left,) = by_window
        return context_parallel_attention(q, k, v, window_size=(left, 0), causal=True, softmax_scale=softmax_scale, group=group, backend=backend)
    out = torch.zeros_like(q)
    for left in sorted(by_window):  # the same order on every rank: the lengths are global
        idx = torch.tensor(by_window[left], device=q.device)
        part = context_parallel_attention(q.index_select(0, idx), k.index_select(0, idx), v.index_select(0, idx),
                                          window_size=(left, 0), causal=True, softmax_scale=softmax_scale, group=group, backend=backend)
        out = out.index_copy(0, idx, part)
    return out


def padded_window_rows(lengths: Sequence[int], window_size: WindowArg, total: int) -> Dict[int, List[int]]:
    """The causal left window each right-padded row runs under in
    :func:`context_parallel_padded_attention` (one halo exchange per distinct window) -> ``{left:
    rows}``; rows of padding only are left out (their output is zero). ``total``: the padded length."""
    spec = parse_window(window_size, True)
    global_left = spec.resolve(total)[0]
    by_window: Dict[int, List[int]] = {}
    for row, real in enumerate(lengths):
        if real == 0:
            continue  # all padding: output zero
        own = spec.resolve(int(real))[0]
        key = global_left if clamp_reach(global_left, real) == clamp_reach(own, real) else own
        by_window.setdefault(key, []).append(row)
    return by_window
