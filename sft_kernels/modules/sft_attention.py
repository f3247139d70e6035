"""``SFTAttention``: a drop-in causal self-attention layer built on both kernels.

- Q, K and V come from **one** :class:`BlockDiagonalLinear`. ``qkv_groups=1`` is the
  usual dense fused projection ``hidden -> (Hq + 2 Hkv) * D``; ``qkv_groups=g`` splits the
  heads into ``g`` groups, group ``i`` projected only from hidden slice ``i`` (``hidden/g``
  features), so the projection holds ``g`` times fewer weights.
- Rotary position embeddings (Llama convention: ``rotate_half``, ``cos/sin`` over the
  full head_dim with frequencies repeated twice), GQA/MQA (K/V never repeated in memory).
- Sliding-window attention (:func:`sft_kernels.sliding_window_attention`): a fixed window
  ``W`` (W keys including self) or the adaptive ``"sqrt"`` window.
- Padding: a Hugging Face ``attention_mask`` ``(batch, seqlen)`` of 1 (token) / 0 (pad),
  right or left padded. Tokens are *unpadded* into one packed batch with ``cu_seqlens``
  before the projections, so a pad token is never attended, never attends, costs no
  FLOPs, and its output row is exactly zero. (With ``causal=False`` this is not what eager
  attention computes: eager masks only keys, so its pad rows attend the real keys. Such rows
  are padding and this module drops them by design; a model whose head reads a pad position,
  such as a left-padded BERT classifier's CLS token, should use the Hugging Face backend,
  which matches eager there.)

Layout of the fused projection's output (what
:func:`sft_kernels.integrations.transformers.from_hf_attention` relies on):
group ``i`` (of ``g``) produces ``[q heads, k heads, v heads]`` of that group,
``(Hq/g + 2 Hkv/g) * D`` features, in head order. With ``g = 1`` this is
``cat([q_proj, k_proj, v_proj])``. Query head ``h`` uses KV head ``h // (Hq/Hkv)``, which
lives in the same group, so groups never need each other's heads.

Rotary embeddings live in :mod:`.rotary`, padding in :mod:`.padding` (both shared with the
Hugging Face integration).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..ops.sliding_window_attention.op import sliding_window_attention
from ..window import WindowArg, parse_window
from .block_diagonal_linear import BlockDiagonalLinear
from .padding import as_bool_mask, check_one_block, pad_rows, padded_sliding_window_attention, unpad_mask
from .rotary import apply_rotary, autocast_qkv, rope_cos_sin, rope_inv_freq, rotate_half

__all__ = [
    "SFTAttention",
    "apply_rotary",
    "autocast_qkv",
    "padded_sliding_window_attention",
    "rope_cos_sin",
    "rope_inv_freq",
    "rotate_half",
    "unpad_mask",
]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SFTAttention: {name} must be a positive int, got {value!r}")
    return value


# ----------------------------------------------------------------------------- module
class SFTAttention(nn.Module):
    """Causal (or bidirectional) sliding-window self-attention with a fused, optionally
    block-diagonal QKV projection, rotary embeddings, GQA and padding.

    Args:
        hidden_size: model width ``C``.
        num_heads: query heads ``Hq``.
        num_kv_heads: key/value heads ``Hkv`` (default ``Hq``); ``Hq % Hkv == 0``.
        head_dim: ``D`` (default ``C // Hq``); even (rotary).
        window_size: keys each query sees: an int ``W`` = W keys including itself
            (causal: keys ``i-W+1 .. i``; the Hugging Face ``sliding_window=W``), ``"sqrt"``
            = ``floor(sqrt(L))`` keys for a sequence of ``L`` real tokens, ``(left, right)``
            with -1 = unbounded, or None = unbounded (plain causal attention). See
            :func:`sft_kernels.sliding_window_attention`.
        causal: queries see no later key.
        qkv_groups: ``g``; the projection is ``g`` blocks ``(hidden/g) -> (Hq/g + 2 Hkv/g) D``.
            ``hidden_size``, ``Hq`` and ``Hkv`` must be divisible by ``g``.
        bias: bias on the Q/K/V projection (Qwen2 has one).
        rope_theta: rotary base. ``rope_theta=None`` disables rotary embeddings.
        backend: attention and projection backend (``"auto"``, ``"triton"``, ``"torch"``, ``"cuda"``).
        out_bias: bias on ``o_proj`` (default: ``bias``).
        dtype, device: factory arguments of the parameters.
        sequence_parallel_group: a ``torch.distributed`` process group of ``P`` ranks for
            DeepSpeed-Ulysses sequence parallelism (None: off). Rank ``r`` of the group holds
            tokens ``r L/P .. (r+1) L/P - 1`` of every sequence; the local attention runs in
            ``deepspeed.sequence.layer.DistributedAttention``, which exchanges heads for
            sequence (all-to-all) so each rank attends over the whole sequence with ``Hq/P``
            query and ``Hkv/P`` key/value heads. Needs ``Hq % P == 0``, ``Hkv % P == 0`` and
            the same local length on every rank; rotary positions default to the global ones
            (offset ``r L/P``); an ``attention_mask`` is the local ``(batch, L/P)`` shard (see
            :mod:`sft_kernels.integrations.deepspeed`). Imports deepspeed only when given, and
            needs ``deepspeed.init_distributed()`` to have run on every rank (the all-to-all goes
            through ``deepspeed.comm``; ``torch.distributed.init_process_group()`` alone raises a
            ValueError here).
        softcap: logit soft-cap ``c`` (scores become ``c * tanh(s / c)``; Gemma2's
            ``attn_logit_softcapping``); 0 = none.
        attention_sinks: a learned sink logit per query head (GPT-OSS): the parameter
            ``sinks`` ``(num_heads,)``, initialised to 0, joins every row's softmax denominator.
            Softcap and sinks run on the triton and torch backends, without the parallel groups.
        context_parallel_group: a ``torch.distributed`` process group of ``P`` ranks for halo
            context parallelism (:func:`sft_kernels.context_parallel_attention`; None: off).
            Rank ``r`` holds tokens ``r L/P .. (r+1) L/P - 1``; each rank exchanges only the
            keys/values its window reaches with its neighbours. Rotary positions are the global
            ones (offset ``r L/P``); an ``attention_mask`` is the local ``(batch, L/P)`` shard and
            must be right padding over the whole sequence (``causal=True`` only); ``"sqrt"``
            windows follow each row's real length, as without parallelism. With
            ``sequence_parallel_group`` too, Ulysses runs inside each context-parallel shard
            (see :func:`sft_kernels.parallel.context_parallel_groups`).

            With either group, every rank first shares its shard's shape, dtype and whether it
            has an ``attention_mask`` (one fixed-size all-gather per group); a bad shard on one
            rank, a different batch or length, or a mask on some ranks only raises the same
            ValueError on every rank of the group(s), never a hang or an abort in a later
            collective.

    Shapes: ``hidden_states (batch, seqlen, hidden_size) -> (batch, seqlen, hidden_size)``.
    Parameters: ``qkv_proj.weight`` (flat block-diagonal weight, ``C (Hq + 2 Hkv) D / g``
    values), ``qkv_proj.bias`` (``(Hq + 2 Hkv) D``), ``o_proj`` (``nn.Linear(Hq D, C)``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        window_size: WindowArg = 4096,
        causal: bool = True,
        qkv_groups: int = 1,
        bias: bool = False,
        rope_theta: Optional[float] = 10000.0,
        backend: str = "auto",
        *,
        out_bias: Optional[bool] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
        sequence_parallel_group=None,
        context_parallel_group=None,
        softcap: float = 0.0,
        attention_sinks: bool = False,
    ) -> None:
        super().__init__()
        hidden_size = _positive_int("hidden_size", hidden_size)
        num_heads = _positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"SFTAttention: num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads} (GQA)"
            )
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ValueError(
                    f"SFTAttention: hidden_size={hidden_size} is not divisible by num_heads={num_heads}; "
                    "pass head_dim explicitly"
                )
            head_dim = hidden_size // num_heads
        head_dim = _positive_int("head_dim", head_dim)
        qkv_groups = _positive_int("qkv_groups", qkv_groups)
        for name, val in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if val % qkv_groups != 0:
                raise ValueError(
                    f"SFTAttention: {name}={val} must be divisible by qkv_groups={qkv_groups} (each group takes "
                    f"hidden_size/g features and produces num_heads/g query and num_kv_heads/g key/value heads)"
                )
        if rope_theta is not None and head_dim % 2 != 0:
            raise ValueError(f"SFTAttention: rotary embeddings need an even head_dim, got {head_dim}")
        self.window_spec = parse_window(window_size, causal)  # validates window_size and causal
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 <= softcap < float("inf"):
            raise ValueError(f"SFTAttention: softcap must be a finite float >= 0 (0 = no cap), got {softcap!r}")
        if (softcap > 0 or attention_sinks) and (sequence_parallel_group is not None
                                                 or context_parallel_group is not None):
            raise ValueError(
                "SFTAttention: softcap / attention_sinks do not run with sequence_parallel_group or "
                "context_parallel_group yet; use them without the parallel groups"
            )
        self.softcap = float(softcap)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.window_size = window_size
        self.causal = causal
        self.qkv_groups = qkv_groups
        self.backend = backend
        self.scaling = head_dim ** -0.5
        self.rope_theta = rope_theta
        self.rope_attention_scaling = 1.0
        g = qkv_groups
        per_group_out = (num_heads // g + 2 * num_kv_heads // g) * head_dim
        factory = dict(dtype=dtype, device=device)
        self.qkv_proj = BlockDiagonalLinear(
            [hidden_size // g] * g, [per_group_out] * g, bias=bias, **factory, backend=backend
        )
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias if out_bias is None else out_bias,
                                **factory)
        inv_freq = rope_inv_freq(head_dim, rope_theta) if rope_theta is not None else torch.empty(0)
        self.register_buffer("inv_freq", inv_freq.to(device=device), persistent=False)
        self.sinks = nn.Parameter(torch.zeros(num_heads, **factory)) if attention_sinks else None
        self.sequence_parallel_group = sequence_parallel_group
        self.sequence_parallel_attention = None
        if sequence_parallel_group is not None:
            self.sequence_parallel_attention = _ulysses_attention(self, sequence_parallel_group)
        self.context_parallel_group = context_parallel_group
        self.context_parallel_ulysses = None  # Ulysses inside each context-parallel shard
        self._context_parallel_layout = None
        if context_parallel_group is not None:
            self.context_parallel_ulysses = _context_parallel_setup(self, context_parallel_group,
                                                                    sequence_parallel_group)

    # ------------------------------------------------------------------ helpers
    def _split_qkv(self, qkv: torch.Tensor):
        """``(..., (Hq + 2 Hkv) D)`` in group layout -> q ``(..., Hq, D)``, k, v ``(..., Hkv, D)``."""
        g, d = self.qkv_groups, self.head_dim
        hq, hkv = self.num_heads // g, self.num_kv_heads // g
        x = qkv.view(*qkv.shape[:-1], g, hq + 2 * hkv, d)
        q, k, v = x.split([hq, hkv, hkv], dim=-2)
        lead = qkv.shape[:-1]
        return (q.reshape(*lead, g * hq, d), k.reshape(*lead, g * hkv, d), v.reshape(*lead, g * hkv, d))

    def _positions(self, attention_mask, position_ids, batch, seqlen, device):
        if position_ids is not None:
            if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point:
                raise TypeError("SFTAttention: position_ids must be an integer tensor (batch, seqlen) or (1, seqlen)")
            if position_ids.dim() == 1:
                position_ids = position_ids.unsqueeze(0)
            if position_ids.shape[-1] != seqlen or position_ids.shape[0] not in (1, batch):
                raise ValueError(
                    f"SFTAttention: position_ids must have shape ({batch}, {seqlen}) or (1, {seqlen}), "
                    f"got {tuple(position_ids.shape)}"
                )
            return position_ids.expand(batch, seqlen)
        if attention_mask is not None:
            # count positions over real tokens, as generation in transformers does for left padding
            return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        return torch.arange(seqlen, device=device).unsqueeze(0).expand(batch, seqlen)

    def _cos_sin(self, position_embeddings, positions, b, l, dtype):
        """Rotary ``(cos, sin)``, each ``(b, l, head_dim)``, or None without rotary: the model's
        own ``position_embeddings`` when given, else the module's tables at ``positions()``
        (called only then)."""
        if position_embeddings is not None:
            cos, sin = position_embeddings
            return cos.expand(b, l, self.head_dim), sin.expand(b, l, self.head_dim)
        if self.rope_theta is None:
            return None
        return rope_cos_sin(positions(), self.inv_freq, dtype, self.rope_attention_scaling)

    # ------------------------------------------------------------------ input checks
    def _check_hidden(self, hidden_states) -> Tuple[int, int, int]:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
            raise ValueError(
                "SFTAttention: hidden_states must be a tensor (batch, seqlen, hidden_size), got "
                f"{tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__}"
            )
        b, l, c = hidden_states.shape
        if c != self.hidden_size:
            raise ValueError(f"SFTAttention: hidden_states has {c} features, expected hidden_size={self.hidden_size}")
        return b, l, c

    def _check_shard(self, hidden_states, attention_mask, position_ids, position_embeddings) -> None:
        """Everything one rank of a parallel group can check alone (raises ValueError / TypeError)."""
        b, l, _ = self._check_hidden(hidden_states)
        if attention_mask is not None:
            if self.context_parallel_group is not None and not self.causal:
                raise ValueError(
                    "SFTAttention(context_parallel_group=...): an attention_mask needs causal=True (with a two-sided "
                    "window real tokens would attend pad keys); pass equal-length rows without a mask"
                )
            as_bool_mask("attention_mask", attention_mask, (b, l))
        if position_ids is not None:
            self._positions(None, position_ids, b, l, hidden_states.device)
        if position_embeddings is not None:
            want = (b, l, self.head_dim)
            parts = tuple(position_embeddings) if isinstance(position_embeddings, (tuple, list)) else ()
            if len(parts) != 2 or not all(isinstance(t, torch.Tensor) and t.dim() == 3 and all(
                    s in (1, w) for s, w in zip(t.shape, want)) for t in parts):
                got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in parts]
                raise ValueError(
                    f"SFTAttention: position_embeddings must be (cos, sin), each broadcastable to {want}, got "
                    f"{got or type(position_embeddings).__name__}"
                )

    def _agree_parallel_inputs(self, hidden_states, attention_mask, position_ids, position_embeddings) -> None:
        """Check this rank's shard, then agree with the group(s) in one fixed-size all-gather each.

        The collectives after this one (the mask's all-gather, the halo exchange, Ulysses'
        all-to-alls) have sizes that depend on the batch, the shard length and whether a mask is
        given; gloo aborts the process when they differ between ranks. So every rank first
        shares ``[its verdict, batch, seqlen, features, dtype, mask given]`` and every rank
        raises the same ValueError when one rank's inputs are bad or the ranks differ. With both
        groups, the Ulysses group goes first and its verdict travels in the context-parallel
        round, so a problem anywhere in the grid stops every rank.
        """
        import torch.distributed as dist

        from ..parallel.comm import all_gather_ints
        from ..parallel.context_parallel import _DTYPE_CODES

        error = None
        try:
            self._check_shard(hidden_states, attention_mask, position_ids, position_embeddings)
        except (TypeError, ValueError) as exc:
            error = exc
        shape = tuple(hidden_states.shape) if error is None else (-1, -1, -1)
        dtype = _DTYPE_CODES.get(hidden_states.dtype, 0) if error is None else -1
        meta = [*shape, dtype, int(attention_mask is not None)]
        groups = [("sequence_parallel_group", self.sequence_parallel_group),
                  ("context_parallel_group", self.context_parallel_group)]
        for name, group in ((n, g) for n, g in groups if g is not None):
            metas = all_gather_ints([int(error is None)] + meta, group)
            if error is None:
                error = _group_disagreement(name, metas, dist.get_rank(group))
        if error is not None:
            raise error

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Self-attention over ``hidden_states (batch, seqlen, hidden_size)``.

        Args:
            attention_mask: ``(batch, seqlen)``, 1 on tokens and 0 on padding (right or left
                padded; bool, int or float 0/1). Pad tokens are dropped before the
                projections and their output rows are zero (also with ``causal=False``, where
                eager attention would give pad rows an average of the real tokens' values).
                None = no padding.
            position_ids: ``(batch, seqlen)`` or ``(1, seqlen)`` rotary positions. Default:
                ``0, 1, ...`` counted over real tokens only (so a left-padded row gets the
                same positions as the unpadded sequence).
            position_embeddings: ``(cos, sin)``, each ``(batch, seqlen, head_dim)``, to use
                instead of the module's own rotary tables (what a Hugging Face model passes;
                supports every rope type it implements).

        Returns:
            ``(batch, seqlen, hidden_size)``.
        """
        if self.context_parallel_group is not None or self.sequence_parallel_attention is not None:
            # before any collective whose size depends on the inputs: a mismatch would abort gloo
            self._agree_parallel_inputs(hidden_states, attention_mask, position_ids, position_embeddings)
            if self.context_parallel_group is not None:
                return self._forward_context_parallel(hidden_states, attention_mask, position_ids, position_embeddings)
            return self._forward_sequence_parallel(hidden_states, attention_mask, position_ids, position_embeddings)
        b, l, c = self._check_hidden(hidden_states)
        valid = None
        if attention_mask is not None:
            valid = as_bool_mask("attention_mask", attention_mask, (b, l)).to(hidden_states.device)
            check_one_block("attention_mask", valid)
            if valid.numel() == 0:  # batch 0 or no token: nothing to unpad, the empty result as without a mask
                valid = None
        dev = hidden_states.device
        rope = self._cos_sin(position_embeddings, lambda: self._positions(valid, position_ids, b, l, dev), b, l,
                             hidden_states.dtype)

        if valid is None:
            q, k, v = self._split_qkv(self.qkv_proj(hidden_states))
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            q, k, v = autocast_qkv(q, k, v)
            out = sliding_window_attention(
                q, k, v, window_size=self.window_size, causal=self.causal, softmax_scale=self.scaling, backend=self.backend, softcap=self.softcap,
                sinks=self.sinks,
            )
            return self.o_proj(out.reshape(b, l, self.num_heads * self.head_dim))

        # unpad once: projections, rotary, attention and o_proj all run on real tokens only
        indices, cu, max_len = unpad_mask(valid)
        x = hidden_states.reshape(b * l, c).index_select(0, indices)
        q, k, v = self._split_qkv(self.qkv_proj(x))
        if rope is not None:
            cos, sin = (t.reshape(b * l, t.shape[-1]).index_select(0, indices) for t in rope)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = autocast_qkv(q, k, v)
        out = sliding_window_attention(
            q, k, v, window_size=self.window_size, causal=self.causal, softmax_scale=self.scaling, cu_seqlens_q=cu, cu_seqlens_k=cu,
            max_seqlen_q=max_len, max_seqlen_k=max_len, backend=self.backend, softcap=self.softcap,
            sinks=self.sinks,
        )
        out = self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))
        return pad_rows(out, indices, b, l)

    def _local_attention(self, q, k, v, valid=None):
        """What each rank runs between the two all-to-alls: the whole sequence, its heads."""
        if valid is None:
            return sliding_window_attention(q, k, v, window_size=self.window_size, causal=self.causal, softmax_scale=self.scaling, backend=self.backend)
        return padded_sliding_window_attention(
            q, k, v, valid, valid, self.window_size, self.causal, self.scaling, backend=self.backend
        )

    def _forward_sequence_parallel(self, hidden_states, attention_mask, position_ids, position_embeddings):
        """Ulysses: this rank holds ``hidden_states (batch, L/P, C)``, a slice of the sequence.

        Padding is kept in place (the all-to-all needs equal shapes on every rank): the full
        ``(batch, L)`` mask is all-gathered, the local attention skips pad keys and queries
        (:func:`padded_sliding_window_attention`), and pad rows of the output are set to zero.
        """
        import torch.distributed as dist

        group = self.sequence_parallel_group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        b, l, c = hidden_states.shape
        offset = rank * l
        full_valid = valid = None
        if attention_mask is not None:
            valid = as_bool_mask("attention_mask", attention_mask, (b, l)).to(hidden_states.device)
            parts = [torch.empty_like(valid) for _ in range(world)]
            dist.all_gather(parts, valid.contiguous(), group=group)
            full_valid = torch.cat(parts, dim=1)
            check_one_block("attention_mask (all-gathered over the sequence parallel group)", full_valid)

        def positions():
            if position_ids is not None:
                return self._positions(None, position_ids, b, l, hidden_states.device)
            if full_valid is not None:
                return (full_valid.long().cumsum(-1) - 1).clamp_(min=0)[:, offset:offset + l]
            return (torch.arange(l, device=hidden_states.device) + offset).unsqueeze(0).expand(b, l)

        rope = self._cos_sin(position_embeddings, positions, b, l, hidden_states.dtype)
        q, k, v = self._split_qkv(self.qkv_proj(hidden_states))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        q, k, v = (t.contiguous() for t in autocast_qkv(q, k, v))
        if full_valid is None:
            out = self.sequence_parallel_attention(q, k, v, 0)
        else:
            out = self.sequence_parallel_attention(q, k, v, 0, None, full_valid)
        out = self.o_proj(out.reshape(b, l, self.num_heads * self.head_dim))
        if valid is not None:
            out = out * valid.unsqueeze(-1).to(out.dtype)  # pad rows exactly zero, as without parallelism
        return out

    def _forward_context_parallel(self, hidden_states, attention_mask, position_ids, position_embeddings):
        """Halo context parallelism: this rank holds ``hidden_states (batch, L/P, C)``, one block of
        consecutive tokens (with Ulysses inside: block ``cp_rank * U + sp_rank`` of ``P U``).

        Padding stays in place (shards keep equal shapes): the mask must be right padding over
        the whole sequence (checked across ranks), pad rows of the output are set to zero.
        """
        from ..parallel.groups import shard_layout
        from ..parallel.padded import right_padded_lengths

        if self._context_parallel_layout is None:  # once per layer: a collective on every rank
            self._context_parallel_layout = shard_layout(self.context_parallel_group, self.sequence_parallel_group)
        shard, _ = self._context_parallel_layout
        b, l, c = hidden_states.shape
        valid = lengths = None
        if attention_mask is not None:
            valid = as_bool_mask("attention_mask", attention_mask, (b, l)).to(hidden_states.device)
            lengths = right_padded_lengths(valid, self.context_parallel_group, self.sequence_parallel_group)

        def positions():
            if position_ids is not None:
                return self._positions(None, position_ids, b, l, hidden_states.device)
            # right padding: a real token's position is its global index
            return (torch.arange(l, device=hidden_states.device) + shard * l).unsqueeze(0).expand(b, l)

        rope = self._cos_sin(position_embeddings, positions, b, l, hidden_states.dtype)
        q, k, v = self._split_qkv(self.qkv_proj(hidden_states))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if self.context_parallel_ulysses is not None:
            out = self.context_parallel_ulysses(q.contiguous(), k.contiguous(), v.contiguous(), 0, None, lengths)
        else:
            out = self._context_parallel_local(q, k, v, lengths)
        out = self.o_proj(out.reshape(b, l, self.num_heads * self.head_dim))
        if valid is not None:
            out = out * valid.unsqueeze(-1).to(out.dtype)  # pad rows exactly zero, as without parallelism
        return out

    def _context_parallel_local(self, q, k, v, lengths=None):
        """The halo exchange over the context-parallel group (inside Ulysses' all-to-alls when composed)."""
        from ..parallel.padded import context_parallel_padded_attention

        return context_parallel_padded_attention(
            q, k, v, lengths, self.window_size, self.causal, self.scaling, self.context_parallel_group, self.backend
        )

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, window_size={self.window_size!r}, causal={self.causal}, "
            f"qkv_groups={self.qkv_groups}, rope_theta={self.rope_theta}, backend={self.backend!r}"
            + (f", softcap={self.softcap}" if self.softcap else "") + (", attention_sinks=True" if self.sinks is not None else "")
        )


