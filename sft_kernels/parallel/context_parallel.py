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
from typing import List, Optional

import torch

from ..backends import resolve_backend
from ..ops.sliding_window_attention.op import _KERNEL_DTYPES, _check_inputs, sliding_window_attention
from ..window import MODE_EXPLICIT, WindowArg, parse_window
from .comm import _dist, _post, _wait, all_gather_ints
from .plan import HaloPlan, halo_plan, resolved_window

__all__ = ["context_parallel_attention"]

NAME = "context_parallel_attention"
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


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
    """(row slice, explicit window) of the left and right halo parts (None when absent): the
    alignment arithmetic of the module docstring. ``window.py`` resolves windows but has no helper
    for keys offset from their queries by a halo, so it is written here."""
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
    parse_window(window_size, causal)  # a bad window raises here, naming window_size
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
