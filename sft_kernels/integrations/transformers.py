"""Hugging Face transformers backend: ``attn_implementation="sft_sliding_window"``.

Two ways into an existing model, both without editing its code:

- :func:`register` adds the attention function through transformers' ``AttentionInterface``
  and its mask function through ``AttentionMaskInterface``, after which
  ``from_pretrained(..., attn_implementation="sft_sliding_window")`` or
  ``model.set_attn_implementation("sft_sliding_window")`` runs every attention layer on
  :func:`sft_kernels.sliding_window_attention`.
- :func:`patch_model` swaps each Llama / Mistral / Qwen2 attention module for an
  :class:`SFTAttentionHF` (an :class:`~sft_kernels.modules.sft_attention.SFTAttention` copied
  exactly from it, optionally with ``qkv_groups=g`` block-diagonal projections), keeping the
  HF call signature; ``save_pretrained`` still writes the model's own key names.

Supported: transformers >= 5.0 (``MIN_TRANSFORMERS_VERSION``;
``scripts/check_transformers_versions.sh`` runs the HF tests under it), torch >= 2.4. The rule everywhere is "eager's
answer or a clear error"; ``tests/test_hf_matrix.py`` checks it against
``attn_implementation="eager"`` for Llama, Mistral, Qwen2 (hybrid), Qwen3, Gemma2, Gemma3,
Cohere2, Phi3 and Starcoder2.

Window. Where the model has a window of its own, that window is used on exactly the layers
where the model uses it: the attention modules pass ``sliding_window`` (None on a
full-attention layer of a hybrid model). transformers' eager mask keeps
``kv_idx > q_idx - sliding_window`` (``masking_utils.sliding_window_overlay``): W keys
including the query itself, which is this package's integer ``window_size=W``, i.e.
``(W-1, 0)`` as ``(left, right)``. A bidirectional layer (Gemma3
``use_bidirectional_attention``) sees ``|q - k| < W``: ``(W-1, W-1)``, as in transformers'
flash-attention path. Layers of a model without a window (Llama) use the window given to
:func:`register` / :func:`patch_model` (None = plain causal attention) -- by design not
eager's answer, since that window is what the user asked for.

Masks and caches. For this backend transformers calls :func:`sft_attention_mask` once per
forward and mask type; it returns None (nothing to mask) or a small int32 *segment table*
``(2, batch, 5)`` instead of an O(L^2) mask. It is built from the 2D padding mask and the
cache geometry transformers hands over (``q_offset`` / ``kv_offset`` / ``kv_length``): key
slot ``j`` holds position ``kv_offset + j``, a key is real when its position is not padding
and not after the last query (static caches keep unwritten slots), a query is real when its
own position is not padding. Each row's real queries and real keys must be one contiguous
block (left or right padding). The attention function then runs one packed (varlen) call in
which every row is five sequences: its left-pad queries (no keys), its left-pad keys (no
queries), the real queries against the real keys (bottom-right aligned), and the right pads
likewise. Pad queries see no key, so their outputs and gradients are exactly zero (as
transformers' FlashAttention-2 path gives them) -- except on bidirectional layers with an
unbounded window (BERT, RoBERTa and other encoders), where eager masks keys only and a pad
query attends its row's real keys: there every query of a row is one sequence against the row's
real keys, so pad positions equal eager's too (a left-padded BERT classifier reads its CLS
token at a pad position; its logits differed from eager's by about 1e-2 with zero pad rows). Pad
positions of causal and windowed bidirectional layers stay zero, where eager gives values no
loss should read (a left pad sees only pad keys), and a row with no real token is zero where
eager averages its pad values. The shapes are static and nothing reads a tensor on the host, so
``torch.compile(fullgraph=True)`` traces it, and nothing here keeps CUDA graphs from capturing
it (not yet run on a GPU). This covers dynamic caches, dynamic sliding-window caches,
``StaticCache`` (full, sliding-window and hybrid layers), prefill and decode.

A 4D mask (one the user passes; transformers hands it through unchanged) is followed as
given: it must be a causal / sliding-window band (any width) with padding, which is read
off the mask and checked pair by pair; anything else (or any 4D mask under
``torch.compile``, where it cannot be checked) raises, naming eager/SDPA. On a layer without
a model window a window given to :func:`register` is applied within the mask.

Packed rows (several sequences per row, ``position_ids`` restarting, as
``DataCollatorWithFlattening`` makes them; or ``cu_seq_lens_q/k`` kwargs) are split, as the
flash-attention backends do, also under ``torch.compile`` (a small custom op derives the
boundaries; its output length is data-dependent, so it syncs once per layer). With a
padding mask transformers does not look for packed rows, and neither does this backend.

Mixed precision. Under ``torch.autocast`` q, k and v are cast to the autocast dtype before
the kernels, as eager's matmuls and SDPA are (rotary embeddings promote q, k to float32
while v stays bf16); gradients flow back through the casts.

Score modifiers. Gemma2's logit soft-capping (the ``softcap`` its layers pass, from
``attn_logit_softcapping``) and GPT-OSS's attention sinks (``s_aux``, each layer's ``sinks``
parameter, trained through the kernels' gradient) go to the op's ``softcap`` / ``sinks``,
on sliding and full-attention layers alike.

Context parallelism. ``register(context_parallel_group=group)`` (or the
:func:`context_parallel` block) runs every layer through
:func:`sft_kernels.context_parallel_attention`: each rank of the group feeds its block of
consecutive tokens with their global position_ids and its slice of a right-padded mask; the mask
function then returns that slice and each layer checks shapes, positions and padding across the
group (two small all-gathers, the first of fixed size so that a rank with another batch or
length gets the ValueError, not an abort) before the halo exchange. No caches, packing, 4D masks, softcap / sinks or
torch.compile there (ValueErrors on every rank of the group).

ZeRO-3. The attention function touches no parameter, so ``attn_implementation="sft_sliding_window"``
works unchanged on a model whose parameters DeepSpeed ZeRO-3 partitions (HF ``Trainer`` with a
stage-3 config). :func:`patch_model` swaps modules and copies weights: on a partitioned model it
gathers each layer's projections and builds the new layer, whose parameters
``deepspeed.initialize`` partitions again (see there); it must run before ``deepspeed.initialize``
(before ``Trainer.train()``).

Not supported (a ValueError names what to use instead): attention dropout > 0 in training
(the message names the field the model reads it from: ``attention_dropout``,
``attention_probs_dropout_prob``, ``attn_pdrop``, ...), ``output_attentions=True`` (the kernels never form the attention
matrix), 4D masks that are not a band with padding, padding with holes, Gemma2 with
``use_bidirectional_attention`` (transformers' layers and masks disagree there).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules.sft_attention import (
    SFTAttention,
    apply_rotary,
    autocast_qkv,
    hf_layer_window,
    rope_cos_sin,
)
from ..ops.sliding_window_attention.op import sliding_window_attention
from ..window import MODE_KEYS, MODE_SQRT, WindowArg, parse_window

__all__ = [
    "ATTN_IMPLEMENTATION",
    "MIN_TRANSFORMERS_VERSION",
    "SFTAttentionHF",
    "context_parallel",
    "patch_model",
    "register",
    "sft_attention_forward",
    "sft_attention_mask",
]

ATTN_IMPLEMENTATION = "sft_sliding_window"
MIN_TRANSFORMERS_VERSION = "5.0.0"
_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Set by register(): the window for models that have none of their own, and the backend.
# "auto" is resolved here, once, rather than inside every (possibly compiled) call.
_settings = {"window_size": None, "backend": "auto", "cuda_backend": "torch", "collector": None,
             "cache_kwargs_dict": False, "context_parallel_group": None}

# Sequences per row in the segment table: left-pad queries, left-pad keys, real, right-pad
# queries, right-pad keys.
_SEGMENTS = 5


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
            f"sft_kernels.integrations.transformers needs transformers>={MIN_TRANSFORMERS_VERSION} (its attention "
            f"and mask interfaces and cache layers), found {transformers.__version__}; upgrade with "
            f"pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'"
        )
    return transformers


# ----------------------------------------------------------------------------- the segment table
def _is_segments(mask) -> bool:
    return (isinstance(mask, torch.Tensor) and mask.dim() == 3 and mask.dtype == torch.int32
            and mask.shape[0] == 2 and mask.shape[2] == _SEGMENTS)


def _check_one_block(name: str, valid: torch.Tensor) -> None:
    """Each row's True entries must form one block (left or right padding, no holes)."""
    if valid.shape[1] < 2:
        return
    v = valid.to(torch.int8)
    blocks = (v[:, 1:] - v[:, :-1] == 1).sum(1) + v[:, 0]
    if torch.compiler.is_compiling():
        # no host read while compiling: a device-side assert instead of a silent wrong answer
        torch._assert_async((blocks <= 1).all(), f"sft_sliding_window: {name} has padding between tokens")
        return
    if bool((blocks > 1).any()):
        row = int((blocks > 1).nonzero()[0, 0])
        raise ValueError(
            f"sft_sliding_window: {name} row {row} has padding between tokens; only left or right padding (one "
            "block of tokens per row) is supported, since the window counts positions; use attn_implementation="
            "'sdpa' or 'eager' for such masks"
        )


