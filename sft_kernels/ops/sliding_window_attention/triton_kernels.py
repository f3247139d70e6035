"""Triton kernels for sliding-window attention, FlashAttention-2 style.

Forward: one program per (query tile, head, sequence). It visits only the key tiles that
intersect its band, in three phases: masked tiles on the band's left edge, mask-free
tiles fully inside the band, masked tiles on the right edge. Online softmax in base 2,
fp32 accumulation; writes the output and the log-sum-exp (natural log, -inf for rows
that see no key). On sm_90 the forward moves Q, K, V and O through tensor descriptors
(TMA, ``USE_TMA``); elsewhere, and for layouts TMA cannot address, masked pointer loads.

Backward (deterministic, no atomics): a pre-pass delta = rowsum(dO * O); a key-tile
kernel that accumulates dK and dV over the query tiles in the band (and over the query
heads sharing the kv head, for GQA); a query-tile kernel for dQ over the key tiles in
the band.

Layouts: q/k/v/o ``(batch, seqlen, heads, head_dim)`` or packed ``(total, heads,
head_dim)`` with ``cu_seqlens`` (batch stride 0, the sequence start added to the row).
The last dimension must be contiguous. LSE/delta: ``(batch, heads, seqlen)`` or
``(heads, total)``. Grids are (tiles, heads, batch): heads and sequences on their own
axes, each up to 65,535 per launch (the launchers split larger batches). Row offsets
(row x stride) are formed in 64 bits from a per-tile base, so a sequence may be longer
than 2**31 elements / row stride; offsets inside a tile stay 32-bit.

Window encoding (see :mod:`sft_kernels.window`, the same named constants): MODE_EXPLICIT
uses (left, right) as given; MODE_KEYS resolves W = clamp(keys, 1, seqlen_k) per
sequence; MODE_SQRT resolves W = floor(sqrt(seqlen_k)) per sequence. ``UPCAST`` casts dot
operands to fp32; it is set under ``TRITON_INTERPRET=1``, whose ``tl.dot`` mishandles
fp16/bf16 (:mod:`.._triton_utils` holds that and the rest of the Triton plumbing).

Arguments: absent pointers (``cu_seqlens`` of a padded batch, ``SINKS`` / ``DSINK`` without
sinks) are ``None``, which Triton specialises as a constexpr; sequence lengths and window
bounds are ``do_not_specialize`` (no recompile when a length happens to be 1 or a multiple
of 16).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...window import MODE_EXPLICIT, MODE_KEYS, MODE_SQRT
from .._triton_utils import (
    Tuner, arch_of, cast_out, dot_precision, ensure_tma_allocator, interpreting, pinned_config, upcast_dots,
)

# The window modes as compile-time globals of the kernels (one definition: window.py).
_MODE_EXPLICIT = tl.constexpr(MODE_EXPLICIT)
_MODE_KEYS = tl.constexpr(MODE_KEYS)
_MODE_SQRT = tl.constexpr(MODE_SQRT)

# ----------------------------------------------------------------------------- helpers
@triton.jit
def _isqrt(n):
    """floor(sqrt(n)) for 0 <= n < 2**31, exact (fp32 sqrt, then corrected by one step)."""
    r = tl.sqrt(n.to(tl.float32)).to(tl.int32)
    r = tl.where(r * r > n, r - 1, r)
    r = tl.where((r + 1) * (r + 1) <= n, r + 1, r)
    return r


@triton.jit
def _resolve_window(left, right, keys, seqlen_k, WINDOW_MODE: tl.constexpr, CAUSAL: tl.constexpr):
    """(left, right) for one sequence; -1 = unbounded."""
    tl.static_assert((WINDOW_MODE == _MODE_EXPLICIT) | (WINDOW_MODE == _MODE_KEYS) | (WINDOW_MODE == _MODE_SQRT))
    if WINDOW_MODE == _MODE_EXPLICIT:
        lw = left
        rw = right
    else:
        if WINDOW_MODE == _MODE_KEYS:
            w = tl.minimum(keys, seqlen_k)
        else:  # _MODE_SQRT
            w = _isqrt(seqlen_k)
        w = tl.maximum(w, 1)
        if CAUSAL:
            lw = w - 1
            rw = w * 0
        else:
            lw = w // 2
            rw = (w - 1) // 2
    return lw, rw


@triton.jit
def _seq_info(cu_seqlens_q, cu_seqlens_k, off_b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(q_start, k_start, seqlen_q, seqlen_k) of sequence ``off_b``.

    (Zero is spelled ``off_b * 0``: a tensor, as the packed branch's starts are, so that the
    callers' ``.to(tl.int64)`` applies to both.)
    """
    if IS_VARLEN:
        q_start = tl.load(cu_seqlens_q + off_b)
        q_end = tl.load(cu_seqlens_q + off_b + 1)
        k_start = tl.load(cu_seqlens_k + off_b)
        k_end = tl.load(cu_seqlens_k + off_b + 1)
        return q_start, k_start, q_end - q_start, k_end - k_start
    return off_b * 0, off_b * 0, seqlen_q, seqlen_k


