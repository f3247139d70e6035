"""Sliding-window attention against the float64 dense reference.

Two implementations are checked: the PyTorch path (any size) and the Triton kernels
(marked ``interpret``: on the GPU when there is one, else through TRITON_INTERPRET=1 on
CPU tensors at small shapes).
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import TOL, assert_fa_bar, assert_rel, poison_
from sft_kernels import sliding_window_attention, sliding_window_attention_reference

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, window_size, causal)
CASES = {
    "full": (2, 97, 97, 2, 2, 32, (-1, -1), False),
    "causal": (2, 97, 97, 2, 2, 32, (-1, -1), True),
    "diag_only": (1, 70, 70, 2, 2, 16, (0, 0), False),
    "asym_3_17": (1, 97, 97, 2, 1, 32, (3, 17), False),
    "left_only_unbounded_right": (1, 97, 97, 2, 2, 16, (9, -1), False),
    "causal_w16": (2, 130, 130, 4, 2, 64, (15, 0), True),
    "int_window_bidir": (1, 97, 97, 2, 2, 16, 9, False),
    "sqrt_causal": (1, 129, 129, 2, 2, 32, "sqrt", True),
    "hd80_gqa": (1, 97, 97, 4, 2, 80, (20, 0), True),
    "hd96_mqa": (1, 65, 65, 4, 1, 96, (7, 7), False),
    "q_shorter_causal": (2, 33, 97, 2, 2, 32, (16, 0), True),
    "q_longer_causal": (1, 97, 33, 2, 2, 32, (-1, 0), True),  # first 64 rows see nothing
    "q_longer_window": (1, 90, 45, 2, 1, 16, (5, 3), False),
    "hd256": (1, 40, 40, 2, 2, 256, (8, 0), True),
}

TRITON_CASES = list(CASES)


def _inputs(b, lq, lk, hq, hkv, d, dtype, device, scale=1.0):
    q = torch.randn(b, lq, hq, d, device=device, dtype=dtype) * scale
    k = torch.randn(b, lk, hkv, d, device=device, dtype=dtype) * scale
    v = torch.randn(b, lk, hkv, d, device=device, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _check(case, dtype, device, backend, grads=True, fa_bar=True, **kw):
    b, lq, lk, hq, hkv, d, window, causal = case
    q, k, v = _inputs(b, lq, lk, hq, hkv, d, dtype, device)
    out, lse = sliding_window_attention(q, k, v, window, causal, return_lse=True, backend=backend, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    q64, k64, v64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = sliding_window_attention_reference(q64, k64, v64, window, causal, **kw)
    tol = TOL[dtype]
    assert_rel(out.cpu(), ref, tol, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite), "lse: -inf rows differ from the reference"
    assert_rel(lse.cpu()[finite], ref_lse[finite], max(tol, 1e-6), "lse")
    if fa_bar and dtype in (torch.float16, torch.bfloat16):
        low, _ = sliding_window_attention_reference(*(t.detach().cpu() for t in (q, k, v)), window, causal, upcast=False, **kw)
        assert_fa_bar(out.cpu(), ref, low, "out")
    if grads:
        do = torch.randn_like(out)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
        rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), do.cpu().double())
        for name, g, r in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
            assert torch.isfinite(g).all(), f"{name} has non-finite values"
            assert_rel(g.cpu(), r, tol, name)
            if fa_bar and dtype in (torch.float16, torch.bfloat16):
                # low-precision plain PyTorch as the baseline for the 2x bar
                ql, kl, vl = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
                lo, _ = sliding_window_attention_reference(ql, kl, vl, window, causal, upcast=False, **kw)
                lg = dict(zip(("dq", "dk", "dv"), torch.autograd.grad(lo, (ql, kl, vl), do.cpu())))
                assert_fa_bar(g.cpu(), r, lg[name], name)


# ----------------------------------------------------------------------------- PyTorch path
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_torch_path(name, dtype):
    _check(CASES[name], dtype, "cpu", "torch")


@pytest.mark.parametrize("name", ["causal_w16", "hd80_gqa", "q_longer_causal"])
def test_torch_path_fp16(name):
    _check(CASES[name], torch.float16, "cpu", "torch")


def test_auto_on_cpu_uses_torch_path():
    q, k, v = _inputs(1, 20, 20, 2, 2, 8, torch.float32, "cpu")
    a = sliding_window_attention(q, k, v, (3, 0))
    b = sliding_window_attention(q, k, v, (3, 0), backend="torch")
    assert torch.equal(a, b)


def test_torch_path_long_sequence_against_reference_chunk():
    """L = 8192: the dense reference would be large, so compare a slice of query rows."""
    torch.manual_seed(3)
    b, L, h, d, w = 1, 8192, 2, 32, 256
    q, k, v = [torch.randn(b, L, h, d, dtype=torch.float64) for _ in range(3)]
    out, lse = sliding_window_attention(q, k, v, w, causal=True, return_lse=True, backend="torch")
    for start in (0, 4000, L - 300):
        rows = (start, start + 300)
        ref, ref_lse = sliding_window_attention_reference(q, k, v, w, causal=True, query_range=rows)
        assert_rel(out[:, rows[0]:rows[1]], ref, TOL[torch.float64], f"out rows {rows}")
        assert_rel(lse[:, :, rows[0]:rows[1]], ref_lse, TOL[torch.float64], f"lse rows {rows}")


def test_torch_path_long_sequence_gradients_chunk():
    """Gradient of a loss on a slice of rows at L = 8192 equals the reference's on that slice."""
    torch.manual_seed(4)
    b, L, h, d, w = 1, 8192, 2, 16, 128
    q, k, v = [torch.randn(b, L, h, d, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    rows = (5000, 5200)
    out = sliding_window_attention(q, k, v, w, causal=True, backend="torch")
    do = torch.randn(b, rows[1] - rows[0], h, d, dtype=torch.float64)
    dq, dk, dv = torch.autograd.grad((out[:, rows[0]:rows[1]] * do).sum(), (q, k, v))
    ref, _ = sliding_window_attention_reference(q, k, v, w, causal=True, query_range=rows)
    rq, rk, rv = torch.autograd.grad((ref * do).sum(), (q, k, v))
    for name, g, r in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_rel(g, r, TOL[torch.float64], name)


# ----------------------------------------------------------------------------- Triton kernels
@pytest.mark.interpret
@pytest.mark.parametrize("name", TRITON_CASES)
def test_triton(name, triton_device):
    dtype = torch.float32
    _check(CASES[name], dtype, triton_device, "triton")


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["causal_w16", "hd80_gqa", "q_longer_causal", "asym_3_17"])
def test_triton_half(name, dtype, triton_device):
    _check(CASES[name], dtype, triton_device, "triton")


def _varlen(lens_q, lens_k, hq, hkv, d, dtype, device):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    q = torch.randn(sum(lens_q), hq, d, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(sum(lens_k), hkv, d, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(sum(lens_k), hkv, d, dtype=dtype, device=device, requires_grad=True)
    return q, k, v, cu_q, cu_k


VARLEN_CASES = {
    "equal_q_k_causal_w": ([17, 40, 1, 33], [17, 40, 1, 33], (7, 0), True),
    "sqrt_per_sequence": ([50, 9, 70], [50, 9, 70], "sqrt", True),
    "with_empty_sequence": ([20, 0, 31], [20, 0, 31], (4, 4), False),
    "q_ne_k": ([10, 30], [25, 30], (-1, 0), True),
    "int_window_bidir": ([40, 23], [40, 23], 5, False),
}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize("name", list(VARLEN_CASES))
def test_varlen_against_per_sequence_reference(name, backend, triton_device):
    lens_q, lens_k, window, causal = VARLEN_CASES[name]
    device = triton_device if backend == "triton" else "cpu"
    q, k, v, cu_q, cu_k = _varlen(lens_q, lens_k, 4, 2, 32, torch.float32, device)
    out, lse = sliding_window_attention(q, k, v, window, causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                        return_lse=True, backend=backend)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert lse.shape == (4, q.shape[0])
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(lens_q)):
        qs, qe, ks, ke = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if qe == qs:
            continue
        qi, ki, vi = [t.detach().cpu()[a:b].double()[None].requires_grad_() for t, (a, b) in
                      ((q, (qs, qe)), (k, (ks, ke)), (v, (ks, ke)))]
        ref, ref_lse = sliding_window_attention_reference(qi, ki, vi, window, causal)
        assert_rel(out[qs:qe].cpu(), ref[0], TOL[torch.float32], f"seq {i} out")
        fin = torch.isfinite(ref_lse[0])
        assert_rel(lse[:, qs:qe].cpu()[fin], ref_lse[0][fin], 1e-5, f"seq {i} lse")
        rg = torch.autograd.grad(ref, (qi, ki, vi), do[qs:qe].cpu().double()[None])
        assert_rel(grads[0][qs:qe].cpu(), rg[0][0], TOL[torch.float32], f"seq {i} dq")
        if ke > ks:
            assert_rel(grads[1][ks:ke].cpu(), rg[1][0], TOL[torch.float32], f"seq {i} dk")
            assert_rel(grads[2][ks:ke].cpu(), rg[2][0], TOL[torch.float32], f"seq {i} dv")


@pytest.mark.interpret
def test_triton_writes_every_output_element(triton_device, monkeypatch):
    """Outputs and gradients are allocated NaN-filled; every element must be overwritten."""
    from sft_kernels.ops.sliding_window_attention import triton_kernels as tk

    monkeypatch.setattr(tk, "_empty_like", lambda t: poison_(torch.empty_like(t)))
    monkeypatch.setattr(tk, "_empty", lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype, device=device)))
    for case in ("q_longer_causal", "hd80_gqa", "diag_only"):
        b, lq, lk, hq, hkv, d, window, causal = CASES[case]
        q, k, v = _inputs(b, lq, lk, hq, hkv, d, torch.float32, triton_device)
        out, lse = sliding_window_attention(q, k, v, window, causal, return_lse=True, backend="triton")
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        for g in (dq, dk, dv):
            assert not torch.isnan(g).any()


