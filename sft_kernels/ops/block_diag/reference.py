"""Dense reference for the block-diagonal merged matmul, through ``torch.block_diag``.

``y = x @ block_diag(W_1, ..., W_g).T + bias``: block ``i`` (``m_i x n_i``, in the
``nn.Linear`` convention out x in) maps input features ``[sum(n_<i), sum(n_<=i))`` to
output features ``[sum(m_<i), sum(m_<=i))``. The zeros are materialised here on purpose:
this is the semantics, not the fast path.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def block_diag_matmul_reference(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    bias: Optional[torch.Tensor] = None,
    upcast: bool = True,
) -> torch.Tensor:
    """``x (..., sum n_i)`` times ``block_diag(weights).T`` (+ ``bias (sum m_i,)``).

    ``weights`` is a list of 2-D blocks of any (unequal) shapes ``(m_i, n_i)``. With
    ``upcast`` fp16/bf16 inputs are computed in fp32; the output has x's dtype.
    """
    if len(weights) == 0:
        raise ValueError("weights must hold at least one block")
    for i, w in enumerate(weights):
        if w.dim() != 2:
            raise ValueError(f"weights[{i}] must be 2-D (out, in), got shape {tuple(w.shape)}")
    dense = torch.block_diag(*weights)
    if x.shape[-1] != dense.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but the blocks take sum(n_i) = {dense.shape[1]}")
    dtype = x.dtype
    compute = torch.float32 if upcast and dtype in (torch.float16, torch.bfloat16) else dtype
    y = x.to(compute) @ dense.to(compute).T
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(dtype)
