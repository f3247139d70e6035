"""Triton kernels for the block-diagonal merged matmul: one persistent grouped GEMM.

Notation (per block i of g): ``n_i`` input features, ``m_i`` output features, block
``W_i (m_i, n_i)`` stored row-major in one flat weight at ``w_off_i = sum_{j<i} m_j n_j``;
``T`` tokens.

- ``_bd_gemm_kernel`` computes ``out[:, n_off_i + :N_i] = a[:, k_off_i + :K_i] @ B_i``
  for every block in one launch. Forward: ``a = x``, ``B_i = W_i^T`` (K_i = n_i,
  N_i = m_i), bias fused. Input gradient: ``a = dy``, ``B_i = W_i`` (K_i = m_i,
  N_i = n_i); the ``TRANS_W`` constexpr swaps the weight strides, nothing is copied.
- ``_bd_dw_kernel`` computes ``dW_i = dy_i^T x_i`` reduced over all tokens, with the
  token dimension split into ``SPLIT`` chunks when there are too few output tiles to
  fill the GPU: each chunk writes an fp32 partial, and the partials are summed after
  (deterministic; no atomics).

Both grids are persistent: ``min(#tiles, #SMs x resident programs per SM)`` programs
walk the tiles of every block in order (block, token tile, column tile), reading the
block table (a small int32 device tensor built once on the host from the static split
sizes and cached) as they go. Inputs are read in place through their strides, and the
zero blocks are never touched. Accumulation is fp32; outputs have the input dtype.

Autotuning is done here, not with ``triton.autotune``: a small config list, keyed on
shape buckets (dtype, largest block rounded up to a power of two, token count rounded
up to a power of two and clamped to [1024, 65536]), benchmarked once per key with
``triton.testing.do_bench``; ``SFT_KERNELS_BD_CONFIG`` pins one (see ``_pinned``).
Under the interpreter (``TRITON_INTERPRET=1``) a single small config runs and dot
operands are upcast to fp32 (``UPCAST_DOT``), since the interpreter's bf16/fp16
``tl.dot`` is wrong. The tile sizes below are starting points from Triton's Hopper
matmul tutorial; they have not been swept on a GPU for this kernel yet.
"""

from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ...backends import triton_interpret

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _bd_gemm_kernel(
    A,  # (T, sum K_i) activations, any strides
    W,  # flat weight
    BIAS,  # (sum N_i,) or a dummy when HAS_BIAS is False
    OUT,  # (T, sum N_i)
    META,  # int32 (G, 6): k_off, n_off, K_i, N_i, w_off, ld_w (= n_i, the row length of W_i)
    T,
    G,
    stride_at,
    stride_ak,
    stride_ot,
    stride_on,
    HAS_BIAS: tl.constexpr,
    TRANS_W: tl.constexpr,
    ALIGNED: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_t_tiles = tl.cdiv(T, BLOCK_T)
    tile = pid
    tiles_before = 0
    for g in range(G):
        k_off = tl.load(META + g * 6 + 0)
        n_off = tl.load(META + g * 6 + 1)
        K_i = tl.load(META + g * 6 + 2)
        N_i = tl.load(META + g * 6 + 3)
        w_off = tl.load(META + g * 6 + 4)
        ld_w = tl.load(META + g * 6 + 5)
        if ALIGNED:  # every block size is a multiple of 16: lets loads vectorise and pipeline
            k_off = tl.multiple_of(k_off, 16)
            n_off = tl.multiple_of(n_off, 16)
            K_i = tl.multiple_of(K_i, 16)
            N_i = tl.multiple_of(N_i, 16)
            w_off = tl.multiple_of(w_off, 16)
            ld_w = tl.multiple_of(ld_w, 16)
        n_tiles = tl.cdiv(N_i, BLOCK_N)
        g_tiles = n_tiles * num_t_tiles
        # Invariant: tile >= tiles_before here, so this walks exactly this block's tiles.
        while tile < tiles_before + g_tiles:
            local = tile - tiles_before
            pid_t = local // n_tiles
            pid_n = local % n_tiles
            offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_k = tl.arange(0, BLOCK_K)
            mask_t = offs_t < T
            mask_n = offs_n < N_i
            a_ptrs = A + offs_t[:, None].to(tl.int64) * stride_at + (k_off + offs_k)[None, :] * stride_ak
            if TRANS_W:  # B_i = W_i: element (k, n) = W_i[k, n]
                w_ptrs = W + w_off + offs_k[:, None] * ld_w + offs_n[None, :]
                w_step = BLOCK_K * ld_w
            else:  # B_i = W_i^T: element (k, n) = W_i[n, k]
                w_ptrs = W + w_off + offs_n[None, :] * ld_w + offs_k[:, None]
                w_step = BLOCK_K
            acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            for kk in range(0, tl.cdiv(K_i, BLOCK_K)):
                k_rem = K_i - kk * BLOCK_K
                a = tl.load(a_ptrs, mask=mask_t[:, None] & (offs_k[None, :] < k_rem), other=0.0)
                b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_rem) & mask_n[None, :], other=0.0)
                if UPCAST_DOT:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
                a_ptrs += BLOCK_K * stride_ak
                w_ptrs += w_step
            if HAS_BIAS:
                bias = tl.load(BIAS + n_off + offs_n, mask=mask_n, other=0.0)
                acc += bias.to(tl.float32)[None, :]
            o_ptrs = OUT + offs_t[:, None].to(tl.int64) * stride_ot + (n_off + offs_n)[None, :] * stride_on
            tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=mask_t[:, None] & mask_n[None, :])
            tile += nprog
        tiles_before += g_tiles


