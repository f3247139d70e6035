"""``tiled_loss(model)``: a Hugging Face causal LM whose loss never holds an L x V logits tensor.

Usage (Trainer, TRL's SFTTrainer, a loop of your own)::

    from sft_kernels.integrations.transformers import tiled_loss
    model = AutoModelForCausalLM.from_pretrained(...)
    tiled_loss(model, chunk_tokens=4096)          # before Trainer / deepspeed.initialize
    out = model(input_ids, attention_mask=mask, labels=labels)
    out.loss.backward()                           # out.logits is None when labels are given

As Liger-Kernel's ``fused_linear_cross_entropy`` does, the instance's ``forward`` is replaced: with
``labels`` (or ``shift_labels``) it runs the base model (``model.<base_model_prefix>``) for the
last hidden states and computes the causal-LM loss from them in chunks of ``chunk_tokens``
tokens (:mod:`sft_kernels.modules.linear_cross_entropy`), with transformers' own semantics:
labels shifted left by one with ``-100`` appended (or ``shift_labels`` as given), ``-100``
ignored, the mean over label tokens or, when ``num_items_in_batch`` is given (Trainer's
token-weighted mean over an optimizer step's micro-batches), the sum over it; Gemma 2's
``config.final_logit_softcapping`` applied. Without labels the original forward runs
(generation, evaluation of logits). ``untiled_loss(model)`` restores it.

Path: the package's own chunked loss (exact under any later scaling of the loss) unless the
lm_head weight is partitioned by ZeRO-3 (it carries ``ds_id``), where DeepSpeed's
``TiledFusedLogitsLoss`` gathers it through the module's hooks; that one fixes the weight
gradient at forward time, so pass ``grad_scale`` = the factor the backward will apply to the
loss (DeepSpeed's engine: 1/gradient_accumulation_steps; ``sft-kernels train`` sets it).
``path="own" | "deepspeed"`` forces one.

``tile_bytes=N`` sizes the chunk from a byte budget instead of ``chunk_tokens``: ``N // (4 V)``
tokens (:func:`~sft_kernels.modules.linear_cross_entropy.tile_chunk_tokens`), so the logits tile
does not grow with the vocabulary.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F

from ...modules.linear_cross_entropy import (DEFAULT_CHUNK_TOKENS, IGNORE_INDEX, deepspeed_tiled_loss,
                                             linear_cross_entropy, tile_chunk_tokens)

_ORIGINAL = "_sft_untiled_forward"
PATHS = ("auto", "own", "deepspeed")


def _is_partitioned(weight: torch.Tensor) -> bool:
    return hasattr(weight, "ds_id")


def _tied(model, head) -> bool:
    embeddings = model.get_input_embeddings()
    return embeddings is not None and embeddings.weight is head.weight


def causal_lm_loss(model, hidden: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                   shift_labels: Optional[torch.Tensor] = None, num_items_in_batch=None,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """transformers' causal-LM loss of ``model`` from its last hidden states ``(batch, seq, H)``,
    chunked as :func:`tiled_loss` configured (defaults if it was not called)."""
    settings = getattr(model, "_sft_tiled_loss", {})
    chunk = settings.get("chunk_tokens", DEFAULT_CHUNK_TOKENS)
    path = settings.get("path", "auto")
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    head = model.get_output_embeddings()
    if settings.get("tile_bytes"):  # ds_shape: ZeRO-3 leaves the local weight empty
        chunk = tile_chunk_tokens(getattr(head.weight, "ds_shape", head.weight.shape)[0], settings["tile_bytes"])
    softcap = getattr(model.config, "final_logit_softcapping", None)
    normalizer = None if num_items_in_batch is None else float(num_items_in_batch)
    if path == "deepspeed" or (path == "auto" and _is_partitioned(head.weight)):
        # ZeRO-3: the module call gathers the weight; see linear_cross_entropy's docstring
        return deepspeed_tiled_loss(head, hidden, shift_labels, chunk_tokens=chunk, ignore_index=ignore_index,
                                    softcap=softcap, normalizer=normalizer,
                                    grad_scale=settings.get("grad_scale", 1.0),
                                    weight_used_again=_tied(model, head))
    return linear_cross_entropy(hidden, head.weight, shift_labels, bias=getattr(head, "bias", None),
                                chunk_tokens=chunk, ignore_index=ignore_index, softcap=softcap,
                                normalizer=normalizer)


def _forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
    shift_labels = kwargs.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        return getattr(self, _ORIGINAL)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
    kwargs.pop("logits_to_keep", None)  # every position has a label here
    out = getattr(self, self.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    loss = causal_lm_loss(self, out[0], labels, shift_labels=shift_labels, num_items_in_batch=num_items,
                          ignore_index=ignore_index)
    rest = {k: v for k, v in out.items() if k != "last_hidden_state" and k in CausalLMOutputWithPast.__dataclass_fields__}
    return CausalLMOutputWithPast(loss=loss, logits=None, **rest)


def tiled_loss(model, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, path: str = "auto", grad_scale: float = 1.0,
               tile_bytes: Optional[int] = None):
    """Make ``model`` (a transformers ``*ForCausalLM``) compute its loss without a full-logits
    tensor (module docstring). ``tile_bytes``: chunk by a byte budget instead of ``chunk_tokens``.
    Returns the model. Calling it again updates the settings."""
    if int(chunk_tokens) < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if tile_bytes is not None and int(tile_bytes) < 1:
        raise ValueError(f"tile_bytes must be >= 1 (or None), got {tile_bytes}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if not grad_scale > 0:
        raise ValueError(f"grad_scale must be > 0, got {grad_scale}")
    prefix = getattr(model, "base_model_prefix", None)
    if not prefix or not hasattr(model, prefix) or model.get_output_embeddings() is None:
        raise TypeError(f"tiled_loss needs a transformers causal LM with a base model and an lm_head; "
                        f"got {type(model).__name__}")
    model._sft_tiled_loss = {"chunk_tokens": int(chunk_tokens), "path": path, "grad_scale": float(grad_scale),
                             "tile_bytes": None if tile_bytes is None else int(tile_bytes)}
    if not hasattr(model, _ORIGINAL):
        setattr(model, _ORIGINAL, model.forward)
        model.forward = types.MethodType(_forward, model)
    return model


def untiled_loss(model):
    """Undo :func:`tiled_loss`."""
    if hasattr(model, _ORIGINAL):
        model.forward = getattr(model, _ORIGINAL)
        delattr(model, _ORIGINAL)
        del model._sft_tiled_loss
    return model