def _segments(q_valid: torch.Tensor, k_valid: torch.Tensor) -> torch.Tensor:
    """``(2, batch, 5)`` int32 lengths: row b's queries ``[left pads, 0, real, right pads, 0]``
    and keys ``[0, left pads, real, 0, right pads]`` (one block of real tokens per row)."""

    def parts(valid):
        n = valid.sum(1)
        first = torch.where(n > 0, valid.to(torch.int32).argmax(1), torch.zeros_like(n))
        return first, n, valid.shape[1] - first - n

    qa, qn, qb = parts(q_valid)
    ka, kn, kb = parts(k_valid)
    z = torch.zeros_like(qn)
    q = torch.stack([qa, z, qn, qb, z], 1)
    k = torch.stack([z, ka, kn, z, kb], 1)
    return torch.stack([q, k]).to(torch.int32)


def _pad_queries_see_real_keys(seg: torch.Tensor) -> torch.Tensor:
    """The segment table of a bidirectional layer with an unbounded window, as eager computes it:
    every query of a row (its pad queries too) attends the row's real keys, so the row's queries
    become one sequence ``[0, 0, all, 0, 0]`` against the keys' ``[0, left pads, real, 0, right pads]``.
    (Eager masks only keys there: a left-padded BERT classifier reads its CLS token at a pad
    position.) A row without real keys stays zero, where eager averages the pad values."""
    q = seg[0]
    all_q = q.sum(1, keepdim=True)
    z = torch.zeros_like(all_q)
    return torch.stack([torch.cat([z, z, all_q, z, z], 1), seg[1]])