@pytest.mark.interpret
def test_triton_backward_is_deterministic(triton_device):
    q, k, v = _inputs(1, 64, 64, 4, 1, 32, torch.float32, triton_device)
    out = sliding_window_attention(q, k, v, (20, 0), True, backend="triton")
    do = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    g2 = torch.autograd.grad(out, (q, k, v), do)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_rows_without_keys_are_zero_with_zero_grad(backend, triton_device):
    device = triton_device if backend == "triton" else "cpu"
    q, k, v = _inputs(1, 40, 8, 2, 2, 16, torch.float32, device)
    out, lse = sliding_window_attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert torch.equal(out[:, :32], torch.zeros_like(out[:, :32]))
    assert torch.isneginf(lse[:, :, :32]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert torch.equal(dq[:, :32], torch.zeros_like(dq[:, :32]))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_fp16_large_logits_stay_finite(backend, triton_device):
    device = triton_device if backend == "triton" else "cpu"
    q, k, v = _inputs(1, 48, 48, 2, 2, 32, torch.float16, device, scale=30.0)  # logits ~ 1e3 to 1e4
    out = sliding_window_attention(q, k, v, (10, 0), True, backend=backend)
    assert torch.isfinite(out).all()
    ref, _ = sliding_window_attention_reference(*(t.detach().cpu().double() for t in (q, k, v)), (10, 0), True)
    assert_rel(out.cpu(), ref, TOL[torch.float16], "out")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_non_contiguous_inputs():
    qkv = torch.randn(2, 50, 3, 4, 16, dtype=torch.float64)
    q, k, v = qkv.unbind(2)  # strided views
    out = sliding_window_attention(q, k, v, (5, 0), True, backend="torch")
    ref, _ = sliding_window_attention_reference(q, k, v, (5, 0), True)
    assert_rel(out, ref, TOL[torch.float64], "out")
    qt = torch.randn(2, 16, 50, 4, dtype=torch.float64).transpose(1, 3)  # last dim not contiguous
    kt = torch.randn(2, 16, 50, 4, dtype=torch.float64).transpose(1, 3)
    out = sliding_window_attention(qt, kt, kt, (5, 0), True)
    ref, _ = sliding_window_attention_reference(qt, kt, kt, (5, 0), True)
    assert_rel(out, ref, TOL[torch.float64], "out (transposed)")


def test_softmax_scale_and_lse():
    q, k, v = _inputs(1, 30, 30, 2, 2, 8, torch.float64, "cpu")
    out, lse = sliding_window_attention(q, k, v, (4, 4), softmax_scale=0.3, return_lse=True)
    ref, ref_lse = sliding_window_attention_reference(q, k, v, (4, 4), softmax_scale=0.3)
    assert_rel(out, ref, 1e-10, "out")
    assert_rel(lse, ref_lse, 1e-10, "lse")
    assert lse.shape == (1, 2, 30)


# ----------------------------------------------------------------------------- bad input
def _ok(**over):
    args = dict(q=torch.randn(1, 8, 4, 16), k=torch.randn(1, 8, 2, 16), v=torch.randn(1, 8, 2, 16))
    args.update(over)
    return args


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (_ok(q=torch.randn(8, 4, 16)), ValueError, "q must be 4-D"),
        (_ok(k=torch.randn(1, 8, 3, 16), v=torch.randn(1, 8, 3, 16)), ValueError, "multiple of heads"),
        (_ok(v=torch.randn(1, 8, 1, 16)), ValueError, "same shape"),
        (_ok(k=torch.randn(1, 8, 2, 8), v=torch.randn(1, 8, 2, 8)), ValueError, "head_dim"),
        (_ok(q=torch.randn(1, 8, 4, 300), k=torch.randn(1, 8, 2, 300), v=torch.randn(1, 8, 2, 300)), ValueError, "head_dim must be in"),
        (_ok(q=torch.randn(1, 8, 4, 16, dtype=torch.float64)), TypeError, "share a dtype"),
        (_ok(q=torch.randint(0, 3, (1, 8, 4, 16))), TypeError, "floating-point"),
        (_ok(k=torch.randn(2, 8, 2, 16), v=torch.randn(2, 8, 2, 16)), ValueError, "batch size"),
        (dict(_ok(), window_size=(-2, 0)), ValueError, "window_size left must be >= -1"),
        (dict(_ok(), window_size=(0, -3)), ValueError, "window_size right"),
        (dict(_ok(), window_size="log"), ValueError, "window_size"),
        (dict(_ok(), backend="cudnn"), ValueError, "backend must be one of"),
        (dict(_ok(), softmax_scale=float("nan")), ValueError, "softmax_scale"),
        (dict(_ok(), max_seqlen_q=8), ValueError, "only for packed"),
        (dict(_ok(), causal=1), TypeError, "causal"),
        (dict(q=[1.0], k=torch.randn(1, 8, 2, 16), v=torch.randn(1, 8, 2, 16)), TypeError, "q must be a torch.Tensor"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sliding_window_attention(**kwargs)


@pytest.mark.parametrize(
    "cu_q, cu_k, match",
    [
        (torch.tensor([0, 5, 10], dtype=torch.int64), torch.tensor([0, 5, 10], dtype=torch.int32), "cu_seqlens_q must be int32"),
        (torch.tensor([1, 5, 10], dtype=torch.int32), torch.tensor([0, 5, 10], dtype=torch.int32), r"cu_seqlens_q\[0\] must be 0"),
        (torch.tensor([0, 7, 5, 10], dtype=torch.int32), torch.tensor([0, 7, 5, 10], dtype=torch.int32), "non-decreasing"),
        (torch.tensor([0, 5, 9], dtype=torch.int32), torch.tensor([0, 5, 10], dtype=torch.int32), "number of packed tokens"),
        (torch.tensor([0, 10], dtype=torch.int32), torch.tensor([0, 5, 10], dtype=torch.int32), "same length"),
        (torch.tensor([[0, 10]], dtype=torch.int32), torch.tensor([0, 10], dtype=torch.int32), "1-D"),
        (torch.tensor([0, 5, 10], dtype=torch.int32), None, "both cu_seqlens"),
    ],
)
def test_bad_cu_seqlens(cu_q, cu_k, match):
    q, k, v = torch.randn(10, 2, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        sliding_window_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_backend_errors_name_the_fix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 8, 2, 16)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            sliding_window_attention(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="backend='cuda'"):
        sliding_window_attention(q, q, q, backend="cuda")


# ----------------------------------------------------------------------------- torch.library
def test_opcheck():
    q, k, v = _inputs(1, 24, 24, 2, 1, 8, torch.float64, "cpu")
    args = (q, k, v, None, None, 24, 24, 0, 5, 0, 0, True, 0.3, "torch")
    torch.library.opcheck(torch.ops.sft_kernels.swa_forward.default, args)
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    qp, kp, vp = [t.detach()[0].requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.sft_kernels.swa_forward.default, (qp, kp, vp, cu, cu, 14, 14, 2, -1, -1, 0, True, 0.3, "torch"))


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(compile_backend):
    q, k, v = _inputs(2, 40, 40, 4, 2, 16, torch.float32, "cpu")

    def f(q, k, v):
        return sliding_window_attention(q * 2, k, v, (7, 0), True, backend="torch").sum()

    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_grads = torch.autograd.grad(f(q, k, v), (q, k, v))
    assert torch.allclose(loss, f(q, k, v))
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b)


# ----------------------------------------------------------------------------- properties
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2), lq=st.integers(1, 70), lk_delta=st.integers(-20, 20), hkv=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]), d=st.sampled_from([4, 8, 12, 32]),
    window=st.one_of(
        st.tuples(st.integers(-1, 40), st.integers(-1, 40)), st.integers(1, 50), st.just("sqrt")
    ),
    causal=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
)
def test_property_torch_path(b, lq, lk_delta, hkv, group, d, window, causal, dtype):
    lk = max(1, lq + lk_delta)
    _check((b, lq, lk, hkv * group, hkv, d, window, causal), dtype, "cpu", "torch", fa_bar=False)


