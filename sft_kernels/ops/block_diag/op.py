"""Block-diagonal merged matmul: argument checks, backend dispatch, custom op, autograd.

``y = x @ block_diag(W_1, ..., W_g).T + bias``. Block ``i`` is ``W_i (m_i, n_i)`` (the
``nn.Linear`` convention, out x in); it maps input features
``[n_1 + ... + n_{i-1}, n_1 + ... + n_i)`` to output features
``[m_1 + ... + m_{i-1}, m_1 + ... + m_i)``::

    x (..., n_1 + n_2 + n_3)           y (..., m_1 + m_2 + m_3)
    [ x_1 | x_2 | x_3 ]   @   [ W_1^T   0      0    ]   =   [ x_1 W_1^T | x_2 W_2^T | x_3 W_3^T ]
                              [  0     W_2^T   0    ]
                              [  0      0     W_3^T ]

The zero blocks are never stored or multiplied. The weight is one flat tensor holding
every block contiguously: block ``i`` row-major ``(m_i, n_i)`` at offset
``sum_{j<i} m_j n_j`` (equal blocks: ``weight.view(g, m, n)``).

Backends (``backend=``):

- ``"torch"``: ``torch.bmm`` for equal blocks, one ``mm``/``addmm`` per block otherwise,
  each writing in place into its slice of the output (see ``torch_impl.py``); any device.
- ``"triton"``: one persistent grouped-GEMM launch over all blocks (``triton_kernels.py``);
  CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
- ``"cuda"``: the CUDA C++ grouped GEMM (``csrc/block_diag.cu``, mma.sync; fp16/bf16);
  verified in the CPU emulator only, unmeasured on a GPU, so ``auto`` never picks it.
- ``"auto"``: one block -> ``F.linear`` (cuBLAS / MKL); CPU -> ``"torch"`` (bmm for equal
  blocks: 8.0x over dense at tokens 4096, width 4096, g=8, fp32, 2 cores); CUDA ->
  ``"triton"``. The CUDA rule is the design's default and is still unmeasured: no GPU
  has run the benchmark yet, so bmm vs Triton for equal blocks on GPU is open.

No host-device synchronisation on the hot path: shapes come from the host, the
Triton block tables are built once per (split sizes, device) and cached, and the dW
partials are summed on the device. The first call for a new shape bucket builds its
table and autotunes, so make one call before capturing a CUDA graph.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...backends import BACKENDS, resolve_backend
from . import torch_impl

OP = "block_diag_matmul"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------- checks


def _check_sizes(in_features, out_features) -> None:
    for name, sizes in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(sizes, (list, tuple)):
            raise TypeError(f"{OP}: {name} must be a list of per-block sizes (ints), got {type(sizes).__name__}")
        if len(sizes) == 0:
            raise ValueError(f"{OP}: {name} must hold at least one block size, got []")
        for i, v in enumerate(sizes):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{OP}: {name}[{i}] must be an int, got {type(v).__name__} {v!r}")
            if v <= 0:
                raise ValueError(f"{OP}: {name}[{i}] must be a positive block size, got {v}")
    if len(in_features) != len(out_features):
        raise ValueError(
            f"{OP}: in_features and out_features must list the same number of blocks, "
            f"got {len(in_features)} and {len(out_features)}"
        )


def _check(x, weight, bias, in_features, out_features, backend) -> None:
    """Every argument of the op; raises ValueError/TypeError naming the argument."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{OP}: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{OP}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{OP}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"{OP}: backend must be one of {BACKENDS}, got {backend!r}")
    _check_sizes(in_features, out_features)
    if x.dtype not in _DTYPES:
        raise TypeError(f"{OP}: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have a feature dimension (shape (..., sum(in_features))), got a 0-d tensor")
    n_total = sum(in_features)
    if x.shape[-1] != n_total:
        raise ValueError(
            f"{OP}: in_features {list(in_features)} sum to {n_total} but x has {x.shape[-1]} features "
            f"(x.shape[-1]); the block sizes must add up to x's feature size"
        )
    numel = sum(m * n for n, m in zip(in_features, out_features))
    if weight.dtype != x.dtype:
        raise TypeError(f"{OP}: weight dtype {weight.dtype} must match x's dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{OP}: weight is on {weight.device} but x is on {x.device}; they must share a device")
    if weight.dim() != 1:
        raise ValueError(
            f"{OP}: weight must be the flat packed weight (1-D, sum(m_i * n_i) = {numel} elements), "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.numel() != numel:
        raise ValueError(
            f"{OP}: weight has {weight.numel()} elements but blocks (m_i, n_i) = "
            f"{list(zip(out_features, in_features))} need sum(m_i * n_i) = {numel}"
        )
    if bias is not None:
        m_total = sum(out_features)
        if bias.dtype != x.dtype:
            raise TypeError(f"{OP}: bias dtype {bias.dtype} must match x's dtype {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"{OP}: bias is on {bias.device} but x is on {x.device}; they must share a device")
        if tuple(bias.shape) != (m_total,):
            raise ValueError(f"{OP}: bias must have shape (sum(out_features),) = ({m_total},), got {tuple(bias.shape)}")


def _resolve(backend: str, device: torch.device, in_features, out_features, dtype: torch.dtype) -> str:
    impl = resolve_backend(backend, device, OP)
    if impl == "triton":
        if dtype == torch.float64:
            raise ValueError(f"{OP}: backend='triton' supports float16, bfloat16 and float32, got float64; use backend='torch'")
        numel = sum(m * n for n, m in zip(in_features, out_features))
        if numel > _INT32_MAX or sum(in_features) > _INT32_MAX or sum(out_features) > _INT32_MAX:
            raise ValueError(f"{OP}: backend='triton' indexes blocks in int32; weight numel {numel} is too large")
    return impl


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    # A view whenever the leading dims flatten in place (any row stride, any column
    # stride); a copy only when they do not (e.g. a transposed batch/sequence pair).
    return t.reshape(-1, t.shape[-1])


# ----------------------------------------------------------------------------- custom ops


def _kernels():
    from . import triton_kernels  # imported lazily: `import sft_kernels` must not need triton

    return triton_kernels


def _cuda():
    from . import cuda_backend

    return cuda_backend


def _impl(backend: str, t: torch.Tensor, in_features, out_features):
    """The chosen backend's (forward, dX, dW) functions for an input like ``t``."""
    impl = _resolve(backend, t.device, in_features, out_features, t.dtype)
    if impl == "torch":
        return torch_impl.forward, torch_impl.backward_dx, torch_impl.backward_dw
    m = _kernels() if impl == "triton" else _cuda()
    return m.gemm_forward, m.gemm_backward_dx, m.gemm_backward_dw


@torch.library.custom_op("sft_kernels::block_diag_matmul", mutates_args=())
def _bdmm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    in_features: List[int],
    out_features: List[int],
    backend: str,
) -> torch.Tensor:
    _check(x, weight, bias, in_features, out_features, backend)
    forward = _impl(backend, x, in_features, out_features)[0]
    b = bias.contiguous() if bias is not None else None
    y = forward(_as_2d(x), weight.contiguous(), b, in_features, out_features)
    return y.view(*x.shape[:-1], y.shape[-1])


@_bdmm.register_fake
def _bdmm_fake(x, weight, bias, in_features, out_features, backend):
    _check(x, weight, bias, in_features, out_features, backend)
    return x.new_empty(*x.shape[:-1], sum(out_features))


@torch.library.custom_op("sft_kernels::block_diag_matmul_backward", mutates_args=())
def _bdmm_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, in_features: List[int], out_features: List[int],
    backend: str, need_dx: bool, need_dw: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dx, dW): ``dx = dy @ block_diag(W)`` (block i is ``dy_i @ W_i``) and the flat ``dW``
    (block i is ``dy_i^T x_i`` summed over every token); an empty tensor for one not needed."""
    _, backward_dx, backward_dw = _impl(backend, x, in_features, out_features)
    g2 = _as_2d(grad)
    dx = backward_dx(g2, weight.contiguous(), in_features, out_features).view(x.shape) if need_dx else x.new_empty(0)
    dw = backward_dw(g2, _as_2d(x), in_features, out_features) if need_dw else weight.new_empty(0)
    return dx, dw


@_bdmm_backward.register_fake
def _bdmm_backward_fake(grad, x, weight, in_features, out_features, backend, need_dx, need_dw):
    return x.new_empty(x.shape if need_dx else 0), weight.new_empty(weight.shape if need_dw else 0)


def _setup_context(ctx, inputs, output):
    x, weight, bias, in_features, out_features, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.sizes = (list(in_features), list(out_features), backend)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    in_features, out_features, backend = ctx.sizes
    need_dx, need_dw = ctx.needs_input_grad[:2]
    dx = dw = db = None
    if need_dx or need_dw:
        dx, dw = torch.ops.sft_kernels.block_diag_matmul_backward(grad, x, weight, in_features, out_features, backend,
                                                                  need_dx, need_dw)
        dx, dw = (dx if need_dx else None), (dw if need_dw else None)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = torch_impl.backward_dbias(_as_2d(grad))
    return dx, dw, db, None, None, None


_bdmm.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public


def block_diag_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    in_features: Sequence[int],
    out_features: Sequence[int],
    *,
    bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = x @ block_diag(W_1, ..., W_g).T + bias`` without the zero blocks.

    Args:
        x: ``(..., sum(in_features))``, any number of leading dimensions, any strides
            (read in place when the leading dimensions flatten to a view, else copied
            once). float16, bfloat16 or float32 (float64 on the torch backend).
        weight: the packed weight, 1-D with ``sum(m_i * n_i)`` elements, block ``i``
            row-major ``(m_i, n_i)`` at offset ``sum_{j<i} m_j n_j``; for equal blocks a
            ``(g, m, n)`` tensor is accepted too (flattened, a view when contiguous).
            Same dtype and device as ``x``.
        in_features: ``[n_1, ..., n_g]``, the input features of each block (positive).
        out_features: ``[m_1, ..., m_g]``, the output features of each block (positive).
        bias: ``(sum(out_features),)`` or None.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"cuda"`` (see the module
            docstring for what ``auto`` picks).

    Returns:
        ``(..., sum(out_features))`` in x's dtype; accumulation is fp32 for fp16/bf16.
        Differentiable in x, weight and bias (fp32 accumulation, no atomics: dW is
        deterministic).
    """
    if isinstance(in_features, tuple):
        in_features = list(in_features)
    if isinstance(out_features, tuple):
        out_features = list(out_features)
    if isinstance(weight, torch.Tensor) and weight.dim() == 3 and isinstance(in_features, list) and isinstance(out_features, list):
        g, m, n = weight.shape
        if len(in_features) == g and set(in_features) == {n} and set(out_features) == {m}:
            weight = weight.reshape(-1)
    _check(x, weight, bias, in_features, out_features, backend)
    if backend == "auto" and len(in_features) == 1:
        return F.linear(x, weight.view(out_features[0], in_features[0]), bias)
    return _bdmm(x, weight, bias, in_features, out_features, backend)