def _segments_attention(q, k, v, seg, window, causal, scaling, backend, **mods):
    """q ``(B, Lq, Hq, D)``, k/v ``(B, Lk, Hkv, D)`` through one packed call over the segments."""
    b, lq = q.shape[:2]
    lk = k.shape[1]
    cu = F.pad(seg.reshape(2, -1).cumsum(1, dtype=torch.int32), (1, 0))
    out = sliding_window_attention(
        q.reshape(b * lq, *q.shape[2:]), k.reshape(b * lk, *k.shape[2:]), v.reshape(b * lk, *v.shape[2:]),
        window, causal, scaling, cu_seqlens_q=cu[0], cu_seqlens_k=cu[1], max_seqlen_q=lq, max_seqlen_k=lk,
        backend=backend, **mods,
    )
    return out.view(b, lq, *out.shape[1:])


# ----------------------------------------------------------------------------- packed rows
@torch.library.custom_op("sft_kernels::packed_cu_seqlens", mutates_args=())
def _packed_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 cu_seqlens over the flattened ``(batch, seqlen)`` position_ids: a sequence starts at
    column 0 and wherever a position is not the previous one plus one -- the rule of
    transformers' ``find_packed_sequence_indices``."""
    b, l = position_ids.shape
    starts = torch.ones(b, l, dtype=torch.bool, device=position_ids.device)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    idx = torch.nonzero(starts.reshape(-1)).reshape(-1).to(torch.int32)
    return torch.cat([idx, idx.new_full((1,), b * l)])


