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

Both grids are persistent: ``min(#tiles, #SMs x resident programs per SM)`` programs,
the residency read from the compiled kernel's registers and shared memory. Each program
walks its tiles (round-robin over all blocks) in ONE flattened loop over k-steps, so the
software pipeline runs across tile boundaries: the next tile's first operand loads are
in flight during the current tile's last MMAs and its epilogue. Tiles are numbered
token tile major, column tile minor over every block (GEMM) or split major over every
block's (m, n) tiles (dW); a small int32 table per column tile (built once on the host
from the static split sizes and cached) names its block. Inputs are read in place
through their strides, and the zero blocks are never touched. Accumulation is fp32;
outputs have the input dtype.

Every block size a multiple of 16 keeps all offsets 16-element aligned, so operand
loads are 16-byte vectors that pipeline through cp.async. Other sizes are padded: x
(or dy) and W are copied once into a layout with every block padded to a multiple of
16 with zeros, the aligned kernel runs, and the real columns are gathered back (an
extra pass over the activations, for the odd shapes only).

Autotuning goes through the package's one tuner (``_triton_utils.Tuner``, which says why
not ``triton.autotune``): a small config list, keyed on shape buckets (dtype, largest
block rounded up to a power of two, token count rounded up to a power of two and clamped
to [1024, 65536]), benchmarked once per key; configs over this device's shared memory
per block are left out first. ``SFT_KERNELS_BD_CONFIG`` pins one (see ``_pinned``).
Under the interpreter (``TRITON_INTERPRET=1``) a single small config runs, dot operands
are upcast to fp32 (``UPCAST_DOT``), since the interpreter's bf16/fp16 ``tl.dot`` is
wrong, and bf16 outputs are rounded by hand (``cast_out``). Absent pointers (no bias) are
``None``; token counts and tile counts are ``do_not_specialize``.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .._triton_utils import (
    ARCH_LIMITS, Tuner, cast_out, device_limits, dot_precision, pinned_config, resident, upcast_dots,
)

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _program_share(total):
    """A persistent program's index, the program count, and how many of ``total`` tiles it
    walks: pid, pid + nprog, ... (the grid has <= total programs)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    return pid, nprog, tl.cdiv(total - pid, nprog)


@triton.jit
def _block_meta(META, g):
    """Row ``g`` of an int32 (G, 6) block table (``_meta``): the operand's column offset, the
    output's column offset, their two sizes, the weight offset (int64) and the weight's row
    length; every field a multiple of 16 (sizes are padded)."""
    return (tl.multiple_of(tl.load(META + g * 6 + 0), 16), tl.multiple_of(tl.load(META + g * 6 + 1), 16),
            tl.multiple_of(tl.load(META + g * 6 + 2), 16), tl.multiple_of(tl.load(META + g * 6 + 3), 16),
            tl.multiple_of(tl.load(META + g * 6 + 4), 16).to(tl.int64), tl.multiple_of(tl.load(META + g * 6 + 5), 16))


@triton.jit
def _no_block(pid):
    """:func:`_block_meta`'s fields before a program's first tile: loop-carried state is
    defined before the loop and set at its first step."""
    z = pid * 0
    return z, z, z, z, z.to(tl.int64), z


@triton.jit(do_not_specialize=["T", "C"])
def _bd_gemm_kernel(
    A,  # (T, sum K_i) activations, any strides
    W,  # flat weight
    BIAS,  # (sum N_i,), or None when HAS_BIAS is False
    OUT,  # (T, sum N_i)
    META,  # int32 (G, 6): k_off, n_off, K_i, N_i, w_off, ld_w (= n_i, the row length of W_i)
    COLS,  # int32 (C, 4) per column tile over all blocks: block, first column in the block, k-steps, 0
    T,
    C,  # column tiles over all blocks
    stride_at,
    stride_ak,
    stride_ot,
    stride_on,
    HAS_BIAS: tl.constexpr,
    TRANS_W: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    COUNT_BLOCK: tl.constexpr,
):
    pid, nprog, my_tiles = _program_share(tl.cdiv(T, BLOCK_T) * C)
    # k-steps over this program's tiles: the trip count of the one flattened loop below
    n_iters = pid * 0
    for j0 in range(0, my_tiles, COUNT_BLOCK):
        j = j0 + tl.arange(0, COUNT_BLOCK)
        steps = tl.load(COLS + ((pid + j * nprog) % C) * 4 + 2, mask=j < my_tiles, other=0)
        n_iters += tl.sum(steps)

    offs_tt = tl.arange(0, BLOCK_T)
    offs_nn = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    tile = pid - nprog  # advanced at the first step
    kk = pid * 0
    k_steps = pid * 0
    t0 = pid * 0
    n0 = pid * 0
    k_off, n_off, K_i, N_i, w_off, ld_w = _no_block(pid)
    a_row = (pid * 0).to(tl.int64)
    for _ in range(0, n_iters):
        if kk == 0:  # a new tile: find its block
            tile += nprog
            c = tile % C
            t0 = tl.multiple_of((tile // C) * BLOCK_T, BLOCK_T)
            g = tl.load(COLS + c * 4)
            n0 = tl.multiple_of(tl.load(COLS + c * 4 + 1), BLOCK_N)
            k_steps = tl.load(COLS + c * 4 + 2)
            k_off, n_off, K_i, N_i, w_off, ld_w = _block_meta(META, g)
            a_row = t0.to(tl.int64) * stride_at  # row x stride in 64 bits
        k0 = kk * BLOCK_K
        kr = k0 + offs_k
        a_ptrs = A + a_row + offs_tt[:, None] * stride_at + (k_off + kr)[None, :] * stride_ak
        cols = n0 + offs_nn
        if TRANS_W:  # B_i = W_i: element (k, n) = W_i[k, n]
            w_ptrs = W + w_off + kr[:, None] * ld_w + cols[None, :]
        else:  # B_i = W_i^T: element (k, n) = W_i[n, k]
            w_ptrs = W + w_off + cols[None, :] * ld_w + kr[:, None]
        a = tl.load(a_ptrs, mask=((t0 + offs_tt) < T)[:, None] & (kr < K_i)[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=(kr < K_i)[:, None] & (cols < N_i)[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        kk += 1
        if kk == k_steps:  # epilogue of this tile
            mask_n = cols < N_i
            if HAS_BIAS:
                bias = tl.load(BIAS + n_off + cols, mask=mask_n, other=0.0)
                acc += bias.to(tl.float32)[None, :]
            o_ptrs = OUT + t0.to(tl.int64) * stride_ot + offs_tt[:, None] * stride_ot + (n_off + cols)[None, :] * stride_on
            tl.store(o_ptrs, cast_out(acc, OUT.dtype.element_ty, UPCAST_DOT),
                     mask=((t0 + offs_tt) < T)[:, None] & mask_n[None, :])
            acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            kk = kk * 0


@triton.jit(do_not_specialize=["T", "MN", "T_CHUNK", "SPLIT"])
def _bd_dw_kernel(
    DY,  # (T, sum m_i), any strides
    X,  # (T, sum n_i), any strides
    DW,  # (SPLIT, sum m_i n_i): fp32 partials, or the weight-dtype gradient when SPLIT == 1
    META,  # int32 (G, 6): n_off (x column), m_off (dy column), n_i, m_i, w_off, n_i
    TILES,  # int32 (MN, 4) per (m, n) tile over all blocks: block, first row m0, first column n0, 0
    T,
    MN,  # (m, n) tiles over all blocks
    T_CHUNK,  # tokens per split, a multiple of BLOCK_T
    SPLIT,
    stride_dyt,
    stride_dym,
    stride_xt,
    stride_xk,
    stride_dws,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    COUNT_BLOCK: tl.constexpr,
):
    pid, nprog, my_tiles = _program_share(MN * SPLIT)
    # k-steps (token tiles) over this program's tiles: the last split may be shorter
    n_iters = pid * 0
    for j0 in range(0, my_tiles, COUNT_BLOCK):
        j = j0 + tl.arange(0, COUNT_BLOCK)
        split = (pid + j * nprog) // MN
        t_len = tl.minimum(T - split * T_CHUNK, T_CHUNK)
        n_iters += tl.sum(tl.where(j < my_tiles, tl.cdiv(t_len, BLOCK_T), 0))

    offs_mm = tl.arange(0, BLOCK_M)
    offs_nn = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tile = pid - nprog
    kk = pid * 0
    k_steps = pid * 0
    split = pid * 0
    t_start = pid * 0
    t_end = pid * 0
    m0 = pid * 0
    n0 = pid * 0
    n_off, m_off, n_i, m_i, w_off, _ld = _no_block(pid)
    for _ in range(0, n_iters):
        if kk == 0:
            tile += nprog
            split = tile // MN
            mn = tile % MN
            g = tl.load(TILES + mn * 4)
            m0 = tl.multiple_of(tl.load(TILES + mn * 4 + 1), BLOCK_M)
            n0 = tl.multiple_of(tl.load(TILES + mn * 4 + 2), BLOCK_N)
            n_off, m_off, n_i, m_i, w_off, _ld = _block_meta(META, g)
            t_start = split * T_CHUNK
            t_end = tl.minimum(T, t_start + T_CHUNK)
            k_steps = tl.cdiv(t_end - t_start, BLOCK_T)
        t = t_start + kk * BLOCK_T
        rows = m0 + offs_mm
        cols = n0 + offs_nn
        mask_t = (t + offs_t) < t_end
        # dy_i^T tile (BLOCK_M, BLOCK_T), read through dy's strides (no transpose copy)
        dy = tl.load(DY + t.to(tl.int64) * stride_dyt + offs_t[None, :] * stride_dyt + (m_off + rows)[:, None] * stride_dym,
                     mask=(rows < m_i)[:, None] & mask_t[None, :], other=0.0)
        x = tl.load(X + t.to(tl.int64) * stride_xt + offs_t[:, None] * stride_xt + (n_off + cols)[None, :] * stride_xk,
                    mask=mask_t[:, None] & (cols < n_i)[None, :], other=0.0)
        if UPCAST_DOT:
            dy = dy.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(dy, x, acc, input_precision=INPUT_PRECISION)
        kk += 1
        if kk == k_steps:
            dw_ptrs = DW + split.to(tl.int64) * stride_dws + w_off + rows[:, None] * n_i + cols[None, :]
            tl.store(dw_ptrs, cast_out(acc, DW.dtype.element_ty, UPCAST_DOT),
                     mask=(rows < m_i)[:, None] & (cols < n_i)[None, :])
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            kk = kk * 0


# ----------------------------------------------------------------------------- configs

# Config lists (every block size is a multiple of 16 by the time a kernel runs: see the
# padding below). Every entry compiles for sm_90a and sm_80, fp16 and bf16, under Triton
# 3.6 and 3.8 with no register spill, no replicated MMA and no serialised wgmma
# (tests/test_gpu_compile.py; registers and CTAs/SM per config in the README).
# (BLOCK_T, BLOCK_N, BLOCK_K, num_warps, num_stages) for _bd_gemm_kernel.
GEMM_CONFIGS: List[Dict[str, int]] = [
    dict(BLOCK_T=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_T=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_T=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_T=128, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=4),  # blocks of <= 32 outputs
]
# (BLOCK_M, BLOCK_N, BLOCK_T, num_warps, num_stages) for _bd_dw_kernel.
DW_CONFIGS: List[Dict[str, int]] = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_T=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_T=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_T=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_T=128, num_warps=4, num_stages=4),  # small blocks
]
# fp32 inputs: with IEEE dots (torch's default, allow_tf32 off) tl.dot runs on the FMA
# units and holds its operands in registers: the tensor-core tiles above spill there (GEMM
# cfg1 524 B on sm_90a, cfg2 13.7 KB on sm_80; dW cfg0 40 B, cfg1 376 B on sm_90a, Triton
# 3.8), so fp32 has its own lists, spill-free on sm_90a and sm_80 under Triton 3.6 and 3.8
# (fp32_compile_specs; registers in docs/kernels.md). Rejected on the way: GEMM (128, 32,
# 32, 4, 4) (dX spills 396 B on sm_80 under 3.8) and dW (64, 64, 64, 4, 4) / (64, 32, 64,
# 4, 3) (7.9-13 KB on sm_80 under 3.8).
GEMM_CONFIGS_FP32: List[Dict[str, int]] = [
    dict(BLOCK_T=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3),
]
DW_CONFIGS_FP32: List[Dict[str, int]] = [
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_T=64, num_warps=4, num_stages=3),
]
# One config each under the interpreter: small tiles so that tests at tokens <= 64 and
# widths <= 96 still cross tile edges and walk several tiles per program.
INTERPRET_GEMM_CONFIG = dict(BLOCK_T=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
INTERPRET_DW_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_T=32, num_warps=4, num_stages=1)
INTERPRET_PROGRAMS = 3  # persistent programs under the interpreter (each walks many tiles)

_ALIGN = 16  # block sizes are padded to a multiple of this


def configs_for(kind: str, dtype: torch.dtype) -> List[Dict[str, int]]:
    """The config list of ``kind`` ("gemm" / "dw") for inputs of ``dtype``."""
    if dtype == torch.float32:
        return GEMM_CONFIGS_FP32 if kind == "gemm" else DW_CONFIGS_FP32
    return GEMM_CONFIGS if kind == "gemm" else DW_CONFIGS
_COUNT_BLOCK = 128  # tiles per step of the kernels' trip-count pre-pass


def _smem_bytes(cfg: Dict[str, int], elsize: int, kind: str) -> int:
    """The operand pipeline's shared memory (Triton adds a little for the epilogue: a config
    this estimate lets through and the device cannot hold is skipped by the tuner)."""
    if kind == "gemm":
        tile = cfg["BLOCK_T"] * cfg["BLOCK_K"] + cfg["BLOCK_K"] * cfg["BLOCK_N"]
    else:
        tile = cfg["BLOCK_M"] * cfg["BLOCK_T"] + cfg["BLOCK_T"] * cfg["BLOCK_N"]
    return tile * elsize * cfg["num_stages"]


_ENV_PIN = "SFT_KERNELS_BD_CONFIG"
_NAMES = {"gemm": ("BLOCK_T", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"),
          "dw": ("BLOCK_M", "BLOCK_N", "BLOCK_T", "num_warps", "num_stages")}


def _pinned(kind: str) -> Optional[Dict[str, int]]:
    """``SFT_KERNELS_BD_CONFIG="gemm=128,128,64,8,3;dw=64,64,64,4,4"`` pins the configs.

    Each entry gives the three block sizes in the order of the config dicts above,
    then num_warps, num_stages. A kind left out is autotuned.
    """
    return pinned_config(_ENV_PIN, kind, _NAMES[kind], tuple(_NAMES))


def _pow2_bucket(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, v))))


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return device_limits(torch.device("cuda", index)).sms


def _programs(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRET_PROGRAMS
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


_RESIDENT: Dict[tuple, int] = {}


def _resident(kernel, key: tuple, device: torch.device, num_warps: int, args, kwargs) -> int:
    """Programs of this compiled kernel one SM holds at once (persistent grids launch
    SMs x this), from the registers and shared memory of the build against this GPU's
    per-SM limits. Cached per config and specialisation key."""
    if device.type != "cuda":
        return 1
    full = (id(kernel), device.index) + key
    if full not in _RESIDENT:
        _RESIDENT[full] = resident(kernel.warmup(*args, grid=(1,), **kwargs), num_warps, device)
    return _RESIDENT[full]


_TUNER = Tuner("block_diag_matmul")


def _choose(kind: str, key: tuple, device: torch.device, elsize: int, candidates, bench_fn) -> Dict[str, int]:
    """The config for ``key``: pinned, the interpreter's, or the fastest candidate that fits
    this device's shared memory per block (tuned once per key)."""
    pinned = _pinned(kind)
    if pinned is not None:
        return pinned
    if device.type != "cuda":
        return INTERPRET_GEMM_CONFIG if kind == "gemm" else INTERPRET_DW_CONFIG
    budget = device_limits(device).smem_per_block
    cands = [c for c in candidates if _smem_bytes(c, elsize, kind) <= budget] or [candidates[-1]]
    return _TUNER.choose((kind,) + key, cands, bench_fn)


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


