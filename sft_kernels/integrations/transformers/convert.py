"""What this package reads from a Hugging Face model: a layer's window, its rotary setup, and
an exact :class:`~sft_kernels.modules.sft_attention.SFTAttention` copy of its attention.

The window rule itself (what ``window_size`` means) lives in :mod:`sft_kernels.window`; here
is only where a Hugging Face config keeps the window and on which layers it applies.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn

from ...modules.sft_attention import SFTAttention
from ...window import WindowArg


# ----------------------------------------------------------------------------- config readers
def model_has_window(config) -> bool:
    """Whether the model uses a sliding window on some layers (Mistral, Qwen2 with
    ``use_sliding_window``, Gemma 2/3, ...): then its layers' own windows win over the one
    given to ``register`` / ``patch_model``."""
    return (config is not None and getattr(config, "sliding_window", None) is not None
            and getattr(config, "use_sliding_window", True) is not False)


def hf_layer_window(attention_module: nn.Module, config) -> Optional[int]:
    """The sliding window (W keys including self) a Hugging Face model uses in this layer, or None.

    Mistral: ``config.sliding_window``. Qwen2 and other models with ``layer_types``: the
    window only on ``"sliding_attention"`` layers, and only when ``use_sliding_window``
    is on (older Qwen2 configs keep ``sliding_window`` set even when it is off; older
    versions without ``layer_types`` use it from layer ``max_window_layers`` on).
    """
    if not model_has_window(config):
        return None
    window = config.sliding_window
    layer_idx = getattr(attention_module, "layer_idx", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_idx is not None and layer_idx < len(layer_types):
        return int(window) if layer_types[layer_idx] == "sliding_attention" else None
    if hasattr(attention_module, "sliding_window"):  # per-layer attribute (Qwen2 in 4.5x / 5.x)
        sw = attention_module.sliding_window
        return int(sw) if sw is not None else None
    max_window_layers = getattr(config, "max_window_layers", None)
    if hasattr(config, "use_sliding_window") and max_window_layers is not None and layer_idx is not None:
        return int(window) if layer_idx >= max_window_layers else None
    return int(window)


def layer_window_size(keys: Optional[int], causal: bool) -> WindowArg:
    """A model's window of ``keys`` (W keys including self, transformers' ``sliding_window``)
    as this package's ``window_size`` on a causal or bidirectional layer: transformers' masks
    keep ``q - W < k <= q`` (causal, the int ``W``) and ``|q - k| < W`` (bidirectional, Gemma 3's
    ``use_bidirectional_attention``: ``(W-1, W-1)``, as in its flash-attention path). None: full
    attention."""
    if keys is None or causal:
        return keys
    return (keys - 1, keys - 1)


def hf_rope(config, head_dim: int):
    """(rope_type, theta, inv_freq or None, attention_scaling) from a Llama-family config."""
    params = getattr(config, "rope_parameters", None) or {}  # transformers 5.x
    scaling = getattr(config, "rope_scaling", None) or {}  # transformers 4.x
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise ValueError(f"from_hf_attention: partial_rotary_factor={partial} is not supported")
    if rope_type == "default":
        return rope_type, float(theta), None, 1.0
    if rope_type in ("dynamic", "longrope"):
        raise ValueError(
            f"from_hf_attention: rope_type={rope_type!r} depends on the sequence length; use "
            "sft_kernels.integrations.transformers.patch_model, which uses the model's own rotary embedding"
        )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # only for non-default rope types

    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    return rope_type, float(theta), inv_freq.float(), float(attention_scaling)


# ----------------------------------------------------------------------------- the layer copy
def _gathered(module: nn.Module):
    """A context holding ``module``'s DeepSpeed ZeRO-3 partitioned parameters gathered (read-only,
    partitioned again on exit; a collective), or nothing when none is partitioned."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # only here: sft_kernels never imports deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def from_hf_attention(
    attention_module: nn.Module,
    config,
    window_size: WindowArg = "config",
    backend: str = "auto",
) -> SFTAttention:
    """Copy a Llama / Mistral / Qwen2 attention module exactly (``qkv_groups=1``).

    ``q_proj, k_proj, v_proj`` (and their biases, Qwen2) are concatenated into the fused
    projection bit for bit, ``o_proj`` is copied. Rotary: the default rope type is
    rebuilt from ``rope_theta``; other non-dynamic types (linear, llama3, yarn, ...)
    take their frequencies from transformers' own initialisers. (Inside a patched
    model, :func:`sft_kernels.integrations.transformers.patch_model` passes the model's
    own cos/sin, so every rope type works there.)

    DeepSpeed ZeRO-3: when the module's parameters are partitioned (``deepspeed.zero.Init``,
    e.g. ``from_pretrained`` under HF ``Trainer`` with a stage-3 config: each local tensor is
    empty), they are gathered for the copy (a collective: call it on every rank of the
    group, in the same order) and the returned layer holds full, unpartitioned parameters,
    which ``deepspeed.initialize`` partitions (as it does any parameter created outside
    ``zero.Init``).

    Args:
        attention_module: e.g. ``model.model.layers[i].self_attn``.
        config: the model config.
        window_size: ``"config"`` (default): the model's own window, i.e.
            ``config.sliding_window`` where the model uses one for this layer
            (Mistral; Qwen2 with ``use_sliding_window`` on its sliding layers), else
            unbounded causal attention. Anything else is used as given.
        backend: as in the constructor.
    """
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not isinstance(getattr(attention_module, name, None), nn.Linear):
            raise TypeError(
                f"from_hf_attention: {type(attention_module).__name__} has no nn.Linear {name}; expected a "
                "Llama / Mistral / Qwen2 style attention module"
            )
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) != 0.0:
        raise ValueError(
            f"from_hf_attention: config.attention_dropout={config.attention_dropout}, but the sliding-window "
            "kernels implement no attention dropout; set it to 0.0"
        )
    qp, kp, vp, op = (getattr(attention_module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    hq = int(config.num_attention_heads)
    hkv = int(getattr(config, "num_key_value_heads", None) or hq)
    head_dim = int(getattr(attention_module, "head_dim", None) or qp.out_features // hq)
    if qp.out_features != hq * head_dim or kp.out_features != hkv * head_dim:
        raise ValueError(
            f"from_hf_attention: projections {qp.out_features}/{kp.out_features} do not match "
            f"{hq} query and {hkv} key/value heads of head_dim {head_dim}"
        )
    biases = {lin.bias is not None for lin in (qp, kp, vp)}
    if len(biases) != 1:
        raise ValueError("from_hf_attention: q_proj, k_proj and v_proj must all have a bias or none")
    if window_size == "config":
        window_size = hf_layer_window(attention_module, config)
    rope_type, theta, inv_freq, attention_scaling = hf_rope(config, head_dim)
    with _gathered(attention_module), torch.no_grad():  # ZeRO-3: the full tensors, read-only
        w = qp.weight
        layer = SFTAttention(
            qp.in_features, hq, hkv, head_dim, window_size=window_size,
            causal=bool(getattr(attention_module, "is_causal", True)), qkv_groups=1, bias=biases.pop(),
            rope_theta=theta, backend=backend, out_bias=op.bias is not None, dtype=w.dtype, device=w.device,
        )
        if float(getattr(attention_module, "scaling", layer.scaling)) != layer.scaling:
            layer.scaling = float(attention_module.scaling)
        if inv_freq is not None:
            layer.inv_freq = inv_freq.to(device=w.device)
            layer.rope_attention_scaling = float(attention_scaling)
        layer.qkv_proj.weight.copy_(torch.cat([p.weight.reshape(-1) for p in (qp, kp, vp)]))
        if layer.qkv_proj.bias is not None:
            layer.qkv_proj.bias.copy_(torch.cat([qp.bias, kp.bias, vp.bias]))
        layer.o_proj.weight.copy_(op.weight)
        if op.bias is not None:
            layer.o_proj.bias.copy_(op.bias)
    return layer