@_packed_cu_seqlens.register_fake
def _(position_ids):
    n = torch.library.get_ctx().new_dynamic_size(min=2)
    return position_ids.new_empty((n,), dtype=torch.int32)


def _packed_attention(q, k, v, position_ids, window, causal, scaling, backend, **mods):
    """Rows holding several sequences (position_ids restarting): one packed call, or None when
    (eagerly checked) no row restarts. Under torch.compile the split is always made."""
    b, l = q.shape[:2]
    pos = position_ids.reshape(-1, position_ids.shape[-1])
    if pos.shape[-1] != l or pos.shape[0] not in (1, b) or l < 2:
        return None
    pos = pos.expand(b, l)
    compiling = torch.compiler.is_compiling()
    if not compiling and not bool((pos[:, 1:] != pos[:, :-1] + 1).any()):
        return None
    cu = _packed_cu_seqlens(pos.contiguous())
    torch._check(cu.numel() >= 2)
    torch._check(cu.numel() <= b * l + 1)
    max_len = l if compiling else int((cu[1:] - cu[:-1]).max())
    out = sliding_window_attention(
        q.reshape(b * l, *q.shape[2:]), k.reshape(b * l, *k.shape[2:]), v.reshape(b * l, *v.shape[2:]), window,
        causal, scaling, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
        backend=backend, **mods,
    )
    return out.view(b, l, *out.shape[1:])


# ----------------------------------------------------------------------------- 4D masks
def _combine_windows(left: int, right: int, registered: WindowArg, causal: bool):
    """A mask's band ``(left, right)`` (-1 = the whole row) narrowed by a registered window."""
    spec = parse_window(registered, causal)
    if spec.mode == MODE_SQRT:  # "sqrt": depends on each sequence's length, so only on an unbounded band
        if left == -1 and right in (-1, 0):
            return registered, right == 0
        raise ValueError(
            'sft_sliding_window: window_size="sqrt" given to register() cannot be combined with a 4D attention_mask '
            "that already limits the window; pass a 2D padding mask, or an int window"
        )
    rl, rr = spec.resolve(1 << 30) if spec.mode == MODE_KEYS else (spec.left, spec.right)

    def narrower(a, b):
        return b if a < 0 else a if b < 0 else min(a, b)

    return (narrower(left, rl), narrower(right, rr)), False


