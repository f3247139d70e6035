"""Context-parallel sliding-window attention by halo exchange.

A sequence of ``L`` tokens is split over the ``P`` ranks of a process group: rank ``r``
holds the ``n = L / P`` consecutive tokens ``[r n, (r + 1) n)`` (rank order = sequence
order). Under a window ``(left, right)`` (resolved from the *global* length ``L``) a query
of rank ``r`` needs only

- the last ``min(left, r n)`` keys/values before its shard (its **left halo**), owned by
  ranks ``r-1, r-2, ...`` (more than one when ``left > n``: multi-hop), and
- the first ``min(right, L - (r+1) n)`` keys/values after it (its **right halo**, two-sided
  windows only), owned by ranks ``r+1, r+2, ...``.

So each rank sends and receives ``O(window * heads_kv * head_dim)`` per layer, whatever
``L`` and ``P`` are, instead of the ``O(L / P * heads * head_dim)`` of DeepSpeed-Ulysses'
all-to-alls or the ``O(L * heads_kv * head_dim)`` of an all-gather of K/V.

Forward, per call:

1. one all-gather of a few integers checks that every rank holds a shard of the same shape
   and resolves the same window (a mismatch would otherwise be a silent wrong answer or a
   hang in the point-to-point exchange);
2. the halo sends/receives are posted (``torch.distributed.batch_isend_irecv``);
3. the local band (queries and keys of this shard) runs while they are in flight;
4. the halo parts run: the first ``min(n, left)`` queries against the left halo, the last
   ``min(n, right)`` against the right halo, each as one call of the local kernel with an
   explicit window and ``seqlen_k != seqlen_q`` (bottom-right alignment, see below);
5. the parts are merged by log-sum-exp.

Backward: for attention over disjoint key sets whose merged output is ``O`` with merged
log-sum-exp ``L``, the gradients of ``q`` and of each key set's ``k, v`` are exactly the
attention backward over that key set evaluated with the merged ``O`` and ``L`` (``P = exp(S
- L)``, ``delta = rowsum(dO * O)``; every backend takes delta from the ``out`` it is given).
So the package's backward op runs once per part with
the merged ``out``/``lse``: the halo parts first, their ``dK``/``dV`` go back to the ranks
that own those keys (posted asynchronously), the local part runs while they travel, and
each owner adds what it receives to its own ``dK``/``dV``. ``dq`` is the sum over parts.

Alignment of a halo part. The kernels place query ``i`` of ``seqlen_q`` at key position
``i + seqlen_k - seqlen_q`` (bottom-right). For the left halo (``h`` keys at global
positions ``r n - h .. r n - 1``) and the queries ``0 .. m-1``, ``m = min(n, left)`` (later
queries cannot reach it), query ``i`` may see key ``j`` iff ``j >= i + h - left``; with
``seqlen_q = m, seqlen_k = h`` that is the explicit window ``(left - m, -1)``. For the right
halo (``h`` keys at ``(r+1) n ..``) and the last ``m = min(n, right)`` queries (local row
``i' = i - (n - m)``), ``j <= i' + right - m``, which is the window ``(-1, right - h)``.
(Concatenating ``[left halo, shard, right halo]`` into one key tensor would misalign the
queries by the right halo's length.) Both windows are >= 0 because ``m <= left`` and
``h <= right``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..backends import resolve_backend
from ..ops.sliding_window_attention.op import _KERNEL_DTYPES, _check_inputs, sliding_window_attention
from ..window import MODE_EXPLICIT, WindowArg, parse_window, resolve_window

__all__ = [
    "HaloPlan",
    "ParallelGroups",
    "all_gather_ints",
    "context_parallel_attention",
    "context_parallel_groups",
    "halo_plan",
]

NAME = "context_parallel_attention"
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


# ----------------------------------------------------------------------------- the plan
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


# ----------------------------------------------------------------------------- communication
def _dist():
    import torch.distributed as dist

    return dist


def _collective_device(group) -> torch.device:
    """Where a small collective of ``group`` can run: the current GPU for NCCL, else CPU."""
    dist = _dist()
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_ints(values: Sequence[float], group) -> List[List[float]]:
    """All-gather one short vector of numbers per rank (float64: exact for ints < 2^53)."""
    dist = _dist()
    world = dist.get_world_size(group)
    t = torch.tensor([float(x) for x in values], dtype=torch.float64, device=_collective_device(group))
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    return [p.tolist() for p in parts]


def _post(sends, recvs, group, like: torch.Tensor):
    """Post every send and receive of one exchange; returns (requests, receive buffers).

    ``sends``: (peer, tensor); ``recvs``: (peer, shape). Peers are group ranks.
    """
    dist = _dist()
    ops, bufs = [], []
    for peer, shape in recvs:
        buf = like.new_empty(shape)
        bufs.append(buf)
        ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(group, peer), group))
    for peer, t in sends:
        ops.append(dist.P2POp(dist.isend, t, dist.get_global_rank(group, peer), group))
    return (dist.batch_isend_irecv(ops) if ops else []), bufs


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()


def _kv_rows(k: torch.Tensor, v: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of k and v as one contiguous ``(batch, rows, 2 heads_kv, head_dim)`` message."""
    return torch.cat([k[:, start:stop], v[:, start:stop]], dim=2).contiguous()