@functools.lru_cache(maxsize=256)
def _col_tiles(ks: Tuple[int, ...], ns: Tuple[int, ...], block_n: int, block_k: int, device: torch.device):
    """int32 (C, 4): per column tile over all blocks (block order), its block, its first
    column inside the block and its k-steps cdiv(K_i, BLOCK_K)."""
    rows = [(g, n0, triton.cdiv(k, block_k), 0) for g, (k, n) in enumerate(zip(ks, ns)) for n0 in range(0, n, block_n)]
    return torch.tensor(rows, dtype=torch.int32).to(device)


@functools.lru_cache(maxsize=256)
def _mn_tiles(ms: Tuple[int, ...], ns: Tuple[int, ...], block_m: int, block_n: int, device: torch.device):
    """int32 (MN, 4): per (m, n) output tile of dW over all blocks, its block, m0, n0."""
    rows = [(g, m0, n0, 0) for g, (m, n) in enumerate(zip(ms, ns))
            for m0 in range(0, m, block_m) for n0 in range(0, n, block_n)]
    return torch.tensor(rows, dtype=torch.int32).to(device)


def _aligned(sizes: Sequence[int]) -> bool:
    # Every size a multiple of 16 makes every offset in the block table one too.
    return all(v % _ALIGN == 0 for v in sizes)