def _from_4d(mask: torch.Tensor, q_len: int, kv_len: int):
    """A 4D mask ``(batch, 1, q_len, >= kv_len)`` -> (segment table, (left, right)), or ValueError.

    The mask must be what a sliding-window band with padding would give: each query row an
    interval of keys, the real queries one block bottom-right aligned with the real keys, one
    ``(left, right)`` band for all rows. The band is read off the mask, then the whole mask is
    compared with it pair by pair. Rows that see no key give zero outputs.
    """
    name = "sft_sliding_window"
    if torch.compiler.is_compiling():
        raise ValueError(
            f"{name}: a 4D attention_mask cannot be checked under torch.compile; pass the 2D padding mask (the "
            "model then builds this backend's own mask), or use attn_implementation='sdpa' for custom 4D masks"
        )
    if mask.dim() != 4 or mask.shape[-2] != q_len or mask.shape[-1] < kv_len:
        raise ValueError(
            f"{name}: a 4D attention_mask must be (batch, 1, {q_len}, >= {kv_len}), got {tuple(mask.shape)}")
    m = mask[..., :kv_len]  # eager slices a mask built for a longer cache the same way
    if m.shape[1] != 1 and not bool((m == m[:, :1]).all()):
        raise ValueError(f"{name}: a 4D attention_mask that differs between heads is not supported; use 'eager'")
    m = m[:, 0]
    if m.dtype == torch.bool:
        allowed = m
    else:
        allowed = m == 0
        blocked = m <= torch.finfo(m.dtype).min / 2
        if not bool((allowed | blocked).all()):
            raise ValueError(f"{name}: the 4D attention_mask carries an additive bias (values other than 0 and "
                             "the dtype minimum); only masks are supported, use attn_implementation='eager'")
    b = m.shape[0]
    idx = torch.arange(kv_len, device=m.device)
    seen = allowed.any(-1)
    first = torch.where(allowed, idx, kv_len).amin(-1)
    last = torch.where(allowed, idx, -1).amax(-1)
    if bool(((last - first + 1 != allowed.sum(-1)) & seen).any()):
        raise ValueError(f"{name}: in the 4D attention_mask some query attends keys that are not one interval; "
                         "only causal / sliding-window masks with padding are supported, use 'sdpa' or 'eager'")
    _check_one_block("4D attention_mask (queries that see some key)", seen)
    rows = []
    for r in range(b):
        qi = seen[r].nonzero().reshape(-1)
        if qi.numel() == 0:
            rows.append(None)
            continue
        qs, qe = int(qi[0]), int(qi[-1]) + 1
        a, z = first[r, qs:qe], last[r, qs:qe]
        ks, ke = int(a.min()), int(z.max()) + 1
        c = torch.arange(qs, qe, device=m.device) + (ke - qe)  # the key each query is aligned with
        rows.append((qs, qe, ks, ke, a, z, c))
    real = [x for x in rows if x is not None]
    left = max([int((x[6] - x[4]).max()) for x in real], default=0)
    right = max([int((x[5] - x[6]).max()) for x in real], default=0)
    ok = right >= 0 and all(bool(((x[6] - x[4]) >= 0).all()) for x in real)
    for qs, qe, ks, ke, a, z, c in real if ok else ():
        if not (torch.equal(a, (c - left).clamp(min=ks)) and torch.equal(z, (c + right).clamp(max=ke - 1))):
            ok = False
    if not ok:
        raise ValueError(f"{name}: the 4D attention_mask is not a causal / sliding-window band with padding (one "
                         "band for all rows, each query aligned with its own key); use attn_implementation='sdpa' "
                         "or 'eager' for other masks")
    # a band at least as wide as every row is unbounded on that side
    span = max([x[3] - x[2] for x in real], default=1)
    left = -1 if left >= span - 1 else left
    right = -1 if right >= span - 1 and right > 0 else right
    seg = torch.zeros(2, b, _SEGMENTS, dtype=torch.int32)
    for r, x in enumerate(rows):
        qs, qe, ks, ke = (x[:4] if x is not None else (0, 0, 0, 0))
        seg[0, r] = torch.tensor([qs, 0, qe - qs, q_len - qe, 0])
        seg[1, r] = torch.tensor([0, ks, ke - ks, 0, kv_len - ke])
    return seg.to(m.device), (left, right)


# ----------------------------------------------------------------------------- the attention call
def _layer_window(module, kwargs, causal: bool):
    """(window, causal-as-passed) for this layer: the model's own where it has one, else the
    registered one. A model window of W keys is (W-1, W-1) on a bidirectional layer."""
    if "sliding_window" in kwargs:
        w = kwargs["sliding_window"]
        if w is None:  # the layer said: full attention
            return None, True
        w = int(w)
        return (w if causal else (w - 1, w - 1)), True
    config = getattr(module, "config", None)
    model_has_window = (
        config is not None
        and getattr(config, "sliding_window", None) is not None
        and getattr(config, "use_sliding_window", True) is not False
    )
    if model_has_window:
        w = hf_layer_window(module, config)
        return (w if causal or w is None else (w - 1, w - 1)), True
    return _settings["window_size"], False


def _backend(device: torch.device, backend: Optional[str] = None) -> str:
    backend = _settings["backend"] if backend is None else backend
    if backend == "auto":  # as the op's auto: Triton on CUDA tensors, the PyTorch path elsewhere
        return _settings["cuda_backend"] if device.type == "cuda" else "torch"
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
        return _context_parallel_attend(q, k, v, attention_mask, scaling, window, causal, kwargs, backend, mods)
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
            q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]), window, causal,
            scaling, cu_seqlens_q=cu_q.to(torch.int32), cu_seqlens_k=cu_k.to(torch.int32), max_seqlen_q=max_q,
            max_seqlen_k=max_k, backend=backend, **mods,
        )
        return out.view(b, q_len, *out.shape[1:])
    if q_len == kv_len and kwargs.get("position_ids") is not None:
        out = _packed_attention(q, k, v, kwargs["position_ids"].to(q.device), window, causal, scaling, backend, **mods)
        if out is not None:
            return out
    return sliding_window_attention(q, k, v, window, causal, scaling, backend=backend, **mods)



