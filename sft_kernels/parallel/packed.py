"""Packed rows across ranks: sliding-window attention over a row holding several sequences
(``cu_seqlens``), split into ``P`` shards of ``n`` consecutive tokens; causal or two-sided windows.

A sequence that crosses the boundary ``r n`` into rank ``r`` sends rank ``r`` only its own keys
before the boundary that its window reaches: ``min(left_j, r n - start_j)`` rows, from as many
ranks back as that spans; with a two-sided window ``(left_j, right_j)``, a sequence crossing the
boundary ``(r+1) n`` out of rank ``r`` likewise sends rank ``r`` its ``min(right_j, end_j - (r+1) n)``
keys after it, from as many ranks ahead. A sequence inside a shard (or starting at its first token
and ending at its last) sends nothing. Each sequence's window is resolved from its own full length
(``"sqrt"`` gives ``floor(sqrt(len_j))`` keys), as the single-device varlen call does. Every rank
knows the whole row's ``cu_seqlens``, so all ranks derive the same plan without a collective beyond
one small consistency all-gather.

The halo travels as a differentiable exchange (:class:`_PackedHalo`: keys/values forward, their
gradients back to their owners), and the local attention is one varlen
:func:`sft_kernels.sliding_window_attention` call per distinct explicit window over the shard's
pieces of sequences, each piece's keys being ``[its left halo, its own rows, its right halo]``.
The kernels align query ``i`` of a piece with key ``i + seqlen_k - seqlen_q`` (bottom-right), which
puts it ``h_r`` keys (the piece's right halo) after its own position: the window
``(left_j + h_r, right_j - h_r)`` gives exactly keys ``i - left_j .. i + right_j`` (``h_r <= right_j``).
Autograd carries the rest; unlike :func:`context_parallel_attention` the exchange does not overlap
the local band.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..ops.sliding_window_attention.op import sliding_window_attention
from ..window import WindowArg, parse_window
from .comm import _dist, _post, _wait, all_gather_ints
from .plan import clamp_reach


@dataclass(frozen=True)
class PackedHaloPlan:
    """What one rank exchanges. ``halo[r]`` / ``halo_right[r]``: rows ``[start, stop)`` (global) rank
    ``r`` receives before / after its shard (``start == stop``: none); ``pieces``: this rank's
    ``(source rank, start, stop)`` received, in row order (left halo, then right); ``sends``:
    ``(dest rank, start, stop)`` of its own rows."""

    rank: int
    world: int
    n: int
    halo: Tuple[Tuple[int, int], ...]
    pieces: Tuple[Tuple[int, int, int], ...]
    sends: Tuple[Tuple[int, int, int], ...]
    halo_right: Tuple[Tuple[int, int], ...] = ()

    def rows_sent(self) -> int:
        return sum(b - a for _, a, b in self.sends)

    def rows_received(self) -> int:
        return sum(b - a for _, a, b in self.pieces)


def _bounds(cu_seqlens) -> List[int]:
    cu = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
    if len(cu) < 2 or cu[0] != 0 or any(b <= a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and strictly increase (no empty sequence), got {cu}")
    return cu


def sequence_windows(cu_seqlens, window_size: WindowArg, causal: bool = True) -> List[Tuple[int, int]]:
    """Each sequence's ``(left, right)`` reach (keys before / after the query it sees), resolved from
    its own length, unbounded replaced by the sequence's length - 1."""
    spec = parse_window(window_size, causal)
    cu = _bounds(cu_seqlens)
    out = []
    for a, b in zip(cu, cu[1:]):
        left, right = spec.resolve(b - a)
        out.append((clamp_reach(left, b - a), clamp_reach(right, b - a)))
    return out


def sequence_lefts(cu_seqlens, window_size: WindowArg) -> List[int]:
    """Each sequence's left reach under a causal window (see :func:`sequence_windows`)."""
    return [left for left, _ in sequence_windows(cu_seqlens, window_size, True)]


