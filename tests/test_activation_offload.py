"""checkpoint_offload (DeepSpeed's CheckpointHiddenStatesOffload on a transformers model) on CPU.

What this proves, and what it does not: on CPU DeepSpeed marks every checkpointed layer's input
and declines to copy it (a synchronized device), so the step is the plain checkpointed step; with
the accelerator made to report itself unsynchronized, DeepSpeed's own copy-out and copy-back code
runs on CPU tensors: its bookkeeping counts every layer input but the last copied out and
restored, with the bytes of those inputs, the loss and every gradient equal the plain gradient-
checkpointing run's (fp32, per element, within 1e-6 of each tensor's largest), and corrupting the
CPU copies between forward and backward changes the gradients (the backward reads the copies, not
the originals). Pinned buffers, the side stream and the device memory it frees are GPU matters.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from sft_kernels.modules.activation_offload import checkpoint_offload  # noqa: E402

LAYERS, B, L, H = 3, 2, 23, 32
CONFIG = dict(vocab_size=97, hidden_size=H, intermediate_size=80, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _model(tiled):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if tiled:  # what sft-kernels train runs with everything on: the loss and the MLP in chunks
        from sft_kernels.integrations.transformers import tiled_loss
        from sft_kernels.modules.tiled_mlp import tiled_mlp

        tiled_loss(model, chunk_tokens=11)
        tiled_mlp(model, chunk_tokens=7)
    return model


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (B, L), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    return ids, labels


def _step(model, ids, labels, offload=None, between=None):
    model.zero_grad(set_to_none=True)
    if offload is None:
        loss = model(input_ids=ids, labels=labels).loss
        (loss * 0.5).backward()
    else:
        with offload:
            loss = model(input_ids=ids, labels=labels).loss
            if between:
                between(offload)
            (loss * 0.5).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_equal(got, ref):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * ref_loss.item()
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert _rel(grads[n], g) <= 1e-6, (n, _rel(grads[n], g))


@pytest.mark.parametrize("tiled", [False, True], ids=["plain", "tiled-loss-mlp"])
def test_on_cpu_deepspeed_marks_every_checkpoint_and_the_step_is_unchanged(tiled):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        pytest.skip("the CPU check (DeepSpeed's accelerator here is not its CPU one)")
    model = _model(tiled)
    ids, labels = _batch(1)
    ref = _step(model, ids, labels)
    offload = checkpoint_offload(model)
    _assert_equal(_step(model, ids, labels, offload), ref)
    s = offload.stats
    assert s.marked_tensors == LAYERS and s.skipped_marked_tensors == LAYERS, s  # seen, declined on CPU
    assert s.offloaded_tensors == 0 and s.restored_tensors == 0, s


@pytest.mark.parametrize("tiled", [False, True], ids=["plain", "tiled-loss-mlp"])
def test_deepspeed_copy_path_runs_and_gives_the_plain_checkpointed_step(tiled, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        pytest.skip("the CPU check (DeepSpeed's accelerator here is not its CPU one)")
    # the CPU accelerator says it is synchronized, and DeepSpeed then never copies; saying it is not makes
    # DeepSpeed's copy-out / copy-back code run on CPU tensors (its accelerator has no streams: synchronous)
    monkeypatch.setattr(accelerator, "is_synchronized_device", lambda: False)
    model = _model(tiled)
    offload = checkpoint_offload(model)  # the defaults: what sft-kernels train's flag calls
    for seed in (1, 2):  # the context is reused across steps (DeepSpeed pools its CPU buffers)
        ids, labels = _batch(seed)
        ref = _step(model, ids, labels)
        _assert_equal(_step(model, ids, labels, offload), ref)
        s = offload.stats
        assert s.marked_tensors == LAYERS and s.kept_last_tensors == 1, s  # the newest stays on the device
        assert s.offloaded_tensors == s.restored_tensors == LAYERS - 1, s
        assert s.offloaded_bytes == s.restored_bytes == (LAYERS - 1) * B * L * H * 4, s

    def corrupt(off):  # DeepSpeed's private bookkeeping: (cpu copy, device, shape, stride, key) per tensor
        assert len(off._tracker) == LAYERS - 1
        for cpu_copy, *_ in off._tracker.values():
            cpu_copy.mul_(1.5)

    ids, labels = _batch(1)
    ref_loss, ref_grads = _step(model, ids, labels)
    loss, grads = _step(model, ids, labels, offload, between=corrupt)
    assert loss.item() == ref_loss.item()  # the forward ran before the corruption
    worst = max(_rel(grads[n], g) for n, g in ref_grads.items())
    assert worst > 1e-2, worst  # the backward's recompute read the corrupted copies


def test_checkpoint_offload_refuses_a_model_without_checkpointing():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    with pytest.raises(ValueError, match="gradient_checkpointing_enable"):
        checkpoint_offload(model)
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="keep_last"):
        checkpoint_offload(model, keep_last=-1)
