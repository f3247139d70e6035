"""``patch_model``: each Llama / Mistral / Qwen2 attention module swapped for an
:class:`SFTAttentionHF` copied exactly from it (optionally block-diagonal ``qkv_groups``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ...modules.sft_attention import SFTAttention, apply_rotary, rope_cos_sin
from ...window import WindowArg, parse_window
from .backend import _attend, _check_unsupported, register
from .convert import from_hf_attention, hf_layer_window, model_has_window
from .settings import _SUPPORTED_MODEL_TYPES, ATTN_IMPLEMENTATION, _settings, _transformers


# ----------------------------------------------------------------------------- patch_model
def _dense_qkv(attn: SFTAttention):
    """The dense ``q_proj, k_proj, v_proj`` weights (and biases or None) equal to ``attn.qkv_proj``:
    group i's block sits at its heads' rows and hidden slice i's columns, zeros elsewhere."""
    g, d, c = attn.qkv_groups, attn.head_dim, attn.hidden_size
    hq, hkv, cin = attn.num_heads // g, attn.num_kv_heads // g, c // g
    per = (hq + 2 * hkv) * d
    w = attn.qkv_proj.weight.detach()
    dense = {p: w.new_zeros(n * g * d, c) for p, n in (("q", hq), ("k", hkv), ("v", hkv))}
    for i in range(g):
        block = w[i * per * cin:(i + 1) * per * cin].view(per, cin)
        for p, part, n in zip("qkv", block.split([hq * d, hkv * d, hkv * d], 0), (hq, hkv, hkv)):
            dense[p][i * n * d:(i + 1) * n * d, i * cin:(i + 1) * cin] = part
    bias = attn.qkv_proj.bias
    biases = {p: None for p in "qkv"}
    if bias is not None:
        parts = bias.detach().view(g, per).split([hq * d, hkv * d, hkv * d], 1)
        biases = {p: part.reshape(-1).clone() for p, part in zip("qkv", parts)}
    return dense, biases


def _flat_qkv(attn: SFTAttention, dense, biases):
    """Inverse of :func:`_dense_qkv`: the flat block-diagonal weight (diagonal blocks) and bias."""
    g, d, c = attn.qkv_groups, attn.head_dim, attn.hidden_size
    hq, hkv, cin = attn.num_heads // g, attn.num_kv_heads // g, c // g
    heads = (("q", hq), ("k", hkv), ("v", hkv))
    blocks, bias = [], []
    for i in range(g):
        rows = [dense[p][i * n * d:(i + 1) * n * d, i * cin:(i + 1) * cin] for p, n in heads]
        blocks.append(torch.cat(rows, 0).reshape(-1))
        if biases["q"] is not None:
            bias.append(torch.cat([biases[p][i * n * d:(i + 1) * n * d] for p, n in heads]))
    return torch.cat(blocks), (torch.cat(bias) if bias else None)


