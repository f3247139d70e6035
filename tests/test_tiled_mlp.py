"""Tiled MLP (DeepSpeed's TiledMLP through sft_kernels.modules.tiled_mlp) equals the plain MLP:
outputs and every gradient, fp32 within 1e-6 of each tensor's largest element, with uneven
chunks and under transformers' activation checkpointing."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sft_kernels.modules.tiled_mlp import chunk_count, tiled_mlp  # noqa: E402

CONFIG = dict(vocab_size=97, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _step(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    (out.loss * 0.5).backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_chunk_count_matches_torch_chunk():
    for tokens in range(1, 60):
        for chunk in range(1, 20):
            assert chunk_count(tokens, chunk) == len(torch.chunk(torch.empty(tokens), -(-tokens // chunk)))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-ckpt"])
def test_tiled_mlp_equals_plain(checkpointing):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 97, (2, 23))
    labels = ids.clone()
    labels[0, :4] = -100
    ref_loss, ref = _step(model, ids, labels)
    calls = []
    assert tiled_mlp(model, chunk_tokens=7) == 2  # 46 tokens: 7 pieces, the last of 4
    mlp = model.model.layers[0].mlp
    hook = mlp.down_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    loss, got = _step(model, ids, labels)
    hook.remove()
    assert max(calls) <= 7 and 4 in calls  # the MLP really ran in chunks, the last one short
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * ref_loss.item()
    for n, g in ref.items():
        assert _rel(got[n], g) <= 1e-6, (n, _rel(got[n], g))
    with torch.no_grad():  # evaluation: chunked too, same values
        x = torch.randn(3, 5, 32)
        assert _rel(mlp(x), mlp._sft_untiled_forward(x)) <= 1e-6
