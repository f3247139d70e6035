"""This package's attention as the core attention of DeepSpeed's ALST (Arctic Long Sequence
Training, ``deepspeed.runtime.sequence_parallel.ulysses_sp``).

ALST's ``UlyssesSPAttentionHF.register_with_transformers(model, core_attn_implementation=...)``
replaces the entry ``ALL_ATTENTION_FUNCTIONS[core_attn_implementation]`` with a wrapper that
all-to-alls q/k/v from ``(batch, heads, L/P, D)`` on each rank to ``(batch, heads/P, L, D)``,
all-gathers ``position_ids`` to the whole sequence, calls the core attention on the whole
sequence with its share of the heads, and all-to-alls the output back. With
``core_attn_implementation="sft_sliding_window"`` the core is :func:`sft_attention_forward`:
the model's window is kept (the layers pass ``sliding_window``; ``"sqrt"`` resolves from the
whole length, which the core sees), and packed rows are found from the gathered position_ids.

What ALST's wrapper drops, and what :func:`register_alst` puts back (DeepSpeed 0.19.8):

- **The padding mask.** The wrapper sets ``attention_mask = None`` for every core but
  flex_attention (a 4D mask of the local shard is wrong after the all-to-all and O(L^2)). This
  backend's mask is an O(batch) segment table of the *local* shard. Without it, a left-padded
  row's real queries attend its pad keys, and pad positions are not zero: the answer differs from
  one process on the whole batch (right padding under causal attention alone is harmless, since no
  real query sees a later pad key). :func:`register_alst` wraps ALST's entry: it turns the local
  table into the shard's key validity ``(batch, L/P)``, all-gathers it over the sequence-parallel
  group (``batch * L/P`` bytes per rank per layer, one eighth of the position_ids ALST already
  gathers) and hands the whole-sequence padding mask to the core in the kwarg
  ``sft_padding_mask``, which ALST passes through. Every rank gathers in every layer (a rank whose
  shard has no padding has no table), so the collective always matches.
- **cu_seq_lens_q/k, max_length_q/k.** ALST passes them through unchanged, but they describe the
  local shard (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` before
  ``UlyssesSPDataLoaderAdapter``), not the gathered sequence: the core refuses them (measured:
  "cu_seqlens_q[-1] must equal the number of packed tokens 72, got 36"). They are dropped; the
  gathered position_ids (restarting at every packed sequence) carry the same boundaries.

With accelerate (HF Trainer, TRL): ``TrainingArguments(parallelism_config=alst_parallelism_config(P),
deepspeed=...)``; see :func:`alst_parallelism_config` for what accelerate 1.16 refuses and how
it is met.

Usage (every rank, after ``deepspeed.init_distributed``)::

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sft_sliding_window")
    mpu = register_alst(model, sequence_parallel_size=P, micro_batch_size=B)
    # each rank feeds its block of L/P consecutive tokens with the global position_ids
    # (UlyssesSPDataLoaderAdapter does that) and its slice of the 2D attention_mask

The model must be built with ``attn_implementation="sft_sliding_window"`` (after
:func:`sft_kernels.integrations.transformers.register`, which :func:`register_alst` calls
when the name is not registered yet). ``register_alst`` replaces a global entry of
transformers' registry, as ALST does: every model using that name in the process goes through
ALST afterwards.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

ALST_PADDING_KWARG = "sft_padding_mask"
_DROPPED = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# what accelerate's register_with_transformers call installs (set by alst_parallelism_config):
# ALST's Ulysses in every layer, or this backend's own exchange over ALST's sequence-parallel group
_ACCELERATE = {"exchange": "ulysses", "packed": False}


def _local_key_validity(attention_mask: Optional[torch.Tensor], batch: int, n: int, device) -> torch.Tensor:
    """``(batch, n)`` bool: which of this shard's tokens are real, from what this backend's mask
    function made of the shard's 2D mask (None: all real; a ``(2, batch, 5)`` segment table whose
    key lengths are ``[0, left pads, real, 0, right pads]``)."""
    from ..integrations.transformers.masks import _is_segments

    if attention_mask is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    if not _is_segments(attention_mask):
        raise ValueError(
            "register_alst: the attention mask reaching ALST's wrapper is not this backend's padding table "
            f"(got {type(attention_mask).__name__} {tuple(getattr(attention_mask, 'shape', ()))}); pass the 2D "
            "(batch, L/P) padding slice as attention_mask, not a 4D mask")
    keys = attention_mask[1].to(device=device, dtype=torch.long)  # (batch, 5)
    if keys.shape[0] != batch or int(keys[0].sum()) != n:
        raise ValueError(f"register_alst: the padding table is for batch {keys.shape[0]} x {int(keys[0].sum())} "
                         f"tokens, the shard has {batch} x {n}")
    pos = torch.arange(n, device=device)[None, :]
    start = keys[:, 1:2]
    return (pos >= start) & (pos < start + keys[:, 2:3])


def _wrap_entry(mpu, disable_in_eval: bool) -> None:
    """Put this module's wrapper in front of the entry ALST just installed for this backend."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import deepspeed.comm as ds_dist

    from ..integrations.transformers import ATTN_IMPLEMENTATION, sft_attention_forward

    ulysses = ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION]
    group = mpu.get_sequence_parallel_group()
    world = mpu.get_sequence_parallel_world_size()

    def sft_alst_attention(module, query, key, value, attention_mask, *args, **kwargs):
        if disable_in_eval and not module.training:
            # ALST then runs the core on this rank's sequences as they are, but its wrapper has
            # already dropped their mask: call the core directly, mask kept
            return sft_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
        b, n = query.shape[0], query.shape[2]
        local = _local_key_validity(attention_mask, b, n, query.device).to(torch.uint8)
        parts = [torch.empty_like(local) for _ in range(world)]
        ds_dist.all_gather(parts, local, group=group)  # every rank, every layer: the collective matches
        padding = torch.cat(parts, dim=1).bool()
        for name in _DROPPED:
            kwargs.pop(name, None)
        kwargs[ALST_PADDING_KWARG] = None if bool(padding.all()) else padding
        return ulysses(module, query, key, value, None, *args, **kwargs)

    sft_alst_attention.ulysses = ulysses  # ALST's own entry, for tests and controls
    ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] = sft_alst_attention


