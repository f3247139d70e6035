"""The backend with a context-parallel group: each layer through the halo exchange
(:func:`sft_kernels.context_parallel_attention`) or DeepSpeed-Ulysses, whichever sends fewer
bytes for that layer (:mod:`sft_kernels.parallel.hybrid`), shapes and padding agreed across the
group first.
"""

from __future__ import annotations

import contextlib

import torch

from .settings import _settings

# which exchange a layer takes under context parallelism: "auto" (the cheaper by bytes, per layer), "halo",
# "ulysses" (wherever the head counts allow); and, while record_exchanges() is active, what each
# layer call chose
_exchange = {"policy": "auto", "log": None}


def set_context_parallel_exchange(policy: str = "auto") -> None:
    """What ``register(context_parallel_exchange=...)`` sets, alone (for a model already
    registered). How ``sft_sliding_window`` layers exchange under ``context_parallel_group``: ``"auto"``
    (default: per layer, the halo or DeepSpeed's Ulysses, whichever sends fewer bytes, see
    :mod:`sft_kernels.parallel.hybrid`), ``"halo"`` (every layer), ``"ulysses"`` (every layer whose
    head counts allow it: ``heads % P == 0``, ``heads_kv`` a multiple or divisor of ``P``)."""
    from ...parallel.hybrid import POLICIES

    if policy not in POLICIES:
        raise ValueError(f"set_context_parallel_exchange: policy must be one of {POLICIES}, got {policy!r}")
    _exchange["policy"] = policy


@contextlib.contextmanager
def record_exchanges():
    """Within the block, each context-parallel layer call appends ``{"window", "exchange",
    "halo_bytes" (per rank), "ulysses_bytes" (None: not possible)}`` to the yielded list, in call
    order (layer order in a forward)."""
    previous, _exchange["log"] = _exchange["log"], []
    try:
        yield _exchange["log"]
    finally:
        _exchange["log"] = previous


def _choose_exchange(window, halo, q, k, position_elems, group):
    """"halo" or "ulysses" for this layer call (the same on every rank: computed from global
    values only); recorded when :func:`record_exchanges` is active."""
    import torch.distributed as dist

    from ...parallel.hybrid import choose, ulysses_bytes, ulysses_possible

    world = dist.get_world_size(group)
    b, n, h, d = q.shape
    hkv = k.shape[2]
    ulysses = None
    if ulysses_possible(world, h, hkv) and _deepspeed_available():
        ulysses = ulysses_bytes(world, n, b, h, hkv, d, k.element_size(), position_elems)
    choice = choose(_exchange["policy"], halo, ulysses)
    if _exchange["log"] is not None:
        _exchange["log"].append({"window": window, "exchange": choice, "halo_bytes": list(halo),
                                 "ulysses_bytes": ulysses})
    return choice


def _deepspeed_available() -> bool:
    """Whether DeepSpeed is installed (without importing it: the byte count runs in every layer);
    without it every layer takes the halo."""
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def _ulysses_attend(q, k, v, padding, position_ids, scaling, window, causal, backend, group, attend):
    """This layer through DeepSpeed's Ulysses (:func:`sft_kernels.parallel.hybrid.ulysses_attention`):
    the core is this backend without context parallelism on the whole sequence, with
    ``padding`` ``(batch, P n)`` (None: none) and the gathered position_ids (packed rows).
    ``attend``: the backend's own attention call (backend._attend, passed in: this module is
    below backend.py)."""
    from ...parallel.hybrid import ulysses_attention

    def core(qf, kf, vf, pos):
        with context_parallel(None):
            return attend(None, qf, kf, vf, padding, scaling, window, causal, {"position_ids": pos}, True, backend)

    return ulysses_attention(q, k, v, position_ids, group, core)


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


