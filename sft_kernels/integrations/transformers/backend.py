"""The attention function transformers calls for ``attn_implementation="sft_sliding_window"``,
the checks of what it refuses, and :func:`register`.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn as nn

from ...backends import BACKENDS, auto_backend
from ...modules.sft_attention import autocast_qkv
from ...ops.sliding_window_attention.op import sliding_window_attention
from ...window import WindowArg, parse_window
from .convert import hf_layer_window, layer_window_size, model_has_window
from .context_parallel import _check_context_parallel_group, _context_parallel_attend, set_context_parallel_exchange
from .masks import (_check_one_block, _combine_windows, _from_4d, _is_segments, _packed_attention,
                    _pad_queries_see_real_keys, _segments, _segments_attention, sft_attention_mask)
from .settings import ATTN_IMPLEMENTATION, _settings, _transformers


# ----------------------------------------------------------------------------- the attention call
def _layer_window(module, kwargs, causal: bool):
    """(window, causal-as-passed) for this layer: the model's own where it has one, else the
    registered one."""
    if "sliding_window" in kwargs:  # None: the layer said full attention
        w = kwargs["sliding_window"]
        return layer_window_size(None if w is None else int(w), causal), True
    config = getattr(module, "config", None)
    if model_has_window(config):
        return layer_window_size(hf_layer_window(module, config), causal), True
    return _settings["window_size"], False


def _backend(device: torch.device, backend: Optional[str] = None) -> str:
    backend = _settings["backend"] if backend is None else backend
    if backend == "auto":  # the op's rule (backends.auto_backend), resolved for CUDA in register()
        return _settings["cuda_backend"] if device.type == "cuda" else auto_backend(device.type)
    return backend


def _attend(module, q, k, v, attention_mask, scaling, window, causal, kwargs, model_window=True, backend=None,
            **mods):
    """q ``(batch, q_len, Hq, D)``, k/v ``(batch, kv_len, Hkv, D)`` -> ``(batch, q_len, Hq, D)``.

    ``window``/``causal``: the layer's; ``model_window``: whether that window is the model's own
    (a 4D mask then replaces it) or the registered one (applied within a 4D mask). ``mods``:
    ``softcap`` / ``sinks`` for :func:`sliding_window_attention`."""
    backend = _backend(q.device, backend)
    q, k, v = autocast_qkv(q, k, v)
    if _settings["context_parallel_group"] is not None:
        return _context_parallel_attend(q, k, v, attention_mask, scaling, window, causal, kwargs, backend, mods,
                                        _attend)
    b, q_len = q.shape[:2]
    kv_len = k.shape[1]
    if attention_mask is not None:
        if _is_segments(attention_mask):
            seg = attention_mask.to(q.device)
            if seg.shape[1] != b:
                raise ValueError(f"sft_sliding_window: the mask is for batch {seg.shape[1]}, the inputs have {b}")
        elif attention_mask.dim() == 4:
            seg, (left, right) = _from_4d(attention_mask.to(q.device), q_len, kv_len)
            if model_window or window is None:
                window, causal = (left, right), False
            else:
                window, causal = _combine_windows(left, right, window, causal)
        elif attention_mask.dim() == 2:  # a direct call: keys are the last kv_len positions, queries the last q_len
            if attention_mask.shape[-1] < kv_len:
                raise ValueError(f"sft_sliding_window: a 2D attention_mask needs >= {kv_len} columns (the keys), got "
                                 f"{attention_mask.shape[-1]}")
            k_valid = attention_mask[:, -kv_len:].to(device=q.device, dtype=torch.bool)
            _check_one_block("attention_mask", k_valid)
            seg = _segments(k_valid[:, -q_len:], k_valid)
        else:
            raise ValueError(f"sft_sliding_window: attention_mask must be 2D or 4D, got {tuple(attention_mask.shape)}")
        if attention_mask.dim() != 4 and not causal and parse_window(window, causal).is_full:
            seg = _pad_queries_see_real_keys(seg)
        return _segments_attention(q, k, v, seg, window, causal, scaling, backend, **mods)
    # no padding: maybe several sequences packed per row
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        if torch.compiler.is_compiling():  # upper bounds: no host read
            max_q = max_q if isinstance(max_q, int) else q_len * b
            max_k = max_k if isinstance(max_k, int) else kv_len * b
        else:
            max_q = int(max_q) if max_q is not None else None
            max_k = int(max_k) if max_k is not None else None
        out = sliding_window_attention(
            q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]), window_size=window, causal=causal,
            softmax_scale=scaling, cu_seqlens_q=cu_q.to(torch.int32), cu_seqlens_k=cu_k.to(torch.int32), max_seqlen_q=max_q,
            max_seqlen_k=max_k, backend=backend, **mods,
        )
        return out.view(b, q_len, *out.shape[1:])
    if q_len == kv_len and kwargs.get("position_ids") is not None:
        out = _packed_attention(q, k, v, kwargs["position_ids"].to(q.device), window, causal, scaling, backend, **mods)
        if out is not None:
            return out
    return sliding_window_attention(q, k, v, window_size=window, causal=causal, softmax_scale=scaling, backend=backend, **mods)




def _score_modifiers(kwargs) -> dict:
    """Gemma2's ``softcap`` (its ``attn_logit_softcapping``) and GPT-OSS's ``s_aux`` (the layer's
    sinks parameter), as the op's ``softcap`` / ``sinks``; only those given."""
    mods = {}
    if kwargs.get("softcap"):
        mods["softcap"] = float(kwargs["softcap"])
    if kwargs.get("s_aux") is not None:
        mods["sinks"] = kwargs["s_aux"]
    return mods


