"""The cheaper exchange per layer: the halo for sliding-window layers, DeepSpeed-Ulysses for
full-attention layers of the same (hybrid) model, chosen by the bytes each would send.

A layer of a model split over ``P`` ranks (``n`` consecutive tokens each, ``batch`` rows) can run

- the **halo** (:func:`sft_kernels.context_parallel_attention`, or the packed-row halo): each rank
  receives the keys/values its window reaches before (and after) its shard and returns their
  gradients. Its bytes follow the window: ``(rows sent + rows returned) 2 heads_kv head_dim e``
  per row of the batch, from the plan (:class:`~sft_kernels.parallel.HaloPlan`,
  :class:`~sft_kernels.parallel.PackedHaloPlan`). On a causal full-attention layer every rank
  moves ``(P - 1) n`` key rows: as much as half an all-gather of K/V.
- **Ulysses** (DeepSpeed's ``UlyssesSPAttentionHF``, ALST's Ulysses for Hugging Face models):
  all-to-alls q, k, v from ``n`` tokens x all heads to ``P n`` tokens x ``heads / P`` heads, runs
  this package's attention on the whole sequence, all-to-alls the output back, and the reverse in
  the backward: ``2 (2 heads + 2 kv) n head_dim e (P - 1) / P`` per row (``kv = heads_kv``
  replicated up to ``P`` when ``heads_kv < P``, as DeepSpeed does), plus its all-gather of the
  int64 position_ids, ``8 n (P - 1)`` per row. Independent of the window.

So on a causal layer whose halo is the whole sequence, Ulysses sends less exactly when
``2 (heads + kv) < P heads_kv`` (up to the small terms): from ``P = 5`` for MHA, ``P > 10`` for 4:1
GQA; at ``P <= 4`` the halo is never more than Ulysses (MHA ties at ``P = 4``) and stays the choice.
A sliding-window layer with ``W - 1 <= n`` sends ``4 (W - 1) heads_kv head_dim e`` by the halo,
constant in ``L``: the halo, unless ``W`` is comparable to ``L``.

Both sides are computed on every rank from what every rank knows (the group size, the shard
shape, the resolved windows, the packed rows' boundaries), so every rank takes the same choice
without a collective; the halo's figure is the busiest rank's (it sets the step). The checks that
run before either path (the shapes' and padding's all-gathers) are common to both and not counted.

Why DeepSpeed's class and not only its all-to-all: ``UlyssesSPAttentionHF`` is what ALST users run
(KV-head replication, its differentiable ``deepspeed::dim_zero_all_to_all`` op, the layouts); the
one thing it costs beyond the all-to-alls is the all-gather of position_ids, about 0.1% of the
all-to-alls at 32 heads of 128 in bf16, which the byte count includes.
"""

from __future__ import annotations

import types
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .plan import halo_plan
from .packed import packed_halo_plan

HALO = "halo"
ULYSSES = "ulysses"
POLICIES = ("auto", HALO, ULYSSES)
HALO_META_BYTES = 10 * 8  # context_parallel_attention's consistency all-gather: 10 float64 to each other rank
PACKED_META_BYTES = 7 * 8  # context_parallel_packed_attention's: 7 float64


def halo_bytes(world: int, n: int, windows: Dict[tuple, int], kv_heads: int, head_dim: int, elem: int) -> List[int]:
    """Bytes each rank sends per layer step (forward + backward) through the halo, one call of
    :func:`sft_kernels.context_parallel_attention` per resolved window: ``windows`` maps ``(left,
    right)`` (>= 0, unbounded already replaced by ``P n - 1``) to the number of rows that call holds."""
    row = 2 * kv_heads * head_dim * elem  # one key row: K and V (or dK and dV)
    out = []
    for r in range(world):
        total = 0
        for (left, right), rows in windows.items():
            plan = halo_plan(r, world, n, left, right)
            total += rows * (plan.rows_sent() + plan.rows_returned()) * row + HALO_META_BYTES * (world - 1)
        out.append(total)
    return out


def packed_row_halo_bytes(world: int, rows: Sequence, window, kv_heads: int, head_dim: int, elem: int) -> List[int]:
    """Bytes each rank sends per layer step for packed rows through the packed-row halo, one call of
    :func:`sft_kernels.parallel.context_parallel_packed_attention` per row; ``rows``: each row's
    ``cu_seqlens`` over the whole row."""
    row = 2 * kv_heads * head_dim * elem
    out = [0] * world
    for cu in rows:
        for r in range(world):
            plan = packed_halo_plan(r, world, cu, window)
            out[r] += (plan.rows_sent() + plan.rows_received()) * row + PACKED_META_BYTES * (world - 1)
    return out