def _context_parallel_attend(q, k, v, attention_mask, scaling, window, causal, kwargs, backend, mods, attend):
    """This rank's shard ``q (batch, n, Hq, D)``, ``k/v (batch, n, Hkv, D)`` of a sequence of
    ``P n`` tokens split over the registered group, through the halo exchange.

    Each row must be right-padded over the whole sequence, and the (real) tokens' position_ids
    must be their global index ``r n + j``. A fixed-size all-gather first agrees on every rank's
    verdict and shard shape; a second one (its size depends on the batch) checks positions and
    padding with the rows' real lengths, which every rank needs. So a bad shard raises on every
    rank together, and no collective ever runs with sizes that differ between ranks."""
    import torch.distributed as dist

    from ...parallel.comm import all_gather_ints
    from ...parallel.hybrid import halo_bytes
    from ...parallel.padded import (context_parallel_padded_attention, lengths_from_shard_counts,
                                    local_prefix_counts, padded_window_rows)
    from ...parallel.plan import resolved_window

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
    if _settings.get("context_parallel_packed"):
        return _context_parallel_packed_attend(q, k, v, valid, scaling, window, causal, kwargs, backend, group,
                                               attend)
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
    total = world * n
    if lengths is None:
        windows = {resolved_window(window, causal, total): b}
    else:  # the halo's calls: one per distinct window (padded_window_rows), causal only (refused below otherwise)
        windows = {resolved_window((left, 0), True, total): len(rows)
                   for left, rows in padded_window_rows(lengths, window, total).items()} if causal else {}
    halo = halo_bytes(world, n, windows, k.shape[2], k.shape[3], k.element_size())
    if _choose_exchange(window, halo, q, k, n, group) == "ulysses":
        padding = None if lengths is None else (
            torch.arange(total, device=q.device)[None, :] < torch.tensor(lengths, device=q.device)[:, None])
        position_ids = (torch.arange(n, device=q.device) + rank * n)[None, :]  # checked above: the global ones
        out = _ulysses_attend(q, k, v, padding, position_ids, scaling, window, causal, backend, group, attend)
    else:
        out = context_parallel_padded_attention(q, k, v, lengths, window, causal, scaling, group, backend)
    if lengths is not None:
        out = out * valid[:, :, None, None].to(out.dtype)  # pad rows zero, as without context parallelism
    return out


def _context_parallel_packed_attend(q, k, v, valid, scaling, window, causal, kwargs, backend, group, attend):
    """Packed rows (``register(context_parallel_group=..., context_parallel_packed=True)``): each
    rank feeds its block of every row with the row's position_ids restarting at 0 at each packed
    sequence (``DataCollatorWithFlattening``'s, sliced); the blocks' position_ids are all-gathered
    (``8 batch n (P-1)`` bytes per rank per layer) and each row's sequence boundaries read off them,
    identically on every rank, so a sequence crossing a shard boundary exchanges only its own keys
    (:func:`sft_kernels.parallel.packed.context_parallel_packed_attention`, one call per row)."""
    import torch.distributed as dist

    from ...parallel.comm import all_gather_ints
    from ...parallel.hybrid import packed_row_halo_bytes
    from ...parallel.packed import context_parallel_packed_attention

    b, n = q.shape[:2]
    ok = int(bool(valid.all())) if causal else 0
    if not all(m[0] for m in all_gather_ints([ok], group)):
        raise ValueError(f"{_CP}: packed rows (context_parallel_packed=True) take no padding and causal layers only: "
                         "drop the attention_mask (the flattening collator gives none) and pad nothing")
    pos = kwargs["position_ids"].to(q.device).reshape(-1, n).expand(b, n).contiguous().to(torch.int64)
    parts = [torch.empty_like(pos) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, pos, group=group)
    full = torch.cat(parts, dim=1)  # (batch, P n), the same on every rank
    prev = torch.cat([full.new_full((b, 1), -1), full[:, :-1]], dim=1)
    good = ((full == 0) | (full == prev + 1)).all() and bool((full[:, 0] == 0).all())
    if not good:
        raise ValueError(f"{_CP}: with context_parallel_packed=True each row's position_ids must count 0, 1, ... "
                         "within each packed sequence and restart at 0 at the next (got other values on some rank)")
    rows = [torch.nonzero(full[row] == 0).flatten().tolist() + [full.shape[1]] for row in range(b)]
    halo = packed_row_halo_bytes(dist.get_world_size(group), rows, window, k.shape[2], k.shape[3], k.element_size())
    if _choose_exchange(window, halo, q, k, pos.numel(), group) == "ulysses":
        # DeepSpeed gathers the position_ids again (counted in its bytes): its wrapper always does
        return _ulysses_attend(q, k, v, None, pos, scaling, window, True, backend, group, attend)
    out = []
    for row, cu in enumerate(rows):
        out.append(context_parallel_packed_attention(q[row:row + 1].contiguous(), k[row:row + 1].contiguous(),
                                                     v[row:row + 1].contiguous(), cu, window, True, scaling, group,
                                                     backend))
    return torch.cat(out, dim=0)


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