@triton.jit
def _bd_dw_kernel(
    DY,  # (T, sum m_i), any strides
    X,  # (T, sum n_i), any strides
    DW,  # (SPLIT, sum m_i n_i): fp32 partials, or the weight-dtype gradient when SPLIT == 1
    META,  # int32 (G, 6): n_off (x column), m_off (dy column), n_i, m_i, w_off, n_i
    T,
    G,
    T_CHUNK,  # tokens per split, a multiple of BLOCK_T
    SPLIT,
    stride_dyt,
    stride_dym,
    stride_xt,
    stride_xk,
    stride_dws,
    ALIGNED: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    tile = pid
    tiles_before = 0
    for g in range(G):
        n_off = tl.load(META + g * 6 + 0)
        m_off = tl.load(META + g * 6 + 1)
        n_i = tl.load(META + g * 6 + 2)
        m_i = tl.load(META + g * 6 + 3)
        w_off = tl.load(META + g * 6 + 4)
        if ALIGNED:
            n_off = tl.multiple_of(n_off, 16)
            m_off = tl.multiple_of(m_off, 16)
            n_i = tl.multiple_of(n_i, 16)
            m_i = tl.multiple_of(m_i, 16)
            w_off = tl.multiple_of(w_off, 16)
        m_tiles = tl.cdiv(m_i, BLOCK_M)
        n_tiles = tl.cdiv(n_i, BLOCK_N)
        mn_tiles = m_tiles * n_tiles
        g_tiles = mn_tiles * SPLIT
        while tile < tiles_before + g_tiles:
            local = tile - tiles_before
            split = local // mn_tiles
            rest = local % mn_tiles
            pid_m = rest // n_tiles
            pid_n = rest % n_tiles
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_t = tl.arange(0, BLOCK_T)
            mask_m = offs_m < m_i
            mask_n = offs_n < n_i
            t_start = split * T_CHUNK
            t_end = tl.minimum(T, t_start + T_CHUNK)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for t0 in range(t_start, t_end, BLOCK_T):
                t = t0 + offs_t
                mask_t = t < t_end
                # dy_i^T tile (BLOCK_M, BLOCK_T), read through dy's strides (no transpose copy)
                dy = tl.load(
                    DY + t[None, :].to(tl.int64) * stride_dyt + (m_off + offs_m)[:, None] * stride_dym,
                    mask=mask_m[:, None] & mask_t[None, :],
                    other=0.0,
                )
                x = tl.load(
                    X + t[:, None].to(tl.int64) * stride_xt + (n_off + offs_n)[None, :] * stride_xk,
                    mask=mask_t[:, None] & mask_n[None, :],
                    other=0.0,
                )
                if UPCAST_DOT:
                    dy = dy.to(tl.float32)
                    x = x.to(tl.float32)
                acc = tl.dot(dy, x, acc, input_precision=INPUT_PRECISION)
            dw_ptrs = DW + split.to(tl.int64) * stride_dws + w_off + offs_m[:, None] * n_i + offs_n[None, :]
            tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
            tile += nprog
        tiles_before += g_tiles


# ----------------------------------------------------------------------------- configs

# Config lists. "Aligned" configs serve blocks whose sizes are all multiples of 16
# (the ALIGNED constexpr: offsets provably 16-element aligned, so loads vectorise and
# pipeline through cp.async / TMA-free multi-buffering); the general path keeps smaller
# tiles because its scalar, per-element-masked loads need many more registers. Every
# entry compiles for sm_90a and sm_80 with no register spill (ptxas -v, Triton 3.8):
# 128x256x64 (8 warps) spilled on sm_80 and 64x64x64 spilled on the general path, so
# neither is listed.
# (BLOCK_T, BLOCK_N, BLOCK_K, num_warps, num_stages) for _bd_gemm_kernel.
GEMM_CONFIGS: List[Dict[str, int]] = [
    dict(BLOCK_T=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_T=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_T=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_T=128, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=4),  # blocks of <= 32 outputs
]
GEMM_CONFIGS_GENERAL: List[Dict[str, int]] = [
    dict(BLOCK_T=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2),
    dict(BLOCK_T=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
]
# (BLOCK_M, BLOCK_N, BLOCK_T, num_warps, num_stages) for _bd_dw_kernel.
DW_CONFIGS: List[Dict[str, int]] = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_T=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_T=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_T=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_T=128, num_warps=4, num_stages=4),  # small blocks
]
# BLOCK_M stays 64: with 32 rows the Hopper build falls back from wgmma to mma.sync.
DW_CONFIGS_GENERAL: List[Dict[str, int]] = [
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_T=32, num_warps=4, num_stages=2),
]
# One config each under the interpreter: small tiles so that tests at tokens <= 64 and
# widths <= 96 still cross tile edges and walk several tiles per program.
INTERPRET_GEMM_CONFIG = dict(BLOCK_T=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
INTERPRET_DW_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_T=32, num_warps=4, num_stages=1)
INTERPRET_PROGRAMS = 3  # persistent programs under the interpreter (each walks many tiles)

