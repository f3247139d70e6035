"""Process groups for data x context x Ulysses parallelism (:func:`context_parallel_groups`) and
which block of a sequence's tokens a rank holds (:func:`shard_layout`)."""

from __future__ import annotations

from typing import NamedTuple, Tuple

from .comm import _dist, all_gather_ints


class ParallelGroups(NamedTuple):
    """This rank's groups for data x context x Ulysses parallelism (see :func:`context_parallel_groups`)."""

    context_parallel_group: object
    sequence_parallel_group: object  # None when sequence_parallel_size == 1
    data_parallel_group: object
    data_parallel_rank: int
    shard_index: int  # which of the num_shards consecutive token blocks of a sequence this rank holds
    num_shards: int


def context_parallel_groups(context_parallel_size: int, sequence_parallel_size: int = 1) -> ParallelGroups:
    """Split the world into data-parallel replicas of ``C x U`` ranks.

    ``C = context_parallel_size`` (halo exchange), ``U = sequence_parallel_size``
    (DeepSpeed-Ulysses, 1 = off). Replica ``i`` is the ranks ``[i C U, (i + 1) C U)``; in it,
    rank ``j`` has Ulysses rank ``j % U`` and context-parallel rank ``j // U``, so a Ulysses
    group is ``U`` consecutive ranks (put them inside one node: its all-to-alls are the
    heavy traffic) and a context-parallel group strides over nodes. Rank ``j`` holds the
    ``j``-th of ``C U`` consecutive blocks of each sequence (``shard_index``). The data
    parallel group (ZeRO's) is the ranks with the same ``j`` in every replica.

    Every rank must call it (group creation is collective); ``world % (C U) == 0``.
    """
    dist = _dist()
    if not dist.is_initialized():
        raise ValueError("context_parallel_groups: initialise torch.distributed first")
    world, rank = dist.get_world_size(), dist.get_rank()
    for name, val in (("context_parallel_size", context_parallel_size),
                      ("sequence_parallel_size", sequence_parallel_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"context_parallel_groups: {name} must be a positive int, got {val!r}")
    c, u = context_parallel_size, sequence_parallel_size
    if world % (c * u) != 0:
        raise ValueError(
            f"context_parallel_groups: context_parallel_size x sequence_parallel_size = {c} x {u} must divide the "
            f"world size {world}"
        )
    replicas = world // (c * u)
    cp = sp = dp = None
    for i in range(replicas):
        base = i * c * u
        for s in range(u):
            ranks = [base + t * u + s for t in range(c)]
            g = dist.new_group(ranks)
            if rank in ranks:
                cp = g
        if u > 1:
            for t in range(c):
                ranks = [base + t * u + s for s in range(u)]
                g = dist.new_group(ranks)
                if rank in ranks:
                    sp = g
    for j in range(c * u):
        ranks = [i * c * u + j for i in range(replicas)]
        g = dist.new_group(ranks)
        if rank in ranks:
            dp = g
    return ParallelGroups(cp, sp, dp, rank // (c * u), rank % (c * u), c * u)


def shard_layout(context_parallel_group, sequence_parallel_group=None) -> Tuple[int, int]:
    """``(shard_index, num_shards)`` of this rank: which block of consecutive tokens it holds.

    Context parallelism alone: the group rank. With Ulysses inside (``U`` ranks per
    context-parallel shard, see :func:`context_parallel_groups`): ``cp_rank * U + sp_rank``.
    The two groups must form a grid (the members of this rank's Ulysses group share its
    context-parallel rank and vice versa); checked here with two small all-gathers, on
    every rank of both groups (a collective).
    """
    dist = _dist()
    cp_rank, cp_size = dist.get_rank(context_parallel_group), dist.get_world_size(context_parallel_group)
    if sequence_parallel_group is None:
        return cp_rank, cp_size
    sp_rank, sp_size = dist.get_rank(sequence_parallel_group), dist.get_world_size(sequence_parallel_group)
    same_cp = {int(m[0]) for m in all_gather_ints([cp_rank], sequence_parallel_group)}
    same_sp = {int(m[0]) for m in all_gather_ints([sp_rank], context_parallel_group)}
    if len(same_cp) != 1 or len(same_sp) != 1:
        raise ValueError(
            "context parallelism with Ulysses needs the groups to form a grid: every member of a Ulysses group "
            "must have the same rank in its context-parallel group and vice versa (got context-parallel ranks "
            f"{sorted(same_cp)} in this rank's Ulysses group, Ulysses ranks {sorted(same_sp)} in its "
            "context-parallel group); build them with sft_kernels.parallel.context_parallel_groups"
        )
    return cp_rank * sp_size + sp_rank, cp_size * sp_size