# ----------------------------------------------------------------------------- context parallelism
_CP = "sft_sliding_window with a context_parallel_group"


def _context_parallel_local_checks(q, k, attention_mask, kwargs, mods, rank):
    """What one rank checks alone before the group agrees: -> (padding mask ``(batch, n)``, per-row
    verdicts on the position_ids), or ValueError."""
    if mods:
        raise ValueError(
            f"{_CP}: {' / '.join(sorted(mods))} (Gemma2's attn_logit_softcapping, GPT-OSS's attention sinks) are not "
            "supported through the halo exchange; run such models without context_parallel_group"
        )
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        raise ValueError(
            f"{_CP}: packed rows (cu_seq_lens_q/k, DataCollatorWithFlattening) are not supported: sequences would "
            "cross rank boundaries with their own windows; pad the rows (right padding) instead"
        )
    b, n = q.shape[:2]
    if k.shape[1] != n:
        raise ValueError(
            f"{_CP}: got {n} queries and {k.shape[1]} keys; a KV cache (generation, decoding) is not supported "
            "under context parallelism, each rank holds only its shard's keys; generate without context_parallel_group"
        )
    if attention_mask is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=q.device)
    elif isinstance(attention_mask, torch.Tensor) and tuple(attention_mask.shape) == (b, n):
        valid = attention_mask.to(device=q.device, dtype=torch.bool)
    else:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(
            f"{_CP}: the attention_mask must be this rank's (batch, {n}) slice of the 2D padding mask, got {shape}; "
            "4D masks cannot be checked across shards, use the 2D padding mask"
        )
    pos = kwargs.get("position_ids")
    if pos is None:
        raise ValueError(f"{_CP}: needs the position_ids the model passes to its attention layers (Llama, Mistral, "
                         "Qwen2 and most decoders do); this model does not pass them")
    pos = pos.to(q.device).reshape(-1, pos.shape[-1])
    if pos.shape[-1] != n or pos.shape[0] not in (1, b):
        raise ValueError(f"{_CP}: position_ids must be (batch, {n}) or (1, {n}), got {tuple(pos.shape)}")
    want = torch.arange(n, device=q.device) + rank * n
    pos_ok = ((pos.expand(b, n) == want) | ~valid).all(dim=1).to(torch.int64).tolist()
    return valid, pos_ok


