"""The halo plan: which rows of which shard each rank of a context-parallel group sends to whom,
for one shard length and one resolved window (:func:`halo_plan`), and the window of a whole
sequence as the halo exchange resolves it (:func:`resolved_window`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from ..window import WindowArg, resolve_window


def clamp_reach(reach: int, length: int) -> int:
    """A resolved window side (``-1`` = unbounded) as the keys it reaches in a sequence of
    ``length`` tokens: ``length - 1`` when unbounded, else at most that. (``window.py`` resolves
    windows but has no helper for the reach within a sequence; the parallel paths share this one.)"""
    return length - 1 if reach < 0 else min(reach, length - 1)


def resolved_window(window_size: WindowArg, causal: bool, total: int) -> Tuple[int, int]:
    """``(left, right)`` of :func:`~sft_kernels.context_parallel_attention` on a sequence of
    ``total`` tokens: resolved from the whole length (:func:`sft_kernels.window.resolve_window`),
    each side as the keys it reaches (:func:`clamp_reach`)."""
    left, right = resolve_window(window_size, causal, total)
    return clamp_reach(left, total), clamp_reach(right, total)


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of the shard of group rank ``owner``, exchanged with ``peer``."""

    peer: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class HaloPlan:
    """Who sends which rows to whom, for one rank, one shard length and one window.

    ``left`` / ``right`` are the resolved window (>= 0; unbounded already replaced by
    ``L - 1``). ``recv_left`` lists the pieces of this rank's left halo in sequence order
    (``peer`` = the owner), ``recv_right`` likewise; ``send_left`` are pieces of this
    rank's shard that later ranks use as their left halo (``peer`` = the receiver),
    ``send_right`` those that earlier ranks use as their right halo.
    """

    rank: int
    world: int
    seqlen: int  # n, rows per shard
    left: int
    right: int
    recv_left: Tuple[Piece, ...]
    recv_right: Tuple[Piece, ...]
    send_left: Tuple[Piece, ...]
    send_right: Tuple[Piece, ...]

    @property
    def halo_left(self) -> int:
        return sum(p.rows for p in self.recv_left)

    @property
    def halo_right(self) -> int:
        return sum(p.rows for p in self.recv_right)

    @property
    def rows_left(self) -> int:
        """Queries of this shard that can reach the left halo: the first ``min(n, left)``."""
        return min(self.seqlen, self.left) if self.recv_left else 0

    @property
    def rows_right(self) -> int:
        """Queries that can reach the right halo: the last ``min(n, right)``."""
        return min(self.seqlen, self.right) if self.recv_right else 0

    def rows_sent(self) -> int:
        """Key rows this rank sends in the forward (each row: K and V, ``heads_kv * head_dim`` each)."""
        return sum(p.rows for p in self.send_left + self.send_right)

    def rows_returned(self) -> int:
        """Key rows whose gradients (dK and dV) this rank sends back in the backward."""
        return self.halo_left + self.halo_right


def halo_plan(rank: int, world: int, seqlen: int, left: int, right: int) -> HaloPlan:
    """The exchange of group rank ``rank`` of ``world`` for shards of ``seqlen`` rows.

    Rank ``s`` gives rank ``s + h`` (h >= 1) the rows ``[max(0, h n - left), n)`` of its
    shard while ``h n - left < n``, and rank ``s - h`` the rows ``[0, min(n, right - (h-1) n))``
    while that is non-empty: the keys at global positions ``[t n - left, t n)`` and
    ``[(t+1) n, (t+1) n + right)`` around each shard ``t``, cut at the sequence ends.
    """
    n = seqlen
    if n < 1 or world < 1 or not 0 <= rank < world or left < 0 or right < 0:
        raise ValueError(f"halo_plan: need 0 <= rank < world, seqlen >= 1, left/right >= 0; got "
                         f"rank={rank}, world={world}, seqlen={seqlen}, left={left}, right={right}")

    def left_piece(h: int):  # rows of shard s that shard s + h needs, or None
        start = max(0, h * n - left)
        return (start, n) if start < n else None

    def right_piece(h: int):  # rows of shard s that shard s - h needs
        stop = min(n, right - (h - 1) * n)
        return (0, stop) if stop > 0 else None

    recv_left, send_left, recv_right, send_right = [], [], [], []
    for h in range(1, world):
        lp, rp = left_piece(h), right_piece(h)
        if lp is not None:
            if rank - h >= 0:
                recv_left.append(Piece(rank - h, *lp))
            if rank + h < world:
                send_left.append(Piece(rank + h, *lp))
        if rp is not None:
            if rank + h < world:
                recv_right.append(Piece(rank + h, *rp))
            if rank - h >= 0:
                send_right.append(Piece(rank - h, *rp))
    recv_left.reverse()  # sequence order: farthest owner first
    return HaloPlan(rank, world, n, left, right, tuple(recv_left), tuple(recv_right), tuple(send_left),
                    tuple(send_right))
