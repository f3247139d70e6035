"""Hugging Face transformers backend: ``attn_implementation="sft_sliding_window"``.

Two ways into an existing model, both without editing its code:

- :func:`register` adds the attention function through transformers' ``AttentionInterface``
  (and its mask function through ``AttentionMaskInterface`` where the installed version
  has one), after which ``from_pretrained(..., attn_implementation="sft_sliding_window")``
  or ``model.set_attn_implementation("sft_sliding_window")`` runs every attention layer on
  :func:`sft_kernels.sliding_window_attention`. Padding is handled by unpadding to a packed
  (varlen) batch; packed sequences in one row (``position_ids`` restarting, as
  ``DataCollatorWithFlattening`` makes them, or ``cu_seq_lens_q/k`` kwargs) are split.
- :func:`patch_model` swaps each Llama / Mistral / Qwen2 attention module for an
  :class:`~sft_kernels.modules.sft_attention.SFTAttention` copied exactly from it (and
  optionally ``qkv_groups=g`` block-diagonal projections), keeping the HF call signature.

Window. Where the model has a sliding window of its own (Mistral's ``config.sliding_window``;
Qwen2's ``sliding_attention`` layers when ``use_sliding_window``), that window is used on
exactly the layers where the model uses it, through the ``sliding_window`` kwarg the
attention modules pass. Elsewhere (Llama, Qwen2 without sliding window) the window given to
``register`` / ``patch_model`` is used (None = unbounded causal attention).

Window mapping, checked in transformers 5.24.0: ``masking_utils.sliding_window_overlay`` keeps
``kv_idx > q_idx - sliding_window``, so eager/SDPA attention with ``sliding_window=W`` sees
W keys including the query itself (keys ``i-W+1 .. i``); the flash-attention path agrees
(``window_size=(W-1, W-1)`` with ``causal``). 4.48-4.52 built the same eager mask
(``arange(L) <= cache_position - W`` masked out). This package's integer ``window_size=W``
means the same W keys, so HF ``sliding_window=W`` maps to ``window_size=W`` unchanged
(``(W-1, 0)`` as ``(left, right)``); the tests compare against eager with the same window.

Masks. transformers >= 4.53 builds masks through ``masking_utils``; for a name it does not
know it builds *no* mask (padding would be dropped), hence the registered mask function:
like FlashAttention-2's it returns the 2D ``(batch, kv_len)`` padding mask (sliced to the
key length), or None. transformers < 4.53 has no mask interface and hands custom backends a
4D ``(batch, 1, q_len, kv_len)`` float mask; the attention function reads padding from it
and checks that it never attends a pair the mask forbids (raising otherwise).

Minimum transformers version: 4.48 (``ALL_ATTENTION_FUNCTIONS``; ``AttentionInterface`` and
``AttentionMaskInterface`` are used where present). Tested with torch 2.14 on CPU, Llama /
Mistral / Qwen2 built from small configs, float32, against eager:

- 5.24.0: the test suite (tests/test_transformers_integration.py): logits and gradients,
  unpadded / right / left padding, packed rows, a cached decoding step, patch_model.
- 4.48.3 (installed aside, by hand): logits unpadded and padded, patch_model, a cached
  decoding step for Llama, Mistral and Qwen2 without sliding window, all within 3e-7.
  Qwen2 *with* ``use_sliding_window`` differs there by design: 4.48's eager ignores Qwen2's
  window (it warns "Sliding Window Attention is enabled but not implemented for `eager`"),
  this backend applies it on the sliding layers as the config asks.

Versions in between are covered by the same two code paths (4D masks before 4.53, the
mask interface from 4.53) but were not installed.

Not supported (a ValueError says so): attention dropout > 0 in training, logit soft-capping,
attention sinks. Like the flash-attention backends, ``output_attentions`` yields None.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn as nn

from ..modules.sft_attention import (
    SFTAttention,
    _check_contiguous,
    apply_rotary,
    hf_layer_window,
    padded_sliding_window_attention,
)
from ..ops.sliding_window_attention.op import sliding_window_attention
from ..window import WindowArg, parse_window

__all__ = [
    "ATTN_IMPLEMENTATION",
    "MIN_TRANSFORMERS_VERSION",
    "SFTAttentionHF",
    "patch_model",
    "register",
    "sft_attention_forward",
    "sft_attention_mask",
]

ATTN_IMPLEMENTATION = "sft_sliding_window"
MIN_TRANSFORMERS_VERSION = "4.48.0"
_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Set by register(): the window for models that have none of their own, and the backend.
_settings = {"window_size": None, "backend": "auto"}


# ----------------------------------------------------------------------------- version
def _version_tuple(v: str):
    parts = []
    for p in v.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def _transformers():
    """Import transformers and check the version; a clear error when missing or too old."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as exc:
        raise ImportError(
            f"sft_kernels.integrations.transformers needs transformers>={MIN_TRANSFORMERS_VERSION}: "
            f"pip install 'transformers>={MIN_TRANSFORMERS_VERSION}' ({exc})"
        ) from exc
    if _version_tuple(transformers.__version__) < _version_tuple(MIN_TRANSFORMERS_VERSION):
        raise ImportError(
            f"sft_kernels.integrations.transformers needs transformers>={MIN_TRANSFORMERS_VERSION} (the attention "
            f"function interface), found {transformers.__version__}; upgrade with "
            f"pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'"
        )
    return transformers