class SFTAttentionHF(nn.Module):
    """An :class:`SFTAttention` behind the call signature of a HF Llama/Mistral/Qwen2 attention.

    ``forward(hidden_states, position_embeddings, attention_mask, cache/past_key_values, **kwargs)
    -> (attn_output (batch, seqlen, hidden), None)``. The model's own rotary ``(cos, sin)`` are
    used; K/V go through ``cache.update`` when there is a cache; the attention runs as in
    :func:`sft_attention_forward` (same masks, caches, packing, autocast and compile rules).

    State dict: the model's own keys. ``state_dict()`` (so ``save_pretrained``) writes
    ``q_proj / k_proj / v_proj / o_proj`` weights of the HF shapes -- for ``qkv_groups=g > 1`` the
    dense matrices whose off-diagonal blocks are zero, the same function -- and
    ``load_state_dict`` accepts them (taking the diagonal blocks) as well as this module's own
    ``attn.*`` keys. A plain ``from_pretrained`` without this package therefore loads a saved
    patched model, and ``patch_model(..., qkv_groups=g)`` on it restores the exact blocks.
    """

    def __init__(self, attn: SFTAttention, config, layer_idx: Optional[int], model_window: bool = True):
        super().__init__()
        self.attn = attn
        self.model_window = model_window  # False: attn.window_size is the one given to patch_model
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = attn.causal
        self.head_dim = attn.head_dim
        self._register_state_dict_hook(SFTAttentionHF._export_state_dict)
        self._register_load_state_dict_pre_hook(SFTAttentionHF._import_state_dict, with_module=True)

    # ------------------------------------------------------------------ state dict in HF names
    @staticmethod
    def _export_state_dict(module, state_dict, prefix, local_metadata):
        attn = module.attn
        expected = attn.hidden_size * (attn.num_heads + 2 * attn.num_kv_heads) * attn.head_dim // attn.qkv_groups
        key = prefix + "attn.qkv_proj.weight"
        if key not in state_dict or state_dict[key].numel() != expected:
            return state_dict  # partitioned (ZeRO-3) or filtered: leave this module's own keys
        dense, biases = _dense_qkv(attn)
        del state_dict[key]
        state_dict.pop(prefix + "attn.qkv_proj.bias", None)
        for p in "qkv":
            state_dict[f"{prefix}{p}_proj.weight"] = dense[p]
            if biases[p] is not None:
                state_dict[f"{prefix}{p}_proj.bias"] = biases[p]
        for suffix in ("weight", "bias"):
            t = state_dict.pop(f"{prefix}attn.o_proj.{suffix}", None)
            if t is not None:
                state_dict[f"{prefix}o_proj.{suffix}"] = t
        return state_dict

    def _import_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs):
        names = [f"{prefix}{p}_proj.weight" for p in "qkv"]
        if not all(n in state_dict for n in names):
            return
        attn = self.attn
        dense = {p: state_dict.pop(f"{prefix}{p}_proj.weight") for p in "qkv"}
        biases = {p: state_dict.pop(f"{prefix}{p}_proj.bias", None) for p in "qkv"}
        shapes = {"q": attn.num_heads * attn.head_dim, "k": attn.num_kv_heads * attn.head_dim,
                  "v": attn.num_kv_heads * attn.head_dim}
        for p, rows in shapes.items():
            if tuple(dense[p].shape) != (rows, attn.hidden_size):
                error_msgs.append(f"size mismatch for {prefix}{p}_proj.weight: checkpoint {tuple(dense[p].shape)}, "
                                  f"model ({rows}, {attn.hidden_size})")
                return
        if (biases["q"] is None) != (attn.qkv_proj.bias is None):
            error_msgs.append(f"{prefix}: the checkpoint's q/k/v biases do not match the model's")
            return
        flat, bias = _flat_qkv(attn, dense, biases)
        state_dict[prefix + "attn.qkv_proj.weight"] = flat
        if bias is not None:
            state_dict[prefix + "attn.qkv_proj.bias"] = bias
        for suffix in ("weight", "bias"):
            t = state_dict.pop(f"{prefix}o_proj.{suffix}", None)
            if t is not None:
                state_dict[f"{prefix}attn.o_proj.{suffix}"] = t

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else kwargs.pop("past_key_value", None)
        _check_unsupported(self, 0.0, kwargs)
        attn = self.attn
        b, l, _ = hidden_states.shape
        q, k, v = attn._split_qkv(attn.qkv_proj(hidden_states))
        if position_embeddings is not None:
            cos, sin = position_embeddings
        else:
            pos = kwargs.get("position_ids")
            if pos is None:
                raise ValueError("SFTAttentionHF: needs position_embeddings or position_ids")
            cos, sin = rope_cos_sin(pos.expand(b, l), attn.inv_freq, hidden_states.dtype, attn.rope_attention_scaling)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            kt, vt = k.transpose(1, 2), v.transpose(1, 2)
            if _settings["cache_kwargs_dict"]:  # transformers 5.0 - 5.x: update(k, v, layer_idx, cache_kwargs)
                cache_kwargs = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
                kt, vt = cache.update(kt, vt, self.layer_idx, cache_kwargs)
            else:
                kt, vt = cache.update(kt, vt, self.layer_idx, kwargs=kwargs)
            k, v = kt.transpose(1, 2), vt.transpose(1, 2)
        out = _attend(self, q, k, v, attention_mask, attn.scaling, attn.window_size, attn.causal, kwargs,
                      model_window=self.model_window, backend=attn.backend)
        return attn.o_proj(out.reshape(b, l, -1)), None


def _attention_modules(model: nn.Module):
    for name, module in model.named_modules():
        if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            yield name, module