# ----------------------------------------------------------------------------- padding
# Block sizes that are not multiples of 16 run on a padded copy: every block's rows and
# columns rounded up to a multiple of 16 and zero-filled, so the aligned kernels (16-byte
# operand loads, cp.async pipeline) serve every shape; real columns are gathered back.


def _pad(v: int) -> int:
    return triton.cdiv(v, _ALIGN) * _ALIGN


@functools.lru_cache(maxsize=256)
def _pad_plan(in_features: Tuple[int, ...], out_features: Tuple[int, ...], device: torch.device):
    """(padded in sizes, padded out sizes, input column map, output column map, weight
    element map): position in the padded layout of every real column / weight element."""
    in_p = tuple(_pad(n) for n in in_features)
    out_p = tuple(_pad(m) for m in out_features)

    def cols(sizes, padded):
        idx, base = [], 0
        for s, p in zip(sizes, padded):
            idx.append(torch.arange(base, base + s))
            base += p
        return torch.cat(idx)

    w_idx, base = [], 0
    for n, m, n_p, m_p in zip(in_features, out_features, in_p, out_p):
        w_idx.append((base + torch.arange(m)[:, None] * n_p + torch.arange(n)[None, :]).reshape(-1))
        base += m_p * n_p
    return (in_p, out_p, cols(in_features, in_p).to(device), cols(out_features, out_p).to(device),
            torch.cat(w_idx).to(device), base)