# ----------------------------------------------------------------------------- window / masks
def _layer_window(module, kwargs) -> WindowArg:
    """The window this layer uses: the model's own where it has one, else the registered one."""
    if kwargs.get("sliding_window") is not None:
        return int(kwargs["sliding_window"])
    config = getattr(module, "config", None)
    model_has_window = (
        config is not None
        and getattr(config, "sliding_window", None) is not None
        and getattr(config, "use_sliding_window", True) is not False
    )
    if model_has_window:
        if "sliding_window" in kwargs:  # the layer said None: a full-attention layer of a hybrid model
            return None
        return hf_layer_window(module, config)
    return _settings["window_size"]


def _valid_from_2d(mask: torch.Tensor, q_len: int, kv_len: int):
    mask = mask.to(torch.bool) if mask.dtype != torch.bool else mask
    if mask.shape[-1] > kv_len:  # longer than the keys (sliding caches): keep the last kv_len
        mask = mask[:, -kv_len:]
    elif mask.shape[-1] < kv_len:  # static cache slots not yet written: not keys
        mask = torch.nn.functional.pad(mask, (0, kv_len - mask.shape[-1]), value=False)
    if torch.compiler.is_compiling() or not bool(mask.all()):
        return mask[:, -q_len:], mask
    return None, None


def _band(q_len, kv_len, left, right, device):
    i = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    j = torch.arange(kv_len, device=device)[None, :]
    keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def _valid_from_4d(mask: torch.Tensor, q_len: int, kv_len: int, window_size, causal: bool):
    """Padding from a 4D mask (transformers < 4.53, or a user's), checked against our band.

    A real query attends itself (the diagonal), a real key is attended by some real
    query. Raises if the mask forbids a pair this backend would attend, or carries an
    additive bias, rather than silently computing something else.
    """
    if mask.dim() != 4 or mask.shape[-2] != q_len or mask.shape[-1] < kv_len:
        raise ValueError(
            f"sft_sliding_window: 4D attention_mask must be (batch, 1, {q_len}, >= {kv_len}), got {tuple(mask.shape)}"
        )
    # 4.x builds the 4D mask for a cache of target_length >= kv_len (dynamic caches: one
    # more column) and eager slices it [..., :kv_len]; so do we
    m = mask[:, 0, :, :kv_len]
    if m.dtype == torch.bool:
        allowed = m
    else:
        allowed = m > torch.finfo(m.dtype).min / 2
        if not torch.compiler.is_compiling() and bool((m[allowed] != 0).any()):
            raise ValueError("sft_sliding_window: the 4D attention_mask carries an additive bias; only masks are supported")
    off = kv_len - q_len
    q_valid = allowed[:, torch.arange(q_len), torch.arange(q_len) + off]
    k_valid = (allowed & q_valid[:, :, None]).any(1)
    if torch.compiler.is_compiling():
        return q_valid, k_valid
    spec = parse_window(window_size, causal)
    for b in range(m.shape[0]):
        left, right = spec.resolve(int(k_valid[b].sum()))
        ours = _band(q_len, kv_len, left, right, m.device) & q_valid[b][:, None] & k_valid[b][None, :]
        if bool((ours & ~allowed[b]).any()):
            raise ValueError(
                "sft_sliding_window: the 4D attention_mask forbids pairs that a causal sliding window "
                f"{window_size!r} with padding would attend (row {b}); custom 4D masks other than causal / "
                "sliding-window + padding are not supported by this backend"
            )
    if bool(q_valid.all()) and bool(k_valid.all()):
        return None, None
    return q_valid, k_valid


