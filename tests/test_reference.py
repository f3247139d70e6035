"""The semantics, pinned on hand-checked cases (not reference-vs-reference)."""

import math

import pytest
import torch

from sft_kernels import (
    block_diag_matmul_reference,
    parse_window,
    resolve_window,
    sliding_window_attention_reference,
    sliding_window_to_window_size,
)
from sft_kernels.ops.sliding_window_attention.reference import reference_mask, reference_window
from sft_kernels.window import band_mask, keys_seen


def _m(rows):
    return torch.tensor(rows, dtype=torch.bool)


# Exact 0/1 masks for L = 5 (rows: queries, columns: keys).
MASKS_L5 = {
    "full": ((-1, -1), False, [[1] * 5] * 5),
    "causal": ((-1, -1), True, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
    "left1_causal": ((1, -1), True, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]),
    "diag_only": ((0, 0), False, [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]),
    "asym_1_2": ((1, 2), False, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]),
    "right_only": ((0, -1), False, [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]),
    "int3_causal": (3, True, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]),
    "int3_bidir": (3, False, [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]),
    "int4_bidir": (4, False, [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1]]),
    "sqrt_causal": ("sqrt", True, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]),
}


# The implementations' window rule (window.py) and the reference's own (reference.py)
# are pinned separately against the same hand-written masks.
RULES = {
    "window.py": (resolve_window, band_mask),
    "reference": (reference_window, lambda lq, lk, left, right: reference_mask(lq, lk, left, right)),
}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("name", list(MASKS_L5))
def test_mask_l5(name, rule):
    window, causal, expected = MASKS_L5[name]
    resolve, mask = RULES[rule]
    left, right = resolve(window, causal, 5)
    assert torch.equal(mask(5, 5, left, right), _m(expected))


