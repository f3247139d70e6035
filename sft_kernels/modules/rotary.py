"""Rotary position embeddings (Llama / GPT-NeoX convention: ``rotate_half``, cos/sin over the
full head_dim with the frequencies repeated twice) and the autocast rule for q, k, v, shared
by :class:`~sft_kernels.modules.sft_attention.SFTAttention` and the Hugging Face integration.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

__all__ = ["apply_rotary", "autocast_qkv", "rope_cos_sin", "rope_inv_freq", "rotate_half"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension (Llama / GPT-NeoX convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """``1 / theta ** (2i / D)`` for ``i < D/2``, float32 (as Hugging Face computes it)."""
    if head_dim % 2 != 0:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    if not (isinstance(theta, (int, float)) and theta > 0 and math.isfinite(theta)):
        raise ValueError(f"rope_theta must be a positive finite number, got {theta!r}")
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, attention_scaling: float = 1.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape ``positions.shape + (head_dim,)``.

    Computed in float32 and cast to ``dtype``, exactly as Hugging Face's rotary embedding
    modules do, so a float64 model reproduces theirs bit for bit.
    """
    freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (..., heads, head_dim)`` by ``cos, sin (..., head_dim)`` (broadcast over heads)."""
    cos = cos.unsqueeze(-2)
    sin = sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Under ``torch.autocast`` on q's device, q, k and v in the autocast dtype; else unchanged.

    That is what eager attention's matmuls and SDPA compute in under autocast. It matters
    because rotary embeddings (float32 cos/sin from float32 positions) promote q and k to
    float32 while v stays in the autocast dtype of its projection; the kernels need one
    dtype. The casts are differentiable, so gradients return in each input's own dtype.
    """
    dev = q.device.type
    if not torch.is_autocast_enabled(dev):
        return q, k, v
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t.dtype in _AUTOCAST_ELIGIBLE and t.dtype != dt else t for t in (q, k, v))
