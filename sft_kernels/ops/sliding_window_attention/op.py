"""Sliding-window attention: argument checks, the custom ops, autograd, dispatch, public API.

Reading order for this op: ``reference.py`` (semantics), ``triton_kernels.py`` (GPU
kernels and launchers), ``torch_impl.py`` (the memory-efficient PyTorch path), then this
file, which ties them together as ``torch.library`` custom ops
``sft_kernels::swa_forward`` / ``sft_kernels::swa_backward`` with fake implementations
and registered autograd, so ``torch.compile`` traces them without graph breaks.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from ...backends import resolve_backend
from ...window import WindowArg, WindowSpec, parse_window
from . import torch_impl

OP = "sliding_window_attention"
MAX_HEAD_DIM = 256
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- checks
def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device, full: bool) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D of length batch + 1 >= 2, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if full:  # value checks read the tensor (a device sync on GPU)
        vals = cu.tolist()
        if vals[0] != 0:
            raise ValueError(f"{name}[0] must be 0, got {vals[0]}")
        if any(b < a for a, b in zip(vals, vals[1:])):
            raise ValueError(f"{name} must be non-decreasing, got {vals}")
        if vals[-1] != total:
            raise ValueError(f"{name}[-1] must equal the number of packed tokens {total}, got {vals[-1]}")


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    """Validate everything the kernels rely on; returns (max_seqlen_q, max_seqlen_k)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):
        raise ValueError("packed input needs both cu_seqlens_q and cu_seqlens_k")
    rank = 3 if varlen else 4
    layout = "(total_tokens, heads, head_dim)" if varlen else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"q and k must have the same head_dim, got {d} and {k.shape[-1]}")
    if d < 1 or d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"heads of q ({hq}) must be a multiple of heads of k/v ({hkv}) (GQA/MQA)")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
    if not varlen:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError("max_seqlen_q / max_seqlen_k are only for packed input (with cu_seqlens)")
        return q.shape[1], k.shape[1]
    # A full value check costs a device sync; it is skipped when the caller already gives
    # the max lengths (the FlashAttention contract, and what CUDA graphs need).
    full = (max_seqlen_q is None or max_seqlen_k is None or q.device.type == "cpu") and not torch.compiler.is_compiling()
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, full)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, full)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length, got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    if max_seqlen_k is None:
        max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    return max_seqlen_q, max_seqlen_k


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by stride but need a contiguous last dimension."""
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- custom ops
def _spec(window_mode: int, left: int, right: int, keys: int, causal: bool) -> WindowSpec:
    return WindowSpec(window_mode, left, right, keys, causal)


def _lse_like(q: torch.Tensor, varlen: bool) -> torch.Tensor:
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(shape, dtype=dtype)


@torch.library.custom_op("sft_kernels::swa_forward", mutates_args=(), device_types=None)
def _swa_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
    window_mode: int, left: int, right: int, keys: int, causal: bool, softmax_scale: float, backend: str,
    softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    spec = _spec(window_mode, left, right, keys, causal)
    if q.numel() == 0 or k.numel() == 0:
        # batch 0, no query or no key tokens: zeros and lse -inf (or the sinks) on every
        # backend, no kernel launched
        return torch_impl.attention_fwd(q, k, v, spec, softmax_scale, cu_seqlens_q, cu_seqlens_k, softcap, sinks)
    if backend == "triton":
        from .triton_kernels import swa_fwd_triton

        return swa_fwd_triton(
            q, k, v, spec, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softcap, sinks
        )
    if backend == "cuda":
        from .cuda_backend import swa_fwd_cuda

        return swa_fwd_cuda(q, k, v, spec, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return torch_impl.attention_fwd(q, k, v, spec, softmax_scale, cu_seqlens_q, cu_seqlens_k, softcap, sinks)


@_swa_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_mode, left, right, keys, causal,
      softmax_scale, backend, softcap=0.0, sinks=None):
    return q.new_empty(q.shape), _lse_like(q, cu_seqlens_q is not None)


@torch.library.custom_op("sft_kernels::swa_backward", mutates_args=(), device_types=None)
def _swa_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
    window_mode: int, left: int, right: int, keys: int, causal: bool, softmax_scale: float, backend: str,
    softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv, dsinks); dsinks is empty (0 elements) without sinks."""
    spec = _spec(window_mode, left, right, keys, causal)
    if q.numel() == 0 or k.numel() == 0:  # empty input: zero (or empty) gradients, no kernel launched
        grads = torch_impl.attention_bwd(do, q, k, v, out, lse, spec, softmax_scale, cu_seqlens_q, cu_seqlens_k,
                                         softcap, sinks)
    elif backend == "triton":
        from .triton_kernels import swa_bwd_triton

        grads = swa_bwd_triton(
            _kernel_ready(do), q, k, v, out, lse, spec, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            max_seqlen_k, softcap, sinks,
        )
    elif backend == "cuda":
        from .cuda_backend import swa_bwd_cuda

        grads = swa_bwd_cuda(
            _kernel_ready(do), q, k, v, out, lse, spec, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            max_seqlen_k,
        ) + (None,)
    else:
        grads = torch_impl.attention_bwd(do, q, k, v, out, lse, spec, softmax_scale, cu_seqlens_q, cu_seqlens_k,
                                         softcap, sinks)
    dq, dk, dv, dsinks = grads
    return dq, dk, dv, _dsinks_or_empty(dsinks, sinks, q)