def _spread_cols(t: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    out = torch.zeros(t.shape[0], width, dtype=t.dtype, device=t.device)
    return out.index_copy_(1, index, t)


def _pad_weight(weight: torch.Tensor, w_index: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.zeros(numel, dtype=weight.dtype, device=weight.device).index_copy_(0, w_index, weight)


# ----------------------------------------------------------------------------- launchers
# The public launcher with the argument checks is ``op.py``; these take validated 2-D
# tensors, the weight flat and contiguous.
_MAX_ROW_STRIDE = (2**31 - 1) // 128  # in-tile row offsets (BLOCK x row stride) stay 32-bit


def _rows_ok(*ts: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Unit column stride (copy otherwise: a column-strided read is uncoalesced anyway) and
    a row stride whose in-tile multiples fit 32 bits (row offsets are 64-bit)."""
    out = []
    for t in ts:
        if t.stride(1) != 1 and t.shape[1] > 1:
            t = t.contiguous()
        if t.stride(0) > _MAX_ROW_STRIDE:
            raise ValueError(f"block_diag_matmul: a row stride of {t.stride(0)} elements is over {_MAX_ROW_STRIDE}; "
                             "make the input contiguous")
        out.append(t)
    return tuple(out)


def _launch_gemm(a, weight, bias, out, meta, ks, cols, trans_w: bool, cfg) -> None:
    T = a.shape[0]
    table = _col_tiles(tuple(ks), tuple(cols), cfg["BLOCK_N"], cfg["BLOCK_K"], a.device)
    C = table.shape[0]
    args = (a, weight, bias, out, meta, table, T, C,
            a.stride(0), a.stride(1), out.stride(0), out.stride(1))
    kwargs = dict(HAS_BIAS=bias is not None, TRANS_W=trans_w, UPCAST_DOT=upcast_dots(a.device),
                  INPUT_PRECISION=dot_precision(a.dtype), BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_K=cfg["BLOCK_K"], COUNT_BLOCK=_COUNT_BLOCK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    res_key = (str(a.dtype), bias is not None, trans_w) + tuple(sorted(cfg.items()))
    progs = _programs(a.device) * _resident(_bd_gemm_kernel, res_key, a.device, cfg["num_warps"], args, kwargs)
    grid = (max(1, min(progs, triton.cdiv(T, cfg["BLOCK_T"]) * C)),)
    _bd_gemm_kernel[grid](*args, **kwargs)


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


def _gemm(a, weight, bias, ks, cols, trans_w, out, dtype):
    """``out (T, sum cols) = a @ B`` over aligned blocks (K sizes ``ks``)."""
    T = a.shape[0]
    y = _buffer(out, (T, sum(cols)), dtype, a.device)
    if T == 0:
        return y
    (a,) = _rows_ok(a)
    in_f, out_f = (cols, ks) if trans_w else (ks, cols)
    meta = _meta(tuple(in_f), tuple(out_f), "dx" if trans_w else "fwd", a.device)
    key = _gemm_key(T, ks, cols, dtype, trans_w, bias is not None)
    cfg = _choose("gemm", key, a.device, a.element_size(), configs_for("gemm", a.dtype),
                  lambda c: _launch_gemm(a, weight, bias, y, meta, ks, cols, trans_w, c))
    _launch_gemm(a, weight, bias, y, meta, ks, cols, trans_w, cfg)
    return y


def _gemm_blocks(a, weight, bias, in_f, out_f, trans_w: bool, out):
    """``a @ B`` for any block sizes: aligned ones directly, others on the zero-padded copy
    (``a``'s columns spread, the weight and bias padded, the real columns gathered back).
    Forward: ``a = x`` over the n_i, output over the m_i; dX (``trans_w``): the other way."""
    ks, cols = (out_f, in_f) if trans_w else (in_f, out_f)
    if _aligned(in_f + out_f):
        return _finish(_gemm(a, weight, bias, ks, cols, trans_w, out, a.dtype), out, a.dtype)
    in_p, out_p, col_in, col_out, w_idx, w_numel = _pad_plan(in_f, out_f, a.device)
    ks_p, col_k, cols_p, col_n = (out_p, col_out, in_p, col_in) if trans_w else (in_p, col_in, out_p, col_out)
    bp = None if bias is None else torch.zeros(sum(cols_p), dtype=bias.dtype, device=bias.device).index_copy_(
        0, col_n, bias)
    yp = _gemm(_spread_cols(a, col_k, sum(ks_p)), _pad_weight(weight, w_idx, w_numel), bp, ks_p, cols_p, trans_w, None,
               a.dtype)
    return _finish(yp.index_select(1, col_n), out, a.dtype)


def gemm_forward(x, weight, bias, in_features, out_features, out=None) -> torch.Tensor:
    """``y = x @ block_diag(W).T + bias`` for 2-D ``x (T, sum n_i)`` (into ``out`` if given)."""
    return _gemm_blocks(x, weight, bias, tuple(in_features), tuple(out_features), False, out)


def gemm_backward_dx(grad, weight, in_features, out_features, out=None) -> torch.Tensor:
    """``dx = dy @ block_diag(W)`` for 2-D ``dy (T, sum m_i)`` (into ``out`` if given)."""
    return _gemm_blocks(grad, weight, None, tuple(in_features), tuple(out_features), True, out)


# Split the token reduction of dW only while there are fewer output tiles (at 128x128)
# than SMs, and keep at least this many tokens per split so partials stay cheap.
_MIN_TOKENS_PER_SPLIT = 1024


def choose_split(T: int, in_features, out_features, device: torch.device) -> int:
    tiles = sum(triton.cdiv(m, 128) * triton.cdiv(n, 128) for n, m in zip(in_features, out_features))
    sms = _programs(device)
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, tiles), T // _MIN_TOKENS_PER_SPLIT))


def _launch_dw(grad, x, dw, meta, in_f, out_f, split, t_chunk, cfg) -> None:
    table = _mn_tiles(tuple(out_f), tuple(in_f), cfg["BLOCK_M"], cfg["BLOCK_N"], x.device)
    MN = table.shape[0]
    args = (grad, x, dw, meta, table, x.shape[0], MN, t_chunk, split, grad.stride(0), grad.stride(1),
            x.stride(0), x.stride(1), dw.stride(0))
    kwargs = dict(UPCAST_DOT=upcast_dots(x.device), INPUT_PRECISION=dot_precision(x.dtype), BLOCK_M=cfg["BLOCK_M"],
                  BLOCK_N=cfg["BLOCK_N"], BLOCK_T=cfg["BLOCK_T"], COUNT_BLOCK=_COUNT_BLOCK, num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    res_key = (str(x.dtype), str(dw.dtype)) + tuple(sorted(cfg.items()))
    progs = _programs(x.device) * _resident(_bd_dw_kernel, res_key, x.device, cfg["num_warps"], args, kwargs)
    grid = (max(1, min(progs, MN * split)),)
    _bd_dw_kernel[grid](*args, **kwargs)


def _dw(grad, x, in_f, out_f, split, out):
    """Flat dW over aligned blocks (into ``out``, flat, x's dtype, when given)."""
    T = x.shape[0]
    numel = sum(m * n for n, m in zip(in_f, out_f))
    grad, x = _rows_ok(grad, x)
    if split is None:
        split = choose_split(T, in_f, out_f, x.device)
    # On the GPU chunks are multiples of 128 tokens (a multiple of every BLOCK_T) so
    # tiles stay aligned; the effective split may be smaller than asked, and every
    # chunk is non-empty. Under the interpreter 32 (its BLOCK_T) keeps splits testable
    # at tiny T.
    align = 128 if x.device.type == "cuda" else 32
    t_chunk = triton.cdiv(triton.cdiv(T, split), align) * align
    split = triton.cdiv(T, t_chunk)
    meta = _meta(in_f, out_f, "dw", x.device)
    if split == 1:
        dw = _buffer(None if out is None else out.view(1, numel), (1, numel), x.dtype, x.device)
    else:
        dw = torch.empty(split, numel, dtype=torch.float32, device=x.device)
    key = (str(x.dtype), split > 1, _pow2_bucket(max(out_f), 16, 8192), _pow2_bucket(max(in_f), 16, 8192),
           _pow2_bucket(len(in_f), 1, 256), _pow2_bucket(t_chunk, 1024, 65536))
    cfg = _choose("dw", key, x.device, x.element_size(), configs_for("dw", x.dtype),
                  lambda c: _launch_dw(grad, x, dw, meta, in_f, out_f, split, t_chunk, c))
    _launch_dw(grad, x, dw, meta, in_f, out_f, split, t_chunk, cfg)
    return dw.view(numel) if split == 1 else dw.sum(0)


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
    if _aligned(in_f + out_f):
        return _finish(_dw(grad, x, in_f, out_f, split, out), out, x.dtype)
    in_p, out_p, col_in, col_out, w_idx, _ = _pad_plan(in_f, out_f, x.device)
    dwp = _dw(_spread_cols(grad, col_out, sum(out_p)), _spread_cols(x, col_in, sum(in_p)), in_p, out_p, split, None)
    return _finish(dwp.index_select(0, w_idx), out, x.dtype)


# ----------------------------------------------------------------------------- compile specs


_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _spec(name: str, fn, first: bool, signature: dict, constexprs: dict, cfg: Dict[str, int]) -> dict:
    return dict(name=name, first_choice=first, fn=fn, signature=signature, constexprs=constexprs,
                divisible_by_16=[k for k, t in signature.items() if t.startswith("*") or k.startswith("stride")],
                expect_mma=constexprs["INPUT_PRECISION"] != "ieee",  # IEEE fp32 dots run on FMA units
                mma_rows=cfg["BLOCK_T" if "BLOCK_K" in cfg else "BLOCK_M"],  # the dots' rows: GEMM / dW
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def compile_specs(dtypes=(torch.float16, torch.bfloat16), dot_prec: Optional[str] = None) -> List[dict]:
    """Every kernel in every autotune config, for an ahead-of-time GPU compile check.

    Format of ``sft_kernels.testing.compile_check``: ``name``, ``fn`` (the raw
    ``@triton.jit`` function), ``signature`` (arg -> Triton type; the unit column
    strides are ``constexpr`` 1, as the JIT specialises them at run time for row-major
    tensors; no bias is a constexpr None, as the launcher passes it), ``constexprs``,
    ``num_warps``, ``num_stages``, ``divisible_by_16`` (what the JIT infers for
    16-byte-aligned tensors and row strides divisible by 16: pass these as
    ``tt.divisibility`` attrs, or the loads do not vectorise and the build is not the one
    that runs), ``expect_mma``, ``archs`` (those whose shared memory per block holds the
    config's pipeline: ``_choose`` leaves it out on the others).

    Each dtype compiles its own lists (:func:`configs_for`); fp32, whose lists differ, is
    :func:`fp32_compile_specs`. ``input_precision`` is what a launch with torch's defaults
    gets (:func:`dot_precision`: IEEE for fp32) unless ``dot_prec`` is given.
    """
    specs = []
    for dtype in dtypes:
        prec = dot_prec or dot_precision(dtype)
        ty, tag = "*" + _TL[dtype], _TL[dtype] + ("" if prec == dot_precision(dtype) else f",{prec}")
        elsize = torch.empty(0, dtype=dtype).element_size()
        first = dtype != torch.float16 and prec == dot_precision(dtype)  # bf16's, and fp32's own lists
        for ci, cfg in enumerate(configs_for("gemm", dtype)):
            for variant, has_bias, trans_w in (("fwd", False, False), ("fwd_bias", True, False), ("dx", False, True)):
                constexprs = dict(stride_ak=1, stride_on=1, HAS_BIAS=has_bias, TRANS_W=trans_w, UPCAST_DOT=False,
                                  INPUT_PRECISION=prec, BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"],
                                  BLOCK_K=cfg["BLOCK_K"], COUNT_BLOCK=_COUNT_BLOCK)
                signature = dict(A=ty, W=ty, BIAS=ty, OUT=ty, META="*i32", COLS="*i32", T="i32", C="i32",
                                 stride_at="i32", stride_ot="i32")
                if not has_bias:
                    del signature["BIAS"]
                    constexprs["BIAS"] = None
                specs.append(_spec(f"_bd_gemm_kernel[{variant},{tag},cfg{ci}]", _bd_gemm_kernel,
                                   first and ci == 0 and variant != "fwd_bias", signature, constexprs, cfg))
                specs[-1]["archs"] = _archs(cfg, elsize, "gemm")
        for ci, cfg in enumerate(configs_for("dw", dtype)):
            for variant, out_ty in (("direct", ty), ("split", "*fp32")):
                constexprs = dict(stride_dym=1, stride_xk=1, UPCAST_DOT=False, INPUT_PRECISION=prec,
                                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_T=cfg["BLOCK_T"],
                                  COUNT_BLOCK=_COUNT_BLOCK)
                signature = dict(DY=ty, X=ty, DW=out_ty, META="*i32", TILES="*i32", T="i32", MN="i32", T_CHUNK="i32",
                                 SPLIT="i32", stride_dyt="i32", stride_xt="i32", stride_dws="i32")
                specs.append(_spec(f"_bd_dw_kernel[{variant},{tag},cfg{ci}]", _bd_dw_kernel,
                                   first and ci == 0 and variant == "direct", signature, constexprs, cfg))
                specs[-1]["archs"] = _archs(cfg, elsize, "dw")
    return specs


def fp32_compile_specs() -> List[dict]:
    """fp32 on its own lists, with IEEE dots (torch's default: what the lists are sized for)
    and with tf32 dots (``allow_tf32``: the same lists, on the tensor cores)."""
    return compile_specs((torch.float32,)) + compile_specs((torch.float32,), dot_prec="tf32")


def _archs(cfg: Dict[str, int], elsize: int, kind: str) -> Tuple[int, ...]:
    """The archs whose shared memory per block holds this config's pipeline (``_choose``
    leaves it out on the others)."""
    return tuple(a for a in (90, 80) if _smem_bytes(cfg, elsize, kind) <= ARCH_LIMITS[a].smem_per_block)