def _split_kv(msgs: List[torch.Tensor], hkv: int):
    kv = torch.cat(msgs, dim=1) if len(msgs) > 1 else msgs[0]
    return kv[:, :, :hkv].contiguous(), kv[:, :, hkv:].contiguous()


# ----------------------------------------------------------------------------- local parts
def _swa_bwd(do, q, k, v, out, lse, left: int, right: int, scale: float, impl: str):
    """The package's backward op for one part (explicit window, non-causal flag, no packing)
    -> (dq, dk, dv)."""
    dq, dk, dv, _dsinks = torch.ops.sft_kernels.swa_backward(
        do=do.contiguous(), q=q, k=k, v=v, out=out.contiguous(), lse=lse.contiguous(), cu_seqlens_q=None,
        cu_seqlens_k=None, max_seqlen_q=q.shape[1], max_seqlen_k=k.shape[1], window_mode=MODE_EXPLICIT,
        left=left, right=right, keys=0, causal=False, softmax_scale=scale, backend=impl,
    )
    return dq, dk, dv


def _part_windows(plan: HaloPlan):
    """(row slice, explicit window) of the left and right halo parts (None when absent)."""
    n = plan.seqlen
    left_part = right_part = None
    if plan.recv_left:
        m = plan.rows_left
        left_part = (slice(0, m), (plan.left - m, -1))
    if plan.recv_right:
        m = plan.rows_right
        right_part = (slice(n - m, n), (-1, plan.right - plan.halo_right))
    return left_part, right_part


def _merge(out: torch.Tensor, lse: torch.Tensor, parts) -> torch.Tensor:
    """Merge halo parts into the local result by log-sum-exp, in place on ``lse``.

    ``out (B, n, H, D)``, ``lse (B, H, n)`` (float32, float64 for float64 input); each part is
    ``(rows: slice, out_p, lse_p)`` over a contiguous row range. Overlapping ranges (a shard
    narrower than the window on both sides) are merged in one accumulator, so the output is
    rounded to its dtype once.
    """
    if not parts:
        return out
    cdt = lse.dtype
    lo = min(p[0].start for p in parts)
    hi = max(p[0].stop for p in parts)
    # disjoint parts are merged separately (no accumulator over the rows between them)
    if len(parts) == 2 and parts[0][0].stop < parts[1][0].start:
        return _merge(_merge(out, lse, parts[:1]), lse, parts[1:])
    acc_o = out[:, lo:hi].to(cdt)
    acc_l = lse[:, :, lo:hi]  # a view: updated in place
    for rows, o_p, l_p in parts:
        s, e = rows.start - lo, rows.stop - lo
        l_a = acc_l[:, :, s:e]
        new = torch.logaddexp(l_a, l_p.to(cdt))  # the local part sees its own key: finite
        w_a = torch.exp(l_a - new).transpose(1, 2).unsqueeze(-1)
        w_p = torch.exp(l_p.to(cdt) - new).transpose(1, 2).unsqueeze(-1)
        acc_o[:, s:e] = acc_o[:, s:e] * w_a + o_p.to(cdt) * w_p
        acc_l[:, :, s:e] = new
    out[:, lo:hi] = acc_o.to(out.dtype)
    return out