# ----------------------------------------------------------------------------- sequence parallelism
def _ulysses_attention(layer: "SFTAttention", group):
    """``DistributedAttention`` around ``layer._local_attention``, after checking the head counts."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "SFTAttention: sequence_parallel_group needs torch.distributed to be initialised "
            "(deepspeed.init_distributed() or torch.distributed.init_process_group())"
        )
    world = dist.get_world_size(group)
    for name, heads in (("num_heads", layer.num_heads), ("num_kv_heads", layer.num_kv_heads)):
        if heads % world != 0:
            raise ValueError(
                f"SFTAttention: {name}={heads} must be divisible by the sequence parallel group size {world} "
                "(Ulysses gives each rank num_heads/P query and num_kv_heads/P key/value heads)"
            )
    import deepspeed.comm as ds_comm  # only here: sft_kernels never imports deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    if not ds_comm.is_initialized():
        # DistributedAttention's all-to-all goes through deepspeed.comm, whose backend only
        # deepspeed.init_distributed() sets (it wraps an existing torch.distributed group); without
        # it the first forward fails with "DeepSpeed backend not set"
        raise ValueError(
            "SFTAttention: sequence_parallel_group (DeepSpeed-Ulysses) needs deepspeed.init_distributed() on every "
            "rank, got torch.distributed initialised without it; call deepspeed.init_distributed() (after or "
            "instead of torch.distributed.init_process_group()) before building the layer"
        )
    # (batch, seqlen, heads, head_dim): scatter heads (dim 2), gather the sequence (dim 1)
    return DistributedAttention(layer._local_attention, group, scatter_idx=2, gather_idx=1)


def _context_parallel_setup(layer: "SFTAttention", group, sequence_parallel_group):
    """Checks for ``context_parallel_group``; returns the Ulysses wrapper when both groups are given."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "SFTAttention: context_parallel_group needs torch.distributed to be initialised "
            "(deepspeed.init_distributed() or torch.distributed.init_process_group())"
        )
    if dist.get_rank(group) < 0:
        raise ValueError("SFTAttention: this process is not a member of context_parallel_group")
    if sequence_parallel_group is None:
        return None
    from deepspeed.sequence.layer import DistributedAttention  # only here: sft_kernels never imports deepspeed

    # heads were checked against the Ulysses group by _ulysses_attention; each rank of a
    # Ulysses group then runs the halo exchange on its heads over the whole shard
    return DistributedAttention(layer._context_parallel_local, sequence_parallel_group, scatter_idx=2, gather_idx=1)


