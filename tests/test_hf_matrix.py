"""Model families x paths, each against transformers' own eager attention with the same window.

Every cell builds two tiny random models from one config (same weights): one with
``attn_implementation="eager"`` -- the oracle; its window is the config's ``sliding_window`` on
the layers the config marks sliding, applied by transformers' own mask code -- and one with
this package's ``"sft_sliding_window"``. Nothing on the test side comes from this package's
window or mask code. ``test_control_detects_a_wrong_window`` shows that the comparison
fails when our model's window is one key wider or narrower than the oracle's.

Windowed families are run with a *trap* window registered (``register(window_size=2)``):
the registered window is only for models without a window of their own, so it must never
show up -- not on their sliding layers, not on their full-attention layers.

Float32 throughout (eager takes its softmax in float32, so that is the precision it
defines), except the autocast row, which holds bf16 autocast to a FlashAttention-style bar:
its relative error against float32 eager at most twice that of eager itself under the same
autocast (plus 1e-3).

Rows are :data:`FAMILIES`; a family is a config factory (Gemma2 with logit soft-capping and
GPT-OSS with attention sinks among them). A family that this backend refuses sits in
:data:`REFUSED` with the error it must raise. Runtime on 2 shared CPU cores: see the README.
"""

import dataclasses
from typing import Callable, Optional

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

from sft_kernels.integrations import transformers as sft_tf  # noqa: E402
from tests.helpers import TOL, assert_rel, assert_rel_bar  # noqa: E402

NAME = "sft_sliding_window"
TOL32 = TOL[torch.float32]
W = 6  # the models' sliding window; sequences are longer, prompts start shorter
TRAP = 2  # registered window: must never be applied to a model that has its own
VOCAB = 96
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.3, pad_token_id=0)
HYBRID = ["sliding_attention", "full_attention"]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    make: Callable  # (sliding_window) -> config
    windowed: bool = True  # has a window of its own
    # transformers 5.24's eager is not self-consistent for Gemma3 use_bidirectional_attention:
    # generate() with a static cache builds its masks in create_masks_for_generate, which drops
    # Gemma3's bidirectional overlay (eager turns causal there; its dynamic-cache generation and
    # plain forwards are bidirectional). This backend stays bidirectional, as the model's layers
    # say; the static-cache generation is then compared with eager's dynamic-cache one.
    static_generate_oracle: Optional[str] = "static"

    def config(self, window=W):
        return self.make(window)


def _gpt_oss(w):
    config = transformers.GptOssConfig(**TINY, head_dim=8, sliding_window=w, layer_types=HYBRID, num_local_experts=4,
                                       num_experts_per_tok=2)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}  # no YaRN at 128 positions
    return config


def _gemma3(bidirectional):
    return lambda w: transformers.Gemma3TextConfig(**TINY, head_dim=8, sliding_window=w, layer_types=HYBRID,
                                                   use_bidirectional_attention=bidirectional)


FAMILIES = [
    Family("llama", lambda w: transformers.LlamaConfig(**TINY), windowed=False),
    Family("mistral", lambda w: transformers.MistralConfig(**TINY, sliding_window=w)),
    # hybrid: layer 0 full attention, layer 1 sliding (layers >= max_window_layers slide)
    Family("qwen2-hybrid", lambda w: transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=w,
                                                               max_window_layers=1)),
    Family("qwen3", lambda w: transformers.Qwen3Config(**TINY, head_dim=8, use_sliding_window=True, sliding_window=w,
                                                        max_window_layers=0)),
    Family("gemma2", lambda w: transformers.Gemma2Config(**TINY, head_dim=8, sliding_window=w, layer_types=HYBRID,
                                                          attn_logit_softcapping=None, final_logit_softcapping=None,
                                                          query_pre_attn_scalar=8)),
    Family("gemma3", _gemma3(False)),
    Family("gemma3-bidirectional", _gemma3(True), static_generate_oracle=None),
    Family("cohere2", lambda w: transformers.Cohere2Config(**TINY, sliding_window=w, layer_types=HYBRID)),
    Family("phi3", lambda w: transformers.Phi3Config(**TINY, sliding_window=w)),
    Family("starcoder2", lambda w: transformers.Starcoder2Config(**TINY, sliding_window=w)),
    # logit soft-capping at Gemma 2's default (50) and a small cap that bites on these tiny models
    Family("gemma2-softcap", lambda w: transformers.Gemma2Config(**TINY, head_dim=8, sliding_window=w,
                                                                  layer_types=HYBRID, attn_logit_softcapping=50.0,
                                                                  query_pre_attn_scalar=8)),
    Family("gemma2-softcap2", lambda w: transformers.Gemma2Config(**TINY, head_dim=8, sliding_window=w,
                                                                   layer_types=HYBRID, attn_logit_softcapping=2.0,
                                                                   final_logit_softcapping=None, query_pre_attn_scalar=8)),
    # attention sinks (a learned logit per head), sliding and full layers, a tiny mixture of experts
    Family("gpt-oss", lambda w: _gpt_oss(w)),
]
FAMILY_IDS = [f.name for f in FAMILIES]