class _HaloAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: HaloPlan, scale: float, impl: str, group):
        b, n, _, d = q.shape
        hkv = k.shape[2]
        sends = [(p.peer, _kv_rows(k, v, p.start, p.stop)) for p in plan.send_left + plan.send_right]
        recvs = [(p.peer, (b, p.rows, 2 * hkv, d)) for p in plan.recv_left + plan.recv_right]
        reqs, bufs = _post(sends, recvs, group, k)
        # the local band runs while the halo is in flight
        out, lse = sliding_window_attention(q, k, v, window_size=(plan.left, plan.right), causal=False, softmax_scale=scale, return_lse=True,
                                            backend=impl)
        _wait(reqs)
        del sends
        nl = len(plan.recv_left)
        kl = vl = kr = vr = None
        left_part, right_part = _part_windows(plan)
        parts = []
        if left_part is not None:
            kl, vl = _split_kv(bufs[:nl], hkv)
            rows, win = left_part
            o_p, l_p = sliding_window_attention(q[:, rows], kl, vl, window_size=win, causal=False, softmax_scale=scale, return_lse=True, backend=impl)
            parts.append((rows, o_p, l_p))
        if right_part is not None:
            kr, vr = _split_kv(bufs[nl:], hkv)
            rows, win = right_part
            o_p, l_p = sliding_window_attention(q[:, rows], kr, vr, window_size=win, causal=False, softmax_scale=scale, return_lse=True, backend=impl)
            parts.append((rows, o_p, l_p))
        out = _merge(out, lse, parts)
        ctx.save_for_backward(q, k, v, out, lse, kl, vl, kr, vr)
        ctx.plan, ctx.scale, ctx.impl, ctx.group = plan, scale, impl, group
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, kl, vl, kr, vr = ctx.saved_tensors
        plan, scale, impl, group = ctx.plan, ctx.scale, ctx.impl, ctx.group
        if dout is None:
            return (None,) * 7
        dout = dout.contiguous()
        b, n, _, d = q.shape
        hkv = k.shape[2]
        left_part, right_part = _part_windows(plan)
        # halo parts first, so that their dK/dV travel while the local backward runs
        sends, dq_parts = [], []
        for part, kh, vh, pieces in ((left_part, kl, vl, plan.recv_left), (right_part, kr, vr, plan.recv_right)):
            if part is None:
                continue
            rows, (wl, wr) = part
            dq_p, dk_p, dv_p = _swa_bwd(dout[:, rows], q[:, rows], kh, vh, out[:, rows], lse[:, :, rows], wl, wr,
                                        scale, impl)
            dq_parts.append((rows, dq_p))
            off = 0
            for p in pieces:  # back to the owners, in the pieces they sent
                sends.append((p.peer, _kv_rows(dk_p, dv_p, off, off + p.rows)))
                off += p.rows
        owned = plan.send_left + plan.send_right
        recvs = [(p.peer, (b, p.rows, 2 * hkv, d)) for p in owned]
        reqs, bufs = _post(sends, recvs, group, k)
        dq, dk, dv = _swa_bwd(dout, q, k, v, out, lse, plan.left, plan.right, scale, impl)
        for rows, dq_p in dq_parts:
            dq[:, rows] += dq_p
        _wait(reqs)
        for p, g in zip(owned, bufs):
            dk[:, p.start:p.stop] += g[:, :, :hkv]
            dv[:, p.start:p.stop] += g[:, :, hkv:]
        return dq, dk, dv, None, None, None, None