@triton.jit
def _key_phases(start_m, off, left, right, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-tile bounds for query rows [start_m, start_m + BLOCK_M).

    Returns (lo, full_lo, full_hi, hi): tiles in [lo, full_lo) and [full_hi, hi) cross the
    band's edge (or the end of the sequence) and need the mask; [full_lo, full_hi) are
    inside the band for every row and need none. lo, full_lo and full_hi are multiples of
    BLOCK_N (full_lo may equal hi).
    """
    lo = start_m * 0
    if left >= 0:
        lo = tl.maximum(start_m + off - left, 0)
    hi = seqlen_k
    if right >= 0:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + off + right, 0), seqlen_k)
    lo = (lo // BLOCK_N) * BLOCK_N
    full_lo = lo
    if left >= 0:
        # the last row's lower bound must be <= the tile's first key
        full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 + off - left, lo), BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(full_lo, tl.maximum(hi, lo))
    # the first row's upper bound must be >= the tile's last key; tile inside the sequence
    upper = seqlen_k
    if right >= 0:
        upper = tl.minimum(tl.maximum(start_m + off + right + 1, 0), seqlen_k)
    full_hi = tl.maximum((upper // BLOCK_N) * BLOCK_N, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_phases(start_n, off, left, right, seqlen_q, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query-tile bounds for key columns [start_n, start_n + BLOCK_N); as _key_phases.

    Key j is seen by rows i with j - off - right <= i <= j - off + left.
    """
    lo = start_n * 0
    if right >= 0:
        lo = tl.maximum(start_n - off - right, 0)
    hi = seqlen_q
    if left >= 0:
        hi = tl.minimum(tl.maximum(start_n + BLOCK_N - off + left, 0), seqlen_q)
    lo = (lo // BLOCK_M) * BLOCK_M
    full_lo = lo
    if right >= 0:
        # the tile's first row must see the last key: i >= start_n + BLOCK_N - 1 - off - right
        full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - off - right, lo), BLOCK_M) * BLOCK_M
    full_lo = tl.minimum(full_lo, tl.maximum(hi, lo))
    upper = hi
    if left >= 0:
        # the tile's last row must see the first key: i <= start_n - off + left
        upper = tl.minimum(tl.maximum(start_n - off + left + 1, 0), hi)
    full_hi = tl.maximum((upper // BLOCK_M) * BLOCK_M, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp2 (the interpreter has no libdevice tanh): a series where
    ``1 - e^(-2|x|)`` would cancel (|x| < 0.25; next term 2e-9), else (1 - e) / (1 + e)."""
    a = tl.abs(x)
    e = tl.math.exp2(a * -2.8853900817779268)  # e^(-2a)
    t = tl.fdiv(1.0 - e, 1.0 + e, ieee_rounding=False)  # div.full (2 ulp): an IEEE divide spilled dQ
    x2 = x * x
    series = a * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397
                                                                                     + x2 * 0.021869488536155203))))
    t = tl.where(a < 0.25, series, t)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores(qk, cap_in, qk_scale, SOFTCAP: tl.constexpr):
    """Raw dot products -> scores in the exp2 domain.

    Without a cap: qk * sm_scale * log2(e). With one (c): c * tanh(qk * sm_scale / c) *
    log2(e), i.e. ``cap_in = sm_scale / c`` and ``qk_scale = c * log2(e)``.
    """
    if SOFTCAP:
        return _tanh(qk * cap_in) * qk_scale
    return qk * qk_scale


@triton.jit
def _softcap_grad(p, lse, qk_scale):
    """``1 - tanh^2`` of the cap, d(c tanh(u)) / du, recovered from p = exp2(c log2(e) t - lse):
    t = (log2(p) + lse) / qk_scale. Recovering it from p, which the backward holds anyway,
    keeps no tanh tile alive across the dP dot (with one, the backward spilled under Triton
    3.6 at D = 64 and 128). Where p = 0 the gradient is 0 whatever the factor."""
    t = (tl.math.log2(tl.where(p > 0, p, 1.0)) + lse) * (1.0 / qk_scale)  # one scalar divide
    return tl.where(p > 0, 1.0 - t * t, 0.0)


@triton.jit
def _score_scales(sm_scale, softcap, SOFTCAP: tl.constexpr):
    """(cap_in, qk_scale) for :func:`_scores`."""
    if SOFTCAP:
        return sm_scale / softcap, softcap * 1.4426950408889634
    return sm_scale * 0.0, sm_scale * 1.4426950408889634


@triton.jit
def _band_mask(rows, cols, off, left, right, seqlen_q, seqlen_k):
    """rows (M, 1) and cols (1, N) -> True where row attends col and both are in range."""
    pos = rows + off
    keep = (cols < seqlen_k) & (rows < seqlen_q) & (cols >= 0)
    keep = keep & ((left < 0) | (cols >= pos - left))
    keep = keep & ((right < 0) | (cols <= pos + right))
    return keep


@triton.jit
def _q_tile_prologue(
    cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, group, left, right, keys,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WINDOW_MODE: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """What a query-tile program (grid (tiles, heads, batch): the forward and dQ) starts
    from: its tile, head, kv head and sequence, the sequence's rows and resolved window, the
    tile's row / key / feature offsets and 64-bit batch / head indices. The caller returns
    when ``start_m >= seqlen_q`` (a tile past its sequence's end)."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hk = off_h // group
    q_start, k_start, seqlen_q, seqlen_k = _seq_info(cu_seqlens_q, cu_seqlens_k, off_b, seqlen_q, seqlen_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    left, right = _resolve_window(left, right, keys, seqlen_k, WINDOW_MODE, CAUSAL)
    off = seqlen_k - seqlen_q
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    return (pid_m, start_m, off_h, q_start, k_start, seqlen_q, seqlen_k, left, right, off, offs_m, offs_n, offs_d,
            off_b.to(tl.int64), off_h.to(tl.int64), off_hk.to(tl.int64))


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, lo, full_lo, full_hi, hi, off, left, right, seqlen_q,
    seqlen_k, cap_in, qk_scale, offs_m, offs_n, offs_d,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    USE_TMA: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Online softmax over the key tiles [lo, hi). ``k_src``/``v_src``: tensor descriptors
    (USE_TMA) or the sequence's row-0 pointers."""
    d_ok = offs_d[None, :] < HEAD_DIM
    k_offs = offs_n[:, None] * stride_kn + offs_d[None, :]  # in-tile offsets: small, int32
    v_offs = offs_n[:, None] * stride_vn + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if USE_TMA:  # rows past seqlen_k and columns past HEAD_DIM arrive as zeros
            k = k_src.load([start_n, 0])
            v = v_src.load([start_n, 0])
        else:
            kv_ok = (cols[:, None] < seqlen_k) & d_ok
            row0 = start_n.to(tl.int64)  # row x stride in 64 bits: it passes 2**31 on long sequences
            k = tl.load(k_src + row0 * stride_kn + k_offs, mask=kv_ok, other=0.0)
            v = tl.load(v_src + row0 * stride_vn + v_offs, mask=kv_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), cap_in, qk_scale, SOFTCAP)
        if (start_n < full_lo) | (start_n >= full_hi):  # tile on the band's edge
            keep = _band_mask(offs_m[:, None], cols[None, :], off, left, right, seqlen_q, seqlen_k)
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


# sequence lengths and window bounds: run-time values, never specialised on == 1 or % 16
_RUNTIME_INTS = ["seqlen_q", "seqlen_k", "left", "right", "keys"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _swa_fwd_kernel(
    Q, K, V, O, LSE, SINKS, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, group, left, right, keys, sm_scale, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW_MODE: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    """One program per (query tile, head, sequence): grid (tiles, heads, batch).

    SOFTCAP: scores ``s`` become ``softcap * tanh(s / softcap)`` before the softmax.
    HAS_SINKS: ``SINKS[head]`` (fp32) is one more logit in every row's denominator, a key of
    value 0: the online softmax starts from it (m = sink, l = 1), so a row that sees no
    key gives out 0 and lse = sink.

    USE_TMA (sm_90): Q, K, V and O move through tensor descriptors made per program over
    this sequence and head (shape (seqlen, HEAD_DIM), so the copy engine zero-fills rows
    past the sequence and columns past HEAD_DIM); otherwise masked pointer loads.
    """
    (_pid_m, start_m, off_h, q_start, k_start, seqlen_q, seqlen_k, left, right, off, offs_m, offs_n, offs_d, b64, h64,
     hk64) = _q_tile_prologue(cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, group, left, right, keys, BLOCK_M,
                              BLOCK_N, BLOCK_D, WINDOW_MODE, CAUSAL, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    # row 0 of this sequence and head; every row offset below is added in 64 bits
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qm
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k_start.to(tl.int64) * stride_vn
    o_base = O + b64 * stride_ob + h64 * stride_oh + q_start.to(tl.int64) * stride_om
    tile_offs = tl.arange(0, BLOCK_M)[:, None] * stride_qm + offs_d[None, :]
    q_ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    lo, full_lo, full_hi, hi = _key_phases(start_m, off, left, right, seqlen_k, BLOCK_M, BLOCK_N)
    if USE_TMA:
        k_src = tl.make_tensor_descriptor(k_base, [seqlen_k, HEAD_DIM], [stride_kn, 1], [BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_base, [seqlen_k, HEAD_DIM], [stride_vn, 1], [BLOCK_N, BLOCK_D])
        q_desc = tl.make_tensor_descriptor(q_base, [seqlen_q, HEAD_DIM], [stride_qm, 1], [BLOCK_M, BLOCK_D])
        q = q_desc.load([start_m, 0])
    else:
        k_src = k_base
        v_src = v_base
        q = tl.load(q_base + start_m.to(tl.int64) * stride_qm + tile_offs, mask=q_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    cap_in, qk_scale = _score_scales(sm_scale, softcap, SOFTCAP)
    if HAS_SINKS:
        m_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32) * (tl.load(SINKS + off_h) * 1.4426950408889634)
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, lo, full_lo, full_hi, hi, off,
                               left, right, seqlen_q, seqlen_k, cap_in, qk_scale, offs_m, offs_n, offs_d,
                               BLOCK_N, HEAD_DIM, UPCAST, DOT_PREC, USE_TMA, SOFTCAP)

    empty = l_i == 0.0  # no visible key (and no sink): output 0, lse -inf
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    if USE_TMA:  # the store is clipped to (seqlen_q, HEAD_DIM)
        o_desc = tl.make_tensor_descriptor(o_base, [seqlen_q, HEAD_DIM], [stride_om, 1], [BLOCK_M, BLOCK_D])
        o_desc.store([start_m, 0], cast_out(acc, O.dtype.element_ty, UPCAST))
    else:
        o_offs = tl.arange(0, BLOCK_M)[:, None] * stride_om + offs_d[None, :]
        tl.store(o_base + start_m.to(tl.int64) * stride_om + o_offs, cast_out(acc, O.dtype.element_ty, UPCAST), mask=q_ok)
    l_base = LSE + b64 * stride_lb + h64 * stride_lh + q_start
    tl.store(l_base + offs_m, lse, mask=offs_m < seqlen_q)


# ----------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["seqlen_q"])
def _bwd_preprocess_kernel(
    O, DO, DELTA, cu_seqlens_q,
    stride_ob, stride_om, stride_oh,
    stride_db, stride_dm, stride_dh,
    stride_lb, stride_lh,
    seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """delta[row] = sum_d dO[row, d] * O[row, d], in fp32. Grid (tiles, heads, batch)."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    q_start, _k, seqlen_q, _lk = _seq_info(cu_seqlens_q, cu_seqlens_q, off_b, seqlen_q, seqlen_q, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    b64 = off_b.to(tl.int64)
    h64 = off_h.to(tl.int64)
    row0 = (q_start + start_m).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)[:, None]
    o = tl.load(O + b64 * stride_ob + h64 * stride_oh + row0 * stride_om + rows * stride_om + offs_d[None, :],
                mask=ok, other=0.0)
    do = tl.load(DO + b64 * stride_db + h64 * stride_dh + row0 * stride_dm + rows * stride_dm + offs_d[None, :],
                 mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, start_n, lo, full_lo, full_hi, hi, off,
    left, right, seqlen_q, seqlen_k, cap_in, qk_scale, offs_m, offs_n, offs_d,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    cols = start_n + offs_n
    d_ok = offs_d[None, :] < HEAD_DIM
    q_offs = offs_m[:, None] * stride_qm + offs_d[None, :]
    do_offs = offs_m[:, None] * stride_dom + offs_d[None, :]
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        r_ok = rows < seqlen_q
        row0 = start_m.to(tl.int64)
        q = tl.load(q_base + row0 * stride_qm + q_offs, mask=r_ok[:, None] & d_ok, other=0.0)
        do = tl.load(do_base + row0 * stride_dom + do_offs, mask=r_ok[:, None] & d_ok, other=0.0)
        lse = tl.load(lse_base + rows, mask=r_ok, other=0.0)
        delta = tl.load(delta_base + rows, mask=r_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # empty rows: p = 0
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        qkT = _scores(tl.dot(k, tl.trans(q), input_precision=DOT_PREC), cap_in, qk_scale, SOFTCAP)  # (N, M)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        if (start_m < full_lo) | (start_m >= full_hi):  # edge tile; mask scores: exp2 could overflow
            keep = _band_mask(rows[None, :], cols[:, None], off, left, right, seqlen_q, seqlen_k)
            qkT = tl.where(keep, qkT, float("-inf"))
            # (p is 0 there anyway.) Consumed inside this branch, dpT is not seen as feeding
            # the dK dot, so Triton does not put every warp on its rows: with 8 warps and 64
            # keys that doubled its wgmma work (warpsPerCTA [8, 1] on 64 rows).
            dpT = tl.where(keep, dpT, 0.0)
        pT = tl.math.exp2(qkT - lse[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * _softcap_grad(pT, lse[None, :], qk_scale)
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _swa_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, group, left, right, keys, sm_scale, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW_MODE: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One program per (key tile, kv head, sequence): dK, dV summed over the band's query
    tiles and over the ``group`` query heads that share this kv head."""
    pid_n = tl.program_id(0)
    off_hk = tl.program_id(1)
    off_b = tl.program_id(2)
    q_start, k_start, seqlen_q, seqlen_k = _seq_info(cu_seqlens_q, cu_seqlens_k, off_b, seqlen_q, seqlen_k, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    left, right = _resolve_window(left, right, keys, seqlen_k, WINDOW_MODE, CAUSAL)
    off = seqlen_k - seqlen_q

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = off_b.to(tl.int64)
    hk64 = off_hk.to(tl.int64)
    kv_ok = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    row0 = (k_start + start_n).to(tl.int64)  # first key of this tile, 64-bit row offset
    tile_n = tl.arange(0, BLOCK_N)[:, None]
    k = tl.load(K + b64 * stride_kb + hk64 * stride_kh + row0 * stride_kn + tile_n * stride_kn + offs_d[None, :],
                mask=kv_ok, other=0.0)
    v = tl.load(V + b64 * stride_vb + hk64 * stride_vh + row0 * stride_vn + tile_n * stride_vn + offs_d[None, :],
                mask=kv_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    cap_in, qk_scale = _score_scales(sm_scale, softcap, SOFTCAP)
    lo, full_lo, full_hi, hi = _query_phases(start_n, off, left, right, seqlen_q, BLOCK_M, BLOCK_N)
    for g in range(0, group):
        off_h = (off_hk * group + g).to(tl.int64)
        q_base = Q + b64 * stride_qb + off_h * stride_qh + q_start.to(tl.int64) * stride_qm
        do_base = DO + b64 * stride_dob + off_h * stride_doh + q_start.to(tl.int64) * stride_dom
        lse_base = LSE + b64 * stride_lb + off_h * stride_lh + q_start
        delta_base = DELTA + b64 * stride_lb + off_h * stride_lh + q_start
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, start_n,
                                 lo, full_lo, full_hi, hi, off, left, right, seqlen_q, seqlen_k, cap_in, qk_scale,
                                 offs_m, tl.arange(0, BLOCK_N), offs_d, BLOCK_M, HEAD_DIM, UPCAST, DOT_PREC, SOFTCAP)
    dk = dk * sm_scale
    dk_ptrs = DK + b64 * stride_dkb + hk64 * stride_dkh + row0 * stride_dkn + tile_n * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b64 * stride_dvb + hk64 * stride_dvh + row0 * stride_dvn + tile_n * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, cast_out(dk, DK.dtype.element_ty, UPCAST), mask=kv_ok)
    tl.store(dv_ptrs, cast_out(dv, DV.dtype.element_ty, UPCAST), mask=kv_ok)


@triton.jit
def _bwd_dq_inner(
    dq, pdp, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, lo, full_lo, full_hi, hi, off, left, right,
    seqlen_q, seqlen_k, cap_in, qk_scale, offs_m, offs_n, offs_d,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    """dQ over the key tiles [lo, hi); with HAS_SINKS also ``pdp`` += rowsum(P * dP), the
    exact delta (from fp32 P, not from the fp16/bf16 O) for the sinks' gradient."""
    d_ok = offs_d[None, :] < HEAD_DIM
    k_offs = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vn + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        kv_ok = (cols[:, None] < seqlen_k) & d_ok
        row0 = start_n.to(tl.int64)
        k = tl.load(k_base + row0 * stride_kn + k_offs, mask=kv_ok, other=0.0)
        v = tl.load(v_base + row0 * stride_vn + v_offs, mask=kv_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), cap_in, qk_scale, SOFTCAP)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if (start_n < full_lo) | (start_n >= full_hi):  # tile on the band's edge
            keep = _band_mask(offs_m[:, None], cols[None, :], off, left, right, seqlen_q, seqlen_k)
            qk = tl.where(keep, qk, float("-inf"))
            dp = tl.where(keep, dp, 0.0)  # p is 0 there; keeps dp's layout off [num_warps, 1] (see dK/dV)
        p = tl.math.exp2(qk - lse[:, None])
        if HAS_SINKS:
            pdp += tl.sum(p * dp, 1)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * _softcap_grad(p, lse[:, None], qk_scale)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq, pdp


@triton.jit(do_not_specialize=_RUNTIME_INTS + ["dsink_tiles"])
def _swa_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, SINKS, DSINK, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, group, left, right, keys, sm_scale, softcap, dsink_tiles,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW_MODE: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    """One program per (query tile, head, sequence): dQ over the band's key tiles.

    HAS_SINKS: also this tile's share of d sink[head] = -sum over its rows of P_sink * delta,
    P_sink = exp(sink - lse), into DSINK[sequence, head, tile] (``dsink_tiles`` slots per
    (sequence, head); summed by the launcher: no atomics, a fixed order)."""
    (pid_m, start_m, off_h, q_start, k_start, seqlen_q, seqlen_k, left, right, off, offs_m, offs_n, offs_d, b64, h64,
     hk64) = _q_tile_prologue(cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, group, left, right, keys, BLOCK_M,
                              BLOCK_N, BLOCK_D, WINDOW_MODE, CAUSAL, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    row0 = (q_start + start_m).to(tl.int64)  # first query of this tile, 64-bit row offset
    tile_m = tl.arange(0, BLOCK_M)[:, None]
    q_ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + row0 * stride_qm + tile_m * stride_qm + offs_d[None, :],
                mask=q_ok, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + row0 * stride_dom + tile_m * stride_dom + offs_d[None, :],
                 mask=q_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    r_ok = offs_m < seqlen_q
    lse = tl.load(LSE + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, mask=r_ok, other=0.0)
    delta = tl.load(DELTA + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, mask=r_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k_start.to(tl.int64) * stride_vn
    cap_in, qk_scale = _score_scales(sm_scale, softcap, SOFTCAP)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    pdp = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_phases(start_m, off, left, right, seqlen_k, BLOCK_M, BLOCK_N)
    dq, pdp = _bwd_dq_inner(dq, pdp, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, lo, full_lo, full_hi, hi,
                            off, left, right, seqlen_q, seqlen_k, cap_in, qk_scale, offs_m, offs_n, offs_d, BLOCK_N,
                            HEAD_DIM, UPCAST, DOT_PREC, SOFTCAP, HAS_SINKS)
    if HAS_SINKS:  # lse is in the exp2 domain here
        p_sink = tl.where(r_ok, tl.math.exp2(tl.load(SINKS + off_h) * 1.4426950408889634 - lse), 0.0)
        tl.store(DSINK + (b64 * tl.num_programs(1) + h64) * dsink_tiles + pid_m, -tl.sum(p_sink * pdp, 0))
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + row0 * stride_dqm + tile_m * stride_dqm + offs_d[None, :],
             cast_out(dq, DQ.dtype.element_ty, UPCAST), mask=q_ok)


# ----------------------------------------------------------------------------- launchers
# Autotune configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) per head_dim class,
# keyed on HEAD_DIM, the window bucket, the dtypes, IS_VARLEN and WINDOW_MODE (and
# USE_TMA for the forward), never on the raw sequence length.
# SFT_KERNELS_SWA_CONFIG="fwd=128,64,8,3;dkdv=32,128,4,3;dq=128,32,4,3" pins them (any
# subset; also under the interpreter, to run the GPU tile sizes on CPU).
_CONFIGS = {
    # Chosen by compiling candidates without a GPU (scripts/sweep_triton_configs.py: TTGIR
    # layouts, ptxas -v): every entry compiles for sm_90a and (unless Hopper-only, below)
    # sm_80, fp16 and bf16, under Triton 3.6 and 3.8, with no spill, no replicated MMA
    # (warps doing the same wgmma) and no serialised wgmma (ptxas C7512/C7515), pipelined
    # (num_stages >= 2) except the D=256 dK/dV fallback, in sm_80's 163 KiB of shared
    # memory. The table of
    # registers, CTAs/SM and wgmma shapes per first choice is in the README. Rules seen in
    # the sweep: 4 warps on 128 rows hold 128 x D fp32 accumulators in 128 threads and
    # spill at D >= 128; 8 warps on 64 rows split N and narrow the wgmma (n = BN / 2); the
    # tensor-descriptor forward needs 20-50 fewer registers than the pointer one. Speed on
    # hardware is unmeasured: the autotuner picks among these on the GPU. An entry ending in
    # (90,) is Hopper-only (it spills a few bytes in sm_80's mma.sync build).
    "fwd": {
        64: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
        128: [(128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
        256: [(128, 32, 8, 2, (90,)), (64, 32, 8, 2), (128, 32, 8, 3, (90,))],
    },
    "dkdv": {
        64: [(32, 128, 8, 2), (32, 64, 4, 2), (16, 64, 4, 3)],
        128: [(32, 128, 8, 2, (90,)), (32, 64, 8, 2), (16, 128, 8, 2, (90,)), (16, 64, 8, 2)],
        256: [(16, 64, 8, 2), (16, 64, 8, 1)],
    },
    "dq": {
        64: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2)],
        # (128, 64) at D = 128 sits at sm_80's 255 registers and spills there with softcap
        # under Triton 3.6: Hopper-only
        128: [(128, 64, 8, 2, (90,)), (128, 32, 8, 2), (64, 32, 4, 2)],
        256: [(64, 32, 8, 2), (128, 16, 8, 2)],
    },
}
_INTERPRET_CONFIG = (16, 16, 1, 1)  # TRITON_INTERPRET=1: one small config, no tuning
_MAX_GRID_YZ = 65535  # CUDA's limit on grid.y and grid.z
_CONFIG_NAMES = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def _pinned(kind: str):
    cfg = pinned_config("SFT_KERNELS_SWA_CONFIG", kind, _CONFIG_NAMES, tuple(_CONFIGS))
    return None if cfg is None else [tuple(cfg[n] for n in _CONFIG_NAMES)]


def head_dim_class(head_dim: int) -> int:
    return 64 if head_dim <= 64 else (128 if head_dim <= 128 else 256)


def _entry_archs(entry):
    return entry[4] if len(entry) > 4 else (80, 90)


def config_list(kind: str, head_dim: int, arch: int = 90):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tuples tried for ``kind`` on ``arch``
    (90 for Hopper and newer, 80 below)."""
    pinned = _pinned(kind)
    if pinned:
        return pinned
    if interpreting():
        return [_INTERPRET_CONFIG]
    return [tuple(e[:4]) for e in _CONFIGS[kind][head_dim_class(head_dim)] if arch in _entry_archs(e)]


_TUNER = Tuner("sliding_window_attention")
_TUNE_KEYS = ("HEAD_DIM", "IS_VARLEN", "WINDOW_MODE", "USE_TMA")  # with tune_bucket and the dtypes


class _Tuned:
    """A kernel launched with the config :data:`_TUNER` picks from ``configs``:
    ``tuned[grid](*args, tune_bucket=b, **constexprs)``, ``grid`` a function of the config's
    meta-parameters. The key is the kind, the config list, the dtypes and the shape-class
    constexprs (HEAD_DIM, IS_VARLEN, WINDOW_MODE, USE_TMA, ...) plus ``tune_bucket`` (the
    band's width class), never a raw length; ``tune_bucket`` is the tuner's, not an
    argument of the kernel."""

    def __init__(self, kernel, kind: str, configs):
        self.kernel, self.kind = kernel, kind
        self.configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                        for bm, bn, w, s in configs]

    def __getitem__(self, grid):
        def launch(*args, tune_bucket: int, **kwargs):
            def run(cfg):
                meta = dict(kwargs, **cfg.kwargs)
                self.kernel[grid(meta)](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

            key = (self.kind, tuple(str(c) for c in self.configs), tune_bucket,
                   tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor)),
                   tuple(kwargs.get(k) for k in _TUNE_KEYS))
            run(_TUNER.choose(key, self.configs, run))

        return launch


def _autotuned(kernel, kind: str):
    """The tuned launcher of ``kernel`` for a head_dim and arch: the config list depends on
    both (and on a pinned config, read at each call)."""

    def get(head_dim: int, arch: int = 90):
        return _Tuned(kernel, kind, tuple(config_list(kind, head_dim, arch)))

    return get


_fwd_tuned = _autotuned(_swa_fwd_kernel, "fwd")
_dkdv_tuned = _autotuned(_swa_bwd_dkdv_kernel, "dkdv")
_dq_tuned = _autotuned(_swa_bwd_dq_kernel, "dq")


def tune_bucket(left: int, right: int, mode: int, max_seqlen_k: int) -> int:
    """Shape bucket for autotuning: log2 of the band width (or of the length, unbounded)."""
    if mode != MODE_EXPLICIT or left < 0 or right < 0:
        width = max_seqlen_k if mode == MODE_EXPLICIT else max(1, int(max_seqlen_k**0.5))
    else:
        width = left + right + 1
    return max(1, min(int(width), 1 << 16)).bit_length()


def _empty_like(t):
    """Contiguous output allocation (tests replace it to poison outputs and catch unwritten
    elements)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def _tma_ok(*tensors) -> bool:
    """Whether the forward may use tensor descriptors for these (b, s, h, d) / (t, h, d)
    tensors: sm_90, fp16/bf16, a 16-byte aligned base and 16-byte multiple strides (what
    the copy engine needs). ``SFT_KERNELS_SWA_TMA=0`` turns it off, ``=1`` forces it (also
    under the interpreter, which emulates descriptors: how the CPU tests run this path)."""
    mode = os.environ.get("SFT_KERNELS_SWA_TMA", "auto")
    if mode == "0" or not hasattr(tl, "make_tensor_descriptor"):
        return False
    t0 = tensors[0]
    if mode != "1":
        if t0.device.type != "cuda" or torch.cuda.get_device_capability(t0.device)[0] != 9:
            return False
        if t0.dtype not in (torch.float16, torch.bfloat16):
            return False
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any((s * size) % 16 for s in t.stride()[:-1]) or t.stride(-1) != 1:
            return False
    return True


def _batch_chunks(batch: int):
    """(start, count) pieces of at most 65,535 sequences: one launch each (grid.z)."""
    return [(b0, min(_MAX_GRID_YZ, batch - b0)) for b0 in range(0, batch, _MAX_GRID_YZ)]


def _rows(t, b0, n, varlen):
    """Sequences [b0, b0 + n) of a (batch, ...) tensor; packed tensors are indexed through
    cu_seqlens and stay whole."""
    return t if varlen or (b0 == 0 and n == t.shape[0]) else t[b0:b0 + n]


def _common(q, k, spec, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    varlen = cu_seqlens_q is not None
    d = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    meta = dict(
        HEAD_DIM=d, BLOCK_D=block_d, WINDOW_MODE=spec.mode, CAUSAL=spec.causal, IS_VARLEN=varlen,
        UPCAST=upcast_dots(q.device), DOT_PREC=dot_precision(q.dtype),
    )
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        lq, lk = max_seqlen_q, max_seqlen_k
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        cu_q = cu_k = None  # absent: a constexpr None in the kernels
    if q.shape[-2] > _MAX_GRID_YZ:
        raise ValueError(f"sliding_window_attention: backend='triton' launches one grid row per head; "
                         f"{q.shape[-2]} query heads exceed {_MAX_GRID_YZ}")
    scalars = (spec.left, spec.right, spec.keys, float(scale), tune_bucket(spec.left, spec.right, spec.mode, lk))
    return batch, lq, lk, cu_q, cu_k, scalars, meta


def _cu(cu, b0, varlen):
    return cu[b0:] if varlen and b0 else cu


def _bsh(t, varlen):
    """(batch, row, head) strides; packed input has no batch stride."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(lse, varlen):
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def swa_fwd_triton(q, k, v, spec, scale, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
                   softcap=0.0, sinks=None):
    """Launch the forward. Inputs already validated; last dim contiguous; ``sinks`` None or
    (heads_q,) fp32. -> (out, lse)."""
    varlen = cu_seqlens_q is not None
    batch, lq, lk, cu_q, cu_k, (left, right, keys, scale, bucket), meta = _common(
        q, k, spec, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    hq, hkv = q.shape[-2], k.shape[-2]
    out = _empty_like(q)
    lse_shape = (hq, q.shape[0]) if varlen else (batch, hq, lq)
    lse = _empty(lse_shape, torch.float32, q.device)
    if q.numel() == 0:
        return out, lse.fill_(float("-inf"))
    use_tma = _tma_ok(q, k, v, out)
    if use_tma:
        ensure_tma_allocator(q.device)
    for b0, nb in _batch_chunks(batch):
        qc, kc, vc, oc, lc = (_rows(t, b0, nb, varlen) for t in (q, k, v, out, lse))
        grid = lambda meta_: (triton.cdiv(lq, meta_["BLOCK_M"]), hq, nb)  # noqa: E731
        _fwd_tuned(q.shape[-1], arch_of(q.device))[grid](
            qc, kc, vc, oc, lc, sinks, _cu(cu_q, b0, varlen), _cu(cu_k, b0, varlen),
            *_bsh(qc, varlen), *_bsh(kc, varlen), *_bsh(vc, varlen), *_bsh(oc, varlen), *_lse_strides(lc, varlen),
            lq, lk, hq // hkv, left, right, keys, scale, float(softcap), tune_bucket=bucket, USE_TMA=use_tma,
            SOFTCAP=softcap > 0, HAS_SINKS=sinks is not None, **meta,
        )
    return out, lse


def swa_bwd_triton(do, q, k, v, out, lse, spec, scale, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
                   max_seqlen_k=0, softcap=0.0, sinks=None):
    """Launch the backward: delta pre-pass (and the sinks' gradient), dK/dV over key tiles,
    dQ over query tiles. -> (dq, dk, dv, dsinks); dsinks is None without sinks."""
    varlen = cu_seqlens_q is not None
    batch, lq, lk, cu_q, cu_k, (left, right, keys, scale, bucket), meta = _common(
        q, k, spec, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    hq, hkv = q.shape[-2], k.shape[-2]
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    dsinks = None if sinks is None else torch.zeros(hq, dtype=torch.float32, device=q.device)
    if q.numel() == 0 or k.numel() == 0:  # (op.py does not launch these) no key: dsinks = 0 too
        return dq.zero_(), dk.zero_(), dv.zero_(), dsinks
    delta = _empty_like(lse)
    pre_m = 16 if interpreting() else 64
    cap = dict(SOFTCAP=softcap > 0)
    for b0, nb in _batch_chunks(batch):
        oc, doc, qc, kc, vc, lc, dc, dqc, dkc, dvc = (
            _rows(t, b0, nb, varlen) for t in (out, do, q, k, v, lse, delta, dq, dk, dv))
        cq, ck = _cu(cu_q, b0, varlen), _cu(cu_k, b0, varlen)
        _bwd_preprocess_kernel[(triton.cdiv(lq, pre_m), hq, nb)](
            oc, doc, dc, cq, *_bsh(oc, varlen), *_bsh(doc, varlen), *_lse_strides(lc, varlen), lq,
            HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"], BLOCK_M=pre_m, IS_VARLEN=varlen,
        )
        common = (*_bsh(qc, varlen), *_bsh(kc, varlen), *_bsh(vc, varlen), *_bsh(doc, varlen))
        grid = lambda meta_: (triton.cdiv(lk, meta_["BLOCK_N"]), hkv, nb)  # noqa: E731
        _dkdv_tuned(q.shape[-1], arch_of(q.device))[grid](
            qc, kc, vc, doc, lc, dc, dkc, dvc, cq, ck, *common, *_bsh(dkc, varlen), *_bsh(dvc, varlen),
            *_lse_strides(lc, varlen), lq, lk, hq // hkv, left, right, keys, scale, float(softcap),
            tune_bucket=bucket, **cap, **meta,
        )
        grid = lambda meta_: (triton.cdiv(lq, meta_["BLOCK_M"]), hq, nb)  # noqa: E731
        dq_tuned = _dq_tuned(q.shape[-1], arch_of(q.device))
        # one slot per (sequence, head, query tile) at the smallest tile of the list; zeros: a
        # tile past its sequence's end returns before writing its slot
        tiles, dsink_part = 0, None
        if sinks is not None:
            tiles = triton.cdiv(lq, min(c.kwargs["BLOCK_M"] for c in dq_tuned.configs))
            dsink_part = torch.zeros((nb, hq, tiles), dtype=torch.float32, device=q.device)
        dq_tuned[grid](
            qc, kc, vc, doc, lc, dc, dqc, sinks, dsink_part, cq, ck, *common, *_bsh(dqc, varlen),
            *_lse_strides(lc, varlen), lq, lk, hq // hkv, left, right, keys, scale, float(softcap), tiles,
            tune_bucket=bucket, HAS_SINKS=sinks is not None, **cap, **meta,
        )
        if sinks is not None:
            dsinks += dsink_part.sum((0, 2))
    return dq, dk, dv, dsinks



# ----------------------------------------------------------------------------- GPU compile check
_KERNELS = {"fwd": _swa_fwd_kernel, "dkdv": _swa_bwd_dkdv_kernel, "dq": _swa_bwd_dq_kernel}
_TENSOR_ARGS = {
    "fwd": ("Q", "K", "V", "O"),
    "dkdv": ("Q", "K", "V", "DO", "DK", "DV"),
    "dq": ("Q", "K", "V", "DO", "DQ"),
}


def _signature(kind: str, dtype: str, absent=()) -> dict:
    """Runtime argument types; the pointers named in ``absent`` are left out (the launch
    passes None: a constexpr)."""
    sig = {}
    for name in _param_names(kind):
        if name in absent or (name.isupper() and name not in _TENSOR_ARGS[kind] + ("LSE", "DELTA", "SINKS", "DSINK")):
            continue  # constexpr
        if name in _TENSOR_ARGS[kind]:
            sig[name] = f"*{dtype}"
        elif name in ("LSE", "DELTA", "SINKS", "DSINK"):
            sig[name] = "*fp32"
        elif name.startswith("cu_seqlens"):
            sig[name] = "*i32"
        elif name in ("sm_scale", "softcap"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _param_names(kind: str):
    import inspect

    fn = _KERNELS[kind]
    return tuple(inspect.signature(getattr(fn, "fn", fn)).parameters)


def compile_spec(kind: str, dtype: str, head_dim: int, cfg, mode: int = MODE_EXPLICIT, varlen: bool = False,
                 causal: bool = True, tma: bool = False, first: bool = False, softcap: bool = False,
                 sinks: bool = False) -> dict:
    """One compile-check spec (``sft_kernels.testing.compile_check``) of ``kind`` in
    ``dtype`` ("fp16"/"bf16"/"fp32") at ``cfg = (BLOCK_M, BLOCK_N, num_warps, num_stages[,
    archs])``; ``softcap`` / ``sinks`` compile those score modifiers in (sinks: the forward
    and dQ, where their gradient is summed; dK/dV has none). Pointers a launch leaves out
    (``cu_seqlens`` unpacked, ``SINKS`` / ``DSINK`` without sinks) are constexpr None, as the
    launchers pass them."""
    bm, bn, warps, stages = cfg[:4]
    archs = (90,) if tma else tuple(_entry_archs(cfg))
    absent = (() if varlen else ("cu_seqlens_q", "cu_seqlens_k")) + (() if sinks else ("SINKS", "DSINK"))
    sig = _signature(kind, dtype, absent)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=bm, BLOCK_N=bn,
                      WINDOW_MODE=mode, CAUSAL=causal, IS_VARLEN=varlen, UPCAST=False,
                      DOT_PREC="ieee" if dtype == "fp32" else "tf32", SOFTCAP=softcap)
    constexprs.update({n: None for n in absent if n in _param_names(kind)})
    if kind == "fwd":
        constexprs["USE_TMA"] = tma
    if kind in ("fwd", "dq"):
        constexprs["HAS_SINKS"] = sinks
    tags = (("tma," if tma else "") + ("softcap," if softcap else "") + ("sinks," if sinks else "")
            + f"D={head_dim},{dtype},BM={bm},BN={bn},w={warps},s={stages}")
    return {
        "name": f"swa_{kind}[{tags}" + (",varlen,sqrt" if varlen else "") + "]",
        "fn": _KERNELS[kind],
        "signature": sig,
        "constexprs": constexprs,
        "num_warps": warps,
        "num_stages": stages,
        "expect_mma": True,
        "first_choice": first,  # the first entry of its autotune list (the report's table)
        # TMA is a Hopper engine: that variant is only ever launched on sm_90 (as are the
        # Hopper-only list entries)
        "archs": archs,
        # what a launch on (batch, seqlen, heads, head_dim) tensors with head_dim a
        # multiple of 16 gets: Triton specialises such strides as 16-divisible
        "divisible_by_16": [n for n, t in sig.items() if t.startswith("*") or n.startswith("stride")],
    }


def compile_specs():
    """Every kernel in every autotune configuration, fp16 and bf16, for
    ``sft_kernels.testing.compile_check`` (the forward also in its TMA variant).

    Register and shared-memory use depend on the tile shapes, head_dim class and dtype, not
    on the window mode, so the config sweep uses causal explicit windows; a packed
    ``"sqrt"`` variant and head_dim 80 (a padded BLOCK_D) per kernel cover the other code
    paths at each list's first config.
    """
    specs = []
    for kind, by_dim in _CONFIGS.items():
        for head_dim, configs in by_dim.items():
            for i, cfg in enumerate(configs):
                for dtype in ("fp16", "bf16"):
                    first = i == 0 and dtype == "bf16"
                    specs.append(compile_spec(kind, dtype, head_dim, cfg, first=first))
                    if kind == "fwd":
                        specs.append(compile_spec(kind, dtype, head_dim, cfg, tma=True, first=first))
        specs.append(compile_spec(kind, "bf16", 80, by_dim[128][0]))
        specs.append(compile_spec(kind, "bf16", 128, by_dim[128][0], mode=MODE_SQRT, varlen=True))
        # the score modifiers (Gemma 2's softcap, GPT-OSS's sinks) at every head_dim's first
        # choice on each arch: they must add no spill / serialisation either
        for head_dim, configs in by_dim.items():
            firsts = [configs[0]]
            if 80 not in _entry_archs(configs[0]):
                firsts += [next(c for c in configs if 80 in _entry_archs(c))]
            for cfg in firsts:
                specs.append(compile_spec(kind, "bf16", head_dim, cfg, softcap=True))
                if kind in ("fwd", "dq"):
                    specs.append(compile_spec(kind, "bf16", head_dim, cfg, sinks=True, softcap=kind == "dq"))
            if kind == "fwd":
                specs.append(compile_spec(kind, "bf16", head_dim, configs[0], sinks=True, softcap=True, tma=True))
        if kind == "fwd":
            specs.append(compile_spec(kind, "bf16", 80, by_dim[128][0], tma=True))
            specs.append(compile_spec(kind, "bf16", 128, by_dim[128][0], mode=MODE_SQRT, varlen=True, tma=True))
    return specs