def _packed_from_position_ids(position_ids: torch.Tensor, batch: int, seqlen: int):
    """cu_seqlens over the flattened batch when rows hold several sequences, else None.

    A sequence starts at column 0 and wherever a position is not the previous one plus
    one -- the rule of transformers' ``find_packed_sequence_indices`` (eager/SDPA masks).
    """
    if position_ids is None or seqlen < 2 or torch.compiler.is_compiling():
        return None
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    if pos.shape[-1] != seqlen:
        return None
    pos = pos.expand(batch, seqlen)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if not bool(starts[:, 1:].any()):
        return None
    idx = torch.nonzero(starts.reshape(-1)).reshape(-1).to(torch.int32)
    total = torch.tensor([batch * seqlen], dtype=torch.int32, device=idx.device)
    cu = torch.cat([idx, total])
    return cu, int((cu[1:] - cu[:-1]).max())


def _attend(module, q, k, v, attention_mask, scaling, window, causal, kwargs):
    """q ``(batch, q_len, Hq, D)``, k/v ``(batch, kv_len, Hkv, D)`` -> ``(batch, q_len, Hq, D)``."""
    backend = _settings["backend"]
    b, q_len = q.shape[:2]
    kv_len = k.shape[1]
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            q_valid, k_valid = _valid_from_2d(attention_mask.to(q.device), q_len, kv_len)
        else:
            q_valid, k_valid = _valid_from_4d(attention_mask.to(q.device), q_len, kv_len, window, causal)
        if q_valid is not None:
            _check_contiguous("attention_mask", k_valid)
        return padded_sliding_window_attention(q, k, v, q_valid, k_valid, window, causal, scaling, backend)
    # no padding: maybe several sequences packed per row
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        max_q = int(max_q) if max_q is not None else None
        max_k = int(max_k) if max_k is not None else None
    elif q_len == kv_len and (packed := _packed_from_position_ids(kwargs.get("position_ids"), b, q_len)) is not None:
        cu_q = cu_k = packed[0]
        max_q = max_k = packed[1]
    else:
        return sliding_window_attention(q, k, v, window, causal, scaling, backend=backend)
    out = sliding_window_attention(
        q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]), window, causal,
        scaling, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, backend=backend,
    )
    return out.view(b, q_len, *out.shape[1:])


def _check_unsupported(module, dropout, kwargs):
    training = getattr(module, "training", False)
    if dropout and training:
        raise ValueError(
            f"sft_sliding_window: attention dropout {dropout} is not implemented by the sliding-window kernels; "
            "set config.attention_dropout = 0.0"
        )
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"sft_sliding_window: `{name}` is not supported; use attn_implementation='eager'")


# ----------------------------------------------------------------------------- interface functions
def sft_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
):
    """The ``AttentionInterface`` function.

    Args:
        module: the calling attention module (``config``, ``is_causal``, ``layer_idx`` read).
        query: ``(batch, heads_q, q_len, head_dim)``; key, value: ``(batch, heads_kv, kv_len, head_dim)``
            (rotary applied, cache included).
        attention_mask: what :func:`sft_attention_mask` produced (2D ``(batch, kv_len)`` bool
            padding mask or None), or a 4D mask on transformers < 4.53.
        scaling: softmax scale (default ``head_dim ** -0.5``).
        dropout: must be 0 in training.
        kwargs: ``sliding_window`` (W keys including self), ``is_causal``, ``position_ids``,
            ``cu_seq_lens_q/k`` + ``max_length_q/k`` (packed rows), others ignored.

    Returns:
        ``(attn_output (batch, q_len, heads_q, head_dim), None)``, as the HF layers expect.

    Packed rows (no padding mask, ``position_ids`` restarting) are split into their
    sequences whenever ``q_len == kv_len``, as flash-attention does. Eager/SDPA in 5.x split
    them only when the model runs without a KV cache, so compare with ``use_cache=False``.
    """
    _check_unsupported(module, dropout, kwargs)
    window = _layer_window(module, kwargs)
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = _attend(module, q, k, v, attention_mask, scaling, window, causal, kwargs)
    return out, None


