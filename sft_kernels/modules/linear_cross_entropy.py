"""The language-model loss without an L x V logits tensor: lm_head + cross-entropy over chunks.

A causal-LM step normally computes ``logits = lm_head(h)`` for all L tokens, casts them to fp32
and takes the cross-entropy: it holds L x V logits in the model dtype, again in fp32, and their
gradient (L = V = 128k: 32 GiB bf16 + 64 GiB fp32). Here the tokens are taken ``chunk_tokens`` at
a time, so at most ``chunk_tokens x V`` logits exist at once (one *logits tile*). A fixed token
count makes the tile grow with the vocabulary; :func:`tile_chunk_tokens` picks the count from a
byte budget instead (``chunk x V x 4`` bytes of fp32 logits at most), so the tile is the same size
at any V, as Liger-Kernel's fused linear cross-entropy sizes its chunk from V / H.

Two paths, one answer (the full computation's, per element; ``tests/test_tiled_loss.py``):

- :func:`linear_cross_entropy` -- this package's own. Per chunk, in the forward, it computes
  exactly the reference's ops (``F.linear`` in the model dtype, Gemma 2's final soft-cap
  ``c * tanh(z / c)`` in the model dtype as transformers does, ``.float()``, cross-entropy with
  ``ignore_index``, sum over the chunk / ``normalizer``) and their gradients; the hidden-state
  gradient is written into one ``(tokens, H)`` buffer, the weight (and bias) gradient summed in
  fp32 across chunks. The backward multiplies them by the incoming gradient, so the loss may be
  scaled afterwards (DeepSpeed's 1/gradient_accumulation_steps, a context-parallel factor) and
  every gradient follows. ``normalizer`` is the token count of the mean: by default this
  call's label tokens; give the whole micro-batch's (over context-parallel ranks) or the whole
  optimizer step's (transformers' ``num_items_in_batch``) for an exact token-weighted mean.
  It needs the whole weight on this rank (not ZeRO-3).
- :func:`deepspeed_tiled_loss` -- DeepSpeed's ALST ``TiledFusedLogitsLoss``. It calls the lm_head
  *module* per shard, so ZeRO-3's hooks gather the partitioned weight and reduce its gradient
  once (``ds_grad_is_ready``): the path to use when the weight is partitioned. It runs the
  backward inside the forward with an incoming gradient of 1, so the weight gradient is fixed
  at forward time and a later factor on the loss reaches only the hidden states. So ``fn``
  returns ``sum / normalizer`` with ``output_reduction="sum"`` (never "mean", whose 1/shards
  is wrong for uneven shards or masks), and the factor the caller will apply afterwards
  (``grad_scale``) is applied inside and divided out of the value: the result's value is the
  loss, and every gradient carries ``grad_scale`` exactly once.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 4096


def tile_chunk_tokens(vocab: int, tile_bytes: int) -> int:
    """Tokens per chunk whose fp32 logits, ``chunk x vocab x 4`` bytes, fit ``tile_bytes`` (at least 1).
    The tile's other tensors (the model-dtype logits, their gradients) are as many elements, so
    the whole tile is a fixed multiple of ``tile_bytes`` whatever the vocabulary."""
    if int(vocab) < 1 or int(tile_bytes) < 1:
        raise ValueError(f"vocab and tile_bytes must be >= 1, got {vocab}, {tile_bytes}")
    return max(1, int(tile_bytes) // (4 * int(vocab)))


def _chunk_loss(x, weight, bias, y, softcap, ignore_index, normalizer):
    """The reference's ops on one chunk: ``sum(token losses) / normalizer`` (fp32)."""
    logits = F.linear(x, weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap  # model dtype, as transformers' Gemma 2
    return F.cross_entropy(logits.float(), y, ignore_index=ignore_index, reduction="sum") / normalizer


def _label_count(labels: torch.Tensor, ignore_index: int) -> int:
    return int((labels != ignore_index).sum())


def _check(hidden, weight, labels, bias, chunk_tokens):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        raise ValueError(f"hidden must be a tensor (..., hidden_size), got {getattr(hidden, 'shape', hidden)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (vocab, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if int(chunk_tokens) < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens, softcap, ignore_index, normalizer):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        x_all = hidden.reshape(-1, hidden.shape[-1])
        y_all = labels.reshape(-1).long()
        n = x_all.shape[0]
        grad_x = torch.zeros_like(x_all) if need_h else None
        # the weight gradient summed in fp32 over chunks, rounded once (as the one matmul of the
        # full computation accumulates in fp32 and rounds once); transient V x H fp32
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.detach().requires_grad_(need_w)
        b = None if bias is None else bias.detach().requires_grad_(need_b)
        for start in range(0, n, chunk_tokens):
            stop = min(n, start + chunk_tokens)
            y = y_all[start:stop]
            if not bool((y != ignore_index).any()):
                continue  # every token ignored: loss 0, all gradients exactly 0
            x = x_all[start:stop].detach().requires_grad_(need_h)
            wants = [t for t, need in ((x, need_h), (w, need_w), (b, need_b)) if need]
            with torch.enable_grad():
                loss = _chunk_loss(x, w, b, y, softcap, ignore_index, normalizer)
            total += loss.detach()
            if wants:
                grads = list(torch.autograd.grad(loss, wants))
                if need_h:
                    grad_x[start:stop] = grads.pop(0)
                if need_w:
                    grad_w += grads.pop(0)
                if need_b:
                    grad_b += grads.pop(0)
        ctx.save_for_backward(
            None if grad_x is None else grad_x.view(hidden.shape),
            None if grad_w is None else grad_w.to(weight.dtype) if weight.dtype != torch.float32 else grad_w,
            None if grad_b is None else grad_b.to(bias.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads = list(ctx.saved_tensors)
        if not bool(grad_out == 1):
            grads = [None if g is None else g * grad_out.to(g.dtype) for g in grads]
        return grads[0], grads[1], grads[2], None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: Optional[torch.Tensor] = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                         ignore_index: int = IGNORE_INDEX, softcap: Optional[float] = None,
                         normalizer=None) -> torch.Tensor:
    """``sum_t CE(softcap(hidden_t @ weight.T + bias), labels_t) / normalizer`` over tokens t whose
    label is not ``ignore_index``, never holding more than ``chunk_tokens x vocab`` logits.

    hidden: ``(..., H)`` (any float dtype; the matmul runs in it, the cross-entropy in fp32);
    weight: ``(V, H)``; bias: ``(V,)`` or None; labels: ``hidden.shape[:-1]``, already aligned
    with ``hidden`` (shifted for a causal LM). ``normalizer``: a number or a 0-d tensor; None:
    the number of label tokens here (a mean; 0 label tokens give 0). Returns a 0-d fp32 tensor.
    Gradients equal the full computation's; they are computed in this forward (one recompute-
    free pass) and scaled by whatever multiplies the loss later.
    """
    _check(hidden, weight, labels, bias, chunk_tokens)
    if normalizer is None:
        normalizer = max(_label_count(labels, ignore_index), 1)
    elif isinstance(normalizer, torch.Tensor):
        normalizer = float(normalizer)
    if not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, int(chunk_tokens),
                                     float(softcap) if softcap else None, int(ignore_index), float(normalizer))


def deepspeed_tiled_loss(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, *,
                         chunk_tokens: int = DEFAULT_CHUNK_TOKENS, ignore_index: int = IGNORE_INDEX,
                         softcap: Optional[float] = None, normalizer=None, grad_scale: float = 1.0,
                         weight_used_again: bool = False) -> torch.Tensor:
    """The same loss through DeepSpeed's ``TiledFusedLogitsLoss`` (module docstring: why, and
    ``grad_scale``). ``lm_head``: the module (its hooks gather a ZeRO-3 weight); ``hidden``
    ``(batch, seq, H)``; ``labels`` ``(batch, seq)`` aligned. ``grad_scale``: the factor the
    caller's backward will apply to this loss (DeepSpeed's engine: 1/gradient_accumulation_steps
    when > 1); the weight gradient gets it at forward time, the value is returned unscaled.
    ``weight_used_again``: the weight gets another gradient later in the backward (tied input
    embeddings). ``TiledFusedLogitsLoss`` marks it ready for ZeRO-3's reduction at its last shard,
    in the forward, and the embedding's gradient then adds it to the reduction bucket a second time
    (DeepSpeed 0.19.8: ``assert len(set(p.ds_id ...)) == len(params_in_bucket)`` in stage3.py).
    Here it stays unready through the shards (its gradient accumulates in ``.grad``) and is marked
    ready after them, so the embedding's backward reduces the sum once.
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (batch, seq, hidden_size), got {tuple(hidden.shape)}")
    weight = lm_head.weight
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels must be {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
    if normalizer is None:
        normalizer = max(_label_count(labels, ignore_index), 1)
    normalizer = float(normalizer)
    if not normalizer > 0 or not grad_scale > 0:
        raise ValueError(f"normalizer and grad_scale must be > 0, got {normalizer}, {grad_scale}")
    tokens = hidden.shape[0] * hidden.shape[1]
    size = math.ceil(tokens / max(1, math.ceil(tokens / int(chunk_tokens))))
    # exactly the number of pieces torch.chunk makes (10 tokens in 6 asked-for chunks are 5): with
    # more, ZeRO-3's ds_grad_is_ready would never be set on the last piece and the gradient never reduced
    shards = math.ceil(tokens / size)
    divisor = normalizer / grad_scale

    def fn(module, x, y):
        logits = module(x)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits.float(), y.long(), ignore_index=ignore_index, reduction="sum") / divisor

    if weight_used_again:
        weight.ds_grad_is_ready = False
        loss = TiledFusedLogitsLoss.apply(fn, lm_head, hidden, labels, None, shards, [], "sum")
        weight.ds_grad_is_ready = True
    else:
        loss = TiledFusedLogitsLoss.apply(fn, lm_head, hidden, labels, None, shards, [weight], "sum")
    # the value: the loss; its gradient 1/grad_scale, so that when the caller multiplies by grad_scale
    # TiledFusedLogitsLoss receives exactly 1 and leaves the hidden-state gradient as fn made it
    return loss / grad_scale
