"""``tiled_loss(model)``: a transformers causal LM's loss and every parameter gradient equal
those of its own forward (full logits + transformers' ForCausalLMLoss), fp32, within 1e-6 of
each tensor's largest element."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sft_kernels.integrations.transformers import tiled_loss, untiled_loss  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    # Gemma 2's final logit soft-capping (a small cap that bites), tied embeddings
    "gemma2-final-softcap": lambda: transformers.Gemma2Config(**TINY, head_dim=8, sliding_window=16,
                                                              final_logit_softcapping=3.0, query_pre_attn_scalar=8),
    "qwen2-bias-free-untied": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=False),
}


def _batch(length=29):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -6:] = 0
    labels = ids.clone()
    labels[0, :7] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def _grads(model, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    (out.loss * 0.5).backward()  # a later factor (DeepSpeed's 1/gas) reaches every gradient
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("num_items", [None, 40], ids=["mean", "num_items_in_batch"])
def test_tiled_loss_equals_model_loss(name, num_items):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager")
    ids, mask, labels = _batch()
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if num_items is not None:
        kw["num_items_in_batch"] = torch.tensor(num_items)
    ref, ref_grads = _grads(model, **kw)
    tiled_loss(model, chunk_tokens=11)  # 58 tokens: 6 chunks, the last of 3
    out, grads = _grads(model, **kw)
    assert out.logits is None
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-6 * ref.loss.item()
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        err = ((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
        assert err <= 1e-6, (n, err)
    # without labels: the model's own forward, logits included
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (2, ids.shape[1], 97)
    untiled_loss(model)
    assert model(**kw).logits is not None


def test_tiled_loss_errors():
    with pytest.raises(TypeError, match="causal LM"):
        tiled_loss(torch.nn.Linear(2, 2))
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    with pytest.raises(ValueError, match="chunk_tokens"):
        tiled_loss(model, chunk_tokens=0)
    with pytest.raises(ValueError, match="path"):
        tiled_loss(model, path="liger")


def test_tile_bytes_sizes_the_chunk_from_the_vocabulary():
    """``tile_bytes``: the chunk is ``tile_bytes // (4 V)`` tokens (a fixed-size logits tile at any
    vocabulary), and the loss and gradients are still the full computation's."""
    from torch.overrides import TorchFunctionMode

    from sft_kernels.modules.linear_cross_entropy import tile_chunk_tokens

    class Rows(TorchFunctionMode):  # the token count of every lm_head matmul (weight of vocab rows)
        def __init__(self, vocab):
            super().__init__()
            self.vocab, self.rows = vocab, []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.linear and args[1].shape[0] == self.vocab:
                self.rows.append(args[0].shape[0])
            return func(*args, **(kwargs or {}))

    assert tile_chunk_tokens(32000, 512 * 32000 * 4) == 512 and tile_chunk_tokens(64000, 512 * 32000 * 4) == 256
    assert tile_chunk_tokens(97, 4 * 97 * 9 + 4 * 97 - 1) == 9 and tile_chunk_tokens(10**6, 1) == 1
    with pytest.raises(ValueError, match="tile_bytes"):
        tile_chunk_tokens(97, 0)
    torch.manual_seed(0)
    for vocab, expect in ((97, 9), (194, 4)):  # the same budget: twice the vocabulary, half the tokens
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**dict(TINY, vocab_size=vocab)),
                                                              attn_implementation="eager")
        ids, mask, labels = _batch()
        kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
        ref, ref_grads = _grads(model, **kw)
        tiled_loss(model, chunk_tokens=5, tile_bytes=4 * 97 * 9 + 7)  # the budget wins over chunk_tokens
        mode = Rows(vocab)
        with mode:
            out, grads = _grads(model, **kw)
        assert max(mode.rows) == expect and sum(mode.rows) <= 2 * 29, mode.rows
        assert abs(out.loss.item() - ref.loss.item()) <= 1e-6 * ref.loss.item()
        for n, g in ref_grads.items():
            err = ((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
            assert err <= 1e-6, (vocab, n, err)
    with pytest.raises(ValueError, match="tile_bytes"):
        tiled_loss(model, tile_bytes=0)