def sft_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
):
    """The ``AttentionMaskInterface`` function: the 2D padding mask ``(batch, kv_length)``, or None.

    Causality and the window are applied by the attention function from the layer's
    ``is_causal`` / ``sliding_window``, as for FlashAttention-2; a mask made of other
    patterns (``or_mask_function`` image blocks, chunked attention) is not representable
    and such models should keep eager/SDPA.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:  # an already prepared mask: pass it on
        return attention_mask
    return attention_mask[:, -kv_length:] if attention_mask.shape[-1] > kv_length else attention_mask


def register(window_size: WindowArg = None, backend: str = "auto") -> str:
    """Register ``attn_implementation="sft_sliding_window"`` with transformers.

    Args:
        window_size: the window for models that have no sliding window of their own
            (Llama, Qwen2 without ``use_sliding_window``): an int ``W`` (W keys including
            self, like ``config.sliding_window``), ``"sqrt"`` (``floor(sqrt(L))`` keys per
            sequence of L tokens), ``(left, right)``, or None (unbounded causal attention).
            Models with their own window (Mistral, Qwen2 sliding layers) always keep it.
        backend: ``"auto"`` (Triton on CUDA tensors, PyTorch on CPU), ``"triton"``, ``"torch"``, ``"cuda"``.

    Returns:
        the name to pass as ``attn_implementation`` (``"sft_sliding_window"``).

    Calling it again replaces the settings for all models using the backend.
    """
    _transformers()
    parse_window(window_size, True)  # validate now, not inside a forward
    from ..backends import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"register: backend must be one of {BACKENDS}, got {backend!r}")
    _settings["window_size"] = window_size
    _settings["backend"] = backend
    try:
        from transformers import AttentionInterface  # >= 4.50
    except ImportError:
        AttentionInterface = None
    if AttentionInterface is not None:
        AttentionInterface.register(ATTN_IMPLEMENTATION, sft_attention_forward)
    else:  # 4.48 / 4.49: a plain dict
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] = sft_attention_forward
    try:
        from transformers.masking_utils import AttentionMaskInterface  # >= 4.53
    except ImportError:
        AttentionMaskInterface = None
    if AttentionMaskInterface is not None:
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sft_attention_mask)
    return ATTN_IMPLEMENTATION


# ----------------------------------------------------------------------------- patch_model
class SFTAttentionHF(nn.Module):
    """An :class:`SFTAttention` behind the call signature of a HF Llama/Mistral/Qwen2 attention.

    ``forward(hidden_states, position_embeddings, attention_mask, cache/past_key_values, **kwargs)
    -> (attn_output (batch, seqlen, hidden), None)``. The model's own rotary ``(cos, sin)``
    are used. Without a KV cache (training) the layer runs unpadded end to end; with a cache
    (generation) K/V go through ``cache.update`` and the backend's attention function.
    """

    def __init__(self, attn: SFTAttention, config, layer_idx: Optional[int]):
        super().__init__()
        self.attn = attn
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = attn.causal
        self.head_dim = attn.head_dim

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else kwargs.pop("past_key_value", None)
        _check_unsupported(self, 0.0, kwargs)
        attn = self.attn
        b, l, _ = hidden_states.shape
        if cache is None:
            mask2d = None
            if attention_mask is not None:
                if attention_mask.dim() == 2:
                    q_valid, _ = _valid_from_2d(attention_mask.to(hidden_states.device), l, l)
                else:
                    q_valid, _ = _valid_from_4d(attention_mask.to(hidden_states.device), l, l, attn.window_size,
                                                attn.causal)
                mask2d = q_valid
            if mask2d is None and kwargs.get("position_ids") is not None:
                if _packed_from_position_ids(kwargs["position_ids"], b, l) is not None:
                    raise ValueError(
                        "SFTAttentionHF: packed sequences (position_ids restarting within a row) need the attention "
                        "interface path: use attn_implementation='sft_sliding_window' without patch_model"
                    )
            return attn(hidden_states, attention_mask=mask2d, position_embeddings=position_embeddings), None
        # generation with a KV cache: padded layout
        q, k, v = attn._split_qkv(attn.qkv_proj(hidden_states))
        if position_embeddings is not None:
            cos, sin = position_embeddings
        else:
            from ..modules.sft_attention import rope_cos_sin

            pos = kwargs.get("position_ids")
            if pos is None:
                raise ValueError("SFTAttentionHF: needs position_embeddings or position_ids")
            cos, sin = rope_cos_sin(pos.expand(b, l), attn.inv_freq, hidden_states.dtype, attn.rope_attention_scaling)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)
        transformers = _transformers()
        if _version_tuple(transformers.__version__) >= (5, 0, 0):
            kt, vt = cache.update(kt, vt, self.layer_idx, kwargs=kwargs)
        else:
            cache_kwargs = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
            kt, vt = cache.update(kt, vt, self.layer_idx, cache_kwargs)
        out = _attend(self, q, kt.transpose(1, 2), vt.transpose(1, 2), attention_mask, attn.scaling, attn.window_size,
                      attn.causal, kwargs)
        return attn.o_proj(out.reshape(b, l, -1)), None


def _attention_modules(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, SFTAttentionHF):
            continue
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
        model: a ``*ForCausalLM`` / ``*Model`` of model type llama, mistral or qwen2.
        window_size: window for layers where the model has none of its own (see
            :func:`register`); layers with a model window (Mistral, Qwen2 sliding layers) keep it.
        qkv_groups: 1 copies the weights exactly (same outputs as before). ``g > 1`` replaces
            Q/K/V by ``g`` block-diagonal groups (g times fewer projection weights): a
            *different* model, initialised from the diagonal blocks of the dense
            projections, to be fine-tuned.
        backend: kernel backend.

    Returns the model (modified in place). Also registers the ``sft_sliding_window``
    backend and sets it as the model's attention implementation, so the masks the model
    builds are the 2D padding masks the patched layers read.
    """
    _transformers()
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"patch_model supports model types {_SUPPORTED_MODEL_TYPES}, got {model_type!r}; other models can use "
            "attn_implementation='sft_sliding_window' after register()"
        )
    if isinstance(qkv_groups, bool) or not isinstance(qkv_groups, int) or qkv_groups < 1:
        raise ValueError(f"patch_model: qkv_groups must be a positive int, got {qkv_groups!r}")
    parse_window(window_size, True)
    targets = list(_attention_modules(model))
    if not targets:
        raise ValueError("patch_model: found no attention module with q_proj/k_proj/v_proj/o_proj in the model")
    for name, module in targets:
        window = hf_layer_window(module, config)
        if window is None and not (getattr(config, "sliding_window", None) is not None
                                   and getattr(config, "use_sliding_window", True) is not False):
            window = window_size  # the model has no window of its own
        sft = SFTAttention.from_hf(module, config, window_size=window, backend=backend)
        if qkv_groups > 1:
            sft = _regroup(sft, qkv_groups)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SFTAttentionHF(sft, config, getattr(module, "layer_idx", None)))
    register(window_size=_settings["window_size"], backend=_settings["backend"])
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:  # older versions: the config attribute
        model.config._attn_implementation = ATTN_IMPLEMENTATION
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
    bias = dense.qkv_proj.bias
    wq, wk, wv = w.split([hq * d, hkv * d, hkv * d], dim=0)
    cin = dense.hidden_size // g
    blocks, biases = [], []
    for i in range(g):
        rows = []
        for part, heads in ((wq, hq), (wk, hkv), (wv, hkv)):
            per = heads // g * d
            rows.append(part[i * per:(i + 1) * per, i * cin:(i + 1) * cin])
        blocks.append(torch.cat(rows, 0).reshape(-1))
        if bias is not None:
            bq, bk, bv = bias.split([hq * d, hkv * d, hkv * d])
            biases.append(torch.cat([bq[i * (hq // g) * d:(i + 1) * (hq // g) * d],
                                     bk[i * (hkv // g) * d:(i + 1) * (hkv // g) * d],
                                     bv[i * (hkv // g) * d:(i + 1) * (hkv // g) * d]]))
    with torch.no_grad():
        new.qkv_proj.weight.copy_(torch.cat(blocks))
        if bias is not None:
            new.qkv_proj.bias.copy_(torch.cat(biases))
        new.o_proj.load_state_dict(dense.o_proj.state_dict())
    return new