def _dsinks_or_empty(dsinks, sinks, q):
    if sinks is None:
        return q.new_empty((0,), dtype=torch.float32)
    return dsinks.to(sinks.dtype)


@_swa_backward.register_fake
def _(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_mode, left, right, keys,
      causal, softmax_scale, backend, softcap=0.0, sinks=None):
    dsinks = sinks.new_empty(sinks.shape) if sinks is not None else q.new_empty((0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *rest = inputs
    scalars, sinks = rest[:-1], rest[-1]  # sinks is the last input
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sinks)
    ctx.args = scalars
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    # one gradient slot per input of swa_forward: q, k, v, the non-differentiable cu_seqlens
    # and scalars (ctx.args), then sinks
    no_grad = (None,) * (2 + len(ctx.args))
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sinks = ctx.saved_tensors
    if dout is None:
        return (None, None, None) + no_grad + (None,)
    dq, dk, dv, dsinks = _swa_backward(dout.contiguous(), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.args,
                                       sinks)
    return (dq, dk, dv) + no_grad + (dsinks if sinks is not None else None,)


_swa_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window_size: WindowArg = (-1, -1),
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    return_lse: bool = False,
    backend: str = "auto",
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention in which each query sees only a band of keys; cost O(L * window).

    Every argument after ``v`` is keyword-only: FlashAttention-2 orders them ``dropout_p,
    softmax_scale, causal, window_size``, so a positional call ported from it would bind
    the wrong values here.

    Args:
        q: ``(batch, seqlen_q, heads_q, head_dim)``, or packed ``(total_q, heads_q, head_dim)``
            with ``cu_seqlens_q``. head_dim <= 256; fp16, bf16 or fp32 (fp64: torch backend).
        k, v: ``(batch, seqlen_k, heads_kv, head_dim)`` (or packed); ``heads_q % heads_kv == 0``
            (GQA/MQA: query head ``h`` uses kv head ``h // (heads_q // heads_kv)``; K/V are
            never repeated in memory).
        window_size: query ``i`` attends keys ``j`` with
            ``i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right``
            (inclusive, bottom-right aligned). Forms: ``(left, right)``, -1 = unbounded on
            that side; an int ``W`` = W keys including self (causal ``(W-1, 0)``, else
            centred ``(W//2, (W-1)//2)``; W clamped to the key length); ``"sqrt"`` = ``W =
            floor(sqrt(seqlen_k))`` per sequence. ``sliding_window=4096`` in a Hugging Face
            config is ``window_size=4096`` with ``causal=True``. Integer-like values are
            accepted as ints (numpy integers, 0-d integer tensors; the pair as a 2-element
            integer tensor, as FlashAttention-2 accepts); floats and bools are refused.
        causal: forces ``right = 0``. With seqlen_q=2, seqlen_k=5, ``causal=True``::

                k0 k1 k2 k3 k4
            q0   1  1  1  1  0
            q1   1  1  1  1  1

        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` prefix sums of the packed lengths.
        max_seqlen_q, max_seqlen_k: longest packed sequences; computed (a device sync) when
            omitted, in which case cu_seqlens are also checked for consistency.
        return_lse: also return the log-sum-exp, float32, ``(batch, heads_q, seqlen_q)``
            (packed: ``(heads_q, total_q)``): the log of each row's softmax denominator (sink
            included); ``-inf`` on rows that see no key (without sinks). Not differentiable.
        backend: ``"auto"`` (Triton on CUDA tensors, PyTorch on CPU), ``"triton"``,
            ``"cuda"`` (the CUDA C++ extension: fp16/bf16, head_dim 64 or 128, neither
            softcap nor sinks) or ``"torch"``.
        softcap: logit soft-capping (Gemma 2's ``attn_logit_softcapping``): ``c > 0``
            replaces each score ``s = softmax_scale * q.k`` by ``c * tanh(s / c)`` before the
            softmax (and the mask); 0 = off. Differentiable through the tanh.
        sinks: attention sinks (GPT-OSS's ``s_aux``): a ``(heads_q,)`` tensor of logits, one
            per query head, each joining every row's softmax denominator as a key whose
            value is zero: ``p_j = exp(s_j) / (exp(sink_h) + sum_j' exp(s_j'))`` over the
            row's band. Differentiable (``d sink_h = -sum over rows of p_sink * (dO . O)``).
            A row that sees no key gives zeros and ``lse = sink_h`` (the sink takes all the
            mass).

    Returns:
        ``out`` like ``q`` (rows that see no key are zero), or ``(out, lse)``.

    Accuracy with large logits: as in FlashAttention, the backward recomputes the softmax
    as ``exp(S - LSE)`` from the forward's fp32 LSE, whose rounding grows with the scores:
    fp32 gradients carry a relative error up to about ``4 * 2^-24 * max|S|`` (measured, q and
    k scaled so that max|S| is 45 / 450: dq, dk, dv within 2-3e-6 / 2-5e-5 on both
    backends, against the 3e-7 of O(1) scores). The output and LSE keep fp32 accuracy, and
    fp16 / bf16 results stay within FlashAttention's bar (twice plain PyTorch's error in that
    precision) at every scale: at logits x100, 6-110x below it. fp64 (torch backend) is
    exact to fp64 rounding. Also FlashAttention's design: the backward takes delta =
    rowsum(dO * O) from the fp16/bf16 output, so where dS is a small difference (rows that
    see one or two keys, or whose sink takes little) dq / dk carry that rounding, up to 3-4x
    plain PyTorch's error there (whose softmax backward takes delta from P).
    """
    spec = parse_window(window_size, causal)
    max_seqlen_q, max_seqlen_k = _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                               softmax_scale)
    # auto: Triton on CUDA tensors, the PyTorch path on CPU. The CUDA C++ kernels are
    # verified only in the CPU emulator (tests/cuda/emu) and unmeasured on a GPU, so auto
    # does not pick them; backend="cuda" asks for them explicitly.
    impl = resolve_backend(backend, q.device, OP)
    if impl == "triton" and q.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{OP}: backend 'triton' supports fp16, bf16 and fp32, got {q.dtype}; use backend='torch'")
    softcap, sinks = _check_score_modifiers(q, softcap, sinks)
    if impl == "cuda":
        from .cuda_backend import check_supported

        check_supported(q)
        if softcap or sinks is not None:
            raise ValueError(f"{OP}: backend='cuda' supports neither softcap nor sinks; use backend='triton' "
                             "(CUDA tensors) or backend='torch'")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = _swa_forward(
        _kernel_ready(q), _kernel_ready(k), _kernel_ready(v), cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, spec.mode, spec.left, spec.right, spec.keys, spec.causal, scale, impl, softcap, sinks,
    )
    return (out, lse) if return_lse else out


def _check_score_modifiers(q, softcap, sinks):
    """Validate softcap / sinks; -> (float softcap, sinks as a contiguous fp32 (fp64 for fp64 q)
    tensor or None). The cast is differentiable: the gradient reaches the caller's sinks."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")
    if sinks is None:
        return float(softcap), None
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        raise TypeError(f"sinks must be a floating-point tensor of shape (heads_q,), got {sinks!r}")
    if tuple(sinks.shape) != (q.shape[-2],):
        raise ValueError(f"sinks must have shape (heads_q,) = ({q.shape[-2]},), one logit per query head, "
                         f"got {tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise ValueError(f"sinks is on {sinks.device} but q is on {q.device}")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return float(softcap), sinks.to(dtype).contiguous()