def _exchange_over(model, mpu, disable_in_eval: bool, exchange: str, packed: bool) -> None:
    """Instead of ALST's entry, this backend over ALST's sequence-parallel group: the halo, or per
    layer the halo or Ulysses by bytes (``register(context_parallel_group=...,
    context_parallel_exchange=exchange)``), on the batches DeepSpeed's UlyssesSPDataLoaderAdapter
    shards. ALST's wrapper has to go (it would all-to-all every layer first); the groups it made
    stay, and so does everything accelerate does around them (the data adapter, the loss over the
    group). ``disable_in_eval``: in eval mode the model runs as without context parallelism (ALST
    runs its core on the unsharded eval batches likewise), switched by hooks on the whole model's
    forward because the mask function runs before any attention layer."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ..integrations.transformers import ATTN_IMPLEMENTATION, register, sft_attention_forward
    from ..integrations.transformers.settings import _settings

    group = mpu.get_sequence_parallel_group()
    register(window_size=_settings["window_size"], backend=_settings["backend"], context_parallel_group=group,
             context_parallel_packed=packed, context_parallel_exchange=exchange)
    ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] = sft_attention_forward  # ALST's entry replaced
    if disable_in_eval and isinstance(model, torch.nn.Module):
        saved = []

        def before(module, args):
            saved.append(_settings["context_parallel_group"])
            if not module.training:
                _settings["context_parallel_group"] = None

        def after(module, args, output):
            _settings["context_parallel_group"] = saved.pop()

        model.register_forward_pre_hook(before)
        model.register_forward_hook(after)


def _without_flattening_keys(batches):
    """Batches without the flattened row's ``cu_seq_lens_q/k`` / ``max_length_q/k``."""
    for batch in batches:
        if isinstance(batch, dict):
            batch = {k: v for k, v in batch.items() if k not in _DROPPED}
        yield batch


