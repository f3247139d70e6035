"""Launchers for the CUDA C++ sliding-window attention kernels (csrc/swa_*.cu).

Same signatures as ``swa_fwd_triton`` / ``swa_bwd_triton`` in ``triton_kernels.py`` (op.py
validates the arguments first and can call either); this module allocates the outputs,
computes element strides and passes the current CUDA stream. The kernels need fp16/bf16,
head_dim 64 or 128, a contiguous last dimension, 16-byte aligned tensors and row strides
that are multiples of 8 elements; inputs that miss the last two are copied once into a
fresh (aligned) allocation; the first two raise ``TypeError`` / ``ValueError`` naming the fix.
"""

from __future__ import annotations

import torch

from ..._build import extension

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128)
_BIG = 1 << 30  # window bounds at or over this are "unbounded" (no sequence is that long)


def check_supported(q: torch.Tensor) -> None:
    """What the compiled kernels cover; raised before anything is launched."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"sliding_window_attention: backend='cuda' supports float16 and bfloat16, got {q.dtype}; "
            "use backend='triton' (or 'torch')"
        )
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"sliding_window_attention: backend='cuda' has kernels for head_dim {SUPPORTED_HEAD_DIMS}, got "
            f"{q.shape[-1]}; use backend='triton'"
        )


def _rows_ready(t: torch.Tensor) -> torch.Tensor:
    """The kernels copy rows with 16-byte cp.async: aligned base, strides % 8 == 0.

    Anything else is copied into a fresh allocation (``.contiguous()`` alone would keep a
    contiguous view whose storage offset leaves its base misaligned)."""
    if rows_aligned(t):
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return out.copy_(t)


def rows_aligned(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1])


def _empty_like(t):
    """Contiguous output allocation (tests replace it to poison outputs)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def _bsh(t, varlen):
    """(batch, row, head) strides; packed input has no batch stride."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(lse, varlen):
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _window(spec):
    """(left, right, keys) for the kernel: bounds no sequence can reach mean unbounded."""
    left = -1 if spec.left >= _BIG else spec.left
    right = -1 if spec.right >= _BIG else spec.right
    return left, right, min(spec.keys, _BIG - 1)


def _sizes(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    if cu_seqlens_q is not None:
        return cu_seqlens_q.numel() - 1, int(max_seqlen_q), int(max_seqlen_k)
    return q.shape[0], q.shape[1], k.shape[1]


def swa_fwd_cuda(q, k, v, spec, scale, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    """Forward. Inputs validated by op.py. -> (out like q, lse float32)."""
    check_supported(q)
    ext = extension()
    varlen = cu_seqlens_q is not None
    q, k, v = _rows_ready(q), _rows_ready(k), _rows_ready(v)
    batch, lq, lk = _sizes(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    hq, hkv = q.shape[-2], k.shape[-2]
    out = _empty_like(q)
    lse = _empty((hq, q.shape[0]) if varlen else (batch, hq, lq), torch.float32, q.device)
    if q.numel() == 0:
        return out, lse.fill_(float("-inf"))
    left, right, keys = _window(spec)
    ext.swa_fwd(
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(out, varlen), *_lse_strides(lse, varlen),
        lq, lk, hq, hq // hkv, left, right, keys, float(scale), batch, spec.mode, bool(spec.causal), _stream(q.device),
    )
    return out, lse


def swa_bwd_cuda(do, q, k, v, out, lse, spec, scale, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
                 max_seqlen_k=0):
    """Backward: delta pre-pass, dK/dV over key tiles, dQ over query tiles (no atomics)."""
    check_supported(q)
    ext = extension()
    varlen = cu_seqlens_q is not None
    do, q, k, v, out = (_rows_ready(t) for t in (do, q, k, v, out))
    batch, lq, lk = _sizes(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    hq, hkv = q.shape[-2], k.shape[-2]
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    delta = _empty(lse.shape, torch.float32, lse.device)
    left, right, keys = _window(spec)
    ext.swa_bwd(
        do, q, k, v, out, lse, delta, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
        *_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(out, varlen), *_bsh(do, varlen),
        *_bsh(dq, varlen), *_bsh(dk, varlen), *_bsh(dv, varlen), *_lse_strides(lse, varlen),
        lq, lk, hq, hq // hkv, left, right, keys, float(scale), batch, spec.mode, bool(spec.causal), _stream(q.device),
    )
    return dq, dk, dv
