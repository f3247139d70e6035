"""Dense reference for sliding-window attention: an explicit (seqlen_q, seqlen_k) mask.

This defines the semantics every other path is tested against. It builds the whole score
matrix, so use it at small sizes or on a slice of queries (``query_range``).

It is an independent oracle: it imports nothing from this package (not ``window.py``, not
``torch_impl.py``, not the kernels). The window forms of the README's table, the
bottom-right alignment and the per-sequence key length of packed input are spelled out
here with their own arithmetic, so a wrong rule in the shared window code cannot move the
oracle along with the bug.
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Tuple

import torch


def _int_like(value, what: str) -> int:
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if isinstance(value, torch.Tensor) and (value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point()):
        raise TypeError(f"{what} must be an integer scalar, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {value!r}") from None


def _floor_sqrt(n: int) -> int:
    """The largest w with w * w <= n, by counting (no floating point, no shared helper)."""
    w = 0
    while (w + 1) * (w + 1) <= n:
        w += 1
    return w


def reference_window(window_size, causal: bool, seqlen_k: int) -> Tuple[int, int]:
    """``(left, right)`` (``-1`` = unbounded) that a sequence with ``seqlen_k`` keys uses.

    The README's table, read literally:

    - ``(left, right)`` as given, ``right`` forced to 0 when causal; ``None`` is ``(-1, -1)``;
    - an int ``W``: ``Wc = min(W, seqlen_k)`` keys including the query itself, at least one;
      causal ``(Wc - 1, 0)``, else centred ``(Wc // 2, (Wc - 1) // 2)``;
    - ``"sqrt"``: as the int form with ``W = floor(sqrt(seqlen_k))``.
    """
    if window_size is None:
        left, right = -1, -1
    elif isinstance(window_size, str):
        if window_size != "sqrt":
            raise ValueError(f"window_size must be (left, right), an int or 'sqrt', got {window_size!r}")
        return _keys_window(max(_floor_sqrt(seqlen_k), 1), causal)
    elif isinstance(window_size, (tuple, list)) or getattr(window_size, "ndim", None) == 1:  # or a 1-D tensor / array
        if len(window_size) != 2:
            raise TypeError(f"window_size as a pair must have 2 entries, got {window_size!r}")
        left, right = (_int_like(x, "window_size entry") for x in window_size)
        if left < -1 or right < -1:
            raise ValueError(f"window_size entries must be >= -1, got {window_size!r}")
    else:
        w = _int_like(window_size, "window_size")
        if w < 1:
            raise ValueError(f"window_size as an int counts keys and must be >= 1, got {w}")
        return _keys_window(max(min(w, seqlen_k), 1), causal)
    return (left, 0) if causal else (left, right)


def _keys_window(w: int, causal: bool) -> Tuple[int, int]:
    # w keys including the query: causal takes them all on the left; otherwise the extra
    # key of an even w goes to the left (w = 4 -> 2 left, 1 right)
    return (w - 1, 0) if causal else (w // 2, (w - 1) // 2)


def reference_mask(seqlen_q: int, seqlen_k: int, left: int, right: int, rows=None, device=None) -> torch.Tensor:
    """Boolean ``(rows, seqlen_k)``: True where query row ``i`` may attend key ``j``.

    Query ``i`` sits at key position ``i + seqlen_k - seqlen_q`` (bottom-right alignment)
    and sees keys ``j`` with ``pos - left <= j <= pos + right``; ``-1`` drops that bound.
    ``rows=(start, stop)`` keeps only those query rows (positions of the full sequence).
    """
    start, stop = rows if rows is not None else (0, seqlen_q)
    pos = torch.arange(start, stop, device=device).view(-1, 1) + (seqlen_k - seqlen_q)
    key = torch.arange(seqlen_k, device=device).view(1, -1)
    lowest = pos - left if left >= 0 else torch.full_like(pos, -1)
    highest = pos + right if right >= 0 else torch.full_like(pos, seqlen_k)
    return (key >= lowest) & (key <= highest)


def _attend_dense(q, k, v, left, right, scale, upcast, rows=None, seqlen_q=None, softcap=0.0, sinks=None):
    """One sequence. q (Lq, Hq, D), k/v (Lk, Hkv, D) -> out (Lq, Hq, D), lse (Hq, Lq).

    ``rows=(start, stop)`` with ``seqlen_q``: q holds only those rows of a longer query
    sequence, which keep the alignment of the full sequence.
    """
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    group = hq // hkv
    k = k.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    mask = reference_mask(seqlen_q or lq, lk, left, right, rows=rows, device=q.device)
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        # one extra logit per head in every row's denominator, a "key" whose value is 0
        sink = sinks.to(s.dtype).view(hq, 1, 1).expand(hq, s.shape[1], 1)
        s = torch.cat([s, sink], dim=-1)
    has_key = torch.isfinite(s).any(-1)  # rows with nothing to attend give zeros, never NaN
    s = s.masked_fill(~has_key[..., None], 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(~has_key, float("-inf"))
    p = torch.softmax(s, dim=-1) * has_key[..., None]
    if sinks is not None:
        p = p[..., :-1]
    out = torch.einsum("hqk,khd->qhd", p.to(v.dtype), v)
    return out.to(dtype), lse.float() if lse.dtype != torch.float64 else lse


def sliding_window_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size=(-1, -1),
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    upcast: bool = True,
    query_range: Optional[Tuple[int, int]] = None,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense sliding-window attention. Returns ``(out, lse)``.

    Args:
        q: ``(batch, seqlen_q, heads_q, head_dim)``, or ``(total_q, heads_q, head_dim)`` with
            ``cu_seqlens_q``.
        k, v: ``(batch, seqlen_k, heads_kv, head_dim)`` (or packed), ``heads_q % heads_kv == 0``.
        window_size: ``(left, right)`` with -1 unbounded, an int W (keys including self) or
            ``"sqrt"``; see :func:`reference_window`.
        causal: forces ``right = 0``.
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` offsets for packed input; an int
            or ``"sqrt"`` window is resolved per sequence from that sequence's key length.
        upcast: compute fp16/bf16 inputs in fp32 (False: in the input precision, the
            "plain PyTorch in low precision" baseline of the tests).
        query_range: ``(start, stop)`` computes only those query rows (non-packed input),
            so a long sequence can be checked a chunk at a time.
        softcap: ``c > 0`` replaces each score ``s`` (after the softmax scale) by
            ``c * tanh(s / c)`` before the softmax (Gemma 2); 0 = off.
        sinks: ``(heads_q,)`` logits, one per query head, each joining every row's softmax
            denominator as a key whose value is zero (GPT-OSS); differentiable.

    Returns:
        out with q's shape and dtype; lse float32 (float64 for float64 input) of shape
        ``(batch, heads_q, seqlen_q)`` or ``(heads_q, total_q)`` when packed: the log of
        the softmax denominator, sink included. A row that sees no key has output zero and
        lse ``-inf`` (with sinks: the sink's logit, the sink taking all the mass).
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens_q is None:
        seqlen_q = q.shape[1]
        if query_range is not None:
            q = q[:, query_range[0] : query_range[1]]
        left, right = reference_window(window_size, causal, k.shape[1])
        outs, lses = [], []
        for b in range(q.shape[0]):
            o, lse = _attend_dense(q[b], k[b], v[b], left, right, scale, upcast, query_range, seqlen_q, softcap, sinks)
            outs.append(o)
            lses.append(lse)
        if not outs:  # batch 0
            lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            return q.new_zeros(q.shape), q.new_zeros((0, q.shape[2], q.shape[1]), dtype=lse_dtype)
        return torch.stack(outs), torch.stack(lses)
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    out = torch.zeros_like(q)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype, device=q.device)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(starts_q) - 1):
        qs, qe, ks, ke = starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]
        if qe == qs:
            continue
        left, right = reference_window(window_size, causal, ke - ks)  # this sequence's key length
        o, l = _attend_dense(q[qs:qe], k[ks:ke], v[ks:ke], left, right, scale, upcast, softcap=softcap, sinks=sinks)
        out[qs:qe] = o
        lse[:, qs:qe] = l
    return out, lse