def _adapter_drops_flattening_keys() -> None:
    """DeepSpeed's ``UlyssesSPDataLoaderAdapter`` shards every tensor of a batch along dim 1, so the
    1-D ``cu_seq_lens_q/k`` that TRL's padding-free collator (``SFTTrainer(packing=True)``) and
    ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` add stop it (``IndexError`` in
    ``refill``, DeepSpeed 0.19.8), and ``max_length_q/k`` would be gathered as objects. They describe
    the whole flattened row, not a shard, and the gathered position_ids carry the same boundaries
    (the wrapper above drops them anyway), so the adapter's input iterator leaves them out: its
    ``iter`` attribute, set in ``__init__`` and again at every epoch's end, is wrapped on assignment."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    if isinstance(UlyssesSPDataLoaderAdapter.__dict__.get("iter"), property):
        return

    def get(self):
        return self.__dict__["_sft_kernels_iter"]

    def set(self, it):
        self.__dict__["_sft_kernels_iter"] = _without_flattening_keys(it)

    UlyssesSPDataLoaderAdapter.iter = property(get, set)


def install() -> None:
    """Make every ``UlyssesSPAttentionHF.register_with_transformers(...,
    core_attn_implementation="sft_sliding_window")`` call -- accelerate's (HF Trainer, TRL) as
    well as :func:`register_alst`'s -- put this module's wrapper in front of the entry it installs
    (DeepSpeed's classmethod is wrapped once; other core attentions are left as they are).
    Registers the backend's name with transformers if it is not registered yet."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ..integrations.transformers import ATTN_IMPLEMENTATION, register

    if ATTN_IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        register()
    _adapter_drops_flattening_keys()
    original = UlyssesSPAttentionHF.register_with_transformers
    if getattr(original, "_sft_kernels", False):
        return
    original = original.__func__

    @functools.wraps(original)  # accelerate passes disable_in_eval only where the signature lists it
    def register_with_transformers(cls, model_name_or_path, core_attn_implementation, sequence_parallel_size,
                                   *args, **kwargs):
        mpu = original(cls, model_name_or_path, core_attn_implementation, sequence_parallel_size, *args, **kwargs)
        if mpu is not None and core_attn_implementation == ATTN_IMPLEMENTATION:
            disable_in_eval = bool(kwargs.get("disable_in_eval", False))
            if _ACCELERATE["exchange"] == "ulysses":
                _wrap_entry(mpu, disable_in_eval)
            else:
                _exchange_over(model_name_or_path, mpu, disable_in_eval, _ACCELERATE["exchange"],
                               _ACCELERATE["packed"])
        return mpu

    register_with_transformers._sft_kernels = True
    UlyssesSPAttentionHF.register_with_transformers = classmethod(register_with_transformers)


def alst_parallelism_config(sp_size: int, seq_length: Optional[int] = None, seq_length_is_variable: bool = True,
                            disable_in_eval: bool = True, exchange: str = "ulysses", packed: bool = False):
    """accelerate's ``ParallelismConfig(sp_backend="deepspeed", sp_size=sp_size)`` with this
    backend as ALST's core attention, for ``TrainingArguments(parallelism_config=...)`` (HF
    Trainer, TRL's SFTTrainer); calls :func:`install`.

    accelerate 1.16's ``DeepSpeedSequenceParallelConfig`` accepts only ``sdpa``, the flash
    attentions and hub kernels as ``sp_attn_implementation`` (a ValueError otherwise, at
    construction), while DeepSpeed accepts any name in transformers' registry: the handler is
    built with ``"sdpa"`` and then given ``"sft_sliding_window"``. On CPU (gloo) accelerate does
    not initialise ``deepspeed.comm``; call ``deepspeed.init_distributed(dist_backend="gloo")``
    before building ``TrainingArguments`` there.

    ``exchange``: ``"ulysses"`` (default): ALST's all-to-all in every layer, this backend as its
    core (any padding, packed rows). ``"auto"`` / ``"halo"``: this backend's own context
    parallelism over ALST's group instead (``register(context_parallel_exchange=)``: per layer the
    halo or Ulysses by bytes, or the halo everywhere), on the same sharded batches; its inputs:
    rows right-padded over the whole sequence, or with ``packed=True`` packed rows without a mask
    (``DataCollatorWithFlattening``), causal layers.
    """
    from .hybrid import POLICIES

    if exchange not in POLICIES:  # checked now, not inside Trainer.train()
        raise ValueError(f"alst_parallelism_config: exchange must be one of {POLICIES}, got {exchange!r}")
    _ACCELERATE.update(exchange=exchange, packed=bool(packed))
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    from ..integrations.transformers import ATTN_IMPLEMENTATION

    install()
    handler = DeepSpeedSequenceParallelConfig(
        sp_seq_length=seq_length, sp_seq_length_is_variable=seq_length_is_variable, sp_attn_implementation="sdpa",
        sp_disable_in_eval=disable_in_eval)
    handler.sp_attn_implementation = ATTN_IMPLEMENTATION
    return ParallelismConfig(sp_backend="deepspeed", sp_size=sp_size, sp_handler=handler)


def register_alst(model, sequence_parallel_size: int, micro_batch_size: int, seq_length: Optional[int] = None,
                  seq_length_is_variable: bool = True, disable_in_eval: bool = False):
    """ALST (DeepSpeed-Ulysses for Hugging Face models) with this package's attention as its core.

    Calls DeepSpeed's ``UlyssesSPAttentionHF.register_with_transformers(model,
    core_attn_implementation="sft_sliding_window", ...)`` with the arguments given (after
    :func:`install`), so the entry it installs has this module's wrapper in front: padding masks
    reach the core and local ``cu_seq_lens`` do not (see the module docstring). Returns
    DeepSpeed's ``mpu`` (its sequence-parallel groups), as ``register_with_transformers`` does;
    None when ``sequence_parallel_size == 1`` (nothing registered, as there).

    Each rank feeds ``input_ids (batch, L/P)`` with ``L % P == 0``, the **global**
    ``position_ids`` of its tokens (restarting at each packed sequence), and, when a batch is
    padded, its slice of the 2D ``attention_mask`` (each row's real tokens one block over the
    whole sequence: left or right padding). Heads: ``heads % P == 0``, ``heads_kv`` a multiple or
    divisor of ``P`` (ALST's rules).
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    from ..integrations.transformers import ATTN_IMPLEMENTATION

    install()
    _ACCELERATE.update(exchange="ulysses", packed=False)  # ALST itself, whatever accelerate was given
    return UlyssesSPAttentionHF.register_with_transformers(
        model, core_attn_implementation=ATTN_IMPLEMENTATION, sequence_parallel_size=sequence_parallel_size,
        micro_batch_size=micro_batch_size, seq_length=seq_length, seq_length_is_variable=seq_length_is_variable,
        disable_in_eval=disable_in_eval)