def _attentions_requested(kwargs) -> bool:
    """Whether the model collects attention weights (``output_attentions=True``): transformers 5
    records them with hooks on the attention modules, listed in its (compile-safe) collector."""
    if kwargs.get("output_attentions"):  # transformers 5.0 - 5.x pass it down to the layers
        return True
    collector = _settings["collector"]
    if collector is None:
        return False
    collected = collector.get()
    return isinstance(collected, dict) and "attentions" in collected


def _dropout_source(module, dropout: float):
    """``(layer attribute, config fields)`` that the layer's ``dropout`` came from, either may be
    None / empty: the attribute of the built layer holding the value (``attention_dropout``,
    ``dropout``, ``dropout.p``, ``attn_dropout.p``, ...) and the config fields equal to it, those
    named like attention dropout first (BERT's ``hidden_dropout_prob`` often has the same value)."""
    def close(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and abs(float(x) - dropout) < 1e-12

    attr = None
    for name in ("attention_dropout", "attn_dropout", "dropout", "attn_pdrop", "attention_probs_dropout_prob"):
        value = getattr(module, name, None)
        if close(value):
            attr = name
        elif isinstance(value, nn.Dropout) and close(value.p):
            attr = f"{name}.p"
        if attr is not None:
            break
    config = getattr(module, "config", None)
    try:
        fields = config.to_dict() if config is not None else {}
    except Exception:  # a config that cannot serialise itself: no hint from it
        fields = {}
    matches = [k for k, v in fields.items() if "drop" in k and close(v)]
    attention = [k for k in matches if "att" in k]
    return attr, attention or matches


def _check_unsupported(module, dropout, kwargs):
    training = getattr(module, "training", False)
    if dropout and training:
        attr, fields = _dropout_source(module, float(dropout))
        where = f"{type(module).__name__}.{attr}" if attr else f"the {type(module).__name__} layers"
        if fields:
            field = fields[0]
            origin = " or ".join(f"config.{f}" for f in fields)
            advice = (f"build or load the model with {field}=0.0 (from_pretrained(..., {field}=0.0), or set "
                      f"config.{field} = 0.0 before building it: built layers keep their value)")
        else:
            origin = "a config field of this model"
            advice = ("build or load the model with its attention dropout field at 0.0 (attention_dropout for Llama / "
                      "Mistral / Qwen2, attention_probs_dropout_prob for BERT / RoBERTa, attn_pdrop for GPT-2)")
        fix_built = f"; on a built model set {where} = 0.0 on every attention layer" if attr else ""
        raise ValueError(
            f"sft_sliding_window: attention dropout {dropout} in training ({where}, from {origin}) is not implemented "
            f"by the sliding-window kernels; {advice}{fix_built}, or use attn_implementation='sdpa' / 'eager' for "
            "training with attention dropout"
        )
    if _attentions_requested(kwargs):
        raise ValueError(
            "sft_sliding_window: output_attentions=True needs the attention weights, which the sliding-window kernels "
            "never form; run that call with attn_implementation='eager' (model.set_attn_implementation('eager'))"
        )



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
        attention_mask: what :func:`sft_attention_mask` produced (None or its segment table);
            a 4D ``(batch, 1, q_len, >= kv_len)`` mask (followed as given, see the module
            docstring); or, calling directly, a 2D ``(batch, >= kv_len)`` padding mask whose last
            kv_len columns are the keys and last q_len the queries.
        scaling: softmax scale (default ``head_dim ** -0.5``).
        dropout: must be 0 in training.
        kwargs: ``sliding_window`` (W keys including self), ``is_causal``, ``position_ids``,
            ``cu_seq_lens_q/k`` + ``max_length_q/k`` (packed rows), ``sft_padding_mask`` (a 2D
            padding mask over the whole sequence that :func:`sft_kernels.parallel.alst.register_alst`
            passes where ALST dropped ``attention_mask``), others ignored.

    Returns:
        ``(attn_output (batch, q_len, heads_q, head_dim), None)``, as the HF layers expect.
    """
    _check_unsupported(module, dropout, kwargs)
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    config = getattr(module, "config", None)
    if not causal and getattr(config, "model_type", None) == "gemma2":
        # its layers say bidirectional (is_causal=False) while transformers builds causal masks
        # for it, which eager follows: no answer to match
        raise ValueError(
            "sft_sliding_window: Gemma2 with use_bidirectional_attention=True is ambiguous in transformers (its "
            "attention layers are bidirectional, the masks it builds causal; eager follows the masks); use "
            "attn_implementation='eager'"
        )
    window, model_window = _layer_window(module, kwargs, causal)
    alst_padding = kwargs.pop("sft_padding_mask", None)
    if attention_mask is None and alst_padding is not None:
        # under ALST (sft_kernels.parallel.alst): DeepSpeed's wrapper drops every mask, register_alst
        # hands the whole sequence's 2D padding mask here instead (the 2D path below)
        attention_mask = alst_padding
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = _attend(module, q, k, v, attention_mask, scaling, window, causal, kwargs, model_window,
                  **_score_modifiers(kwargs))
    return out, None



def register(window_size: WindowArg = None, backend: str = "auto", context_parallel_group=None,
             context_parallel_packed: bool = False, context_parallel_exchange: str = "auto") -> str:
    """Register ``attn_implementation="sft_sliding_window"`` with transformers.

    Args:
        window_size: the window for models that have no sliding window of their own
            (Llama, Qwen2 without ``use_sliding_window``): an int ``W`` (W keys including
            self, like ``config.sliding_window``), ``"sqrt"`` (``floor(sqrt(L))`` keys per
            sequence of L tokens), ``(left, right)``, or None (unbounded causal attention).
            Models with their own window (Mistral, Qwen2 sliding layers) always keep it, and
            their full-attention layers stay full.
        backend: ``"auto"`` (Triton on CUDA tensors, PyTorch on CPU), ``"triton"``, ``"torch"``, ``"cuda"``.
        context_parallel_group: a ``torch.distributed`` process group of ``P`` ranks (None: off).
            Every rank of it runs the model on its own shard: ``input_ids (batch, L/P)`` holding
            the tokens ``[r L/P, (r+1) L/P)`` of the sequence (rank order = sequence order),
            ``position_ids`` their **global** positions ``r L/P + j``, and the
            ``attention_mask`` slice (right padding over the whole sequence only). Each
            attention layer then runs :func:`sft_kernels.context_parallel_attention` (halo
            exchange; the window resolved from the global length) and every rank gets its
            shard's outputs of the whole-sequence model, forward and backward; gradients of
            the parameters are the sum over the group. Refused with a ValueError on every rank:
            packed rows (unless context_parallel_packed), a KV cache (generation), position_ids
            that are not the global ones, padding other than right padding, softcap / sinks,
            two-sided windows with padding.
            :func:`context_parallel` sets it for a block only.
        context_parallel_packed: with ``context_parallel_group``, rows are packed
            (``DataCollatorWithFlattening``): each rank feeds its block of every row with the
            row's own position_ids (restarting at 0 at each sequence, not global positions), no
            attention_mask; a sequence crossing a shard boundary exchanges only its own keys,
            windows resolved per sequence. Causal layers only.
        context_parallel_exchange: with ``context_parallel_group``, how each layer exchanges:
            ``"auto"`` (per layer, the halo or DeepSpeed's Ulysses all-to-all, whichever sends
            fewer bytes per rank: :mod:`sft_kernels.parallel.hybrid`; a hybrid model's
            full-attention layers take Ulysses once ``P`` is large enough), ``"halo"`` or
            ``"ulysses"`` (every layer; Ulysses where the head counts allow).

    Returns:
        the name to pass as ``attn_implementation`` (``"sft_sliding_window"``).

    Padding: outputs at pad positions are exactly zero (as with FlashAttention-2), except on
    bidirectional layers with an unbounded window (BERT-style encoders), where a pad query
    attends its row's real keys and equals eager's output; models whose head reads a pad
    position (a left-padded classifier's CLS token) thus give eager's answer. Attention
    dropout in training is refused, naming the config field to set to 0.0. DeepSpeed ZeRO-3
    partitioned models need nothing more (no parameter is touched).

    Calling it again replaces the settings for all models using the backend.
    """
    _transformers()
    parse_window(window_size, True)  # validate now, not inside a forward

    if backend not in BACKENDS:
        raise ValueError(f"register: backend must be one of {BACKENDS}, got {backend!r}")
    _settings["context_parallel_group"] = _check_context_parallel_group(context_parallel_group)
    _settings["context_parallel_packed"] = bool(context_parallel_packed)
    set_context_parallel_exchange(context_parallel_exchange)
    _settings["window_size"] = window_size
    _settings["backend"] = backend
    _settings["cuda_backend"] = auto_backend("cuda")
    try:  # where transformers lists the outputs being recorded (imported here: not importable while compiling)
        from transformers.utils.output_capturing import _active_collector as collector
    except ImportError:  # transformers < 5.x records them otherwise, and passes output_attentions down
        collector = None
    _settings["collector"] = collector
    from transformers.cache_utils import Cache

    _settings["cache_kwargs_dict"] = "cache_kwargs" in inspect.signature(Cache.update).parameters
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, sft_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sft_attention_mask)
    return ATTN_IMPLEMENTATION


