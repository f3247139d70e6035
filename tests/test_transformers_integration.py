"""The Hugging Face backend and patch_model against transformers' own eager attention.

Small random Llama / Mistral / Qwen2 models are built from configs (no downloads). Models
run in float32: transformers' eager attention takes its softmax in float32 whatever the
model dtype (and a float64 model turns the float64 mask minimum into -inf there, which
makes left-padded rows NaN), so float32 is the precision eager defines, and the float32
tolerance of the table in tests/helpers.py applies.
"""

import copy
import inspect
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402

from sft_kernels.integrations import transformers as sft_tf  # noqa: E402
from sft_kernels.integrations.transformers import from_hf_attention  # noqa: E402
from tests.helpers import TOL, assert_rel  # noqa: E402

NAME = "sft_sliding_window"
TOL32 = TOL[torch.float32]
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)
B, L, W = 3, 21, 8


def _config(kind, **extra):
    if kind == "llama":
        return LlamaConfig(**SMALL, **extra)
    if kind == "mistral":
        return MistralConfig(**SMALL, sliding_window=W, **extra)
    if kind == "qwen2":  # layer 0 full attention, layers 1-2 sliding: a hybrid model
        return Qwen2Config(**{**SMALL, "num_hidden_layers": 3}, use_sliding_window=True, sliding_window=W,
                           max_window_layers=1, **extra)
    raise ValueError(kind)


def _pair(cfg, impl=NAME):
    """(eager model, same weights with ``impl``); each gets its own config copy."""
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager", dtype=torch.float32)
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl, dtype=torch.float32)
    ours.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and ours.config._attn_implementation == impl
    return eager, ours


def _batch(padding):
    ids = torch.randint(0, SMALL["vocab_size"], (B, L))
    if padding == "none":
        return ids, None
    mask = torch.ones(B, L, dtype=torch.long)
    if padding == "right":
        mask[1, 13:] = 0
        mask[2, 4:] = 0
    else:
        mask[1, :8] = 0
        mask[2, : L - 4] = 0
    return ids, mask


