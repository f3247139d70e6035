"""SFTAttention against a dense float64 reference with an explicit mask, plus its checks."""

import math

import pytest
import torch

from sft_kernels.modules.sft_attention import SFTAttention, rope_cos_sin
from tests.helpers import TOL, assert_rel


def _rotate(x, cos, sin):
    """Llama / GPT-NeoX rotary, written out here: feature pairs (i, i + D/2) rotate by the angle
    whose cos/sin are given, x_i' = x_i cos - x_{i+D/2} sin, x_{i+D/2}' = x_{i+D/2} cos + x_i sin."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    return torch.cat([x1 * c1 - x2 * s1, x2 * c2 + x1 * s2], dim=-1)


# ----------------------------------------------------------------------------- reference
def _keys(window, causal, n):
    """(left, right) for a sequence of n real tokens, written out independently of window.py."""
    if window is None:
        return (-1, 0) if causal else (-1, -1)
    if isinstance(window, tuple):
        return (window[0], 0) if causal else window
    w = math.isqrt(n) if window == "sqrt" else min(window, n)
    w = max(w, 1)
    return (w - 1, 0) if causal else (w // 2, (w - 1) // 2)


def reference(layer: SFTAttention, x, mask=None, position_ids=None):
    """Dense attention: dense weight (block_diag materialised), explicit (L, L) mask per row."""
    b, l, c = x.shape
    g, d, hq, hkv = layer.qkv_groups, layer.head_dim, layer.num_heads, layer.num_kv_heads
    valid = torch.ones(b, l, dtype=torch.bool) if mask is None else mask.bool()
    w = torch.block_diag(*layer.qkv_proj.blocks())
    qkv = x @ w.T + (layer.qkv_proj.bias if layer.qkv_proj.bias is not None else 0)
    qkv = qkv.view(b, l, g, hq // g + 2 * hkv // g, d)
    q = qkv[:, :, :, : hq // g].reshape(b, l, hq, d)
    k = qkv[:, :, :, hq // g : hq // g + hkv // g].reshape(b, l, hkv, d)
    v = qkv[:, :, :, hq // g + hkv // g :].reshape(b, l, hkv, d)
    if position_ids is None:
        position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
    # rotary tables in float32, then cast: the Hugging Face convention SFTAttention follows
    # (so that from_hf_attention reproduces a float64 HF model bit for bit)
    inv_freq = 1.0 / (layer.rope_theta ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([position_ids[..., None].float() * inv_freq] * 2, -1)
    cos, sin = emb.cos().double()[:, :, None], emb.sin().double()[:, :, None]
    q = _rotate(q, cos, sin)
    k = _rotate(k, cos, sin)
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * d ** -0.5
    allowed = torch.zeros(b, l, l, dtype=torch.bool)
    for r in range(b):
        n = int(valid[r].sum())
        left, right = _keys(layer.window_size, layer.causal, n)
        pos = valid[r].long().cumsum(0) - 1  # index among the row's real tokens
        i, j = pos[:, None], pos[None, :]
        ok = valid[r][:, None] & valid[r][None, :]
        if left >= 0:
            ok &= j >= i - left
        if right >= 0:
            ok &= j <= i + right
        allowed[r] = ok
    if layer.softcap:  # Gemma2: c * tanh(s / c) before the mask and the softmax
        s = layer.softcap * torch.tanh(s / layer.softcap)
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    if layer.sinks is not None:  # GPT-OSS: one more logit per head in every row, its value dropped
        sink = layer.sinks.double().view(1, hq, 1, 1).expand(b, hq, l, 1)
        p = torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1]
    else:
        p = torch.softmax(s, -1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, l, hq * d)
    out = out @ layer.o_proj.weight.T + (layer.o_proj.bias if layer.o_proj.bias is not None else 0)
    return out * valid[..., None]


def _mask(kind, b, l):
    mask = torch.ones(b, l, dtype=torch.long)
    if kind == "right":
        mask[1, l - 7 :] = 0
        mask[2, 3:] = 0
    elif kind == "left":
        mask[1, :7] = 0
        mask[2, : l - 3] = 0
    return None if kind == "none" else mask


CASES = [
    # (hq, hkv, groups)
    pytest.param(4, 2, 1, id="gqa-g1"),
    pytest.param(4, 2, 2, id="gqa-g2"),
    pytest.param(4, 4, 2, id="mha-g2"),
    pytest.param(4, 1, 1, id="mqa-g1"),
]
WINDOWS = [pytest.param(5, id="W5"), pytest.param("sqrt", id="sqrt"), pytest.param(None, id="full"),
           pytest.param((3, 0), id="left3")]


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("hq,hkv,groups", CASES)
def test_matches_dense_reference(hq, hkv, groups, window, padding):
    b, l, c = 3, 23, 32
    layer = SFTAttention(c, hq, hkv, head_dim=8, window_size=window, qkv_groups=groups, bias=True,
                         dtype=torch.float64)
    x = torch.randn(b, l, c, dtype=torch.float64, requires_grad=True)
    mask = _mask(padding, b, l)
    out = layer(x, attention_mask=mask)
    ref = reference(layer, x, mask)
    assert_rel(out, ref, TOL[torch.float64], "out")
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x] + list(layer.parameters()), dy)
    grads_ref = torch.autograd.grad(ref, [x] + list(layer.parameters()), dy)
    for name, g, gr in zip(["x"] + [n for n, _ in layer.named_parameters()], grads, grads_ref):
        assert_rel(g, gr, TOL[torch.float64], f"grad {name}")


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("window", [5, "sqrt"])
@pytest.mark.parametrize("softcap,sinks", [(2.0, False), (0.0, True), (3.0, True)], ids=["softcap", "sinks", "both"])
def test_softcap_and_sinks_match_dense_reference(softcap, sinks, window, padding):
    b, l, c = 3, 23, 32
    layer = SFTAttention(c, 4, 2, head_dim=8, window_size=window, bias=True, dtype=torch.float64, softcap=softcap,
                         attention_sinks=sinks)
    if sinks:
        assert layer.sinks.shape == (4,) and "sinks" in dict(layer.named_parameters())
        with torch.no_grad():
            layer.sinks.copy_(torch.tensor([-1.0, 0.5, 2.0, 0.0]))
    with torch.no_grad():  # scores large enough for the cap to bite
        layer.qkv_proj.weight.mul_(4.0)
    x = torch.randn(b, l, c, dtype=torch.float64, requires_grad=True)
    mask = _mask(padding, b, l)
    out = layer(x, attention_mask=mask)
    ref = reference(layer, x, mask)
    assert_rel(out, ref, TOL[torch.float64], "out")
    dy = torch.randn_like(out)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    grads = torch.autograd.grad(out, [x] + list(layer.parameters()), dy)
    grads_ref = torch.autograd.grad(ref, [x] + list(layer.parameters()), dy)
    for name, g, gr in zip(names, grads, grads_ref):
        assert_rel(g, gr, TOL[torch.float64], f"grad {name}")
    # control: the same layer without its modifiers gives another answer
    plain = SFTAttention(c, 4, 2, head_dim=8, window_size=window, bias=True, dtype=torch.float64)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "sinks"})
    assert (plain(x, attention_mask=mask) - out).abs().max() > 1e-3


def test_softcap_and_sinks_refused_with_parallel_groups():
    with pytest.raises(ValueError, match="without the parallel groups"):
        SFTAttention(16, 2, softcap=5.0, context_parallel_group=object())
    with pytest.raises(ValueError, match="without the parallel groups"):
        SFTAttention(16, 2, attention_sinks=True, sequence_parallel_group=object())
    with pytest.raises(ValueError, match="softcap must be"):
        SFTAttention(16, 2, softcap=-1.0)


def test_non_causal_and_position_ids():
    layer = SFTAttention(32, 4, 2, window_size=6, causal=False, qkv_groups=2, dtype=torch.float64)
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    pos = torch.randint(0, 50, (2, 19))
    assert_rel(layer(x, position_ids=pos), reference(layer, x, None, pos), TOL[torch.float64], "non-causal")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_is_invisible(side):
    """A padded row gives the unpadded sequence's output; pad rows and their gradients are zero."""
    layer = SFTAttention(32, 4, 2, window_size=4, dtype=torch.float64)
    seq = torch.randn(1, 11, 32, dtype=torch.float64)
    pad = torch.randn(1, 5, 32, dtype=torch.float64) * 100
    x = torch.cat([pad, seq] if side == "left" else [seq, pad], 1).requires_grad_(True)
    mask = torch.zeros(1, 16, dtype=torch.long)
    real = slice(5, 16) if side == "left" else slice(0, 11)
    mask[:, real] = 1
    out = layer(x, attention_mask=mask)
    torch.testing.assert_close(out[:, real], layer(seq), rtol=1e-12, atol=1e-12)
    pad_rows = torch.ones(16, dtype=torch.bool)
    pad_rows[real] = False
    assert (out[:, pad_rows] == 0).all()
    (out ** 2).sum().backward()
    assert (x.grad[:, pad_rows] == 0).all()


