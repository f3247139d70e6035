"""Issue 19, the Hugging Face backend: attention dropout refused with advice that works for the
family at hand, and bidirectional encoders' pad positions computed as eager computes them.

- Dropout: BERT reads ``attention_probs_dropout_prob``, GPT-2 ``attn_pdrop``, Llama
  ``attention_dropout``; the error names the field the model actually read and the layer
  attribute holding it. Each test follows both pieces of advice (rebuild with the field at 0.0;
  set the built layers' attribute to 0.0) and the training-mode forward then equals eager's.
- Pad queries of a bidirectional layer with an unbounded window attend the row's real keys,
  as eager does (it masks keys only): a left-padded BERT classifier reads its CLS token at a
  pad position, so its logits depend on it (they differed from eager by 9e-3 when pad rows were
  zero). Compared with eager per element at every position, pads included, and in the gradients.
"""

import copy
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sft_kernels.integrations import transformers as sft_tf  # noqa: E402
from tests.helpers import TOL, assert_rel  # noqa: E402

NAME = "sft_sliding_window"
TOL32 = TOL[torch.float32]
VOCAB = 60


def _bert(**kw):
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, hidden_dropout_prob=0.0, num_labels=3, **kw)


FAMILIES = {  # family: (config with the given attention dropout, the field the model reads)
    "bert": (lambda p: _bert(attention_probs_dropout_prob=p), "attention_probs_dropout_prob"),
    "roberta": (lambda p: transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=p, pad_token_id=1, max_position_embeddings=40),
        "attention_probs_dropout_prob"),
    "gpt2": (lambda p: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                               embd_pdrop=0.0, attn_pdrop=p, bos_token_id=0, eos_token_id=0),
             "attn_pdrop"),
    "llama": (lambda p: transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 attention_dropout=p), "attention_dropout"),
}


@pytest.fixture(autouse=True)
def _registered():
    sft_tf.register(window_size=None)
    yield
    sft_tf.register(window_size=None)


def _build(cfg, impl, model_cls=transformers.AutoModel):
    torch.manual_seed(0)
    return model_cls.from_config(copy.deepcopy(cfg), attn_implementation=impl)


def _ids(b=2, l=9):
    return torch.randint(2, VOCAB, (b, l), generator=torch.Generator().manual_seed(1))


def _hidden(model, ids, mask=None):
    return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dropout_error_names_the_field_the_model_reads_and_its_advice_works(family):
    make, field = FAMILIES[family]
    ours = _build(make(0.1), NAME).train()
    ids = _ids()
    with pytest.raises(ValueError) as info:
        _hidden(ours, ids)
    msg = str(info.value)
    assert f"from config.{field})" in msg, msg
    # advice 1: build the model with the named field at 0.0
    named = re.search(r"build or load the model with (\w+)=0\.0", msg).group(1)
    eager = _build(make(0.0), "eager").train()
    rebuilt = _build(transformers.AutoConfig.for_model(**{**make(0.1).to_dict(), named: 0.0}), NAME).train()
    assert_rel(_hidden(rebuilt, ids), _hidden(eager, ids).detach(), TOL32, f"{family}: rebuilt with {named}=0.0")
    # advice 2: on the built model, the layers' attribute named in the message
    cls_name, attr = re.search(r"on a built model set (\w+)\.([\w.]+) = 0\.0 on every attention layer", msg).groups()
    layers = [m for m in ours.modules() if type(m).__name__ == cls_name]
    assert layers
    for m in layers:
        *path, last = attr.split(".")
        setattr(m if not path else getattr(m, path[0]), last, 0.0)
    assert_rel(_hidden(ours, ids), _hidden(eager, ids).detach(), TOL32, f"{family}: {cls_name}.{attr} = 0.0")


def test_dropout_error_prefers_the_attention_field_and_falls_back_to_a_list():
    """BERT's default config has hidden_dropout_prob == attention_probs_dropout_prob == 0.1: the
    attention field is the one named. A value no config field holds gets the generic advice."""
    model = transformers.AutoModel.from_config(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48),
        attn_implementation=NAME).train()
    with pytest.raises(ValueError, match=r"from config\.attention_probs_dropout_prob\)") as info:
        _hidden(model, _ids())
    assert "hidden_dropout_prob" not in str(info.value)
    llama = _build(FAMILIES["llama"][0](0.0), NAME).train()
    for layer in llama.layers:
        layer.self_attn.attention_dropout = 0.25
    with pytest.raises(ValueError, match=r"0\.25 in training \(LlamaAttention\.attention_dropout, from a config field "
                                         r"of this model\).*attention_probs_dropout_prob for BERT"):
        _hidden(llama, _ids())


@pytest.mark.parametrize("padding", ["left", "right"])
def test_bidirectional_pad_positions_match_eager(padding):
    """A BERT classifier on a padded batch: logits, every position's hidden states (pads
    included) and every parameter gradient against eager's, per element."""
    cfg = _bert(attention_probs_dropout_prob=0.0)
    eager = _build(cfg, "eager", transformers.AutoModelForSequenceClassification)
    ours = _build(cfg, NAME, transformers.AutoModelForSequenceClassification)
    ours.load_state_dict(eager.state_dict())
    ids, mask = _ids(3, 11), torch.ones(3, 11, dtype=torch.long)
    if padding == "left":  # rows 1, 2: the CLS position (0) is padding
        mask[1, :4] = 0
        mask[2, :9] = 0
    else:
        mask[1, 6:] = 0
        mask[2, 1:] = 0
    results = []
    for model in (eager, ours):
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        out.logits.square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), [h.detach() for h in out.hidden_states], grads))
    (le, he, ge), (lo, ho, go) = results
    assert_rel(lo, le, TOL32, "logits")
    for i, (a, b) in enumerate(zip(ho, he)):
        assert_rel(a, b, TOL32, f"hidden states {i}, every position")
        assert_rel(a[mask == 0], b[mask == 0], TOL32, f"hidden states {i}, pad positions")
    assert ge.keys() == go.keys()
    for n in ge:
        if n.endswith("key.bias"):  # exactly zero in exact arithmetic (a row's scores shift by one constant)
            assert go[n].abs().max() < 1e-10 and ge[n].abs().max() < 1e-10, n
            continue
        assert_rel(go[n], ge[n], TOL32, f"grad {n}")