REFUSED = [
    # (family, error the forward must raise)
    # bidirectional layers, causal masks in transformers (eager follows the masks): ambiguous
    (Family("gemma2-bidirectional", lambda w: transformers.Gemma2Config(
        **TINY, head_dim=8, sliding_window=w, layer_types=HYBRID, attn_logit_softcapping=None,
        use_bidirectional_attention=True)), "use_bidirectional_attention"),
]


# ----------------------------------------------------------------------------- building blocks
@pytest.fixture(autouse=True)
def _registered():
    yield
    sft_tf.register(window_size=None)


def _pair(family: Family, window_delta=0):
    """(eager oracle, our model) with the same weights. ``window_delta`` (the control only) moves
    our model's ``config.sliding_window`` by that many keys."""
    sft_tf.register(window_size=TRAP if family.windowed else None)
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(family.config(), attn_implementation="eager", dtype=torch.float32)
    config = family.config()
    if window_delta:  # after the config's own post-processing (Gemma3 bidirectional halves it)
        config.sliding_window = config.sliding_window + window_delta
    ours = AutoModelForCausalLM.from_config(config, attn_implementation=NAME, dtype=torch.float32)
    ours.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and ours.config._attn_implementation == NAME
    return eager, ours


B, L = 3, 16


def _batch(padding, b=B, length=L, seed=1):
    """Token ids and a 0/1 mask; padded rows keep at least two tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, length), generator=g)
    if padding == "none":
        return ids, None
    mask = torch.ones(b, length, dtype=torch.long)
    lens = [length, length - 5, 3][:b]
    for r, n in enumerate(lens):
        if padding == "right":
            mask[r, n:] = 0
        else:
            mask[r, : length - n] = 0
    return ids, mask


def _loss_weights(logits_shape, seed=2):
    return torch.randn(logits_shape, generator=torch.Generator().manual_seed(seed))


def _run(model, ids, mask, weights, **kw):
    """Logits on real tokens and the gradients of a weighted sum of them."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits
    keep = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    (logits.float()[keep] * weights[keep]).sum().backward()
    module = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return logits.detach().float()[keep], grads


def _compare(ref, out, what, tol=TOL32):
    (lr, gr), (lo, go) = ref, out
    assert_rel(lo, lr, tol, f"{what}: logits")
    assert gr.keys() == go.keys(), f"{what}: gradients of different parameters"
    for n in gr:
        assert_rel(go[n], gr[n], tol, f"{what}: grad {n}")


# ----------------------------------------------------------------------------- paths
def path_train(padding):
    def run(eager, ours, family):
        ids, mask = _batch(padding)
        w = _loss_weights((B, L, VOCAB))
        eager.train(), ours.train()
        _compare(_run(eager, ids, mask, w), _run(ours, ids, mask, w), f"train/{padding}")
    return run


def path_checkpointing(eager, ours, family):
    ids, mask = _batch("right")
    w = _loss_weights((B, L, VOCAB))
    eager.train(), ours.train()
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _compare(_run(eager, ids, mask, w), _run(ours, ids, mask, w), "gradient checkpointing")