_AGREED_FIELDS = ("batch", "seqlen (tokens per rank)", "hidden_size (features)", "dtype", "attention_mask given")


def _group_disagreement(name: str, metas, rank: int) -> Optional[ValueError]:
    """The ValueError every rank of a group raises when the all-gathered ``metas`` (per rank:
    ``[verdict, batch, seqlen, features, dtype code, mask given]``) are not all good and equal."""
    bad = [r for r, m in enumerate(metas) if m[0] != 1]
    if bad:
        return ValueError(
            f"SFTAttention({name}=...): group rank(s) {bad} rejected their inputs (the error is raised there); every "
            "rank of the group stops here"
        )
    for f, field in enumerate(_AGREED_FIELDS, start=1):
        vals = [int(m[f]) for m in metas]
        if len(set(vals)) == 1:
            continue
        if field == "attention_mask given":
            given = [r for r, x in enumerate(vals) if x]
            return ValueError(
                f"SFTAttention({name}=...): attention_mask is given on group rank(s) {given} but not on "
                f"{[r for r, x in enumerate(vals) if not x]}; every rank must pass its (batch, seqlen) shard of the "
                "mask, or every rank None"
            )
        if field == "dtype":
            return ValueError(f"SFTAttention({name}=...): hidden_states dtype differs across the group (codes "
                              f"{vals} on group ranks 0..{len(vals) - 1}); every rank must pass one dtype")
        return ValueError(
            f"SFTAttention({name}=...): hidden_states {field} differs across the group: {vals} on group ranks "
            f"0..{len(vals) - 1}; every rank must pass a shard of the same shape (batch, L/P, hidden_size)"
        )
    return None
