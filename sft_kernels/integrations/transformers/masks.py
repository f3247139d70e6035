"""The mask side of the backend: what transformers hands the attention function instead of
an O(L^2) mask (the segment table of :func:`sft_attention_mask`), packed rows split at
``position_ids`` restarts, and user 4D masks read back into a band with padding.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...modules.padding import check_one_block
from ...ops.sliding_window_attention.op import sliding_window_attention
from ...window import MODE_KEYS, MODE_SQRT, WindowArg, parse_window
from .context_parallel import _context_parallel_mask
from .settings import _SEGMENTS, _settings


# ----------------------------------------------------------------------------- the segment table
def _is_segments(mask) -> bool:
    return (isinstance(mask, torch.Tensor) and mask.dim() == 3 and mask.dtype == torch.int32
            and mask.shape[0] == 2 and mask.shape[2] == _SEGMENTS)


_HOLE_HINT = "; use attn_implementation='sdpa' or 'eager' for such masks"


def _check_one_block(name: str, valid: torch.Tensor) -> None:
    check_one_block(f"sft_sliding_window: {name}", valid, _HOLE_HINT)


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
        window_size=window, causal=causal, softmax_scale=scaling, cu_seqlens_q=cu[0], cu_seqlens_k=cu[1], max_seqlen_q=lq, max_seqlen_k=lk,
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
        q.reshape(b * l, *q.shape[2:]), k.reshape(b * l, *k.shape[2:]), v.reshape(b * l, *v.shape[2:]), window_size=window,
        causal=causal, softmax_scale=scaling, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
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


