"""Launchers for the CUDA C++ block-diagonal grouped GEMM (csrc/block_diag.cu).

Same signatures as ``gemm_forward`` / ``gemm_backward_dx`` / ``gemm_backward_dw`` in
``triton_kernels.py``: 2-D activations ``(T, features)`` already validated by op.py, the
weight flat and contiguous. This module builds the block tables (int32, cached per split
sizes and device, layout in csrc/sft_kernels.h), allocates outputs and passes the current
CUDA stream. fp16 / bf16 only (fp32: ``TypeError`` naming backend='triton').
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch

from ..._build import extension

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
BLOCK_M = BLOCK_N = 128  # csrc/sft_kernels.h kBdBlockM / kBdBlockN (checked against the module)
BLOCK_K = 32
_INT32_MAX = 2**31 - 1
# dW token split: only while there are fewer output tiles than SMs, and at least this
# many tokens per split (the Triton launcher's rule, so both backends split alike).
_MIN_TOKENS_PER_SPLIT = 1024


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_supported(t: torch.Tensor, in_features, out_features) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"block_diag_matmul: backend='cuda' supports float16 and bfloat16, got {t.dtype}; use backend='triton' "
            "or 'torch'"
        )
    numel = sum(m * n for n, m in zip(in_features, out_features))
    if numel > _INT32_MAX or sum(in_features) > _INT32_MAX or sum(out_features) > _INT32_MAX:
        raise ValueError(f"block_diag_matmul: backend='cuda' indexes blocks in int32; weight numel {numel} is too large")


def _ext():
    ext = extension()
    if (ext.BD_BLOCK_M, ext.BD_BLOCK_N, ext.BD_BLOCK_K) != (BLOCK_M, BLOCK_N, BLOCK_K):
        raise RuntimeError("sft_kernels CUDA extension was built with other tile sizes; rebuild it")
    return ext


@functools.lru_cache(maxsize=256)
def _meta(in_features: Tuple[int, ...], out_features: Tuple[int, ...], kind: str, device: torch.device):
    """(table, total tiles) for ``kind`` in fwd / dx / dw; csrc/sft_kernels.h has the columns."""
    rows, tiles = [], 0
    n_off = m_off = w_off = 0
    for n, m in zip(in_features, out_features):
        if kind == "fwd":  # a = x (K = n), out = y (N = m), B = W^T, ld_w = n
            rows.append((n_off, m_off, n, m, w_off, n, tiles, 0))
            tiles += _cdiv(m, BLOCK_N)
        elif kind == "dx":  # a = dy (K = m), out = dx (N = n), B = W, ld_w = n
            rows.append((m_off, n_off, m, n, w_off, n, tiles, 0))
            tiles += _cdiv(n, BLOCK_N)
        else:  # dw: dy columns (M = m), x columns (N = n)
            n_tiles = _cdiv(n, BLOCK_N)
            rows.append((m_off, n_off, m, n, w_off, 0, tiles, n_tiles))
            tiles += _cdiv(m, BLOCK_M) * n_tiles
        n_off += n
        m_off += m
        w_off += m * n
    return torch.tensor(rows, dtype=torch.int32).to(device), tiles


def _unit_cols(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _into(result: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    if out is None:
        return result
    if out.data_ptr() != result.data_ptr():
        out.copy_(result)
    return out


def _target(out, shape, dtype, device):
    # ``out`` (tests pass a poisoned one) is written in place when the kernel can.
    if out is not None and out.dtype == dtype and out.dim() == 2 and out.stride(1) == 1 and tuple(out.shape) == shape:
        return out
    return torch.empty(shape, dtype=dtype, device=device)


def _gemm(a, weight, bias, in_features, out_features, mode: str, out) -> torch.Tensor:
    """The forward (``mode="fwd"``: ``a @ block_diag(W).T + bias``) and dX (``"dx"``:
    ``a @ block_diag(W)``, the weight read transposed) launches, one kernel for both."""
    check_supported(a, in_features, out_features)
    in_f, out_f = tuple(in_features), tuple(out_features)
    a = _unit_cols(a)
    y = _target(out, (a.shape[0], sum(out_f if mode == "fwd" else in_f)), a.dtype, a.device)
    if a.shape[0] == 0:
        return _into(y, out)
    meta, tiles = _meta(in_f, out_f, mode, a.device)
    _ext().bd_gemm(a, weight.contiguous(), None if bias is None else bias.contiguous(), y, meta, tiles, mode == "dx",
                   _stream(a.device))
    return _into(y, out)


def gemm_forward(x, weight, bias, in_features, out_features, out=None) -> torch.Tensor:
    """``y = x @ block_diag(W).T + bias`` for 2-D ``x (T, sum n_i)``."""
    return _gemm(x, weight, bias, in_features, out_features, "fwd", out)


def gemm_backward_dx(grad, weight, in_features, out_features, out=None) -> torch.Tensor:
    """``dx = dy @ block_diag(W)`` for 2-D ``dy (T, sum m_i)``."""
    return _gemm(grad, weight, None, in_features, out_features, "dx", out)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_split(T: int, in_features: Sequence[int], out_features: Sequence[int], device: torch.device) -> int:
    tiles = sum(_cdiv(m, BLOCK_M) * _cdiv(n, BLOCK_N) for n, m in zip(in_features, out_features))
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if tiles >= sms:
        return 1
    return max(1, min(_cdiv(sms, tiles), T // _MIN_TOKENS_PER_SPLIT))


def gemm_backward_dw(grad, x, in_features, out_features, split: Optional[int] = None, out=None) -> torch.Tensor:
    """Flat ``dW``, block i ``dy_i^T x_i`` over all tokens; ``split`` token chunks summed
    after the kernel from fp32 partials (deterministic, no atomics)."""
    check_supported(x, in_features, out_features)
    in_f, out_f = tuple(in_features), tuple(out_features)
    grad, x = _unit_cols(grad), _unit_cols(x)
    T = x.shape[0]
    numel = sum(m * n for n, m in zip(in_f, out_f))
    if T == 0:
        return torch.zeros(numel, dtype=x.dtype, device=x.device) if out is None else out.zero_()
    if split is None:
        split = choose_split(T, in_f, out_f, x.device)
    t_chunk = _cdiv(_cdiv(T, max(1, split)), 128) * 128  # a multiple of BLOCK_K; every chunk non-empty
    split = _cdiv(T, t_chunk)
    meta, tiles = _meta(in_f, out_f, "dw", x.device)
    if split == 1:
        dw = out if (out is not None and out.dtype == x.dtype and out.is_contiguous() and out.numel() == numel) else \
            torch.empty(numel, dtype=x.dtype, device=x.device)
        _ext().bd_dw(grad, x, dw, meta, tiles, t_chunk, 1, _stream(x.device))
        return _into(dw.view(numel), out)
    parts = torch.empty(split, numel, dtype=torch.float32, device=x.device)
    _ext().bd_dw(grad, x, parts, meta, tiles, t_chunk, split, _stream(x.device))
    return _into(parts.sum(0).to(x.dtype), out)
