"""Dense reference for sliding-window attention: an explicit (seqlen_q, seqlen_k) mask.

This defines the semantics every other path is tested against. It builds the whole score
matrix, so use it at small sizes or on a slice of queries (``query_range``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ...window import WindowArg, band_mask, packed_sequences, parse_window


def _attend_dense(q, k, v, left, right, scale, upcast, rows=None, seqlen_q=None):
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
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    mask = band_mask(seqlen_q or lq, lk, left, right, device=q.device, rows=rows)
    has_key = mask.any(-1)  # rows with no visible key give zeros, never NaN
    s = s.masked_fill(~mask, float("-inf")).masked_fill(~has_key[:, None], 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(~has_key, float("-inf"))
    p = torch.softmax(s, dim=-1) * has_key[:, None]
    out = torch.einsum("hqk,khd->qhd", p.to(v.dtype), v)
    return out.to(dtype), lse.float() if lse.dtype != torch.float64 else lse


def sliding_window_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: WindowArg = (-1, -1),
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    upcast: bool = True,
    query_range: Optional[Tuple[int, int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense sliding-window attention. Returns ``(out, lse)``.

    Args:
        q: ``(batch, seqlen_q, heads_q, head_dim)``, or ``(total_q, heads_q, head_dim)`` with
            ``cu_seqlens_q``.
        k, v: ``(batch, seqlen_k, heads_kv, head_dim)`` (or packed), ``heads_q % heads_kv == 0``.
        window_size: ``(left, right)`` with -1 unbounded, an int W (keys including self) or
            ``"sqrt"``; see :mod:`sft_kernels.window`.
        causal: forces ``right = 0``.
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` offsets for packed input.
        upcast: compute fp16/bf16 inputs in fp32 (False: in the input precision, the
            "plain PyTorch in low precision" baseline of the tests).
        query_range: ``(start, stop)`` computes only those query rows (non-packed input),
            so a long sequence can be checked a chunk at a time.

    Returns:
        out with q's shape and dtype; lse float32 (float64 for float64 input) of shape
        ``(batch, heads_q, seqlen_q)`` or ``(heads_q, total_q)`` when packed; ``-inf`` on
        rows that see no key (whose output is zero).
    """
    spec = parse_window(window_size, causal)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens_q is None:
        seqlen_q = q.shape[1]
        if query_range is not None:
            q = q[:, query_range[0] : query_range[1]]
        left, right = spec.resolve(k.shape[1])
        outs, lses = [], []
        for b in range(q.shape[0]):
            o, lse = _attend_dense(q[b], k[b], v[b], left, right, scale, upcast, query_range, seqlen_q)
            outs.append(o)
            lses.append(lse)
        return torch.stack(outs), torch.stack(lses)
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    out = torch.zeros_like(q)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype, device=q.device)
    for qs, qe, ks, ke, left, right in packed_sequences(cu_seqlens_q, cu_seqlens_k, spec):
        if qe == qs:
            continue
        o, l = _attend_dense(q[qs:qe], k[ks:ke], v[ks:ke], left, right, scale, upcast)
        out[qs:qe] = o
        lse[:, qs:qe] = l
    return out, lse