@pytest.mark.parametrize("rule", list(RULES))
def test_bottom_right_alignment(rule):
    mask = RULES[rule][1]
    # 2 queries, 5 keys, causal: the queries are the last two positions.
    assert torch.equal(mask(2, 5, -1, 0), _m([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]))
    # 5 queries, 2 keys, causal: the first three queries see nothing.
    assert torch.equal(mask(5, 2, -1, 0), _m([[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]))
    # window (1, 0) with 3 queries over 5 keys
    assert torch.equal(mask(3, 5, 1, 0), _m([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]))
    # two-sided (1, 1) with 2 queries over 4 keys: the queries sit at positions 2 and 3
    assert torch.equal(mask(2, 4, 1, 1), _m([[0, 1, 1, 1], [0, 0, 1, 1]]))


# floor(sqrt(L)) keys, at lengths where rounding would give one more (15 -> 3, not 4)
SQRT_KEYS = {1: 1, 3: 1, 4: 2, 8: 2, 10: 3, 15: 3, 16: 4, 35: 5, 99: 9, 250: 15, 1023: 31, 1024: 32, 4095: 63}


@pytest.mark.parametrize("rule", list(RULES))
def test_sqrt_floors(rule):
    resolve = RULES[rule][0]
    for length, keys in SQRT_KEYS.items():
        assert resolve("sqrt", True, length) == (keys - 1, 0), length
        assert resolve("sqrt", False, length) == (keys // 2, (keys - 1) // 2), length


def test_window_rules():
    assert sliding_window_to_window_size(4096) == (4095, 0)
    assert sliding_window_to_window_size(1) == (0, 0)
    assert sliding_window_to_window_size(None) == (-1, 0)
    assert parse_window((-1, -1), False).is_full


@pytest.mark.parametrize("rule", list(RULES))
def test_window_forms(rule):
    resolve = RULES[rule][0]
    assert resolve("sqrt", True, 10) == (2, 0)  # floor(sqrt(10)) = 3 keys
    assert resolve("sqrt", True, 16) == (3, 0)
    assert resolve("sqrt", True, 15) == (2, 0)
    assert resolve("sqrt", True, 1) == (0, 0)
    assert resolve("sqrt", True, 0) == (0, 0)  # at least one key
    assert resolve(4096, True, 100) == (99, 0)  # fixed K clamps to L
    assert resolve(4096, True, 5000) == (4095, 0)
    assert resolve(4096, False, 7) == (3, 3)  # clamped to 7 keys, centred
    assert resolve(5, False, 100) == (2, 2)
    assert resolve(4, False, 100) == (2, 1)  # even: the extra key on the left
    assert resolve(1, False, 100) == (0, 0)
    assert resolve((3, 7), True, 100) == (3, 0)  # causal forces right = 0
    assert resolve((3, 7), False, 100) == (3, 7)
    assert resolve(None, False, 9) == (-1, -1)
    assert resolve(None, True, 9) == (-1, 0)


@pytest.mark.parametrize(
    "bad, exc",
    [((-2, 0), ValueError), ((0, -5), ValueError), (0, ValueError), (-3, ValueError), ("cube", ValueError),
     ((1, 2, 3), TypeError), ((1.5, 0), TypeError), (True, TypeError), (2.0, TypeError)],
)
def test_bad_windows(bad, exc):
    with pytest.raises(exc, match="window_size"):
        parse_window(bad, False)


def test_sliding_window_bad():
    with pytest.raises(ValueError, match="sliding_window"):
        sliding_window_to_window_size(0)


def test_keys_seen():
    assert keys_seen(5, 5, -1, 0) == 15
    assert keys_seen(5, 5, 1, 0) == 9
    assert keys_seen(5, 5, -1, -1) == 25
    assert keys_seen(5, 2, -1, 0) == 3


def test_attention_reference_hand_values():
    # L = 3, d = 1, one head, q = 0 so every visible key gets equal weight.
    q = torch.zeros(1, 3, 1, 1, dtype=torch.float64)
    k = torch.randn(1, 3, 1, 1, dtype=torch.float64)
    v = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64).view(1, 3, 1, 1)
    out, lse = sliding_window_attention_reference(q, k, v, window_size=(1, 0), causal=True)
    assert torch.allclose(out.flatten(), torch.tensor([1.0, 1.5, 3.0], dtype=torch.float64))
    assert torch.allclose(lse.flatten(), torch.tensor([0.0, math.log(2), math.log(2)], dtype=torch.float64))
    # explicit scores: q = 1, k = [0, 1, 2], scale 1 -> softmax over visible keys
    q = torch.ones(1, 3, 1, 1, dtype=torch.float64)
    k = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    out, lse = sliding_window_attention_reference(q, k, v, causal=True, softmax_scale=1.0)
    e = torch.exp(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    expect = torch.stack([v.flatten()[:1].sum(), (e[:2] * v.flatten()[:2]).sum() / e[:2].sum(), (e * v.flatten()).sum() / e.sum()])
    assert torch.allclose(out.flatten(), expect)
    assert torch.allclose(lse.flatten(), torch.log(torch.cumsum(e, 0)))


def test_attention_reference_empty_rows_zero_and_no_nan():
    q = torch.randn(1, 5, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 2, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 2, 4, dtype=torch.float64, requires_grad=True)
    out, lse = sliding_window_attention_reference(q, k, v, causal=True)
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))
    assert torch.isinf(lse[0, :, :3]).all() and (lse[0, :, :3] < 0).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[0, :3], torch.zeros_like(q.grad[0, :3]))