def packed_halo_plan(rank: int, world: int, cu_seqlens, window_size: WindowArg, causal: bool = True) -> PackedHaloPlan:
    """The exchange of ``rank`` for one packed row of ``cu_seqlens[-1] = P n`` tokens."""
    cu = _bounds(cu_seqlens)
    total = cu[-1]
    if total % world:
        raise ValueError(f"the packed row's {total} tokens do not split into {world} equal shards")
    n = total // world
    wins = sequence_windows(cu, window_size, causal)

    def seq_of(token):  # the sequence holding a token
        return max(i for i in range(len(wins)) if cu[i] <= token)

    halo, halo_right = [], []
    for r in range(world):
        edge = r * n  # left: the sequence holding this shard's first token, if it began before it
        j = seq_of(edge)
        h = min(wins[j][0], edge - cu[j])
        halo.append((edge - h, edge))
        end = (r + 1) * n  # right: the sequence holding this shard's last token, if it goes on after it
        j = seq_of(end - 1)
        h = min(wins[j][1], cu[j + 1] - end) if r < world - 1 else 0
        halo_right.append((end, end + max(h, 0)))
    pieces, sends = [], []
    for r in range(world):
        for (a, b), owners in ((halo[r], range(r)), (halo_right[r], range(r + 1, world))):
            for s in owners:  # in row order: the ranks before r own its left halo, those after it the right
                lo, hi = max(a, s * n), min(b, (s + 1) * n)
                if lo < hi:
                    if r == rank:
                        pieces.append((s, lo, hi))
                    if s == rank:
                        sends.append((r, lo, hi))
    return PackedHaloPlan(rank, world, n, tuple(halo), tuple(pieces), tuple(sends), tuple(halo_right))


def _kv(k, v, lo, hi):
    return torch.cat([k[:, lo:hi], v[:, lo:hi]], dim=2).contiguous()


class _PackedHalo(torch.autograd.Function):
    """Local ``k, v (B, n, Hkv, D)`` -> this rank's halo ``(B, h, Hkv, D)`` each; backward returns
    the halo's gradients to their owners."""

    @staticmethod
    def forward(ctx, k, v, plan: PackedHaloPlan, group):
        b, n, hkv, d = k.shape
        base = plan.rank * n
        sends = [(p, _kv(k, v, lo - base, hi - base)) for p, lo, hi in plan.sends]
        recvs = [(s, (b, hi - lo, 2 * hkv, d)) for s, lo, hi in plan.pieces]
        reqs, bufs = _post(sends, recvs, group, k)
        _wait(reqs)
        ctx.plan, ctx.group, ctx.shape = plan, group, k.shape
        if not bufs:
            empty = k.new_empty((b, 0, hkv, d))
            return empty, empty.clone()
        kv = torch.cat(bufs, dim=1)
        return kv[:, :, :hkv].contiguous(), kv[:, :, hkv:].contiguous()

    @staticmethod
    def backward(ctx, dkh, dvh):
        plan, group = ctx.plan, ctx.group
        b, n, hkv, d = ctx.shape
        base = plan.rank * n
        sends, off = [], 0
        for s, lo, hi in plan.pieces:  # back to the owners, in the pieces they sent
            sends.append((s, _kv(dkh, dvh, off, off + hi - lo)))
            off += hi - lo
        recvs = [(p, (b, hi - lo, 2 * hkv, d)) for p, lo, hi in plan.sends]
        reqs, bufs = _post(sends, recvs, group, dkh if dkh.numel() else torch.empty(0, dtype=dkh.dtype))
        _wait(reqs)
        dk = torch.zeros(ctx.shape, dtype=dkh.dtype, device=dkh.device)
        dv = torch.zeros_like(dk)
        for (p, lo, hi), g in zip(plan.sends, bufs):
            dk[:, lo - base:hi - base] += g[:, :, :hkv]
            dv[:, lo - base:hi - base] += g[:, :, hkv:]
        return dk, dv, None, None


