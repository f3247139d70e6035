"""Activation-checkpoint offload to CPU for a Hugging Face model, through DeepSpeed's own piece.

With gradient checkpointing a step keeps one tensor per layer on the GPU from the forward to the
backward: the layer's input hidden states, ``layers x tokens x hidden`` in all (Llama-3-8B at
500K tokens in bf16: 32 x 500K x 4096 x 2 B = 122 GiB). ALST keeps them in CPU memory instead
("activation checkpoint offload to CPU"); DeepSpeed 0.19.8 ships that piece for transformers'
checkpointed layers as ``CheckpointHiddenStatesOffload``
(``deepspeed.runtime.activation_checkpointing.offload_activations``): a ``saved_tensors_hooks``
context that, while it is active, marks the first positional argument of every checkpointing
``GradientCheckpointingLayer`` call, copies each marked tensor into a pooled pinned CPU buffer on
a side stream when the checkpoint saves it, and copies it back when the backward's recompute
unpacks it. Everything else a step saves passes through untouched; the newest checkpoint stays on
the GPU (the backward needs it first). :func:`checkpoint_offload` checks that the model is set up
for it and returns that context, to be entered around each micro-batch's forward *and* backward:
the offloaded copies live in the context's own bookkeeping, which its exit releases, so a backward
outside it would find nothing to restore.

Not DeepSpeed's other route, ``activation_checkpointing.cpu_checkpointing`` with
``deepspeed.checkpointing.checkpoint`` as the model's checkpoint function: on DeepSpeed's CPU
accelerator (any synchronized device) 0.19.8 takes a blocking-copy branch where ``.to("cpu")`` of a
CPU tensor is the tensor itself, empties it (``arg.data = torch.empty([])``) and then keeps that
empty storage as the saved copy; the backward's recompute fails (IndexError in the first
projection). It cannot be run, let alone checked, on CPU. (transformers 5's own
``activation_checkpointing_enable(offload=True)`` is a third way: ``torch.autograd.graph.save_on_cpu``
around each checkpoint, blocking copies on the compute stream.)

What a CPU machine can check (``tests/test_activation_offload.py``): on CPU DeepSpeed marks every
layer's input and then declines to copy it (a synchronized device has nothing to offload to), so
the step is the plain checkpointed step exactly; with the accelerator made to report itself
unsynchronized, DeepSpeed's copy and restore code runs on CPU tensors (synchronous, no pinning, no
stream): every layer's input but the last is copied out and copied back, the loss and every
gradient are the plain checkpointed step's, and corrupting the copies changes the gradients (the
backward really reads them). The memory it saves, the pinned buffers and the stream overlap are a
GPU measurement.
"""

from __future__ import annotations

import torch


def _checkpointing_layers(model: torch.nn.Module) -> int:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(1 for m in model.modules()
               if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False))


def checkpoint_offload(model: torch.nn.Module, *, min_offload_bytes: int = 1024, keep_last: int = 1,
                       pin_memory: bool = True, streams: bool = True):
    """DeepSpeed's activation-checkpoint CPU offload for ``model`` (a transformers model whose
    decoder layers are ``GradientCheckpointingLayer``s, with gradient checkpointing already on).

    Returns a reusable context manager (DeepSpeed's ``CheckpointHiddenStatesOffload``; its
    ``stats`` count what it marked, offloaded and restored). Create it once (its CPU buffers are
    pooled across steps) and enter it around each micro-batch's forward and backward::

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        offload = checkpoint_offload(model)
        for batch in loader:
            with offload:
                loss = engine(**batch).loss
                engine.backward(loss)
            engine.step()

    ``keep_last``: how many of the newest checkpoints stay on the device; ``min_offload_bytes``:
    smaller tensors stay; ``pin_memory`` / ``streams``: DeepSpeed's pinned buffers and side-stream
    copies (both on by default, as DeepSpeed ships them).
    """
    try:
        from deepspeed.runtime.activation_checkpointing.offload_activations import (
            get_checkpoint_hidden_states_offloading_ctx_manager)
    except ImportError as exc:  # older DeepSpeed: the piece arrived in 0.19.8
        raise ImportError("checkpoint_offload needs DeepSpeed >= 0.19.8 "
                          "(deepspeed.runtime.activation_checkpointing.offload_activations)") from exc
    if int(keep_last) < 0 or int(min_offload_bytes) < 0:
        raise ValueError(f"keep_last and min_offload_bytes must be >= 0, got {keep_last}, {min_offload_bytes}")
    if _checkpointing_layers(model) == 0:
        raise ValueError(f"checkpoint_offload: no layer of {type(model).__name__} is checkpointed; call "
                         "model.gradient_checkpointing_enable() first (what is offloaded is the checkpoints' inputs)")
    return get_checkpoint_hidden_states_offloading_ctx_manager(
        use_pin_memory=bool(pin_memory), use_streams=bool(streams), min_offload_bytes=int(min_offload_bytes),
        keep_last_count=int(keep_last))