def test_attention_reference_gqa_and_varlen():
    torch.manual_seed(1)
    # GQA: 4 query heads share 2 kv heads -> equal to repeating kv heads explicitly
    q = torch.randn(2, 7, 4, 8, dtype=torch.float64)
    k = torch.randn(2, 7, 2, 8, dtype=torch.float64)
    v = torch.randn(2, 7, 2, 8, dtype=torch.float64)
    out, _ = sliding_window_attention_reference(q, k, v, window_size=(2, 1))
    out_rep, _ = sliding_window_attention_reference(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2), window_size=(2, 1))
    assert torch.equal(out, out_rep)
    # query head 1 uses kv head 0, query head 2 uses kv head 1
    o1, _ = sliding_window_attention_reference(q[:, :, 1:2], k[:, :, 0:1], v[:, :, 0:1], window_size=(2, 1))
    o2, _ = sliding_window_attention_reference(q[:, :, 2:3], k[:, :, 1:2], v[:, :, 1:2], window_size=(2, 1))
    assert torch.allclose(out[:, :, 1:2], o1) and torch.allclose(out[:, :, 2:3], o2)
    # packed: two sequences of lengths 3 and 5 == each run on its own
    lens = [3, 5]
    qs = [torch.randn(n, 2, 8, dtype=torch.float64) for n in lens]
    ks = [torch.randn(n, 1, 8, dtype=torch.float64) for n in lens]
    vs = [torch.randn(n, 1, 8, dtype=torch.float64) for n in lens]
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    out, lse = sliding_window_attention_reference(torch.cat(qs), torch.cat(ks), torch.cat(vs), window_size="sqrt", causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert lse.shape == (2, 8)
    for i, n in enumerate(lens):
        o, l = sliding_window_attention_reference(qs[i][None], ks[i][None], vs[i][None], window_size="sqrt", causal=True)
        assert torch.allclose(out[cu[i]:cu[i + 1]], o[0])
        assert torch.allclose(lse[:, cu[i]:cu[i + 1]], l[0])


def test_attention_reference_query_range():
    q = torch.randn(1, 9, 1, 4, dtype=torch.float64)
    k = torch.randn(1, 12, 1, 4, dtype=torch.float64)
    v = torch.randn(1, 12, 1, 4, dtype=torch.float64)
    full, lse = sliding_window_attention_reference(q, k, v, window_size=(2, 1), causal=False)
    part, lpart = sliding_window_attention_reference(q, k, v, window_size=(2, 1), query_range=(3, 7))
    assert torch.allclose(part, full[:, 3:7], rtol=0, atol=1e-12)
    assert torch.allclose(lpart, lse[:, :, 3:7], rtol=0, atol=1e-12)


def test_block_diag_reference_layout():
    # blocks of unequal shapes: W1 (1x2), W2 (2x1)
    w1 = torch.tensor([[1.0, 2.0]])
    w2 = torch.tensor([[3.0], [4.0]])
    x = torch.tensor([[1.0, 10.0, 100.0]])
    y = block_diag_matmul_reference(x, [w1, w2])
    # y0 = 1*1 + 2*10 ; y1 = 3*100 ; y2 = 4*100 ; x's third feature never meets W1
    assert torch.equal(y, torch.tensor([[21.0, 300.0, 400.0]]))
    y = block_diag_matmul_reference(x, [w1, w2], bias=torch.tensor([0.5, 0.25, -1.0]))
    assert torch.equal(y, torch.tensor([[21.5, 300.25, 399.0]]))
    # leading dims
    xb = x.expand(2, 3, 3)
    assert block_diag_matmul_reference(xb, [w1, w2]).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="features"):
        block_diag_matmul_reference(torch.ones(1, 4), [w1, w2])


# FlashAttention-2 code passes windows as numpy integers, 0-d tensors or a 2-element tensor
# (its tests use torch.randint(0, seqlen_k, (2,))); they mean the same as Python ints.
def _integer_likes():
    import numpy as np

    return {
        "numpy_int64": (np.int64(5), 5),
        "numpy_int32_pair": ((np.int32(3), np.int32(2)), (3, 2)),
        "tensor_0d": (torch.tensor(7), 7),
        "tensor_pair": (torch.tensor([4, 1]), (4, 1)),
        "tensor_pair_int32": (torch.tensor([2, -1], dtype=torch.int32), (2, -1)),
        "numpy_pair": (np.array([6, 0]), (6, 0)),
        "tuple_of_0d_tensors": ((torch.tensor(3), torch.tensor(-1)), (3, -1)),
    }


@pytest.mark.parametrize("name", ["numpy_int64", "numpy_int32_pair", "tensor_0d", "tensor_pair", "tensor_pair_int32",
                                  "numpy_pair", "tuple_of_0d_tensors"])
@pytest.mark.parametrize("causal", [True, False])
def test_integer_like_windows_mean_their_int(name, causal):
    from sft_kernels import sliding_window_attention

    given, plain = _integer_likes()[name]
    assert parse_window(given, causal) == parse_window(plain, causal)
    spec = parse_window(given, causal)
    assert all(type(x) is int for x in (spec.left, spec.right, spec.keys))  # plain ints reach the custom op
    q, k, v = (torch.randn(1, 12, 2, 8, dtype=torch.float64) for _ in range(3))
    got = sliding_window_attention(q, k, v, window_size=given, causal=causal)
    want, _ = sliding_window_attention_reference(q, k, v, plain, causal)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    ref_given, _ = sliding_window_attention_reference(q, k, v, given, causal)  # the reference takes them too
    assert torch.equal(ref_given, want)


