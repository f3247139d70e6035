"""Memory-efficient PyTorch path (what ``backend="auto"`` runs on CPU tensors).

Queries are processed in chunks of ``C`` rows; a chunk attends only the key range its band
can reach, ``[lo, hi)``, so work and memory are O(L * (C + w)) and no L x L tensor is
ever built. The mask is applied only to chunks that cross the band's edges. Forward
saves ``out`` and the log-sum-exp; backward recomputes the scores chunk by chunk
(FlashAttention's recomputation, in plain PyTorch), so activations stay O(L * D).

All functions take one padded batch ``(B, L, H, D)``; packed (varlen) input is run one
sequence at a time by :func:`attention_fwd` / :func:`attention_bwd`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...window import WindowSpec, packed_sequences

# Query rows per chunk. Swept on the CI machine (2 cores, fp32, B=1, H=8, D=64, L=16384,
# causal window 256, forward+backward): 64 -> 1.44 s, 128 -> 1.34 s, 256 -> 1.56 s.
CHUNK = 128
# Upper bound on one chunk's score tensor, elements (for wide / unbounded windows).
MAX_SCORE_ELEMS = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunks(lq: int, lk: int, left: int, right: int, rows: int):
    """Yield (qs, qe, lo, hi, needs_mask) for query chunks of ``rows`` rows."""
    off = lk - lq
    for qs in range(0, lq, rows):
        qe = min(qs + rows, lq)
        lo = 0 if left < 0 else max(0, qs + off - left)
        hi = lk if right < 0 else min(lk, qe - 1 + off + right + 1)
        # the mask matters only if some (row, key) pair in [qs,qe) x [lo,hi) is out of band
        cut_left = left >= 0 and (qe - 1 + off - left) > lo
        cut_right = right >= 0 and (qs + off + right) < hi - 1
        yield qs, qe, lo, hi, cut_left or cut_right


def _band(qs, qe, lo, hi, off, left, right, device):
    i = torch.arange(qs, qe, device=device).unsqueeze(1) + off
    j = torch.arange(lo, hi, device=device).unsqueeze(0)
    keep = torch.ones(qe - qs, hi - lo, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def _rows_per_chunk(lq: int, lk: int, left: int, right: int, batch_heads: int) -> int:
    band = lk if (left < 0 or right < 0) else min(lk, left + right + 1)
    rows = CHUNK
    while rows > 16 and batch_heads * rows * (rows + band) > MAX_SCORE_ELEMS:
        rows //= 2
    return max(1, min(rows, lq))


def _q_chunk(x: torch.Tensor, qs: int, qe: int, hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [qs, qe) of (B, L, Hq, D) -> (B, Hkv, G * C, D) in the compute dtype (a chunk-sized copy)."""
    b, _, h, d = x.shape
    c = qe - qs
    return x[:, qs:qe].to(dtype).view(b, c, hkv, h // hkv, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, (h // hkv) * c, d)


def _kv_range(x: torch.Tensor, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    """Keys [lo, hi) of (B, Lk, Hkv, D) -> (B, Hkv, R, D); the kv heads are never repeated."""
    return x[:, lo:hi].to(dtype).permute(0, 2, 1, 3)


def _to_rows(t: torch.Tensor, b: int, hkv: int, g: int, c: int) -> torch.Tensor:
    """(B, Hkv, G * C, D) -> (B, C, Hkv * G, D), the caller's layout for a chunk of rows."""
    return t.view(b, hkv, g, c, -1).permute(0, 3, 1, 2, 4).reshape(b, c, hkv * g, -1)


def _fwd_padded(q, k, v, left, right, scale):
    """q (B, Lq, Hq, D), k/v (B, Lk, Hkv, D) -> out (B, Lq, Hq, D), lse (B, Hq, Lq) fp32.

    Works on the caller's layout a chunk at a time: besides out and lse, memory is one
    chunk's scores (no full-size transposed copies of q, k or v).
    """
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    cdt = _compute_dtype(q.dtype)
    out = torch.zeros(b, lq, hq, d, dtype=q.dtype, device=q.device)
    lse_dtype = torch.float64 if cdt == torch.float64 else torch.float32
    lse = torch.full((b, hkv, g, lq), float("-inf"), dtype=lse_dtype, device=q.device)
    off = lk - lq
    rows = _rows_per_chunk(lq, lk, left, right, b * hq)
    for qs, qe, lo, hi, needs_mask in _chunks(lq, lk, left, right, rows):
        if hi <= lo:
            continue  # no key in reach: zeros, lse -inf
        c = qe - qs
        s = torch.matmul(_q_chunk(q, qs, qe, hkv, cdt), _kv_range(k, lo, hi, cdt).transpose(-1, -2)).mul_(scale)
        if needs_mask:
            keep = _band(qs, qe, lo, hi, off, left, right, q.device)
            s.view(b, hkv, g, c, hi - lo).masked_fill_(~keep, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows with no key
        p = s.sub_(m).exp_()
        l = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p, _kv_range(v, lo, hi, cdt)).div_(torch.where(l == 0, torch.ones_like(l), l))
        out[:, qs:qe] = _to_rows(o, b, hkv, g, c)
        lse[:, :, :, qs:qe] = (m + torch.log(l)).view(b, hkv, g, c).to(lse_dtype)
    return out, lse.view(b, hq, lq)


def _bwd_padded(do, q, k, v, lse, left, right, scale):
    """Gradients of :func:`_fwd_padded`; scores recomputed per chunk.

    Memory besides dq, dk, dv: one chunk's scores (dk/dv accumulate in fp32 buffers only
    when the inputs are fp16/bf16).
    """
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    cdt = _compute_dtype(q.dtype)
    lse = lse.view(b, hkv, g, lq).to(cdt)
    lse = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)  # empty rows: p = 0
    dq = torch.zeros(b, lq, hq, d, dtype=q.dtype, device=q.device)
    dk = torch.zeros(b, lk, hkv, d, dtype=cdt, device=q.device)
    dv = torch.zeros(b, lk, hkv, d, dtype=cdt, device=q.device)
    off = lk - lq
    rows = _rows_per_chunk(lq, lk, left, right, b * hq)
    for qs, qe, lo, hi, needs_mask in _chunks(lq, lk, left, right, rows):
        if hi <= lo:
            continue
        c = qe - qs
        qc = _q_chunk(q, qs, qe, hkv, cdt)
        doc = _q_chunk(do, qs, qe, hkv, cdt)
        kr, vr = _kv_range(k, lo, hi, cdt), _kv_range(v, lo, hi, cdt)
        s = torch.matmul(qc, kr.transpose(-1, -2)).mul_(scale)
        if needs_mask:
            keep = _band(qs, qe, lo, hi, off, left, right, q.device)
            s.view(b, hkv, g, c, hi - lo).masked_fill_(~keep, float("-inf"))
        p = s.sub_(lse[:, :, :, qs:qe].reshape(b, hkv, g * c, 1)).exp_()
        dv[:, lo:hi] += torch.matmul(p.transpose(-1, -2), doc).transpose(1, 2)  # sums the G query heads
        dp = torch.matmul(doc, vr.transpose(-1, -2))
        # delta = rowsum(P * dP) (= rowsum(dO * O)), from the compute-precision P rather than the
        # saved output: exact for a row that sees one key (dq = 0), and no fp16/bf16 rounding of O
        delta = torch.matmul(p.unsqueeze(-2), dp.unsqueeze(-1)).squeeze(-1)
        ds = p.mul_(dp.sub_(delta))
        dq[:, qs:qe] = _to_rows(torch.matmul(ds, kr).mul_(scale), b, hkv, g, c)
        dk[:, lo:hi] += torch.matmul(ds.transpose(-1, -2), qc).mul_(scale).transpose(1, 2)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def attention_fwd(
    q, k, v, spec: WindowSpec, scale: float, cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Padded ``(B, L, H, D)`` or packed ``(T, H, D)`` input -> (out, lse)."""
    if cu_seqlens_q is None:
        left, right = spec.resolve(k.shape[1])
        return _fwd_padded(q, k, v, left, right, scale)
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype, device=q.device)
    for qs, qe, ks, ke, left, right in packed_sequences(cu_seqlens_q, cu_seqlens_k, spec):
        if qe == qs:
            continue
        o, l = _fwd_padded(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], left, right, scale)
        out[qs:qe] = o[0]
        lse[:, qs:qe] = l[0]
    return out, lse


def attention_bwd(do, q, k, v, out, lse, spec: WindowSpec, scale, cu_seqlens_q, cu_seqlens_k):
    """Gradients (dq, dk, dv). ``out`` is not needed: delta is recomputed from P and dP."""
    if cu_seqlens_q is None:
        left, right = spec.resolve(k.shape[1])
        return _bwd_padded(do, q, k, v, lse, left, right, scale)
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    for qs, qe, ks, ke, left, right in packed_sequences(cu_seqlens_q, cu_seqlens_k, spec):
        if qe == qs or ke == ks:
            continue
        g = _bwd_padded(
            do[None, qs:qe], q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], lse[None, :, qs:qe],
            left, right, scale,
        )
        dq[qs:qe], dk[ks:ke], dv[ks:ke] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv
