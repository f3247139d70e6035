"""The ``@triton.jit`` code of sliding-window attention, FlashAttention-2 style: the window
helpers, the forward and the backward kernels. The launchers, their configs and the tuner
are in ``triton_kernels.py`` / ``triton_configs.py``; the GPU compile specs in
``triton_compile_specs.py``.

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

Arguments: each tensor's strides are one tuple, ``(batch, row, head)`` for q/k/v/o and their
gradients (batch 0 when packed), ``(batch, head)`` for LSE/delta. Absent pointers
(``cu_seqlens`` of a padded batch, ``SINKS`` / ``DSINK`` without sinks) are ``None``, which
Triton specialises as a constexpr; sequence lengths and window bounds are
``do_not_specialize`` (no recompile when a length happens to be 1 or a multiple of 16).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...window import MODE_EXPLICIT, MODE_KEYS, MODE_SQRT
from .._triton_utils import cast_out

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
def _program_tile(cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, BLOCK: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Every program's grid is (tiles, heads, batch): its tile index, head (a kv head for
    dK/dV), sequence, the sequence's starts and lengths, and its first row (query or key,
    tiles of ``BLOCK``). The caller returns when that row is past its sequence's end."""
    pid = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    q_start, k_start, seqlen_q, seqlen_k = _seq_info(cu_seqlens_q, cu_seqlens_k, off_b, seqlen_q, seqlen_k, IS_VARLEN)
    return pid, off_h, off_b, q_start, k_start, seqlen_q, seqlen_k, pid * BLOCK


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
    pid_m, off_h, off_b, q_start, k_start, seqlen_q, seqlen_k, start_m = _program_tile(
        cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, BLOCK_M, IS_VARLEN)
    off_hk = off_h // group
    left, right = _resolve_window(left, right, keys, seqlen_k, WINDOW_MODE, CAUSAL)
    off = seqlen_k - seqlen_q
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    return (pid_m, start_m, off_h, q_start, k_start, seqlen_q, seqlen_k, left, right, off, offs_m, offs_n, offs_d,
            off_b.to(tl.int64), off_h.to(tl.int64), off_hk.to(tl.int64))


@triton.jit
def _tile_base(ptr, strides, b64, h64, start):
    """Row ``start`` of sequence ``b64``, head ``h64`` of a (batch, seqlen, heads, ...) or
    packed tensor with ``strides`` (batch, row, head): every row offset from here on is added
    in 64 bits (a sequence may span more than 2**31 elements)."""
    return ptr + b64 * strides[0] + h64 * strides[2] + start.to(tl.int64) * strides[1]


@triton.jit
def _row_stats(ptr, strides, b64, h64, start):
    """Row ``start`` of sequence ``b64``, head ``h64`` of an LSE / delta tensor, (batch,
    heads, seqlen) or packed (heads, total), with ``strides`` (batch, head)."""
    return ptr + b64 * strides[0] + h64 * strides[1] + start


@triton.jit
def _load_pair(a_src, b_src, start, stride_a, stride_b, tile, offs_d, n, HEAD_DIM: tl.constexpr,
               UPCAST: tl.constexpr, USE_TMA: tl.constexpr):
    """Two tiles of rows [start, start + tile) of a sequence in two sources: K and V (forward,
    dQ), Q and dO (dK/dV), O and dO (delta); ``tile`` is ``tl.arange(0, rows)``, rows at or
    past ``n`` and columns past HEAD_DIM read as zeros. Sources are tensor descriptors
    (USE_TMA: the copy engine zero-fills) or row-0 pointers: the tile's row offset is added
    in 64 bits (it passes 2**31 on long sequences), the in-tile offsets stay int32 (loop
    invariant: hoisted out of the callers' loops)."""
    if USE_TMA:
        a = a_src.load([start, 0])
        b = b_src.load([start, 0])
    else:
        ok = ((start + tile)[:, None] < n) & (offs_d[None, :] < HEAD_DIM)
        row0 = start.to(tl.int64)
        a = tl.load(a_src + row0 * stride_a + (tile[:, None] * stride_a + offs_d[None, :]), mask=ok, other=0.0)
        b = tl.load(b_src + row0 * stride_b + (tile[:, None] * stride_b + offs_d[None, :]), mask=ok, other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


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
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k, v = _load_pair(k_src, v_src, start_n, stride_kn, stride_vn, offs_n, offs_d, seqlen_k, HEAD_DIM, UPCAST,
                          USE_TMA)
        qk = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), cap_in, qk_scale, SOFTCAP)
        if (start_n < full_lo) | (start_n >= full_hi):  # tile on the band's edge
            keep = _band_mask(offs_m[:, None], (start_n + offs_n)[None, :], off, left, right, seqlen_q, seqlen_k)
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
    q_strides, k_strides, v_strides, o_strides, lse_strides,
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
    stride_qm, stride_kn, stride_vn, stride_om = q_strides[1], k_strides[1], v_strides[1], o_strides[1]
    q_base = _tile_base(Q, q_strides, b64, h64, q_start)
    k_base = _tile_base(K, k_strides, b64, hk64, k_start)
    v_base = _tile_base(V, v_strides, b64, hk64, k_start)
    o_base = _tile_base(O, o_strides, b64, h64, q_start)
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
    tl.store(_row_stats(LSE, lse_strides, b64, h64, q_start) + offs_m, lse, mask=offs_m < seqlen_q)


# ----------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["seqlen_q"])
def _bwd_preprocess_kernel(
    O, DO, DELTA, cu_seqlens_q, o_strides, do_strides, delta_strides, seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """delta[row] = sum_d dO[row, d] * O[row, d], in fp32. Grid (tiles, heads, batch)."""
    _pid, off_h, off_b, q_start, _k, seqlen_q, _lk, start_m = _program_tile(
        cu_seqlens_q, cu_seqlens_q, seqlen_q, seqlen_q, BLOCK_M, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    b64 = off_b.to(tl.int64)
    h64 = off_h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    o, do = _load_pair(_tile_base(O, o_strides, b64, h64, q_start), _tile_base(DO, do_strides, b64, h64, q_start),
                       start_m, o_strides[1], do_strides[1], tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D), seqlen_q,
                       HEAD_DIM, False, False)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(_row_stats(DELTA, delta_strides, b64, h64, q_start) + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, start_n, lo, full_lo, full_hi, hi, off,
    left, right, seqlen_q, seqlen_k, cap_in, qk_scale, offs_m, offs_n, offs_d,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    cols = start_n + offs_n
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        q, do = _load_pair(q_base, do_base, start_m, stride_qm, stride_dom, offs_m, offs_d, seqlen_q, HEAD_DIM, UPCAST,
                           False)
        rows = start_m + offs_m
        r_ok = rows < seqlen_q
        lse = tl.load(lse_base + rows, mask=r_ok, other=0.0)
        delta = tl.load(delta_base + rows, mask=r_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # empty rows: p = 0
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
    q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides, lse_strides,
    seqlen_q, seqlen_k, group, left, right, keys, sm_scale, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW_MODE: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One program per (key tile, kv head, sequence): dK, dV summed over the band's query
    tiles and over the ``group`` query heads that share this kv head."""
    _pid, off_hk, off_b, q_start, k_start, seqlen_q, seqlen_k, start_n = _program_tile(
        cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, BLOCK_N, IS_VARLEN)
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
    tile_n = tl.arange(0, BLOCK_N)[:, None]
    k, v = _load_pair(_tile_base(K, k_strides, b64, hk64, k_start), _tile_base(V, v_strides, b64, hk64, k_start),
                      start_n, k_strides[1], v_strides[1], tl.arange(0, BLOCK_N), offs_d, seqlen_k, HEAD_DIM, UPCAST,
                      False)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    cap_in, qk_scale = _score_scales(sm_scale, softcap, SOFTCAP)
    lo, full_lo, full_hi, hi = _query_phases(start_n, off, left, right, seqlen_q, BLOCK_M, BLOCK_N)
    for g in range(0, group):
        off_h = (off_hk * group + g).to(tl.int64)
        q_base = _tile_base(Q, q_strides, b64, off_h, q_start)
        do_base = _tile_base(DO, do_strides, b64, off_h, q_start)
        lse_base = _row_stats(LSE, lse_strides, b64, off_h, q_start)
        delta_base = _row_stats(DELTA, lse_strides, b64, off_h, q_start)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_strides[1], do_strides[1],
                                 start_n, lo, full_lo, full_hi, hi, off, left, right, seqlen_q, seqlen_k, cap_in,
                                 qk_scale, offs_m, tl.arange(0, BLOCK_N), offs_d, BLOCK_M, HEAD_DIM, UPCAST, DOT_PREC,
                                 SOFTCAP)
    dk = dk * sm_scale
    dk_ptrs = _tile_base(DK, dk_strides, b64, hk64, k_start + start_n) + tile_n * dk_strides[1] + offs_d[None, :]
    dv_ptrs = _tile_base(DV, dv_strides, b64, hk64, k_start + start_n) + tile_n * dv_strides[1] + offs_d[None, :]
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
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k, v = _load_pair(k_base, v_base, start_n, stride_kn, stride_vn, offs_n, offs_d, seqlen_k, HEAD_DIM, UPCAST,
                          False)
        cols = start_n + offs_n
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
    q_strides, k_strides, v_strides, do_strides, dq_strides, lse_strides,
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
    q, do = _load_pair(_tile_base(Q, q_strides, b64, h64, q_start), _tile_base(DO, do_strides, b64, h64, q_start),
                       start_m, q_strides[1], do_strides[1], tl.arange(0, BLOCK_M), offs_d, seqlen_q, HEAD_DIM, UPCAST,
                       False)
    tile_m = tl.arange(0, BLOCK_M)[:, None]
    q_ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    r_ok = offs_m < seqlen_q
    lse = tl.load(_row_stats(LSE, lse_strides, b64, h64, q_start) + offs_m, mask=r_ok, other=0.0)
    delta = tl.load(_row_stats(DELTA, lse_strides, b64, h64, q_start) + offs_m, mask=r_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    k_base = _tile_base(K, k_strides, b64, hk64, k_start)
    v_base = _tile_base(V, v_strides, b64, hk64, k_start)
    cap_in, qk_scale = _score_scales(sm_scale, softcap, SOFTCAP)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    pdp = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_phases(start_m, off, left, right, seqlen_k, BLOCK_M, BLOCK_N)
    dq, pdp = _bwd_dq_inner(dq, pdp, q, do, lse, delta, k_base, v_base, k_strides[1], v_strides[1], lo, full_lo,
                            full_hi, hi, off, left, right, seqlen_q, seqlen_k, cap_in, qk_scale, offs_m, offs_n, offs_d,
                            BLOCK_N, HEAD_DIM, UPCAST, DOT_PREC, SOFTCAP, HAS_SINKS)
    if HAS_SINKS:  # lse is in the exp2 domain here
        p_sink = tl.where(r_ok, tl.math.exp2(tl.load(SINKS + off_h) * 1.4426950408889634 - lse), 0.0)
        tl.store(DSINK + (b64 * tl.num_programs(1) + h64) * dsink_tiles + pid_m, -tl.sum(p_sink * pdp, 0))
    dq = dq * sm_scale
    tl.store(_tile_base(DQ, dq_strides, b64, h64, q_start + start_m) + tile_m * dq_strides[1] + offs_d[None, :],
             cast_out(dq, DQ.dtype.element_ty, UPCAST), mask=q_ok)