def _context_parallel_attend(q, k, v, attention_mask, scaling, window, causal, kwargs, backend, mods):
    """This rank's shard ``q (batch, n, Hq, D)``, ``k/v (batch, n, Hkv, D)`` of a sequence of
    ``P n`` tokens split over the registered group, through the halo exchange.

    Each row must be right-padded over the whole sequence, and the (real) tokens' position_ids
    must be their global index ``r n + j``. A fixed-size all-gather first agrees on every rank's
    verdict and shard shape; a second one (its size depends on the batch) checks positions and
    padding with the rows' real lengths, which every rank needs. So a bad shard raises on every
    rank together, and no collective ever runs with sizes that differ between ranks."""
    import torch.distributed as dist

    from ..parallel.context_parallel import (all_gather_ints, context_parallel_padded_attention,
                                             lengths_from_shard_counts, local_prefix_counts)

    group = _settings["context_parallel_group"]
    if torch.compiler.is_compiling():
        raise ValueError(f"{_CP}: runs eagerly (its checks and exchange read values on the host); do not wrap the "
                         "model in torch.compile while context parallelism is on")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    b, n = q.shape[:2]
    error = valid = pos_ok = None
    try:
        valid, pos_ok = _context_parallel_local_checks(q, k, attention_mask, kwargs, mods, rank)
    except (TypeError, ValueError) as exc:
        error = exc
    # one fixed-size all-gather first: the next one's size depends on the batch, and gloo aborts
    # the process (not a ValueError) when ranks disagree on a collective's size
    shapes = all_gather_ints([int(error is None), b, n, q.shape[2], q.shape[3], k.shape[2]], group)
    if error is not None:
        raise error
    bad = [r for r, m in enumerate(shapes) if m[0] != 1]
    if bad:
        raise ValueError(f"{_CP}: group rank(s) {bad} rejected their inputs (the error is raised there); every rank "
                         "of the group stops here")
    for f, field in enumerate(("batch", "tokens per rank", "query heads", "head_dim", "key/value heads"), start=1):
        vals = [int(m[f]) for m in shapes]
        if len(set(vals)) != 1:
            raise ValueError(
                f"{_CP}: the {field} differs across the group: {vals} on group ranks 0..{world - 1}; every rank must "
                f"run the model on a shard of the same shape (batch, L/P) (pad the sequence to a multiple of P)"
            )
    metas = all_gather_ints(local_prefix_counts(valid) + pos_ok, group)  # every rank: its counts and verdicts
    bad = [r for r, m in enumerate(metas) if not all(m[b:])]
    if bad:
        raise ValueError(
            f"{_CP}: position_ids must be the global positions of each rank's tokens (rank r of {world} holds tokens "
            f"[r*{n}, (r+1)*{n}): pass position_ids=torch.arange(r*{n}, (r+1)*{n}) or the shard of the full "
            f"sequence's position_ids); wrong on group rank(s) {bad}. Packed rows (positions restarting) are not "
            "supported under context parallelism"
        )
    lengths = lengths_from_shard_counts([m[:b] for m in metas], n)
    if all(x == world * n for x in lengths):
        lengths = None
    out = context_parallel_padded_attention(q, k, v, lengths, window, causal, scaling, group, backend)
    if lengths is not None:
        out = out * valid[:, :, None, None].to(out.dtype)  # pad rows zero, as without context parallelism
    return out


def _context_parallel_mask(q_length, kv_length, q_offset, kv_offset, attention_mask):
    """The mask function's answer under context parallelism: this rank's 2D padding slice (or None);
    the attention function checks it across the group. A cache (keys beyond the queries) is refused."""
    if isinstance(q_offset, torch.Tensor) or q_offset != 0 or kv_offset != 0 or kv_length != q_length or (
            attention_mask is not None and attention_mask.shape[-1] != q_length):
        raise ValueError(
            f"{_CP}: a KV cache (generation, decoding, or a forward with past_key_values) is not supported: each rank "
            "holds only its shard's keys; run generation without context_parallel_group"
        )
    return None if attention_mask is None else attention_mask.to(torch.bool)


@contextlib.contextmanager
def context_parallel(group):
    """Within the block, ``sft_sliding_window`` attention runs context-parallel over ``group``
    (see :func:`register`'s ``context_parallel_group``); the previous setting is restored after."""
    previous = _settings["context_parallel_group"]
    _settings["context_parallel_group"] = _check_context_parallel_group(group)
    try:
        yield group
    finally:
        _settings["context_parallel_group"] = previous


def _check_context_parallel_group(group):
    if group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("context_parallel_group: torch.distributed is not initialised (init_process_group() or "
                         "deepspeed.init_distributed() first)")
    if dist.get_rank(group) < 0:
        raise ValueError("context_parallel_group: this process is not a member of the group")
    return group


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
            ``cu_seq_lens_q/k`` + ``max_length_q/k`` (packed rows), others ignored.

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
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = _attend(module, q, k, v, attention_mask, scaling, window, causal, kwargs, model_window,
                  **_score_modifiers(kwargs))
    return out, None


