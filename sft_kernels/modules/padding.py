"""Padded batches: Hugging Face ``attention_mask`` rows of 1 (token) / 0 (pad), unpadded into
one packed batch with ``cu_seqlens`` so that a pad is never attended, never attends and costs
nothing; the one check that each row is a single block of tokens.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..ops.sliding_window_attention.op import sliding_window_attention
from ..window import WindowArg

__all__ = ["as_bool_mask", "check_one_block", "pad_rows", "padded_sliding_window_attention", "unpad_mask"]


def as_bool_mask(name: str, mask: torch.Tensor, shape) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of 1 (token) / 0 (padding), got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape (batch, seqlen) = {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        if not torch.compiler.is_compiling() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must hold only 1 (token) and 0 (padding); got other values")
    return mask != 0


def check_one_block(name: str, valid: torch.Tensor, hint: str = "") -> None:
    """Each row's True entries of ``valid (batch, seqlen)`` must form one block (right or left
    padding, no holes): the window counts positions, so a hole would shift every key after it.

    Outside ``torch.compile`` a ValueError names the first bad row; while compiling (no host
    read) a device-side assertion fails the call instead of a silent wrong answer. The one
    padding check of :class:`SFTAttention` and of the Hugging Face backend.
    """
    if valid.shape[1] < 2:
        return
    v = valid.to(torch.int8)
    blocks = (v[:, 1:] - v[:, :-1] == 1).sum(1) + v[:, 0]
    if torch.compiler.is_compiling():
        torch._assert_async((blocks <= 1).all(), f"{name} has padding between tokens")
        return
    if bool((blocks > 1).any()):
        row = int((blocks > 1).nonzero()[0, 0])
        raise ValueError(
            f"{name}: row {row} has padding between tokens; only right or left padding (one block of tokens per "
            f"row) is supported, since the window counts positions{hint}"
        )


def unpad_mask(valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """``valid (batch, seqlen)`` bool -> ``(indices, cu_seqlens, max_seqlen)``.

    ``indices`` (int64) are the flat positions ``b * seqlen + t`` of the tokens, row-major;
    ``cu_seqlens`` (int32, ``batch + 1``) their per-row prefix sums.
    """
    lens = valid.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(valid.reshape(-1), as_tuple=False).reshape(-1)
    cu = torch.nn.functional.pad(torch.cumsum(lens, dim=0, dtype=torch.int32), (1, 0))
    return indices, cu, int(lens.max()) if lens.numel() else 0


def pad_rows(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Scatter packed rows ``(total, ...)`` into zeros ``(batch, seqlen, ...)``."""
    out = packed.new_zeros((batch * seqlen,) + tuple(packed.shape[1:]))
    out = out.index_copy(0, indices, packed)  # out of place: differentiable w.r.t. packed
    return out.view((batch, seqlen) + tuple(packed.shape[1:]))


def padded_sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_valid: Optional[torch.Tensor],
    k_valid: Optional[torch.Tensor],
    window_size: WindowArg,
    causal: bool,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
    *,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sliding-window attention on a padded batch, computed on the unpadded tokens only.

    Args:
        q: ``(batch, seqlen_q, heads_q, head_dim)``; k, v: ``(batch, seqlen_k, heads_kv, head_dim)``.
        q_valid, k_valid: bool ``(batch, seqlen_q)`` / ``(batch, seqlen_k)``, True on real
            tokens, or both None (no padding). Each row must be one contiguous block;
            queries are bottom-right aligned with the keys of their row (left-padded
            generation with a cache: the queries are the last tokens).
        window_size, causal, softmax_scale, backend, softcap, sinks: as in
            :func:`sft_kernels.sliding_window_attention`; an int / ``"sqrt"`` window is
            resolved per row from that row's number of real keys.

    Returns:
        ``(batch, seqlen_q, heads_q, head_dim)``; rows of padded queries are zero.
    """
    if (q_valid is None) != (k_valid is None):
        raise ValueError("q_valid and k_valid must both be given or both be None")
    if q_valid is None or q_valid.numel() == 0 or k_valid.numel() == 0:  # no padding, or nothing to unpad
        return sliding_window_attention(q, k, v, window_size=window_size, causal=causal, softmax_scale=softmax_scale, backend=backend,
                                        softcap=softcap, sinks=sinks)
    b, lq = q.shape[:2]
    lk = k.shape[1]
    idx_q, cu_q, max_q = unpad_mask(q_valid)
    idx_k, cu_k, max_k = unpad_mask(k_valid)
    qp = q.reshape(b * lq, *q.shape[2:]).index_select(0, idx_q)
    kp = k.reshape(b * lk, *k.shape[2:]).index_select(0, idx_k)
    vp = v.reshape(b * lk, *v.shape[2:]).index_select(0, idx_k)
    out = sliding_window_attention(
        qp, kp, vp, window_size=window_size, causal=causal, softmax_scale=softmax_scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        max_seqlen_q=max_q, max_seqlen_k=max_k, backend=backend, softcap=softcap, sinks=sinks,
    )
    return pad_rows(out, idx_q, b, lq)