def ulysses_possible(world: int, heads: int, kv_heads: int) -> bool:
    """DeepSpeed's ``UlyssesSPAttentionHF`` rule: ``heads % P == 0`` and ``heads_kv`` a multiple or a
    divisor of ``P``."""
    return heads % world == 0 and (kv_heads % world == 0 or world % kv_heads == 0)


def ulysses_bytes(world: int, n: int, batch: int, heads: int, kv_heads: int, head_dim: int, elem: int,
                  position_elems: int) -> int:
    """Bytes each rank sends per layer step through DeepSpeed's ``UlyssesSPAttentionHF``: the four
    all-to-alls forward and four backward (``(P - 1) / P`` of each tensor leaves the rank), ``kv``
    replicated up to ``P``, and its all-gather of ``position_elems`` int64 position_ids."""
    kv = kv_heads * max(1, world // kv_heads)
    heads_part = 2 * (2 * heads + 2 * kv) * batch * n * head_dim * elem * (world - 1) // world
    return heads_part + 8 * position_elems * (world - 1)


def choose(policy: str, halo: Sequence[int], ulysses: Optional[int]) -> str:
    """``"halo"`` or ``"ulysses"``: ``policy="auto"`` takes Ulysses only when it is possible
    (``ulysses`` not None) and sends fewer bytes than the halo's busiest rank (a tie stays on the
    halo: neighbour messages, no head-count constraint); ``"ulysses"`` wherever it is possible;
    ``"halo"`` always."""
    if policy not in POLICIES:
        raise ValueError(f"context parallel exchange policy must be one of {POLICIES}, got {policy!r}")
    if ulysses is None or policy == HALO:
        return HALO
    if policy == ULYSSES:
        return ULYSSES
    return ULYSSES if ulysses < max(halo) else HALO


_instances: Dict[tuple, object] = {}


def _ulysses_module(group, batch: int, heads: int, kv_heads: int, head_dim: int):
    """DeepSpeed's ``UlyssesSPAttentionHF`` for this group and shape (built once: its constructor
    checks transformers' version and registers the group with DeepSpeed's all-to-all op). The core
    is set per call."""
    import deepspeed.comm as ds_dist
    import torch.distributed as dist

    if not ds_dist.is_initialized():  # torch.distributed is: DeepSpeed wraps the existing process group
        import deepspeed

        deepspeed.init_distributed(dist_backend=str(dist.get_backend(group)))
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    key = (id(group), batch, heads, kv_heads, head_dim)
    if key not in _instances:
        _instances[key] = UlyssesSPAttentionHF(
            attn=None, batch_size=batch, attn_head_count=heads, attn_head_size=head_dim, kv_head_count=kv_heads,
            num_hidden_layers=1, process_group=group, seq_length_is_variable=True)
    return _instances[key]


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor, group,
                      core: Callable) -> torch.Tensor:
    """One layer through DeepSpeed's ``UlyssesSPAttentionHF`` over ``group``.

    ``q (batch, n, heads, head_dim)``, ``k, v (batch, n, heads_kv, head_dim)``: this rank's shard;
    ``position_ids``: this rank's (gathered by DeepSpeed to the whole sequence and handed to the
    core). ``core(q, k, v, position_ids)`` gets ``(batch, P n, heads / P, head_dim)`` and K/V with
    their share of the (replicated) KV heads, the whole sequence, and returns the attention output
    of the same layout. Returns ``(batch, n, heads, head_dim)``, differentiable.
    """
    b, n, h, d = q.shape
    uattn = _ulysses_module(group, b, h, k.shape[2], d)

    def attn(module, query, key, value, attention_mask, *args, **kwargs):  # (b, h/P, L, d) in, (b, L, h/P, d) out
        out = core(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), kwargs["position_ids"])
        return out, None

    uattn.attn = attn
    module = types.SimpleNamespace(training=True)  # UlyssesSPAttentionHF reads .training, writes .num_key_value_groups
    out, _ = uattn(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
                   position_ids=position_ids)
    return out.view(b, n, h, d)