def sft_attention_mask(
    batch_size: int,
    q_length: Optional[int] = None,
    kv_length: Optional[int] = None,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    cache_position: Optional[torch.Tensor] = None,
    **kwargs,
):
    """The ``AttentionMaskInterface`` function: None, or a ``(2, batch, 5)`` int32 segment table.

    Args (as transformers passes them): ``q_length`` queries at positions ``q_offset ..``
    (an int, or a 0-d tensor for static caches; transformers < 5.x passes their positions as
    ``cache_position`` instead), ``kv_length`` key slots holding positions ``kv_offset ..``, the
    2D padding mask ``(batch, positions seen)`` or None. Causality and the window come from the
    layer (``is_causal`` / ``sliding_window``), as for FlashAttention-2; ``mask_function`` is not
    evaluated.

    Returns None when there is nothing to mask (no padding and the keys end at the last
    query); otherwise each row's real queries and keys (see the module docstring). Raises if
    a row's tokens are not one block.
    """
    if attention_mask is not None and attention_mask.dim() != 2:  # an already prepared mask: pass it on
        return attention_mask
    compiling = torch.compiler.is_compiling()
    if q_length is None:  # transformers 5.0 - 5.x: the queries' positions, consecutive
        if cache_position is None:
            raise TypeError("sft_attention_mask: needs q_length (and q_offset) or cache_position")
        q_length = cache_position.shape[0]
        q_offset = cache_position[0] if compiling else int(cache_position[0])
    if _settings["context_parallel_group"] is not None:
        return _context_parallel_mask(q_length, kv_length, q_offset, kv_offset, attention_mask)
    device = kwargs.get("device")
    if device is None:
        ref = attention_mask if attention_mask is not None else cache_position
        device = ref.device if ref is not None else "cpu"
    q_end = q_offset + q_length  # position after the last query
    # the key slots end with the queries (no unwritten slots): known without reading a tensor when
    # there are as many slots as queries (no cache, or a prefill filling it), or from an int offset
    ends_with_queries = kv_length == q_length or (
        not isinstance(q_offset, torch.Tensor) and kv_offset + kv_length == q_end)
    if ends_with_queries and (attention_mask is None or (not compiling and bool(attention_mask.all()))):
        return None
    need = kv_offset + kv_length  # positions covered by the key slots (they include the queries)
    if attention_mask is None:
        pad = torch.ones(batch_size, need, dtype=torch.bool, device=device)
    else:
        pad = attention_mask.to(device=device, dtype=torch.bool)
        if pad.shape[-1] < need:  # positions past the mask are not tokens (transformers pads the same way)
            pad = F.pad(pad, (0, need - pad.shape[-1]), value=False)
    k_pos = torch.arange(kv_offset, need, device=device)
    q_pos = torch.arange(q_length, device=device) + q_offset
    k_valid = pad[:, kv_offset:need] & (k_pos < q_end)[None, :]  # not padding, and written
    q_valid = pad.index_select(1, q_pos)
    _check_one_block("attention_mask (keys)", k_valid)
    _check_one_block("attention_mask (queries)", q_valid)
    return _segments(q_valid, k_valid)


def register(window_size: WindowArg = None, backend: str = "auto", context_parallel_group=None) -> str:
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
            packed rows, a KV cache (generation), position_ids that are not the global ones,
            padding other than right padding, softcap / sinks, two-sided windows with padding.
            :func:`context_parallel` sets it for a block only.

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
    from ..backends import BACKENDS, _triton_import_error

    if backend not in BACKENDS:
        raise ValueError(f"register: backend must be one of {BACKENDS}, got {backend!r}")
    _settings["context_parallel_group"] = _check_context_parallel_group(context_parallel_group)
    _settings["window_size"] = window_size
    _settings["backend"] = backend
    _settings["cuda_backend"] = "torch" if _triton_import_error() else "triton"
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
    from ..backends import BACKENDS

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
    model_has_window = (getattr(config, "sliding_window", None) is not None
                        and getattr(config, "use_sliding_window", True) is not False)
    # DeepSpeed ZeRO-3 (HF Trainer with a stage-3 config loads the model partitioned): from_hf gathers
    # each layer's projections and returns full parameters, which deepspeed.initialize partitions
    # (DeepSpeedZeRoOffload converts every parameter created outside zero.Init: a broadcast from
    # rank 0, then each rank keeps its slice). Converting them here instead would fail inside
    # deepspeed.initialize: its stage-3 optimizer formats repr(module), and BlockDiagonalLinear's
    # extra_repr divides by weight.numel(), 0 for a partitioned weight
    for name, module in targets:
        window = hf_layer_window(module, config) if model_has_window else window_size
        sft = SFTAttention.from_hf(module, config, window_size=window, backend=backend)
        if qkv_groups > 1:
            sft = _regroup(sft, qkv_groups)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SFTAttentionHF(sft, config, getattr(module, "layer_idx", None), model_has_window))
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