def _logits_and_grads(model, ids, mask, weights):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    (logits[keep] * weights[keep]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits[keep].detach(), grads


def _compare(a, b, what):
    (la, ga), (lb, gb) = a, b
    assert_rel(lb, la, TOL32, f"{what}: logits")
    assert ga.keys() == gb.keys(), f"{what}: gradients of different parameters"
    for n in ga:
        assert_rel(gb[n], ga[n], TOL32, f"{what}: grad {n}")


def _cache_of(output):
    """The cache a forward returned (``cache`` from transformers 5.x on, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _eager_mask(batch, q_len, kv_len, **kw):
    """transformers' own 4D eager mask for ``q_len`` queries at the end of ``kv_len`` keys, in
    either signature (5.x: q_length; 5.0: the queries' cache_position)."""
    from transformers.masking_utils import eager_mask

    if "q_length" in inspect.signature(eager_mask).parameters:
        return eager_mask(batch, q_len, kv_len, q_offset=kv_len - q_len, **kw)
    return eager_mask(batch, cache_position=torch.arange(kv_len - q_len, kv_len), kv_length=kv_len, **kw)


@pytest.fixture(autouse=True)
def _registered():
    sft_tf.register(window_size=None)
    yield
    sft_tf.register(window_size=None)


# ----------------------------------------------------------------------------- the backend
@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_backend_matches_eager(kind, padding):
    eager, ours = _pair(_config(kind))
    ids, mask = _batch(padding)
    weights = torch.randn(B, L, SMALL["vocab_size"])
    _compare(_logits_and_grads(eager, ids, mask, weights), _logits_and_grads(ours, ids, mask, weights),
             f"{kind}/{padding}")


@pytest.mark.parametrize("padding", ["none", "left"])
def test_registered_window_on_llama_matches_eager_mistral(padding):
    """register(window_size=W) gives a Llama the window eager Mistral (same architecture) uses."""
    sft_tf.register(window_size=W)
    eager, _ = _pair(_config("mistral"))
    torch.manual_seed(1)
    ours = AutoModelForCausalLM.from_config(_config("llama"), attn_implementation=NAME, dtype=torch.float32)
    ours.load_state_dict(eager.state_dict())
    ids, mask = _batch(padding)
    weights = torch.randn(B, L, SMALL["vocab_size"])
    _compare(_logits_and_grads(eager, ids, mask, weights), _logits_and_grads(ours, ids, mask, weights), "llama+W")


def test_mistral_window_semantics_pinned():
    """HF sliding_window=W is W keys including self in eager: a window of W differs from W+1 and W-1."""
    eager, ours = _pair(_config("mistral"))
    ids, _ = _batch("none")
    ref = eager(input_ids=ids).logits
    assert_rel(ours(input_ids=ids).logits, ref, TOL32, "W")
    for other in (W - 1, W + 1):
        e2, _ = _pair(_config("mistral"))
        e2.config.sliding_window = other
        e2.load_state_dict(eager.state_dict())
        assert (e2(input_ids=ids).logits - ref).abs().max() > 1e-3


def test_packed_sequences_via_position_ids():
    """Rows holding several sequences (position_ids restart) are split as eager splits them."""
    for kind in ("llama", "mistral"):
        eager, ours = _pair(_config(kind))
        ids = torch.randint(0, SMALL["vocab_size"], (2, L))
        pos = torch.cat([torch.arange(9), torch.arange(12)])[None].repeat(2, 1)
        pos[1] = torch.cat([torch.arange(4), torch.arange(17)])
        # eager splits packed rows only without a KV cache (masking_utils._preprocess_mask_arguments)
        a = eager(input_ids=ids, position_ids=pos, use_cache=False).logits
        b = ours(input_ids=ids, position_ids=pos, use_cache=False).logits
        assert_rel(b, a, TOL32, f"{kind} packed")
        # and the split matters: the same tokens as one sequence differ
        assert (ours(input_ids=ids, use_cache=False).logits - a).abs().max() > 1e-3


def test_packed_sequences_via_flash_kwargs():
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) hands over cu_seq_lens_q/k and
    max_length_q/k (one flattened row): the same split as eager makes from position_ids."""
    for kind in ("llama", "mistral"):
        eager, ours = _pair(_config(kind))
        lens = [5, 9, 7]
        ids = torch.randint(0, SMALL["vocab_size"], (1, sum(lens)))
        pos = torch.cat([torch.arange(n) for n in lens])[None]
        cu = torch.tensor([0, 5, 14, 21], dtype=torch.int32)
        flash = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
        a = eager(input_ids=ids, position_ids=pos, use_cache=False).logits
        b = ours(input_ids=ids, position_ids=pos, use_cache=False, **flash).logits
        assert_rel(b, a, TOL32, f"{kind} packed via cu_seq_lens")
        # the kwargs are what splits (over position_ids): one sequence given, one sequence made
        whole = torch.tensor([0, 21], dtype=torch.int32)
        c = ours(input_ids=ids, position_ids=pos, use_cache=False, cu_seq_lens_q=whole, cu_seq_lens_k=whole).logits
        assert (c - a).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_incremental_decoding_with_cache(kind):
    eager, ours = _pair(_config(kind))
    ids, mask = _batch("left")
    for model in (eager, ours):
        model.eval()
    with torch.no_grad():
        out_e = eager(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        out_o = ours(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
        step_e = eager(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=_cache_of(out_e),
                       position_ids=pos).logits
        step_o = ours(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=_cache_of(out_o),
                      position_ids=pos).logits
    assert_rel(step_o, step_e, TOL32, f"{kind} decode step")


def _mistral_module():
    _, ours = _pair(_config("mistral"))
    return ours.model.layers[0].self_attn


def _eager(module, q, k, v, mask4, scaling):
    from transformers.models.mistral.modeling_mistral import eager_attention_forward

    return eager_attention_forward(module, q, k, v, mask4, scaling=scaling)[0]


@pytest.mark.parametrize("width", [W, W - 3, None], ids=["W", "narrower", "no-window"])
def test_attention_function_follows_4d_masks(width):
    """A 4D mask is followed as given (as eager does), whatever window the layer has: the same
    width, a narrower one, or plain causal; checked against eager directly."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    module = _mistral_module()
    q = torch.randn(2, 4, L, 16)
    k, v = torch.randn(2, 2, L, 16), torch.randn(2, 2, L, 16)
    pad = torch.ones(2, L, dtype=torch.bool)
    pad[1, :5] = False
    fn = causal_mask_function if width is None else sliding_window_causal_mask_function(width)
    mask4 = _eager_mask(2, L, L, mask_function=fn, attention_mask=pad)
    out, weights = sft_tf.sft_attention_forward(module, q, k, v, mask4, scaling=0.25, sliding_window=W)
    assert weights is None
    assert_rel(out[pad], _eager(module, q, k, v, mask4, 0.25)[pad], TOL32, f"4D mask {width}")
    assert (out[~pad] == 0).all()
    # a bool mask (SDPA's convention) means the same
    out_b, _ = sft_tf.sft_attention_forward(module, q, k, v, mask4 == 0, scaling=0.25, sliding_window=W)
    torch.testing.assert_close(out_b, out, rtol=0, atol=0)


def test_attention_function_refuses_other_4d_masks():
    """Masks no single band with padding expresses raise, naming eager/sdpa."""
    module = _mistral_module()
    q = torch.randn(1, 4, 8, 16)
    k = v = torch.randn(1, 2, 8, 16)
    i, j = torch.arange(8)[:, None], torch.arange(8)[None, :]
    bad = {
        "documents": (j <= i) & ((i < 4) == (j < 4)),  # two packed documents: not one band
        "hole": (j <= i) & (j != 2),
        "strided": (j <= i) & ((i - j) % 2 == 0),
        "rows-disagree": (j <= i) & ((j >= i - 2) | (i < 5)),  # window 3 from row 5 on, unbounded before
    }
    for what, allowed in bad.items():
        with pytest.raises(ValueError, match="sdpa|eager"):
            sft_tf.sft_attention_forward(module, q, k, v, allowed[None, None], scaling=0.25)
    # an odd band is still a band: followed exactly (rows that see no key give zeros)
    for allowed in ((j > i), (j >= i - 1) & (j <= i + 2)):
        out, _ = sft_tf.sft_attention_forward(module, q, k, v, allowed[None, None], scaling=0.25)
        mask4 = torch.zeros(1, 1, 8, 8).masked_fill(~allowed, torch.finfo(torch.float32).min)
        seen = allowed.any(-1)
        assert_rel(out[0, seen], _eager(module, q, k, v, mask4, 0.25)[0, seen], TOL32, "odd band")
    bias = torch.zeros(1, 1, 8, 8).masked_fill(j > i, torch.finfo(torch.float32).min)
    bias[0, 0, 5, 1] = -0.5
    with pytest.raises(ValueError, match="additive bias"):
        sft_tf.sft_attention_forward(module, q, k, v, bias, scaling=0.25)


def test_registered_window_within_a_4d_mask():
    """On a layer without a model window, the registered window narrows a user's 4D mask: a Llama
    with register(window_size=W) and a plain causal 4D mask is eager with the sliding-W mask."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    _, llama = _pair(_config("llama"))
    module = llama.model.layers[0].self_attn
    q = torch.randn(2, 4, L, 16)
    k, v = torch.randn(2, 2, L, 16), torch.randn(2, 2, L, 16)
    pad = torch.ones(2, L, dtype=torch.bool)
    pad[1, :5] = False
    causal4 = _eager_mask(2, L, L, mask_function=causal_mask_function, attention_mask=pad)
    sliding4 = _eager_mask(2, L, L, mask_function=sliding_window_causal_mask_function(W), attention_mask=pad)
    sft_tf.register(window_size=W)
    out, _ = sft_tf.sft_attention_forward(module, q, k, v, causal4, scaling=0.25)
    assert_rel(out[pad], _eager(module, q, k, v, sliding4, 0.25)[pad], TOL32, "registered W within a causal mask")
    narrow4 = _eager_mask(2, L, L, mask_function=sliding_window_causal_mask_function(3), attention_mask=pad)
    out, _ = sft_tf.sft_attention_forward(module, q, k, v, narrow4, scaling=0.25)  # the mask is narrower: it wins
    assert_rel(out[pad], _eager(module, q, k, v, narrow4, 0.25)[pad], TOL32, "narrower mask within registered W")
    sft_tf.register(window_size="sqrt")
    with pytest.raises(ValueError, match="sqrt"):
        sft_tf.sft_attention_forward(module, q, k, v, narrow4, scaling=0.25)


def test_user_4d_causal_mask_on_a_sliding_model():
    """A user-supplied 4D causal mask on Mistral: eager follows the mask (no window); so do we."""
    eager, ours = _pair(_config("mistral"))
    ids, mask = _batch("left")
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    allowed = (j <= i)[None] & mask.bool()[:, None, :]
    mask4 = torch.zeros(B, 1, L, L).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    with torch.no_grad():
        a = eager(input_ids=ids, attention_mask=mask4).logits
        b = ours(input_ids=ids, attention_mask=mask4).logits
        windowed = eager(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert_rel(b[keep], a[keep], TOL32, "user 4D causal mask")
    assert (a[keep] - windowed[keep]).abs().max() > 1e-3  # the mask really drops the window


def _cache_geometries():
    """(name, q_len, kv_len, q_offset, kv_offset, 2D mask, window): what transformers' caches report
    to the mask function (cache_utils ``get_mask_sizes``). The 2D mask: "left"/"right" padded over
    the positions seen so far, None, or "ones" over every key slot (a user's all-ones mask as long
    as a static cache: only causality keeps eager off the unwritten slots)."""
    t = torch.tensor
    return [
        ("no-cache", 8, 8, 0, 0, "left", None),
        ("no-cache-right", 8, 8, 0, 0, "right", 4),
        ("dynamic-decode", 1, 9, 8, 0, "left", None),
        ("dynamic-chunk", 3, 11, 8, 0, "left", 4),
        ("dynamic-sliding-full", 1, 4, 9, 6, "left", 4),  # the last W-1 keys kept, plus the new one
        ("static-prefill", 5, 12, t(0), 0, "left", None),  # unwritten slots 5..11
        ("static-prefill-no-mask", 5, 12, t(0), 0, None, None),
        ("static-decode", 1, 12, t(7), 0, "left", None),
        ("static-decode-ones", 1, 12, t(7), 0, "ones", None),
        ("static-sliding-not-full", 2, 6, t(2), 0, "left", 6),  # window not yet full: slots 4, 5 unwritten
        ("static-sliding-not-full-ones", 2, 6, t(2), 0, "ones", 6),
        ("static-sliding-full", 1, 6, t(9), 4, "left", 6),
        ("static-sliding-chunk", 3, 8, t(9), 4, "left", 6),  # full window, 3 new tokens at once
    ]


@pytest.mark.parametrize("geometry", _cache_geometries(), ids=lambda g: g[0])
def test_mask_function_against_transformers_masks(geometry):
    """The mask function on every cache geometry against eager with the 4D mask transformers'
    own masking_utils builds from the same arguments; pad queries give exact zeros."""
    from transformers.masking_utils import causal_mask_function, eager_mask, sliding_window_causal_mask_function

    name, q_len, kv_len, q_off, kv_off, padding, window = geometry
    module = _mistral_module()
    b = 3
    seen = int(q_off) + q_len  # positions 0 .. seen-1 exist
    pad = torch.ones(b, kv_off + kv_len if padding == "ones" else seen, dtype=torch.bool)
    if padding == "left":
        pad[1, :2] = False
        pad[2, : seen - 1] = False  # only the last position real
    elif padding == "right":
        pad[1, seen - 3:] = False
        pad[2, 2:] = False
    fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    mask2d = None if padding is None else pad
    # the arguments as the installed transformers passes them to a mask interface function
    if "q_length" in inspect.signature(eager_mask).parameters:  # 5.x
        sizes = dict(q_length=q_len, kv_length=kv_len, q_offset=q_off, kv_offset=kv_off)
    else:  # 5.0: the queries' positions
        sizes = dict(cache_position=torch.arange(q_len) + q_off, kv_length=kv_len, kv_offset=kv_off)
    ref_mask = eager_mask(b, **sizes, mask_function=fn, attention_mask=mask2d)
    ours_mask = sft_tf.sft_attention_mask(b, **sizes, attention_mask=mask2d)
    q = torch.randn(b, 4, q_len, 16)
    k, v = torch.randn(b, 2, kv_len, 16), torch.randn(b, 2, kv_len, 16)  # unwritten slots: garbage
    out, _ = sft_tf.sft_attention_forward(module, q, k, v, ours_mask, scaling=0.25, sliding_window=window)
    ref = _eager(module, q, k, v, ref_mask, 0.25)
    real = pad[:, int(q_off) + torch.arange(q_len)]
    assert_rel(out[real], ref[real], TOL32, name)
    assert (out[~real] == 0).all(), f"{name}: pad queries must give exact zeros"


def test_mask_function_nothing_to_mask_and_holes():
    m = torch.ones(2, 10, dtype=torch.bool)
    assert sft_tf.sft_attention_mask(2, 10, 10, attention_mask=None) is None
    assert sft_tf.sft_attention_mask(2, 10, 10, attention_mask=m) is None
    assert sft_tf.sft_attention_mask(2, 1, 10, q_offset=9, attention_mask=m) is None
    assert sft_tf.sft_attention_mask(2, 1, 12, q_offset=torch.tensor(9), attention_mask=m) is not None  # static
    m[0, 4] = False
    with pytest.raises(ValueError, match="padding between tokens"):
        sft_tf.sft_attention_mask(2, 10, 10, attention_mask=m)


def test_output_attentions_raises():
    """Eager returns the weights; these kernels never form them: a clear error, not an empty tuple."""
    _, ours = _pair(_config("llama"))
    ids, _ = _batch("none")
    with pytest.raises(ValueError, match="output_attentions.*eager"):
        ours(input_ids=ids, output_attentions=True)


def test_unsupported_features_raise():
    _, ours = _pair(_config("llama", attention_dropout=0.1))
    ours.train()
    ids, _ = _batch("none")
    with pytest.raises(ValueError, match="attention dropout"):
        ours(input_ids=ids)
    module = ours.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 16)
    with pytest.raises(ValueError, match="softcap must be"):  # passed to the op, which checks it
        sft_tf.sft_attention_forward(module.eval(), q, q[:, :2], q[:, :2], None, softcap=-30.0)


def test_register_validates_and_checks_version(monkeypatch):
    assert sft_tf.register() == NAME
    with pytest.raises(ValueError, match="window_size"):
        sft_tf.register(window_size=0)
    with pytest.raises(ValueError, match="backend"):
        sft_tf.register(backend="cudnn")
    # transformers may swap its lazy module in sys.modules after import: patch the live one
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.40.2")
    with pytest.raises(ImportError, match=r"transformers>=5\.0\.0.*found 4\.40\.2"):
        sft_tf.register()


def test_import_sft_kernels_does_not_import_transformers():
    code = "import sys, sft_kernels, sft_kernels.modules; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- patch_model
@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_patch_model_matches_eager(kind, padding):
    eager, patched = _pair(_config(kind), impl="eager")
    sft_tf.patch_model(patched)
    assert all(isinstance(layer.self_attn, sft_tf.SFTAttentionHF) for layer in patched.model.layers)
    ids, mask = _batch(padding)
    weights = torch.randn(B, L, SMALL["vocab_size"])
    a = _logits_and_grads(eager, ids, mask, weights)
    lb, gb = _logits_and_grads(patched, ids, mask, weights)
    # the fused projection's gradient is the q/k/v gradients concatenated
    ga = dict(a[1])
    for i, layer in enumerate(eager.model.layers):
        pre = f"model.layers.{i}.self_attn."
        ga[pre + "attn.qkv_proj.weight"] = torch.cat([ga.pop(pre + f"{p}_proj.weight").reshape(-1) for p in "qkv"])
        if pre + "q_proj.bias" in ga:
            ga[pre + "attn.qkv_proj.bias"] = torch.cat([ga.pop(pre + f"{p}_proj.bias") for p in "qkv"])
        for p in ("weight", "bias"):
            if pre + f"o_proj.{p}" in ga:
                ga[pre + f"attn.o_proj.{p}"] = ga.pop(pre + f"o_proj.{p}")
    _compare((a[0], ga), (lb, gb), f"patched {kind}/{padding}")


def test_patch_model_window_and_layers():
    _, llama = _pair(_config("llama"), impl="eager")
    sft_tf.patch_model(llama, window_size="sqrt")
    assert {layer.self_attn.attn.window_size for layer in llama.model.layers} == {"sqrt"}
    _, qwen = _pair(_config("qwen2"), impl="eager")
    sft_tf.patch_model(qwen, window_size=4)  # qwen2 has its own window: layer 0 full, 1-2 sliding W
    assert [layer.self_attn.attn.window_size for layer in qwen.model.layers] == [None, W, W]


def test_from_hf_copies_exactly():
    for kind in ("llama", "mistral", "qwen2"):
        eager, _ = _pair(_config(kind))
        for layer in eager.model.layers:
            hf = layer.self_attn
            sft = from_hf_attention(hf, eager.config)
            q, k, v = sft.qkv_proj.blocks()[0].split([64, 32, 32])
            assert torch.equal(q, hf.q_proj.weight) and torch.equal(k, hf.k_proj.weight)
            assert torch.equal(v, hf.v_proj.weight) and torch.equal(sft.o_proj.weight, hf.o_proj.weight)
            if kind == "qwen2":
                assert torch.equal(sft.qkv_proj.bias, torch.cat([hf.q_proj.bias, hf.k_proj.bias, hf.v_proj.bias]))
            x = torch.randn(2, L, 64)
            pos = torch.arange(L)[None]
            cos_sin = eager.model.rotary_emb(x, pos)
            ref, _ = hf(x, position_embeddings=cos_sin, attention_mask=_causal_eager_mask(eager.config, hf, x))
            assert_rel(sft(x), ref, TOL32, f"from_hf_attention {kind}")  # its own rotary tables
            assert_rel(sft(x, position_embeddings=cos_sin), ref, TOL32, f"from_hf_attention {kind} (HF rotary)")


def _causal_eager_mask(config, module, x):
    """Eager's mask for this layer, from the config alone: Mistral slides on every layer, Qwen2
    on the layers its ``layer_types`` mark, Llama never."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    layer_types = getattr(config, "layer_types", None)
    sliding = getattr(config, "sliding_window", None) is not None and (
        layer_types is None or layer_types[module.layer_idx] == "sliding_attention")
    fn = sliding_window_causal_mask_function(config.sliding_window) if sliding else causal_mask_function
    return _eager_mask(x.shape[0], x.shape[1], x.shape[1], mask_function=fn, dtype=x.dtype)


def test_patch_model_qkv_groups():
    eager, patched = _pair(_config("llama"), impl="eager")
    dense = sum(p.numel() for p in eager.parameters())
    sft_tf.patch_model(patched, window_size=W, qkv_groups=2)
    attn = patched.model.layers[0].self_attn.attn
    assert attn.qkv_groups == 2
    qkv_dense = 64 * (4 + 2 + 2) * 16
    assert attn.qkv_proj.weight.numel() == qkv_dense // 2
    assert sum(p.numel() for p in patched.parameters()) == dense - 2 * qkv_dense // 2
    ids, mask = _batch("right")
    logits = patched(input_ids=ids, attention_mask=mask, labels=ids).loss
    logits.backward()
    assert attn.qkv_proj.weight.grad is not None and torch.isfinite(attn.qkv_proj.weight.grad).all()


def test_patch_model_rejects_bad_arguments():
    _, model = _pair(_config("llama"), impl="eager")
    with pytest.raises(ValueError, match="qkv_groups"):
        sft_tf.patch_model(model, qkv_groups=0)
    with pytest.raises(ValueError, match="qkv_groups=3"):
        sft_tf.patch_model(model, qkv_groups=3)
    with pytest.raises(ValueError, match="window_size"):
        sft_tf.patch_model(model, window_size=-2)
    with pytest.raises(ValueError, match="backend must be one of"):  # now, not at the first forward
        sft_tf.patch_model(model, backend="bogus")
    assert not any(isinstance(m, sft_tf.SFTAttentionHF) for m in model.modules())
    sft_tf.patch_model(model)
    with pytest.raises(ValueError, match="already patched"):
        sft_tf.patch_model(model)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model types"):
        sft_tf.patch_model(gpt2)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_patch_model_save_pretrained_round_trip(kind, groups, tmp_path):
    """save_pretrained writes the model's own keys and shapes; a plain from_pretrained (eager)
    gives the patched model's logits; patch_model(qkv_groups=g) on it restores the blocks."""
    _, patched = _pair(_config(kind), impl="eager")
    sft_tf.patch_model(patched, qkv_groups=groups)
    with torch.no_grad():  # a fine-tuned model: weights no longer the initial ones
        for p in patched.parameters():
            p.add_(0.01 * torch.randn_like(p))
    plain = AutoModelForCausalLM.from_config(_config(kind), attn_implementation="eager", dtype=torch.float32)
    want = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in patched.state_dict().items()}
    assert got == want
    patched.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32)
    ids, mask = _batch("left")
    with torch.no_grad():
        a = patched(input_ids=ids, attention_mask=mask).logits
        b = reloaded(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert_rel(b[keep], a[keep], TOL32, f"reloaded {kind} g={groups}")
    sft_tf.patch_model(reloaded, qkv_groups=groups)
    for (na, pa), (nb, pb) in zip(patched.named_parameters(), reloaded.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na
    # and load_state_dict takes either naming
    fresh = AutoModelForCausalLM.from_config(_config(kind), attn_implementation="eager", dtype=torch.float32)
    sft_tf.patch_model(fresh, qkv_groups=groups)
    fresh.load_state_dict(patched.state_dict())
    for pa, pb in zip(patched.parameters(), fresh.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_patch_model_generates_with_static_cache(kind):
    """The patched layers read the same masks: static-cache generation equals eager's."""
    eager, patched = _pair(_config(kind), impl="eager")
    sft_tf.patch_model(patched)
    ids, mask = _batch("left")
    ids, mask = ids[:, :6], mask[:, -6:]
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_logits=True, cache_implementation="static")
    with torch.no_grad():
        a, b = eager.eval().generate(ids, **kw), patched.eval().generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for la, lb in zip(a.logits, b.logits):
        assert_rel(lb, la, TOL32, f"patched {kind} static generate")


def test_patch_model_under_autocast_and_compile():
    """bf16 autocast (FlashAttention's bar against float32 eager) and a fullgraph compile."""
    from tests.helpers import assert_rel_bar

    eager, patched = _pair(_config("qwen2"), impl="eager")
    sft_tf.patch_model(patched)
    ids, mask = _batch("left")
    keep = mask.bool()
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask).logits[keep]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = eager(input_ids=ids, attention_mask=mask).logits[keep]
            out = patched(input_ids=ids, attention_mask=mask).logits[keep]
    assert_rel_bar(out, ref, low, "patched autocast", floor=1e-3)
    torch._dynamo.reset()
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_rel(compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits[keep], ref, TOL32,
                   "patched compiled")