_SMEM_BUDGET = 200 * 1024  # bytes; Hopper has 227 KiB per block, Ampere (sm_80) 163 KiB


def _smem_bytes(cfg: Dict[str, int], elsize: int, kind: str) -> int:
    if kind == "gemm":
        tile = cfg["BLOCK_T"] * cfg["BLOCK_K"] + cfg["BLOCK_K"] * cfg["BLOCK_N"]
    else:
        tile = cfg["BLOCK_M"] * cfg["BLOCK_T"] + cfg["BLOCK_T"] * cfg["BLOCK_N"]
    return tile * elsize * cfg["num_stages"]


_ENV_PIN = "SFT_KERNELS_BD_CONFIG"


def _pinned(kind: str) -> Optional[Dict[str, int]]:
    """``SFT_KERNELS_BD_CONFIG="gemm=128,128,64,8,3;dw=64,64,64,4,4"`` pins the configs.

    Each entry gives the three block sizes in the order of the config dicts above,
    then num_warps, num_stages. A kind left out is autotuned.
    """
    spec = os.environ.get(_ENV_PIN)
    if not spec:
        return None
    names = ("BLOCK_T", "BLOCK_N", "BLOCK_K") if kind == "gemm" else ("BLOCK_M", "BLOCK_N", "BLOCK_T")
    for part in spec.split(";"):
        key, _, vals = part.partition("=")
        if key.strip() != kind:
            continue
        nums = [int(v) for v in vals.split(",")]
        if len(nums) != 5 or any(v <= 0 or v & (v - 1) for v in nums[:3]):
            raise ValueError(
                f"{_ENV_PIN}: {kind}= needs 5 integers (3 power-of-two block sizes, num_warps, num_stages), got {vals!r}"
            )
        return dict(zip(names + ("num_warps", "num_stages"), nums))
    return None