def test_mask_forms_agree():
    layer = SFTAttention(32, 4, window_size=5, dtype=torch.float64)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    m = torch.tensor([[1] * 9, [0, 0] + [1] * 7])
    a = layer(x, attention_mask=m)
    for form in (m.bool(), m.float()):
        torch.testing.assert_close(layer(x, attention_mask=form), a, rtol=0, atol=0)
    torch.testing.assert_close(layer(x, attention_mask=torch.ones(2, 9))[0], layer(x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_parameter_count(groups):
    c, hq, hkv, d = 64, 8, 4, 16
    layer = SFTAttention(c, hq, hkv, head_dim=d, qkv_groups=groups)
    dense = c * (hq + 2 * hkv) * d
    assert layer.qkv_proj.weight.numel() == dense // groups
    assert layer.o_proj.weight.shape == (c, hq * d)
    assert sum(p.numel() for p in layer.parameters()) == dense // groups + hq * d * c


@pytest.mark.parametrize("padding", ["none", "left"])
def test_autocast_bf16(padding):
    """Under CPU bf16 autocast (rotary promotes q, k to float32 while v is bf16) the layer runs,
    forward and backward, within the bf16 tolerance of the float64 reference."""
    layer = SFTAttention(32, 4, 2, window_size=5, bias=True)
    x = torch.randn(3, 19, 32)
    mask = _mask(padding, 3, 19)
    ref64 = reference(layer.double(), x.double(), mask)
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, attention_mask=mask)
    assert out.dtype == torch.bfloat16
    keep = torch.ones(3, 19, dtype=torch.bool) if mask is None else mask.bool()
    assert_rel(out[keep], ref64[keep], TOL[torch.bfloat16], "autocast")
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_rope_tables_match_llama_convention():
    inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))
    pos = torch.arange(5)[None]
    cos, sin = rope_cos_sin(pos, inv, torch.float32)
    emb = torch.cat([pos[..., None] * inv, pos[..., None] * inv], -1)
    torch.testing.assert_close(cos, emb.cos())
    torch.testing.assert_close(sin, emb.sin())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hidden_size=30, num_heads=4), "not divisible by num_heads"),
        (dict(hidden_size=32, num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
        (dict(hidden_size=32, num_heads=4, qkv_groups=3), "divisible by qkv_groups=3"),
        (dict(hidden_size=32, num_heads=4, num_kv_heads=1, qkv_groups=2), "num_kv_heads=1 must be divisible"),
        (dict(hidden_size=36, num_heads=4, qkv_groups=8), "divisible by qkv_groups=8"),
        (dict(hidden_size=32, num_heads=4, head_dim=7), "even head_dim"),
        (dict(hidden_size=32, num_heads=0), "num_heads must be a positive int"),
        (dict(hidden_size=32, num_heads=4, qkv_groups=0), "qkv_groups must be a positive int"),
        (dict(hidden_size=32, num_heads=4, window_size=0), "window_size"),
        (dict(hidden_size=32, num_heads=4, window_size="cube"), "window_size"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SFTAttention(**kwargs)


def test_bad_forward_arguments():
    layer = SFTAttention(32, 4, window_size=4)
    x = torch.randn(2, 6, 32)
    with pytest.raises(ValueError, match="hidden_size=32"):
        layer(torch.randn(2, 6, 16))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, seqlen\)"):
        layer(x, attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="only 1 \\(token\\) and 0"):
        layer(x, attention_mask=torch.full((2, 6), 0.5))
    with pytest.raises(ValueError, match="padding between tokens"):
        layer(x, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match="position_ids must have shape"):
        layer(x, position_ids=torch.arange(5)[None])


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compiled_layer_refuses_a_padding_hole(compile_backend):
    """Under torch.compile the padding check cannot read the mask on the host: it asserts on
    the device instead, so a hole still fails the call rather than shifting every key after it."""
    torch._dynamo.reset()
    layer = SFTAttention(32, 4, window_size=4)
    compiled = torch.compile(layer, backend=compile_backend)
    x = torch.randn(2, 6, 32)
    good = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    torch.testing.assert_close(compiled(x, attention_mask=good), layer(x, attention_mask=good))
    with pytest.raises(Exception, match="padding between tokens"):
        compiled(x, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6]))
