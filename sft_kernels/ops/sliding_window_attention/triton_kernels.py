"""Triton kernels for sliding-window attention, FlashAttention-2 style.

Forward: one program per (query tile, batch * head). It visits only the key tiles that
intersect its band, in three phases: masked tiles on the band's left edge, mask-free
tiles fully inside the band, masked tiles on the right edge. Online softmax in base 2,
fp32 accumulation; writes the output and the log-sum-exp (natural log, -inf for rows
that see no key).

Backward (deterministic, no atomics): a pre-pass delta = rowsum(dO * O); a key-tile
kernel that accumulates dK and dV over the query tiles in the band (and over the query
heads sharing the kv head, for GQA); a query-tile kernel for dQ over the key tiles in
the band.

Layouts: q/k/v/o ``(batch, seqlen, heads, head_dim)`` or packed ``(total, heads,
head_dim)`` with ``cu_seqlens`` (batch stride 0, the sequence start added to the row).
The last dimension must be contiguous. LSE/delta: ``(batch, heads, seqlen)`` or
``(heads, total)``.

Window encoding (see :mod:`sft_kernels.window`): WINDOW_MODE 0 uses (left, right)
as given; 1 resolves W = clamp(keys, 1, seqlen_k) per sequence; 2 resolves
W = floor(sqrt(seqlen_k)) per sequence. ``UPCAST`` casts dot operands to fp32; it is set
under ``TRITON_INTERPRET=1``, whose ``tl.dot`` mishandles fp16/bf16.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


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
    if WINDOW_MODE == 0:
        lw = left
        rw = right
    else:
        if WINDOW_MODE == 1:
            w = tl.minimum(keys, seqlen_k)
        else:
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

    (Zero is spelled ``off_b * 0`` so that it is a tensor even when Triton specialises an
    integer argument equal to 1 into a constexpr.)
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
def _band_mask(rows, cols, off, left, right, seqlen_q, seqlen_k):
    """rows (M, 1) and cols (1, N) -> True where row attends col and both are in range."""
    pos = rows + off
    keep = (cols < seqlen_k) & (rows < seqlen_q) & (cols >= 0)
    keep = keep & ((left < 0) | (cols >= pos - left))
    keep = keep & ((right < 0) | (cols <= pos + right))
    return keep


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo, full_lo, full_hi, hi, off, left, right, seqlen_q,
    seqlen_k, qk_scale, offs_m, offs_n, offs_d,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        kv_ok = (cols[:, None] < seqlen_k) & d_ok
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
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


@triton.jit
def _swa_fwd_kernel(
    Q, K, V, O, LSE, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, num_heads, group, left, right, keys, sm_scale, tune_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW_MODE: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_hk = off_h // group
    q_start, k_start, seqlen_q, seqlen_k = _seq_info(cu_seqlens_q, cu_seqlens_k, off_b, seqlen_q, seqlen_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    left, right = _resolve_window(left, right, keys, seqlen_k, WINDOW_MODE, CAUSAL)
    off = seqlen_k - seqlen_q

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = off_b.to(tl.int64)
    q_base = Q + b64 * stride_qb + off_h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qm
    k_base = K + b64 * stride_kb + off_hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + off_hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    q_ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    qk_scale = sm_scale * 1.4426950408889634  # exp2 domain
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _key_phases(start_m, off, left, right, seqlen_k, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo, full_lo, full_hi, hi, off,
                               left, right, seqlen_q, seqlen_k, qk_scale, offs_m, offs_n, offs_d,
                               BLOCK_N, HEAD_DIM, UPCAST, DOT_PREC)

    empty = l_i == 0.0  # no visible key: output 0, lse -inf
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_base = O + b64 * stride_ob + off_h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_om
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], acc.to(O.dtype.element_ty), mask=q_ok)
    l_base = LSE + b64 * stride_lb + off_h.to(tl.int64) * stride_lh + q_start
    tl.store(l_base + offs_m, lse, mask=offs_m < seqlen_q)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA, cu_seqlens_q,
    stride_ob, stride_om, stride_oh,
    stride_db, stride_dm, stride_dh,
    stride_lb, stride_lh,
    seqlen_q, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """delta[row] = sum_d dO[row, d] * O[row, d], in fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    q_start, _k, seqlen_q, _lk = _seq_info(cu_seqlens_q, cu_seqlens_q, off_b, seqlen_q, seqlen_q, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    b64 = off_b.to(tl.int64)
    rows = (q_start + offs_m).to(tl.int64)
    o = tl.load(O + b64 * stride_ob + off_h * stride_oh + rows[:, None] * stride_om + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b64 * stride_db + off_h * stride_dh + rows[:, None] * stride_dm + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * stride_lb + off_h * stride_lh + q_start + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, start_n, lo, full_lo, full_hi, hi, off,
    left, right, seqlen_q, seqlen_k, qk_scale, offs_m, offs_n, offs_d,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    cols = start_n + offs_n
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        r_ok = rows < seqlen_q
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=r_ok[:, None] & d_ok, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=r_ok[:, None] & d_ok, other=0.0)
        lse = tl.load(lse_base + rows, mask=r_ok, other=0.0)
        delta = tl.load(delta_base + rows, mask=r_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # empty rows: p = 0
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (N, M)
        if (start_m < full_lo) | (start_m >= full_hi):  # edge tile; mask scores: exp2 could overflow
            keep = _band_mask(rows[None, :], cols[:, None], off, left, right, seqlen_q, seqlen_k)
            qkT = tl.where(keep, qkT, float("-inf"))
        pT = tl.math.exp2(qkT - lse[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _swa_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, num_kv_heads, group, left, right, keys, sm_scale, tune_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW_MODE: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One program per (key tile, batch * kv head): dK, dV summed over the band's query
    tiles and over the ``group`` query heads that share this kv head."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // num_kv_heads
    off_hk = pid_bh % num_kv_heads
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
    kv_ok = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    k_base = K + b64 * stride_kb + off_hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + off_hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    lo, full_lo, full_hi, hi = _query_phases(start_n, off, left, right, seqlen_q, BLOCK_M, BLOCK_N)
    for g in range(0, group):
        off_h = (off_hk * group + g).to(tl.int64)
        q_base = Q + b64 * stride_qb + off_h * stride_qh + q_start.to(tl.int64) * stride_qm
        do_base = DO + b64 * stride_dob + off_h * stride_doh + q_start.to(tl.int64) * stride_dom
        lse_base = LSE + b64 * stride_lb + off_h * stride_lh + q_start
        delta_base = DELTA + b64 * stride_lb + off_h * stride_lh + q_start
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, start_n,
                                 lo, full_lo, full_hi, hi, off, left, right, seqlen_q, seqlen_k, qk_scale, offs_m,
                                 tl.arange(0, BLOCK_N), offs_d, BLOCK_M, HEAD_DIM, UPCAST, DOT_PREC)
    dk = dk * sm_scale
    dk_base = DK + b64 * stride_dkb + off_hk.to(tl.int64) * stride_dkh + k_start.to(tl.int64) * stride_dkn
    dv_base = DV + b64 * stride_dvb + off_hk.to(tl.int64) * stride_dvh + k_start.to(tl.int64) * stride_dvn
    tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, lo, full_lo, full_hi, hi, off, left, right, seqlen_q,
    seqlen_k, qk_scale, offs_m, offs_n, offs_d,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        kv_ok = (cols[:, None] < seqlen_k) & d_ok
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if (start_n < full_lo) | (start_n >= full_hi):  # tile on the band's edge
            keep = _band_mask(offs_m[:, None], cols[None, :], off, left, right, seqlen_q, seqlen_k)
            qk = tl.where(keep, qk, float("-inf"))
        p = tl.math.exp2(qk - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _swa_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, cu_seqlens_q, cu_seqlens_k,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, num_heads, group, left, right, keys, sm_scale, tune_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW_MODE: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One program per (query tile, batch * head): dQ over the band's key tiles."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_hk = off_h // group
    q_start, k_start, seqlen_q, seqlen_k = _seq_info(cu_seqlens_q, cu_seqlens_k, off_b, seqlen_q, seqlen_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    left, right = _resolve_window(left, right, keys, seqlen_k, WINDOW_MODE, CAUSAL)
    off = seqlen_k - seqlen_q

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    b64 = off_b.to(tl.int64)
    h64 = off_h.to(tl.int64)
    q_ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + (q_start + offs_m)[:, None].to(tl.int64) * stride_qm
                + offs_d[None, :], mask=q_ok, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + (q_start + offs_m)[:, None].to(tl.int64) * stride_dom
                 + offs_d[None, :], mask=q_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    r_ok = offs_m < seqlen_q
    lse = tl.load(LSE + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, mask=r_ok, other=0.0)
    delta = tl.load(DELTA + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, mask=r_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    k_base = K + b64 * stride_kb + off_hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + off_hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_phases(start_m, off, left, right, seqlen_k, BLOCK_M, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, lo, full_lo, full_hi, hi, off,
                       left, right, seqlen_q, seqlen_k, qk_scale, offs_m, offs_n, offs_d, BLOCK_N, HEAD_DIM, UPCAST,
                       DOT_PREC)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + (q_start + offs_m)[:, None].to(tl.int64) * stride_dqm
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_ok)


# ----------------------------------------------------------------------------- launchers
# Autotune configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) per head_dim class.
# Kept small so first-call tuning takes seconds; keyed on HEAD_DIM, the window bucket and
# the tensor dtypes, never on the raw sequence length. SFT_KERNELS_SWA_CONFIG="fwd=128,64,8,3;
# dkdv=32,128,4,3;dq=128,32,4,3" pins them (any subset). Shapes follow Triton's fused
# attention tutorial (FA2 style) for sm_80/sm_90; they are not yet swept on hardware.
_CONFIGS = {
    # Each config compiles for sm_90a (with wgmma) and sm_80 without register spills
    # (tests/test_gpu_compile.py). Registers ~ fp32 accumulators + operands held in
    # registers + score tiles: dK/dV at D=128 with BLOCK_N=128 holds 2*128*128*4 B of
    # accumulators alone, which ptxas spilled at 4 and 8 warps; the sweep of ~60
    # candidates that chose these is in the commit history. Speed on hardware is unmeasured.
    "fwd": {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
        128: [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
        256: [(64, 64, 8, 2), (64, 32, 8, 2), (128, 32, 8, 2)],
    },
    "dkdv": {
        64: [(16, 64, 4, 3), (16, 128, 8, 3), (16, 64, 8, 3)],
        128: [(32, 64, 8, 2), (32, 64, 8, 3), (16, 64, 8, 3)],
        256: [(16, 64, 8, 1)],
    },
    "dq": {
        64: [(128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3)],
        128: [(64, 64, 8, 3), (64, 32, 8, 3), (64, 32, 4, 3)],
        256: [(64, 32, 8, 1), (64, 16, 8, 2), (64, 32, 8, 3)],
    },
}
_INTERPRET_CONFIG = (16, 16, 1, 1)  # TRITON_INTERPRET=1: one small config, no tuning


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pinned(kind: str):
    spec = os.environ.get("SFT_KERNELS_SWA_CONFIG", "")
    for part in filter(None, spec.split(";")):
        name, _, vals = part.partition("=")
        if name.strip() == kind:
            bm, bn, w, s = (int(x) for x in vals.split(","))
            return [(bm, bn, w, s)]
    return None


def head_dim_class(head_dim: int) -> int:
    return 64 if head_dim <= 64 else (128 if head_dim <= 128 else 256)


def config_list(kind: str, head_dim: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tuples tried for ``kind``.

    A pinned config wins, also under the interpreter (where the tests use it to run the
    GPU's tile sizes on CPU tensors)."""
    pinned = _pinned(kind)
    if pinned:
        return pinned
    return [_INTERPRET_CONFIG] if _interpreting() else _CONFIGS[kind][head_dim_class(head_dim)]


def _autotuned(kernel, kind: str):
    """One Autotuner per (kernel, head_dim class); the config list depends on head_dim."""
    cache = {}

    def get(head_dim: int):
        key = head_dim_class(head_dim)
        if key not in cache:
            configs = [
                triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                for bm, bn, w, s in config_list(kind, head_dim)
            ]
            cache[key] = triton.autotune(configs, key=["HEAD_DIM", "tune_bucket", "IS_VARLEN", "WINDOW_MODE"])(kernel)
        return cache[key]

    return get


_fwd_tuned = _autotuned(_swa_fwd_kernel, "fwd")
_dkdv_tuned = _autotuned(_swa_bwd_dkdv_kernel, "dkdv")
_dq_tuned = _autotuned(_swa_bwd_dq_kernel, "dq")


def tune_bucket(left: int, right: int, mode: int, max_seqlen_k: int) -> int:
    """Shape bucket for autotuning: log2 of the band width (or of the length, unbounded)."""
    if mode != 0 or left < 0 or right < 0:
        width = max_seqlen_k if mode == 0 else max(1, int(max_seqlen_k**0.5))
    else:
        width = left + right + 1
    return max(1, min(int(width), 1 << 16)).bit_length()


def _empty_like(t):
    """Contiguous output allocation (tests replace it to poison outputs and catch unwritten
    elements)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def _common(q, k, spec, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    varlen = cu_seqlens_q is not None
    dummy = torch.empty(0, dtype=torch.int32, device=q.device)
    d = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    upcast = q.device.type == "cpu"  # interpreter: fp32 dot operands
    meta = dict(
        HEAD_DIM=d, BLOCK_D=block_d, WINDOW_MODE=spec.mode, CAUSAL=spec.causal, IS_VARLEN=varlen, UPCAST=upcast,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        lq, lk = max_seqlen_q, max_seqlen_k
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        cu_q = cu_k = dummy
    scalars = (spec.left, spec.right, spec.keys, float(scale), tune_bucket(spec.left, spec.right, spec.mode, lk))
    return batch, lq, lk, cu_q, cu_k, scalars, meta


def _bsh(t, varlen):
    """(batch, row, head) strides; packed input has no batch stride."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(lse, varlen):
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def swa_fwd_triton(q, k, v, spec, scale, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    """Launch the forward. Inputs already validated; last dim contiguous. -> (out, lse)."""
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
    grid = lambda meta_: (triton.cdiv(lq, meta_["BLOCK_M"]), batch * hq)  # noqa: E731
    _fwd_tuned(q.shape[-1])[grid](
        q, k, v, out, lse, cu_q, cu_k,
        *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(out, varlen), *_lse_strides(lse, varlen),
        lq, lk, hq, hq // hkv, left, right, keys, scale, bucket, **meta,
    )
    return out, lse


def swa_bwd_triton(do, q, k, v, out, lse, spec, scale, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
                   max_seqlen_k=0):
    """Launch the backward: delta pre-pass, dK/dV over key tiles, dQ over query tiles."""
    varlen = cu_seqlens_q is not None
    batch, lq, lk, cu_q, cu_k, (left, right, keys, scale, bucket), meta = _common(
        q, k, spec, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    hq, hkv = q.shape[-2], k.shape[-2]
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = _empty_like(lse)
    pre_m = 16 if _interpreting() else 64
    _bwd_preprocess_kernel[(triton.cdiv(lq, pre_m), batch * hq)](
        out, do, delta, cu_q, *_bsh(out, varlen), *_bsh(do, varlen), *_lse_strides(lse, varlen), lq, hq,
        HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"], BLOCK_M=pre_m, IS_VARLEN=varlen,
    )
    common = (*_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(do, varlen))
    grid = lambda meta_: (triton.cdiv(lk, meta_["BLOCK_N"]), batch * hkv)  # noqa: E731
    _dkdv_tuned(q.shape[-1])[grid](
        q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, *common, *_bsh(dk, varlen), *_bsh(dv, varlen),
        *_lse_strides(lse, varlen), lq, lk, hkv, hq // hkv, left, right, keys, scale, bucket, **meta,
    )
    grid = lambda meta_: (triton.cdiv(lq, meta_["BLOCK_M"]), batch * hq)  # noqa: E731
    _dq_tuned(q.shape[-1])[grid](
        q, k, v, do, lse, delta, dq, cu_q, cu_k, *common, *_bsh(dq, varlen),
        *_lse_strides(lse, varlen), lq, lk, hq, hq // hkv, left, right, keys, scale, bucket, **meta,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------- GPU compile check
def compile_specs():
    """Every kernel in every autotune configuration, for ``sft_kernels.testing.compile_check``.

    Register and shared-memory use depend on the tile shapes, head_dim class and dtype, not
    on the window mode, so the full config sweep uses causal explicit windows and one
    packed ``"sqrt"`` variant per kernel covers the other code paths.
    """
    specs = []
    ptr_args = {
        "fwd": ("Q", "K", "V", "O"),
        "dkdv": ("Q", "K", "V", "DO", "DK", "DV"),
        "dq": ("Q", "K", "V", "DO", "DQ"),
    }
    kernels = {"fwd": _swa_fwd_kernel, "dkdv": _swa_bwd_dkdv_kernel, "dq": _swa_bwd_dq_kernel}

    def signature(kind, dtype):
        import inspect

        fn = kernels[kind]
        params = inspect.signature(getattr(fn, "fn", fn)).parameters
        sig = {}
        for name, p in params.items():
            if name.isupper() and name not in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ", "LSE", "DELTA"):
                continue  # constexpr
            if name in ptr_args[kind]:
                sig[name] = f"*{dtype}"
            elif name in ("LSE", "DELTA"):
                sig[name] = "*fp32"
            elif name.startswith("cu_seqlens"):
                sig[name] = "*i32"
            elif name == "sm_scale":
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        return sig

    def add(kind, dtype, head_dim, cfg, mode=0, varlen=False, causal=True):
        bm, bn, warps, stages = cfg
        specs.append({
            "name": f"swa_{kind}[D={head_dim},{dtype},BM={bm},BN={bn},w={warps},s={stages}"
                    + (",varlen,sqrt" if varlen else "") + "]",
            "fn": kernels[kind],
            "signature": signature(kind, dtype),
            "constexprs": dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=bm,
                               BLOCK_N=bn, WINDOW_MODE=mode, CAUSAL=causal, IS_VARLEN=varlen, UPCAST=False,
                               DOT_PREC="tf32"),
            "num_warps": warps,
            "num_stages": stages,
            "expect_mma": True,
            # what a launch on (batch, seqlen, heads, head_dim) tensors with head_dim a
            # multiple of 16 gets: Triton specialises such strides as 16-divisible
            "divisible_by_16": [n for n, t in signature(kind, dtype).items() if t.startswith("*") or n.startswith("stride")],
        })

    for kind, by_dim in _CONFIGS.items():
        for head_dim, configs in by_dim.items():
            for i, cfg in enumerate(configs):
                add(kind, "fp16", head_dim, cfg)
                if i == 0:
                    add(kind, "bf16", head_dim, cfg)
        add(kind, "bf16", 80, by_dim[128][0])
        add(kind, "bf16", 128, by_dim[128][0], mode=2, varlen=True)
    return specs