# ----------------------------------------------------------------------------- checks
def _local_checks(q, k, v, window_size, causal, softmax_scale, backend, world):
    """Everything one rank can check alone; returns (impl, n, left, right, scale, meta)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{NAME}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() == 3 or k.dim() == 3:
        raise ValueError(
            f"{NAME}: packed (varlen) input (total_tokens, heads, head_dim) is not supported: sequences packed "
            "into one row would cross rank boundaries with per-sequence windows. Pass padded shards "
            "(batch, L/P, heads, head_dim) (SFTAttention(context_parallel_group=...) takes a right-padded "
            "attention_mask), or run packed batches without context parallelism"
        )
    spec = parse_window(window_size, causal)
    _check_inputs(q, k, v, None, None, None, None, softmax_scale)
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"{NAME}: q and k/v must hold the same tokens (self-attention shard), got seqlen {q.shape[1]} and "
            f"{k.shape[1]}"
        )
    n = q.shape[1]
    if n < 1:
        raise ValueError(f"{NAME}: every rank needs at least one token, got a shard of length {n}")
    impl = resolve_backend(backend, q.device, NAME)
    if impl == "triton" and q.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{NAME}: backend 'triton' supports fp16, bf16 and fp32, got {q.dtype}; use backend='torch'")
    if impl == "cuda":
        from ..ops.sliding_window_attention.cuda_backend import check_supported

        check_supported(q)
    left, right = resolved_window(window_size, causal, n * world)  # the window of the WHOLE sequence
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    b, _, hq, d = q.shape
    meta = [1, b, n, hq, k.shape[2], d, _DTYPE_CODES.get(q.dtype, 0), left, right, scale]
    return impl, n, left, right, scale, meta


_META_FIELDS = ("ok", "batch", "seqlen (tokens per rank)", "heads_q", "heads_kv", "head_dim", "dtype",
                "window left", "window right", "softmax_scale")


def _check_group_agrees(metas: List[List[float]], rank: int) -> None:
    bad = [i for i, m in enumerate(metas) if m[0] != 1]
    if bad:
        raise ValueError(f"{NAME}: rank(s) {bad} of the group rejected their inputs (see the error there); "
                         "every rank stops here")
    for f in range(1, len(_META_FIELDS)):
        vals = [m[f] for m in metas]
        if len(set(vals)) == 1:
            continue
        shown = [int(x) if float(x).is_integer() else x for x in vals]
        if f == 2:
            raise ValueError(
                f"{NAME}: every rank of the group must hold the same number of tokens L/P; got {shown} on group "
                f"ranks 0..{len(vals) - 1}. The group size P must divide the sequence length L: pad the sequence "
                "to a multiple of P (right padding; SFTAttention takes an attention_mask for it)"
            )
        if f in (7, 8):
            raise ValueError(
                f"{NAME}: the window resolves differently across the group ({_META_FIELDS[f]}: {shown}); pass the "
                "same window_size and causal on every rank"
            )
        raise ValueError(f"{NAME}: {_META_FIELDS[f]} differs across the group: {shown}; every rank must pass "
                         "shards of one shape, dtype and softmax_scale")


# ----------------------------------------------------------------------------- public API
def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window_size: WindowArg,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    group=None,
    backend: str = "auto",
    return_lse: bool = False,
    cu_seqlens=None,
):
    """Sliding-window attention over a sequence split across the ranks of ``group``.

    Every rank of the group calls it with its own shard; rank ``r`` of ``P`` holds the
    tokens ``[r n, (r + 1) n)`` of a sequence of ``L = P n`` tokens (rank order = sequence
    order). The result on each rank is its rows of the single-device
    :func:`sft_kernels.sliding_window_attention` on the whole sequence, forward and backward.

    Args:
        q: ``(batch, n, heads_q, head_dim)``, this rank's shard; with ``cu_seqlens``, one
            packed row ``(1, n, heads_q, head_dim)``.
        k, v: ``(batch, n, heads_kv, head_dim)``, the same tokens; ``heads_q % heads_kv == 0``
            (GQA/MQA: only ``heads_kv`` heads are exchanged).
        window_size: (keyword-only, like everything after ``v``) as in
            :func:`sft_kernels.sliding_window_attention`, resolved from the
            **global** length ``L`` (an int ``W`` is ``min(W, L)`` keys including self,
            ``"sqrt"`` is ``floor(sqrt(L))`` keys, ``(left, right)`` explicit, -1 unbounded:
            then the halo is the whole sequence on that side, as traffic-heavy as an
            all-gather of K/V).
        causal: forces ``right = 0`` (default True, unlike ``sliding_window_attention``).
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        group: a ``torch.distributed`` process group (default: the world), every member of
            which calls this function with a shard of the same shape, dtype and window.
        backend: the local kernel, any backend of ``sliding_window_attention`` (``"auto"``:
            Triton on CUDA tensors, PyTorch on CPU). fp16/bf16/fp32; float64 on ``"torch"``.
        return_lse: also return this shard's log-sum-exp ``(batch, heads_q, n)`` (float32;
            float64 for float64 input), not differentiable.
        cu_seqlens: the whole packed row's sequence boundaries (global, ``[0, ..., P n]``), the
            same on every rank: several sequences in one row, each with its window resolved from
            its own length, and a sequence crossing a shard boundary exchanges only its own keys
            (:func:`sft_kernels.parallel.packed.context_parallel_packed_attention`; causal or
            two-sided, no ``return_lse``).

    Communication per call: one all-gather of 10 numbers (the consistency check; a host
    sync on GPU), then point-to-point messages of ``min(left, r n)`` keys+values to the
    left and ``min(right, L - (r+1) n)`` to the right (dK/dV of the same size in the
    backward), split over as many ranks as the window spans. fp16/bf16 messages travel in
    the input dtype.

    Raises:
        ValueError / TypeError on every rank of the group together (never a hang on the
        others) when any rank's shard is invalid, when the shards differ in length (the
        group size must divide ``L``) or shape or dtype, or when the window resolves
        differently across ranks.
    """
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{NAME}: torch.distributed is not initialised (torch.distributed.init_process_group() "
                         "or deepspeed.init_distributed())")
    if cu_seqlens is not None:
        if return_lse:
            raise ValueError(f"{NAME}: return_lse is not available with cu_seqlens (packed rows)")
        from .packed import context_parallel_packed_attention

        return context_parallel_packed_attention(q, k, v, cu_seqlens, window_size, causal, softmax_scale, group,
                                                 backend)
    if group is None:
        group = dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{NAME}: this process is not a member of the given group")
    error = None
    try:
        impl, n, left, right, scale, meta = _local_checks(q, k, v, window_size, causal, softmax_scale, backend, world)
    except (TypeError, ValueError) as exc:
        error, meta = exc, [0] * len(_META_FIELDS)
    if world > 1:
        metas = all_gather_ints(meta, group)  # every rank learns every rank's verdict: all raise together
        if error is not None:
            raise error
        _check_group_agrees(metas, rank)
    elif error is not None:
        raise error
    if world == 1:
        out, lse = sliding_window_attention(q, k, v, window_size=(left, right), causal=False, softmax_scale=scale, return_lse=True, backend=impl)
        return (out, lse) if return_lse else out
    plan = halo_plan(rank, world, n, left, right)
    # the backward calls the raw backward op on the saved tensors, which reads them as contiguous
    # (Hugging Face hands over transposed views: the gradients were wrong without this)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, lse = _HaloAttention.apply(q, k, v, plan, scale, impl, group)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- groups
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


# ----------------------------------------------------------------------------- layers
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
        reach = lambda lft: real - 1 if lft < 0 else min(lft, real - 1)  # noqa: E731
        key = global_left if reach(global_left) == reach(own) else own
        by_window.setdefault(key, []).append(row)
    return by_window


def resolved_window(window_size: WindowArg, causal: bool, total: int) -> Tuple[int, int]:
    """``(left, right)`` of :func:`context_parallel_attention` on a sequence of ``total`` tokens:
    resolved from the whole length, unbounded replaced by ``total - 1``, clamped to it."""
    left, right = resolve_window(window_size, causal, total)
    return (total - 1 if left < 0 else min(left, total - 1)), (total - 1 if right < 0 else min(right, total - 1))