@pytest.mark.parametrize(
    "bad",
    [torch.tensor(4.0), torch.tensor([2.0, 0.0]), torch.tensor(True), torch.tensor([3, 1, 0]), torch.tensor([[3, 1]]),
     (torch.tensor(True), 0), (2, 0.5), torch.tensor([5])],
    ids=["float_0d", "float_pair", "bool_0d", "three_entries", "2d", "bool_entry", "float_entry", "one_entry_1d"],
)
def test_float_and_bool_windows_still_refused(bad):
    with pytest.raises(TypeError, match="window_size"):
        parse_window(bad, True)


def test_numpy_bool_and_float_refused():
    import numpy as np

    for bad in (np.bool_(True), np.float32(4.0), (np.float64(2.0), 0)):
        with pytest.raises(TypeError, match="window_size"):
            parse_window(bad, False)
    with pytest.raises(ValueError, match="window_size left must be >= -1"):
        parse_window(torch.tensor([-2, 0]), False)
    with pytest.raises(ValueError, match="window_size as an int"):
        parse_window(np.int64(0), True)


def test_reference_softcap_hand_values():
    # one query, three keys with scores 0, 25, 30 (scale 1): softcap 10 maps them to
    # 10 tanh(s / 10) = 0, 9.87, 9.95 before the softmax, so the 30 no longer takes 99%
    q = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    k = torch.tensor([0.0, 25.0, 30.0], dtype=torch.float64).view(1, 3, 1, 1)
    v = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64).view(1, 3, 1, 1)
    out, lse = sliding_window_attention_reference(q, k, v, softmax_scale=1.0, softcap=10.0)
    capped = 10.0 * torch.tanh(torch.tensor([0.0, 25.0, 30.0], dtype=torch.float64) / 10.0)
    p = torch.softmax(capped, 0)
    assert torch.allclose(out.flatten(), (p * v.flatten()).sum().view(1), rtol=0, atol=1e-14)
    assert torch.allclose(lse.flatten(), torch.logsumexp(capped, 0).view(1), rtol=0, atol=1e-14)
    plain, _ = sliding_window_attention_reference(q, k, v, softmax_scale=1.0)
    assert (plain - out).abs().item() > 0.5  # the cap changes the answer


def test_reference_sinks_hand_values():
    # q = 0: every key scores 0. Two heads with sinks log(1) = 0 and log(3): row i (causal)
    # sees i + 1 keys, so P(key) = 1 / (i + 1 + e^sink) and the sink keeps the rest.
    q = torch.zeros(1, 3, 2, 1, dtype=torch.float64)
    k = torch.randn(1, 3, 2, 1, dtype=torch.float64)
    v = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 2, 1)
    sinks = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64)
    out, lse = sliding_window_attention_reference(q, k, v, causal=True, sinks=sinks)
    csum = torch.tensor([1.0, 3.0, 7.0], dtype=torch.float64)
    for h, e_sink in enumerate((1.0, 3.0)):
        n = torch.arange(1, 4, dtype=torch.float64)
        assert torch.allclose(out[0, :, h, 0], csum / (n + e_sink), rtol=0, atol=1e-14)
        assert torch.allclose(lse[0, h], torch.log(n + e_sink), rtol=0, atol=1e-14)


def test_reference_sinks_empty_rows_and_gradient():
    # 5 queries over 2 keys, causal: rows 0-2 see no key; with a sink they output 0 and
    # their lse is the sink's logit (the sink takes all the mass), finite
    q = torch.randn(1, 5, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 1, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 1, 4, dtype=torch.float64, requires_grad=True)
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    out, lse = sliding_window_attention_reference(q, k, v, causal=True, sinks=sinks, softcap=3.0)
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))
    assert torch.allclose(lse[0, :, :3], sinks.detach()[:, None].expand(2, 3))
    # d loss / d sink_h = -sum over rows of P_sink * (dO . O): check against finite differences
    do = torch.randn_like(out)
    (g,) = torch.autograd.grad((out * do).sum(), sinks)
    p_sink = torch.exp(sinks.detach()[None, :, None] - lse.detach())  # (1, H, L)
    delta = (do * out.detach()).sum(-1).transpose(1, 2)  # (1, H, L)
    assert torch.allclose(g, -(p_sink * delta).sum((0, 2)), rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: sliding_window_attention_reference(q, k, v, (1, 0), True, sinks=s, softcap=2.0)[0],
        (q, k, v, sinks),
    )
