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
Modules: :mod:`.settings` (the name, the version, what :func:`register` stores),
:mod:`.masks` (the segment table, packed rows, 4D masks), :mod:`.backend` (the attention
function, its checks, :func:`register`), :mod:`.context_parallel` (the halo path),
:mod:`.patch` (:func:`patch_model`, :class:`SFTAttentionHF`).
"""

from .backend import register, sft_attention_forward
from .context_parallel import context_parallel
from .convert import from_hf_attention, hf_layer_window
from .loss import causal_lm_loss, tiled_loss, untiled_loss
from .masks import sft_attention_mask
from .patch import SFTAttentionHF, patch_model
from .settings import ATTN_IMPLEMENTATION, MIN_TRANSFORMERS_VERSION

__all__ = [
    "ATTN_IMPLEMENTATION",
    "MIN_TRANSFORMERS_VERSION",
    "SFTAttentionHF",
    "causal_lm_loss",
    "context_parallel",
    "from_hf_attention",
    "hf_layer_window",
    "patch_model",
    "register",
    "sft_attention_forward",
    "sft_attention_mask",
    "tiled_loss",
    "untiled_loss",
]
