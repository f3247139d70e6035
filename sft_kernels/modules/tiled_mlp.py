"""Tiled MLP: a decoder layer's MLP over sequence chunks, through DeepSpeed's ALST ``TiledMLP``.

A gated MLP at L tokens holds ``L x intermediate`` activations (gate, up, act, product: 4 of
them, and as many in its backward) -- for Llama-3-8B (I = 14336) more than any other part of a
checkpointed layer's recompute. ``TiledMLP`` runs the forward chunk by chunk without
keeping activations and, in the backward, recomputes each chunk and backpropagates it at once,
so at most ``chunk_tokens x intermediate`` of them live. Its output and gradients are the
plain MLP's (``tests/test_tiled_mlp.py``); the price is one more MLP forward per step (with
activation checkpointing, the forward runs three times).

DeepSpeed's piece is used as is (ZeRO-3 included: it passes the MLP's parameters as
``compute_params``, so their gradient is reduced once, after the last chunk). The one thing
added here is the chunk count: ``TiledMLP`` marks the last chunk by its index against the
count it was given, while ``torch.chunk`` may make fewer pieces (10 tokens asked in 6 chunks
make 5), so the count passed is the number of pieces ``torch.chunk`` makes.
"""

from __future__ import annotations

import math
import types

import torch

_ORIGINAL = "_sft_untiled_forward"


def chunk_count(tokens: int, chunk_tokens: int) -> int:
    """The number of pieces ``torch.chunk`` makes when asked for ``ceil(tokens / chunk_tokens)``."""
    if tokens <= 0:
        return 1
    size = math.ceil(tokens / max(1, math.ceil(tokens / chunk_tokens)))
    return math.ceil(tokens / size)


def _tiled_forward(self, x):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    chunk = self._sft_mlp_chunk_tokens
    tokens = x.numel() // x.shape[-1]
    original = getattr(self, _ORIGINAL)
    if tokens <= chunk:
        return original(x)
    if not torch.is_grad_enabled():  # evaluation, or the first pass of a checkpointed layer
        flat = x.reshape(-1, x.shape[-1])
        out = torch.cat([original(piece) for piece in torch.split(flat, chunk)])
        return out.view(*x.shape[:-1], out.shape[-1])
    params = [p for p in self.parameters()]
    # TiledMLP chunks dim -2: flatten (batch, seq) so that a chunk is chunk_tokens tokens at any batch
    flat = x.reshape(-1, x.shape[-1])
    out = TiledMLP.apply(lambda _self, xs: original(xs), self, flat, chunk_count(tokens, chunk), params)
    return out.view(*x.shape[:-1], out.shape[-1])


def tiled_mlp(model: torch.nn.Module, chunk_tokens: int = 4096, mlp_attr: str = "mlp") -> int:
    """Run the ``mlp`` submodule of every layer of ``model`` (any module whose attribute
    ``mlp_attr`` is a module taking ``(..., hidden)``: transformers' decoder layers) over chunks
    of ``chunk_tokens`` tokens. Returns how many MLPs were tiled; raises if none."""
    if int(chunk_tokens) < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    count = 0
    for module in model.modules():
        mlp = getattr(module, mlp_attr, None)
        if not isinstance(mlp, torch.nn.Module):
            continue
        mlp._sft_mlp_chunk_tokens = int(chunk_tokens)
        if not hasattr(mlp, _ORIGINAL):
            setattr(mlp, _ORIGINAL, mlp.forward)
            mlp.forward = types.MethodType(_tiled_forward, mlp)
        count += 1
    if count == 0:
        raise ValueError(f"tiled_mlp found no submodule named {mlp_attr!r} in {type(model).__name__}")
    return count