def _packed_position_ids():
    """Row 0: sequences of 7 and 9 tokens; row 1: 3, 8 and 5 (as DataCollatorWithFlattening makes)."""
    return torch.stack([torch.cat([torch.arange(7), torch.arange(9)]),
                        torch.cat([torch.arange(3), torch.arange(8), torch.arange(5)])])


def _run_each_sequence(model, ids, pos, weights):
    """:func:`_run` of packed rows by their definition: every sequence (``pos`` restarting at 0)
    through the model on its own, the weighted sums added before one backward. (Eager with
    ``position_ids`` is no oracle for every family: GPT-OSS's eager attends across them.)"""
    model.zero_grad(set_to_none=True)
    logits, total = [], 0.0
    for row in range(ids.shape[0]):
        starts = [i for i, p in enumerate(pos[row].tolist()) if p == 0] + [ids.shape[1]]
        for a, b in zip(starts, starts[1:]):
            part = model(input_ids=ids[row:row + 1, a:b], use_cache=False).logits[0].float()
            total = total + (part * weights[row, a:b]).sum()
            logits.append(part.detach())
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(logits), grads


def path_packed(compiled):
    def run(eager, ours, family):
        ids, _ = _batch("none", b=2)
        pos = _packed_position_ids()
        w = _loss_weights((2, L, VOCAB))
        eager.train(), ours.train()
        if compiled:  # a fresh dynamo: no recompilation from earlier cells (see path_compile_fullgraph)
            torch._dynamo.reset()
        model = torch.compile(ours, backend="aot_eager", fullgraph=True) if compiled else ours
        ref = _run_each_sequence(eager, ids, pos, w)
        _compare(ref, _run(model, ids, None, w, position_ids=pos), f"packed (compiled={compiled})")
        # and the split matters: without position_ids the same tokens are one sequence per row
        assert (ours(input_ids=ids, use_cache=False).logits.detach() - ref[0].view(2, L, VOCAB)).abs().max() > 1e-3
    return run


def path_compile_fullgraph(eager, ours, family):
    """A padded batch traces in one graph (aot_eager on CPU), forward and backward."""
    ids, mask = _batch("left")
    w = _loss_weights((B, L, VOCAB))
    eager.train(), ours.train()
    # Fresh dynamo state: recompiling the same model code for another instance turns float
    # attributes (the softmax scale) symbolic, and the op's math.isfinite check on a symbolic
    # float breaks the graph -- an op-level limit, not met when a model is compiled once.
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    _compare(_run(eager, ids, mask, w), _run(compiled, ids, mask, w), "compile fullgraph")


def path_autocast(eager, ours, family):
    """CPU autocast bf16 (what Trainer(bf16=True) / accelerate do), forward and backward."""
    ids, mask = _batch("left")
    w = _loss_weights((B, L, VOCAB))
    eager.train(), ours.train()
    ref = _run(eager, ids, mask, w)  # float32: the precise answer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _run(eager, ids, mask, w)
        out = _run(ours, ids, mask, w)
    assert_rel_bar(out[0], ref[0], low[0], "autocast logits", floor=1e-3)
    flat = {k: torch.cat([g[1][n].reshape(-1) for n in sorted(ref[1])]) for k, g in (("ref", ref), ("low", low),
                                                                                     ("out", out))}
    assert_rel_bar(flat["out"], flat["ref"], flat["low"], "autocast gradient (all parameters)", floor=1e-3)
    # per matrix too; bias and norm-scale gradients are sums with heavy cancellation (a k_proj
    # bias barely moves the softmax), where bf16 noise dominates either implementation
    for n in ref[1]:
        if ref[1][n].dim() >= 2:
            assert_rel_bar(out[1][n], ref[1][n], low[1][n], f"autocast grad {n}", floor=1e-3)