def _pow2_bucket(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, v))))


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRET_PROGRAMS
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _resident(cfg: Dict[str, int], elsize: int, kind: str) -> int:
    """Programs of this config one SM can hold: persistent grids launch SMs x this.

    An estimate, not a measurement: shared memory from the tile sizes, registers at
    ~168 per thread (ptxas reported 118-176 for the 128-row configs on sm_90a). One
    program of 4 warps per SM cannot keep enough loads in flight for the memory-bound
    small-block shapes, which is why this is not simply 1.
    """
    by_smem = max(1, _SMEM_BUDGET // max(1, _smem_bytes(cfg, elsize, kind)))
    by_regs = max(1, 65536 // (cfg["num_warps"] * 32 * 168))
    return min(by_smem, by_regs)


_TUNED: Dict[tuple, Dict[str, int]] = {}


def _choose(kind: str, key: tuple, device: torch.device, elsize: int, candidates, bench_fn) -> Dict[str, int]:
    """The config for ``key``: pinned, the interpreter's, or the fastest candidate (cached)."""
    pinned = _pinned(kind)
    if pinned is not None:
        return pinned
    if device.type != "cuda":
        return INTERPRET_GEMM_CONFIG if kind == "gemm" else INTERPRET_DW_CONFIG
    full = (kind,) + key
    cfg = _TUNED.get(full)
    if cfg is not None:
        return cfg
    cands = [c for c in candidates if _smem_bytes(c, elsize, kind) <= _SMEM_BUDGET] or [candidates[-1]]
    if len(cands) == 1:
        _TUNED[full] = cands[0]
        return cands[0]
    from triton.testing import do_bench

    best, best_ms = None, float("inf")
    for c in cands:
        try:
            ms = do_bench(lambda: bench_fn(c), warmup=5, rep=20)
        except Exception:  # noqa: BLE001 - a config that does not fit this GPU is skipped
            continue
        if ms < best_ms:
            best, best_ms = c, ms
    if best is None:
        raise RuntimeError(f"block_diag_matmul: no {kind} Triton config could run on {device}")
    _TUNED[full] = best
    return best


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for fp16/bf16 operands


def _upcast(device: torch.device) -> bool:
    return device.type != "cuda" or triton_interpret()


def _staged_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a kernel writes before the final cast.

    The interpreter's fp32 -> bf16 cast truncates where the GPU rounds to nearest even
    (``triton/runtime/interpreter.py``, ``cast_impl``), which doubles the rounding error
    of bf16 outputs; under the interpreter bf16 results are therefore written in fp32
    and rounded by torch. On the GPU every kernel writes its output dtype directly.
    """
    if dtype == torch.bfloat16 and _upcast(device):
        return torch.float32
    return dtype


# ----------------------------------------------------------------------------- block tables


@functools.lru_cache(maxsize=256)
def _meta(in_features: Tuple[int, ...], out_features: Tuple[int, ...], kind: str, device: torch.device) -> torch.Tensor:
    """int32 (G, 6) block table on ``device``; built once per (splits, kind, device)."""
    rows = []
    k_in = k_out = w = 0
    for n, m in zip(in_features, out_features):
        if kind == "fwd":  # a = x (k over n_i), out = y (columns over m_i), B = W_i^T
            rows.append((k_in, k_out, n, m, w, n))
        elif kind == "dx":  # a = dy (k over m_i), out = dx (columns over n_i), B = W_i
            rows.append((k_out, k_in, m, n, w, n))
        else:  # dw: x columns, dy columns, n_i, m_i, w_off, n_i
            rows.append((k_in, k_out, n, m, w, n))
        k_in += n
        k_out += m
        w += m * n
    return torch.tensor(rows, dtype=torch.int32).to(device)


def _aligned(sizes: Sequence[int]) -> bool:
    # Every size a multiple of 16 makes every offset in the block table one too.
    return all(v % 16 == 0 for v in sizes)


def _tiles_gemm(T: int, cols: Sequence[int], cfg) -> int:
    return triton.cdiv(T, cfg["BLOCK_T"]) * sum(triton.cdiv(c, cfg["BLOCK_N"]) for c in cols)


def _tiles_dw(in_features, out_features, cfg, split: int) -> int:
    return split * sum(
        triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]) for n, m in zip(in_features, out_features)
    )


# ----------------------------------------------------------------------------- launchers
# The public launcher with the argument checks is ``op.py``; these take validated 2-D
# tensors, the weight flat and contiguous.


def _launch_gemm(a, weight, bias, out, meta, cols, trans_w: bool, cfg, aligned: bool) -> None:
    T = a.shape[0]
    progs = _programs(a.device) * (_resident(cfg, a.element_size(), "gemm") if a.device.type == "cuda" else 1)
    grid = (max(1, min(progs, _tiles_gemm(T, cols, cfg))),)
    _bd_gemm_kernel[grid](
        a,
        weight,
        bias if bias is not None else out,
        out,
        meta,
        T,
        meta.shape[0],
        a.stride(0),
        a.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        TRANS_W=trans_w,
        ALIGNED=aligned,
        UPCAST_DOT=_upcast(a.device),
        INPUT_PRECISION=_precision(a.dtype),
        BLOCK_T=cfg["BLOCK_T"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def _gemm_key(T: int, ks: Sequence[int], cols: Sequence[int], dtype, trans_w: bool, has_bias: bool) -> tuple:
    return (
        str(dtype),
        trans_w,
        has_bias,
        _pow2_bucket(max(ks), 16, 8192),
        _pow2_bucket(max(cols), 16, 8192),
        _pow2_bucket(len(cols), 1, 256),
        _pow2_bucket(T, 1024, 65536),
    )


def _buffer(out, shape, dtype, device):
    # ``out`` (tests pass a poisoned one) is written directly when its dtype is the
    # one the kernel writes; otherwise the kernel writes a staging buffer.
    if out is not None and out.dtype == dtype:
        return out
    return torch.empty(shape, dtype=dtype, device=device)


def _finish(buf, out, dtype):
    if out is None:
        return buf.to(dtype)
    if buf.data_ptr() != out.data_ptr():
        out.copy_(buf)
    return out


def gemm_forward(x, weight, bias, in_features, out_features, out=None) -> torch.Tensor:
    """``y = x @ block_diag(W).T + bias`` for 2-D ``x (T, sum n_i)`` (into ``out`` if given)."""
    in_f, out_f = tuple(in_features), tuple(out_features)
    T = x.shape[0]
    y = _buffer(out, (T, sum(out_f)), _staged_dtype(x.dtype, x.device), x.device)
    if T == 0:
        return _finish(y, out, x.dtype)
    meta = _meta(in_f, out_f, "fwd", x.device)
    aligned = _aligned(in_f + out_f)
    key = _gemm_key(T, in_f, out_f, x.dtype, False, bias is not None) + (aligned,)
    cfg = _choose(
        "gemm", key, x.device, x.element_size(), GEMM_CONFIGS if aligned else GEMM_CONFIGS_GENERAL,
        lambda c: _launch_gemm(x, weight, bias, y, meta, out_f, False, c, aligned),
    )
    _launch_gemm(x, weight, bias, y, meta, out_f, False, cfg, aligned)
    return _finish(y, out, x.dtype)


def gemm_backward_dx(grad, weight, in_features, out_features, out=None) -> torch.Tensor:
    """``dx = dy @ block_diag(W)`` for 2-D ``dy (T, sum m_i)`` (into ``out`` if given)."""
    in_f, out_f = tuple(in_features), tuple(out_features)
    T = grad.shape[0]
    dx = _buffer(out, (T, sum(in_f)), _staged_dtype(grad.dtype, grad.device), grad.device)
    if T == 0:
        return _finish(dx, out, grad.dtype)
    meta = _meta(in_f, out_f, "dx", grad.device)
    aligned = _aligned(in_f + out_f)
    key = _gemm_key(T, out_f, in_f, grad.dtype, True, False) + (aligned,)
    cfg = _choose(
        "gemm", key, grad.device, grad.element_size(), GEMM_CONFIGS if aligned else GEMM_CONFIGS_GENERAL,
        lambda c: _launch_gemm(grad, weight, None, dx, meta, in_f, True, c, aligned),
    )
    _launch_gemm(grad, weight, None, dx, meta, in_f, True, cfg, aligned)
    return _finish(dx, out, grad.dtype)


# Split the token reduction of dW only while there are fewer output tiles (at 128x128)
# than SMs, and keep at least this many tokens per split so partials stay cheap.
_MIN_TOKENS_PER_SPLIT = 1024


def choose_split(T: int, in_features, out_features, device: torch.device) -> int:
    ref = dict(BLOCK_M=128, BLOCK_N=128)
    tiles = _tiles_dw(in_features, out_features, ref, 1)
    sms = _programs(device)
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, tiles), T // _MIN_TOKENS_PER_SPLIT))


def _launch_dw(grad, x, dw, meta, in_f, out_f, split, t_chunk, cfg) -> None:
    progs = _programs(x.device) * (_resident(cfg, x.element_size(), "dw") if x.device.type == "cuda" else 1)
    grid = (max(1, min(progs, _tiles_dw(in_f, out_f, cfg, split))),)
    _bd_dw_kernel[grid](
        grad,
        x,
        dw,
        meta,
        x.shape[0],
        meta.shape[0],
        t_chunk,
        split,
        grad.stride(0),
        grad.stride(1),
        x.stride(0),
        x.stride(1),
        dw.stride(0),
        ALIGNED=_aligned(in_f + out_f),
        UPCAST_DOT=_upcast(x.device),
        INPUT_PRECISION=_precision(x.dtype),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_T=cfg["BLOCK_T"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def gemm_backward_dw(grad, x, in_features, out_features, split: Optional[int] = None, out=None) -> torch.Tensor:
    """Flat ``dW``, block i ``dy_i^T x_i``; ``split`` token chunks (None: heuristic).

    With ``out`` (flat, x's dtype) the result is written there: directly by the kernel
    when there is one split, else through the fp32 partials.
    """
    in_f, out_f = tuple(in_features), tuple(out_features)
    T = x.shape[0]
    numel = sum(m * n for n, m in zip(in_f, out_f))
    if T == 0:
        return torch.zeros(numel, dtype=x.dtype, device=x.device) if out is None else out.zero_()
    if split is None:
        split = choose_split(T, in_f, out_f, x.device)
    # On the GPU chunks are multiples of 128 tokens (a multiple of every BLOCK_T) so
    # tiles stay aligned; the effective split may be smaller than asked, and every
    # chunk is non-empty. Under the interpreter 16 keeps splits testable at tiny T.
    align = 128 if x.device.type == "cuda" else 16
    t_chunk = triton.cdiv(triton.cdiv(T, split), align) * align
    split = triton.cdiv(T, t_chunk)
    meta = _meta(in_f, out_f, "dw", x.device)
    if split == 1:
        dw = _buffer(None if out is None else out.view(1, numel), (1, numel), _staged_dtype(x.dtype, x.device), x.device)
    else:
        dw = torch.empty(split, numel, dtype=torch.float32, device=x.device)
    aligned = _aligned(in_f + out_f)
    key = (str(x.dtype), split > 1, _pow2_bucket(max(out_f), 16, 8192), _pow2_bucket(max(in_f), 16, 8192),
           _pow2_bucket(len(in_f), 1, 256), _pow2_bucket(t_chunk, 1024, 65536), aligned)
    cfg = _choose(
        "dw", key, x.device, x.element_size(), DW_CONFIGS if aligned else DW_CONFIGS_GENERAL,
        lambda c: _launch_dw(grad, x, dw, meta, in_f, out_f, split, t_chunk, c),
    )
    _launch_dw(grad, x, dw, meta, in_f, out_f, split, t_chunk, cfg)
    if split == 1:
        return _finish(dw.view(numel), out, x.dtype)
    return _finish(dw.sum(0), out, x.dtype)


# ----------------------------------------------------------------------------- compile specs


_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_specs(dtypes=(torch.float16, torch.bfloat16)) -> List[dict]:
    """Every kernel in every autotune config, for an ahead-of-time GPU compile check.

    Format of ``sft_kernels.testing.compile_check``: ``name``, ``fn`` (the raw
    ``@triton.jit`` function), ``signature`` (arg -> Triton type; the unit column
    strides are ``constexpr`` 1, as the JIT specialises them at run time for row-major
    tensors), ``constexprs``, ``num_warps``, ``num_stages``, ``divisible_by_16`` (what
    the JIT infers for 16-byte-aligned tensors and row strides divisible by 16: pass
    these as ``tt.divisibility`` attrs, or the loads do not vectorise and the build is
    not the one that runs), ``expect_mma``.
    Both ``ALIGNED`` variants are listed: True is the fast path (every block size a
    multiple of 16), False the general one.
    """
    specs = []
    for dtype in dtypes:
        ty = "*" + _TL[dtype]
        gemm = [(True, i, c) for i, c in enumerate(GEMM_CONFIGS)] + [(False, i, c) for i, c in enumerate(GEMM_CONFIGS_GENERAL)]
        for aligned, ci, cfg in gemm:
            for variant, has_bias, trans_w in (("fwd", False, False), ("fwd_bias", True, False), ("dx", False, True)):
                constexprs = dict(
                    stride_ak=1,
                    stride_on=1,
                    HAS_BIAS=has_bias,
                    TRANS_W=trans_w,
                    ALIGNED=aligned,
                    UPCAST_DOT=False,
                    INPUT_PRECISION=_precision(dtype),
                    BLOCK_T=cfg["BLOCK_T"],
                    BLOCK_N=cfg["BLOCK_N"],
                    BLOCK_K=cfg["BLOCK_K"],
                )
                signature = dict(
                    A=ty, W=ty, BIAS=ty, OUT=ty, META="*i32", T="i32", G="i32",
                    stride_at="i32", stride_ak="constexpr", stride_ot="i32", stride_on="constexpr",
                )
                signature.update({k: "constexpr" for k in constexprs})
                specs.append(dict(
                    name=f"_bd_gemm_kernel[{variant},{_TL[dtype]},aligned={int(aligned)},cfg{ci}]",
                    fn=_bd_gemm_kernel,
                    signature=signature,
                    constexprs=constexprs,
                    divisible_by_16=["A", "W", "BIAS", "OUT", "META", "stride_at", "stride_ot"],
                expect_mma=True,
                    num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"],
                ))
        dws = [(True, i, c) for i, c in enumerate(DW_CONFIGS)] + [(False, i, c) for i, c in enumerate(DW_CONFIGS_GENERAL)]
        for aligned, ci, cfg in dws:
            for variant, out_ty in (("direct", ty), ("split", "*fp32")):
                constexprs = dict(
                    stride_dym=1,
                    stride_xk=1,
                    ALIGNED=aligned,
                    UPCAST_DOT=False,
                    INPUT_PRECISION=_precision(dtype),
                    BLOCK_M=cfg["BLOCK_M"],
                    BLOCK_N=cfg["BLOCK_N"],
                    BLOCK_T=cfg["BLOCK_T"],
                )
                signature = dict(
                    DY=ty, X=ty, DW=out_ty, META="*i32", T="i32", G="i32", T_CHUNK="i32", SPLIT="i32",
                    stride_dyt="i32", stride_dym="constexpr", stride_xt="i32", stride_xk="constexpr",
                    stride_dws="i32",
                )
                signature.update({k: "constexpr" for k in constexprs})
                specs.append(dict(
                    name=f"_bd_dw_kernel[{variant},{_TL[dtype]},aligned={int(aligned)},cfg{ci}]",
                    fn=_bd_dw_kernel,
                    signature=signature,
                    constexprs=constexprs,
                    divisible_by_16=["DY", "X", "DW", "META", "stride_dyt", "stride_xt", "stride_dws"],
                expect_mma=True,
                    num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"],
                ))
    return specs