def context_parallel_packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens,
                                      window_size: WindowArg, causal: bool = True,
                                      softmax_scale: Optional[float] = None, group=None,
                                      backend: str = "auto") -> torch.Tensor:
    """Sliding-window attention of one packed row split over the ranks of ``group``.

    Args:
        q: ``(1, n, heads, head_dim)``, this rank's tokens ``[r n, (r+1) n)`` of the row;
            k, v: ``(1, n, heads_kv, head_dim)``.
        cu_seqlens: the **whole row's** sequence boundaries (global token indices, ``[0, ...,
            P n]``, int list or tensor), the same on every rank.
        window_size: int ``W`` (W keys including self), ``(left, right)``, ``"sqrt"``, or None
            (unbounded); resolved per sequence from its full length.
        causal: True forces ``right = 0``; False keeps two-sided windows (an int or ``"sqrt"``
            window is then centred, as in :func:`sft_kernels.sliding_window_attention`).

    Returns:
        ``(1, n, heads, head_dim)``: this rank's rows of
        ``sliding_window_attention(q_row, k_row, v_row, window_size, causal, cu_seqlens_q=cu,
        cu_seqlens_k=cu)`` on the whole row, differentiable (halo gradients go back to their
        owners). A ValueError on every rank when the ranks disagree on the shapes or the row.
    """
    dist = _dist()
    if q.dim() != 4 or q.shape[0] != 1:
        raise ValueError(f"context_parallel_packed_attention: q must be (1, n, heads, head_dim), one packed row; got "
                         f"{tuple(q.shape)}")
    group = group if group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    cu = _bounds(cu_seqlens)
    n = q.shape[1]
    metas = all_gather_ints([n, cu[-1], len(cu), sum(cu), q.shape[2], k.shape[2], q.shape[3]], group)
    if any(m != metas[0] for m in metas) or cu[-1] != n * world:
        raise ValueError(f"context_parallel_packed_attention: the ranks must hold equal shards of the same row "
                         f"(n, row length, #bounds, sum of bounds, heads, heads_kv, head_dim per rank: {metas}; "
                         f"the row must have n * P = {n * world} tokens)")
    plan = packed_halo_plan(rank, world, cu, window_size, causal)
    kh, vh = _PackedHalo.apply(k, v, plan, group)
    hl = plan.halo[rank][1] - plan.halo[rank][0]
    hr = plan.halo_right[rank][1] - plan.halo_right[rank][0]
    kf = torch.cat([kh[:, :hl], k, kh[:, hl:]], dim=1)  # [left halo, shard, right halo]
    vf = torch.cat([vh[:, :hl], v, vh[:, hl:]], dim=1)
    lo, hi = rank * n, (rank + 1) * n
    wins = sequence_windows(cu, window_size, causal)
    groups = {}
    for j, (a, b) in enumerate(zip(cu, cu[1:])):
        qa, qb = max(a, lo), min(b, hi)
        if qa >= qb:
            continue
        ka = 0 if a < lo else hl + a - lo  # a sequence crossing in from the left starts at the left halo
        h_r = hr if b > hi else 0  # one crossing out to the right ends with the right halo
        left, right = wins[j]
        groups.setdefault((left + h_r, right - h_r), []).append((qa - lo, qb - lo, ka, hl + qb - lo + h_r))
    out = torch.zeros_like(q[0])
    for window in sorted(groups):
        pcs = groups[window]
        iq = torch.cat([torch.arange(a, b) for a, b, _, _ in pcs]).to(q.device)
        ik = torch.cat([torch.arange(a, b) for _, _, a, b in pcs]).to(q.device)
        cq = torch.tensor([0] + [b - a for a, b, _, _ in pcs]).cumsum(0).to(torch.int32).to(q.device)
        ck = torch.tensor([0] + [b - a for _, _, a, b in pcs]).cumsum(0).to(torch.int32).to(q.device)
        o = sliding_window_attention(
            q[0].index_select(0, iq), kf[0].index_select(0, ik), vf[0].index_select(0, ik), window_size=window,
            causal=False, softmax_scale=softmax_scale, cu_seqlens_q=cq, cu_seqlens_k=ck,
            max_seqlen_q=int(cq.diff().max()), max_seqlen_k=int(ck.diff().max()), backend=backend)
        out = out.index_copy(0, iq, o)
    return out.unsqueeze(0)