def _prompts(length):
    """Left-padded prompts of ``length`` columns; rows hold length, length-1 and 1 real tokens."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (B, length), generator=g)
    mask = torch.ones(B, length, dtype=torch.long)
    mask[1, :1] = 0
    mask[2, : length - 1] = 0
    ids[mask == 0] = 0
    return ids, mask


def path_generate(cache_implementation):
    """Greedy generation from left-padded prompts shorter and longer than the window; the
    tokens and every step's logits must be eager's."""
    def run(eager, ours, family):
        for model in (eager, ours):
            model.eval()
        for length in (3, 10):  # static sliding layers: window not yet full / full at prefill
            ids, mask = _prompts(length)
            kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                      return_dict_in_generate=True, output_logits=True, cache_implementation=cache_implementation)
            oracle = family.static_generate_oracle if cache_implementation == "static" else cache_implementation
            with torch.no_grad():
                a = eager.generate(ids, **{**kw, "cache_implementation": oracle})
                b = ours.generate(ids, **kw)
            assert torch.equal(a.sequences, b.sequences), f"{cache_implementation}/{length}: tokens differ"
            for step, (la, lb) in enumerate(zip(a.logits, b.logits)):
                assert_rel(lb, la, TOL32, f"{cache_implementation}/prompt {length}: step {step} logits")
    return run


def _static_cache(model, max_len):
    return transformers.StaticCache(config=model.config, max_cache_len=max_len)


def path_decode(cache_kind):
    """By hand: a chunked prefill (5 then 4 columns, left padded), then single tokens."""
    def run(eager, ours, family):
        ids, mask = _prompts(16)
        chunks = [(0, 5), (5, 9)] + [(t, t + 1) for t in range(9, 16)]
        caches = {}
        for model in (eager, ours):
            model.eval()
            caches[model] = _static_cache(model, 16) if cache_kind == "static" else transformers.DynamicCache(
                config=model.config)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        for s, e in chunks:
            out = {}
            for model in (eager, ours):
                with torch.no_grad():
                    out[model] = model(input_ids=ids[:, s:e], attention_mask=mask[:, :e], position_ids=pos[:, s:e],
                                       past_key_values=caches[model], use_cache=True).logits
            keep = mask[:, s:e].bool()
            assert_rel(out[ours][keep], out[eager][keep], TOL32, f"{cache_kind} decode, columns {s}:{e}")
    return run


PATHS = {
    "train-unpadded": path_train("none"),
    "train-right": path_train("right"),
    "train-left": path_train("left"),
    "checkpointing": path_checkpointing,
    "autocast-bf16": path_autocast,
    "packed": path_packed(False),
    "packed-compiled": path_packed(True),
    "compile-fullgraph": path_compile_fullgraph,
    "generate-dynamic": path_generate(None),
    "generate-static": path_generate("static"),
    "decode-dynamic": path_decode("dynamic"),
    "decode-static": path_decode("static"),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_matrix(family, path):
    eager, ours = _pair(family)
    PATHS[path](eager, ours, family)


# ----------------------------------------------------------------------------- controls
@pytest.mark.parametrize("family", [f for f in FAMILIES if f.windowed], ids=[f.name for f in FAMILIES if f.windowed])
@pytest.mark.parametrize("delta", [-1, 1])
def test_control_detects_a_wrong_window(family, delta):
    """The same comparison, with our model's window one key off the oracle's, must fail."""
    eager, ours = _pair(family, window_delta=delta)
    with pytest.raises(AssertionError, match="relative error"):
        PATHS["train-left"](eager, ours, family)


def test_control_eager_window_is_the_configs():
    """The oracle itself: eager Mistral with sliding_window=W differs from a longer window, and on
    a sequence no longer than W equals full causal attention (W keys including the query)."""
    mistral = FAMILIES[FAMILY_IDS.index("mistral")]
    torch.manual_seed(0)
    models = {w: AutoModelForCausalLM.from_config(mistral.config(w), attn_implementation="eager") for w in (W, 10 * L)}
    models[10 * L].load_state_dict(models[W].state_dict())
    ids, _ = _batch("none")
    with torch.no_grad():
        short = {w: m(input_ids=ids[:, :W]).logits for w, m in models.items()}
        long_ = {w: m(input_ids=ids[:, :W + 1]).logits for w, m in models.items()}
    assert torch.equal(short[W], short[10 * L])
    assert (long_[W][:, -1] - long_[10 * L][:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("family,error", REFUSED, ids=[f.name for f, _ in REFUSED])
def test_refused_families_raise(family, error):
    sft_tf.register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family.config(), attn_implementation=NAME)
    ids, mask = _batch("left")
    with pytest.raises(ValueError, match=error):
        model(input_ids=ids, attention_mask=mask)
