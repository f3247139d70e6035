"""Pure-PyTorch block-diagonal matmul (the ``torch`` backend): forward, dX, dW.

Every product writes straight into its slice of one preallocated output (``out=`` on a
strided view), so no block's result is copied or concatenated afterwards, and x is
read in place through its row stride:

- equal blocks: one ``torch.bmm`` over ``x.view(T, g, n).transpose(0, 1)``;
- unequal blocks: one ``torch.mm``/``addmm`` per block on column slices.

Measured on 2 CPU cores (MKL, fp32, tokens 4096, width 4096, g=8): dense
``x @ block_diag(W).T`` 1.23 s; bmm into a transposed ``out=`` view 0.153 s (8.0x);
the same bmm followed by a transpose copy 0.351 s (3.5x); ``F.linear`` per block then
``torch.cat`` 0.459 s (2.7x). Writing in place is what makes the difference.

All inputs are 2-D here: ``x (T, sum n_i)`` with any strides, ``weight`` flat and
contiguous, blocks ``(m_i, n_i)`` row-major at offset ``sum_{j<i} m_j n_j``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def _batched(in_features: Sequence[int], out_features: Sequence[int]) -> bool:
    """Equal blocks, more than one: one ``bmm`` over ``(g, ., .)`` views. Otherwise one
    ``mm`` per block (one block is a plain ``nn.Linear``: cuBLAS / MKL ``mm``)."""
    return len(in_features) > 1 and len(set(in_features)) == 1 and len(set(out_features)) == 1


def _split(t: torch.Tensor, sizes: Sequence[int], dim: int):
    off = 0
    for size in sizes:
        yield t.narrow(dim, off, size)
        off += size


def _cols(t: torch.Tensor, widths: Sequence[int], batched: bool) -> list:
    """Token-major ``t (T, sum widths)`` by block: ``[(g, T, w) view]`` when batched, else
    its column slices (views: written in place, read through the row stride)."""
    if batched:
        return [t.view(t.shape[0], len(widths), widths[0]).transpose(0, 1)]
    return list(_split(t, widths, 1))


def _mats(flat: torch.Tensor, in_features: Sequence[int], out_features: Sequence[int], batched: bool) -> list:
    """The flat weight (or dW) by block: ``[(g, m, n) view]`` when batched, else the
    row-major ``(m_i, n_i)`` blocks."""
    if batched:
        return [flat.view(len(in_features), out_features[0], in_features[0])]
    numels = [m * n for n, m in zip(in_features, out_features)]
    return [w.view(m, n) for w, n, m in zip(_split(flat, numels, 0), in_features, out_features)]


def _t(blocks: list) -> list:
    return [b.transpose(-2, -1) for b in blocks]


def _matmul(a: list, b: list, out: list, bias: Optional[list] = None) -> None:
    """``out_i = a_i @ b_i (+ bias_i)`` for every block: ``bmm``/``baddbmm`` on the batched
    views, ``mm``/``addmm`` on the blocks."""
    for i, (ai, bi, oi) in enumerate(zip(a, b, out)):
        batched = oi.dim() == 3
        if bias is None:
            (torch.bmm if batched else torch.mm)(ai, bi, out=oi)
        else:
            (torch.baddbmm if batched else torch.addmm)(bias[i], ai, bi, out=oi)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], in_features: Sequence[int],
            out_features: Sequence[int], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y (T, sum m_i) = x (T, sum n_i) @ block_diag(W).T + bias`` (into ``out`` if given)."""
    T = x.shape[0]
    y = torch.empty(T, sum(out_features), dtype=x.dtype, device=x.device) if out is None else out
    if T:
        bt = _batched(in_features, out_features)
        b = None if bias is None else _cols(bias.expand(T, -1), out_features, bt)  # stride 0 over tokens
        _matmul(_cols(x, in_features, bt), _t(_mats(weight, in_features, out_features, bt)),
                _cols(y, out_features, bt), b)
    return y


def backward_dx(grad: torch.Tensor, weight: torch.Tensor, in_features: Sequence[int], out_features: Sequence[int],
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dx (T, sum n_i) = dy (T, sum m_i) @ block_diag(W)``: block i is ``dy_i @ W_i``."""
    T = grad.shape[0]
    dx = torch.empty(T, sum(in_features), dtype=grad.dtype, device=grad.device) if out is None else out
    if T:
        bt = _batched(in_features, out_features)
        _matmul(_cols(grad, out_features, bt), _mats(weight, in_features, out_features, bt), _cols(dx, in_features, bt))
    return dx


def backward_dw(grad: torch.Tensor, x: torch.Tensor, in_features: Sequence[int], out_features: Sequence[int],
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flat ``dW``: block i is ``dy_i^T (m_i, T) @ x_i (T, n_i)``, reduced over all tokens."""
    numel = sum(m * n for n, m in zip(in_features, out_features))
    dw = torch.empty(numel, dtype=grad.dtype, device=grad.device) if out is None else out
    if grad.shape[0] == 0:
        return dw.zero_()
    bt = _batched(in_features, out_features)
    _matmul(_t(_cols(grad, out_features, bt)), _cols(x, in_features, bt), _mats(dw, in_features, out_features, bt))
    return dw


def backward_dbias(grad: torch.Tensor) -> torch.Tensor:
    """``d(bias) = sum over tokens of dy``, accumulated in at least fp32, in dy's dtype."""
    if grad.dtype in (torch.float16, torch.bfloat16):
        return grad.sum(0, dtype=torch.float32).to(grad.dtype)
    return grad.sum(0)