@pytest.mark.interpret
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    lens=st.lists(st.integers(0, 40), min_size=1, max_size=3), group=st.sampled_from([1, 2]),
    window=st.one_of(st.tuples(st.integers(-1, 20), st.integers(-1, 20)), st.integers(1, 30), st.just("sqrt")),
    causal=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_property_triton_packed(lens, group, window, causal, dtype, triton_device):
    if sum(lens) == 0:
        lens = lens + [5]
    q, k, v, cu_q, cu_k = _varlen(lens, lens, 2 * group, 2, 16, dtype, triton_device)
    out = sliding_window_attention(q, k, v, window, causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="triton")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref, _ = sliding_window_attention_reference(q64, k64, v64, window, causal, cu_seqlens_q=cu_q.cpu(), cu_seqlens_k=cu_k.cpu())
    rg = torch.autograd.grad(ref, (q64, k64, v64), do.cpu().double())
    assert_rel(out.cpu(), ref, TOL[dtype], "out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, rg):
        assert_rel(g.cpu(), r, TOL[dtype], name)


# ----------------------------------------------------------------------------- GPU sizes
GPU_CASES = {
    "L1025_w256_gqa_hd128": (2, 1025, 1025, 8, 2, 128, 256, True),
    "L2048_sqrt_hd64": (1, 2048, 2048, 4, 4, 64, "sqrt", True),
    "L1025_bidir_hd80": (1, 1025, 1025, 4, 1, 80, (100, 37), False),
    "q_shorter_hd256": (1, 300, 1100, 2, 2, 256, (128, 0), True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_triton_gpu_sizes(name, dtype):
    # fp32 on the GPU multiplies in full fp32 (DOT_PREC="ieee"), so the fp32 bar holds
    _check(GPU_CASES[name], dtype, "cuda", "triton")


@pytest.mark.gpu
def test_triton_gpu_varlen_long():
    lens = [1000, 17, 3000, 513]
    q, k, v, cu_q, cu_k = _varlen(lens, lens, 8, 2, 128, torch.bfloat16, "cuda")
    out = sliding_window_attention(q, k, v, 512, True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="triton")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = sliding_window_attention_reference(q64, k64, v64, 512, True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    rg = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    assert_rel(out, ref, TOL[torch.bfloat16], "out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, rg):
        assert_rel(g, r, TOL[torch.bfloat16], name)