def patch_model(
    model: nn.Module,
    window_size: WindowArg = None,
    qkv_groups: int = 1,
    backend: str = "auto",
) -> nn.Module:
    """Swap every attention module of a Llama / Mistral / Qwen2 model for :class:`SFTAttentionHF`.

    Args:
        model: a ``*ForCausalLM`` / ``*Model`` of model type llama, mistral or qwen2, not yet patched.
        window_size: window for layers where the model has none of its own (see
            :func:`register`); layers with a model window (Mistral, Qwen2 sliding layers) keep
            it, full-attention layers of a hybrid model stay full.
        qkv_groups: 1 copies the weights exactly (same outputs as before). ``g > 1`` replaces
            Q/K/V by ``g`` block-diagonal groups (g times fewer projection weights): a
            *different* model, initialised from the diagonal blocks of the dense projections,
            to be fine-tuned. It saves as dense projections with zero off-diagonal blocks (the
            same function), which this call with the same ``g`` turns back into the exact blocks.
        backend: kernel backend, one of ``"auto"``, ``"triton"``, ``"cuda"``, ``"torch"``.

    DeepSpeed ZeRO-3: a model loaded partitioned (``from_pretrained`` under HF ``Trainer`` /
    ``HfDeepSpeedConfig`` with a stage-3 config) is patched layer by layer: each layer's
    projections are gathered (a collective: call it on every rank) and the new layer built with
    full parameters, which ``deepspeed.initialize`` partitions again (until then each rank holds
    the attention projections whole, about a third of a Llama layer's weights). Call it before
    ``deepspeed.initialize`` (before ``Trainer.train()``): afterwards it raises a ValueError.
    The attention-interface path
    (``attn_implementation="sft_sliding_window"``, :func:`register`) swaps no module and needs
    nothing at any time.

    Returns the model (modified in place). Also registers the ``sft_sliding_window`` backend
    (keeping the window registered for unpatched models) and sets it as the model's attention
    implementation, so the masks the model builds are the ones the patched layers read.
    """
    _transformers()
    from ...backends import BACKENDS

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"patch_model supports model types {_SUPPORTED_MODEL_TYPES}, got {model_type!r}; other models can use "
            "attn_implementation='sft_sliding_window' after register()"
        )
    if any(hasattr(m, "ds_id") for m in model.modules()):  # DeepSpeed's ZeRO-3 engine numbers the modules it hooks
        raise ValueError(
            "patch_model: the model is already wrapped by deepspeed.initialize (ZeRO-3 hooks are registered on its "
            "modules, and its optimizer holds their parameters); call patch_model before deepspeed.initialize (before "
            "Trainer.train()), or use attn_implementation='sft_sliding_window' after register(), which swaps no module"
        )
    if any(isinstance(m, SFTAttentionHF) for m in model.modules()):
        raise ValueError(
            "patch_model: the model is already patched (its attention modules are SFTAttentionHF); patch a freshly "
            "loaded model (a patched model saved with save_pretrained reloads as a plain one)"
        )
    if isinstance(qkv_groups, bool) or not isinstance(qkv_groups, int) or qkv_groups < 1:
        raise ValueError(f"patch_model: qkv_groups must be a positive int, got {qkv_groups!r}")
    if backend not in BACKENDS:
        raise ValueError(f"patch_model: backend must be one of {BACKENDS}, got {backend!r}")
    parse_window(window_size, True)
    targets = list(_attention_modules(model))
    if not targets:
        raise ValueError("patch_model: found no attention module with q_proj/k_proj/v_proj/o_proj in the model")
    # DeepSpeed ZeRO-3 (HF Trainer with a stage-3 config loads the model partitioned): from_hf_attention gathers
    # each layer's projections and returns full parameters, which deepspeed.initialize partitions
    # (DeepSpeedZeRoOffload converts every parameter created outside zero.Init: a broadcast from
    # rank 0, then each rank keeps its slice). Converting them here instead would fail inside
    # deepspeed.initialize: its stage-3 optimizer formats repr(module), and BlockDiagonalLinear's
    # extra_repr divides by weight.numel(), 0 for a partitioned weight
    has_window = model_has_window(config)
    for name, module in targets:
        window = hf_layer_window(module, config) if has_window else window_size
        sft = from_hf_attention(module, config, window_size=window, backend=backend)
        if qkv_groups > 1:
            sft = _regroup(sft, qkv_groups)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SFTAttentionHF(sft, config, getattr(module, "layer_idx", None), has_window))
    register(window_size=_settings["window_size"], backend=_settings["backend"],
             context_parallel_group=_settings["context_parallel_group"])
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def _regroup(dense: SFTAttention, g: int) -> SFTAttention:
    """A ``qkv_groups=g`` copy of a ``qkv_groups=1`` layer: block i keeps the rows of its heads
    and the columns of hidden slice i of the dense projection; o_proj and rotary are copied."""
    new = SFTAttention(
        dense.hidden_size, dense.num_heads, dense.num_kv_heads, dense.head_dim, window_size=dense.window_size,
        causal=dense.causal, qkv_groups=g, bias=dense.qkv_proj.bias is not None, rope_theta=dense.rope_theta,
        backend=dense.backend, out_bias=dense.o_proj.bias is not None, dtype=dense.o_proj.weight.dtype,
        device=dense.o_proj.weight.device,
    )
    new.scaling = dense.scaling
    new.inv_freq = dense.inv_freq.clone()
    new.rope_attention_scaling = dense.rope_attention_scaling
    d, hq, hkv = dense.head_dim, dense.num_heads, dense.num_kv_heads
    w = dense.qkv_proj.blocks()[0]  # (Hq D + 2 Hkv D, C)
    wq, wk, wv = w.split([hq * d, hkv * d, hkv * d], dim=0)
    bias = dense.qkv_proj.bias
    biases = dict(zip("qkv", bias.split([hq * d, hkv * d, hkv * d]))) if bias is not None else {p: None for p in "qkv"}
    flat, flat_bias = _flat_qkv(new, {"q": wq, "k": wk, "v": wv}, biases)
    with torch.no_grad():
        new.qkv_proj.weight.copy_(flat)
        if flat_bias is not None:
            new.qkv_proj.bias.copy_(flat_bias)
        new.o_proj.load_state_dict(dense.o_proj.state_dict())
    return new

