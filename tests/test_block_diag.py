"""block_diag_matmul against the dense ``torch.block_diag`` reference (float64).

Torch-backend tests run on CPU at real sizes; Triton-kernel tests (``interpret``) run
through ``TRITON_INTERPRET=1`` on CPU tensors when there is no GPU, at tokens <= 64 and
widths <= 96 (the interpreter is slow).
"""

import random

import pytest
import torch
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from helpers import TOL, assert_close, assert_fa_bar, assert_rel, poison_
from sft_kernels.ops.block_diag import block_diag_matmul, block_diag_matmul_reference
from sft_kernels.ops.block_diag import op as bd_op
from sft_kernels.ops.block_diag import torch_impl

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

# (in_features, out_features), with readable ids. Random-but-fixed unequal sizes use a
# seeded generator so the cases are stable.
_rng = random.Random(1234)
SPLITS = {
    "equal_g8": ([16] * 8, [16] * 8),
    "equal_rect_g4": ([24] * 4, [40] * 4),
    "unequal": ([8, 40, 1, 17], [33, 5, 64, 1]),
    "one_by_one_g32": ([1] * 32, [1] * 32),
    "single_block": ([37], [19]),
    "g256_equal": ([2] * 256, [3] * 256),
    "g256_unequal": ([_rng.randint(1, 4) for _ in range(256)], [_rng.randint(1, 4) for _ in range(256)]),
}
# Small cases for the interpreter (widths <= 96).
TRITON_SPLITS = {
    "aligned_g2": ([32, 64], [48, 16]),  # every size a multiple of 16: the ALIGNED path
    "equal_g4": ([16] * 4, [16] * 4),
    "unequal": ([8, 40, 1, 17], [33, 5, 50, 1]),
    "one_by_one_g8": ([1] * 8, [1] * 8),
    "g16_unequal": ([3, 5, 1, 7, 2, 6, 4, 8, 1, 9, 2, 3, 5, 6, 7, 4], [4, 2, 6, 1, 3, 5, 7, 2, 8, 1, 4, 6, 3, 2, 5, 1]),
}


def _blocks(weight, in_f, out_f):
    out, off = [], 0
    for n, m in zip(in_f, out_f):
        out.append(weight[off : off + m * n].view(m, n))
        off += m * n
    return out


def _make(in_f, out_f, lead=(29,), dtype=torch.float32, bias=True, device="cpu", requires_grad=False, generator=None):
    numel = sum(m * n for n, m in zip(in_f, out_f))

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    x = randn(*lead, sum(in_f)).to(dtype)
    # Blocks scaled like nn.Linear (1/sqrt(fan_in)) so outputs of different blocks are comparable.
    scale = torch.cat([torch.full((m * n,), n ** -0.5) for n, m in zip(in_f, out_f)]).to(device)
    w = (randn(numel) * scale).to(dtype)
    b = randn(sum(out_f)).to(dtype) if bias else None
    if requires_grad:
        x.requires_grad_(True)
        w.requires_grad_(True)
        if b is not None:
            b.requires_grad_(True)
    return x, w, b


def _ref64(x, w, b, in_f, out_f):
    return block_diag_matmul_reference(
        x.detach().double(), [blk.double() for blk in _blocks(w.detach(), in_f, out_f)],
        None if b is None else b.detach().double(),
    )


def _ref64_grads(x, w, b, in_f, out_f, gy):
    xr = x.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(True)
    br = None if b is None else b.detach().double().requires_grad_(True)
    y = block_diag_matmul_reference(xr, _blocks(wr, in_f, out_f), br)
    y.backward(gy.double())
    return xr.grad, wr.grad, None if br is None else br.grad


def _lowp_ref(x, w, b, in_f, out_f):
    return block_diag_matmul_reference(x, _blocks(w, in_f, out_f), b, upcast=False)


def _tol(dtype, backend, device):
    if dtype == torch.float32 and backend == "triton" and device == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return TOL["tf32"]
    return TOL[dtype]


# ----------------------------------------------------------------------------- torch backend, forward


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_IDS[d])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(SPLITS))
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_forward_vs_reference(case, bias, dtype, backend):
    in_f, out_f = SPLITS[case]
    x, w, b = _make(in_f, out_f, lead=(97,), dtype=dtype, bias=bias)
    y = block_diag_matmul(x, w, in_f, out_f, bias=b, backend=backend)
    assert y.dtype == dtype and y.shape == (97, sum(out_f))
    ref = _ref64(x, w, b, in_f, out_f)
    assert_rel(y, ref, TOL[dtype], f"{case} y")
    if dtype != torch.float32:
        assert_fa_bar(y, ref, _lowp_ref(x, w, b, in_f, out_f), f"{case} y")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_IDS[d])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", ["equal_g8", "unequal", "one_by_one_g32", "single_block", "g256_unequal"])
def test_gradients_vs_reference(case, bias, dtype):
    in_f, out_f = SPLITS[case]
    x, w, b = _make(in_f, out_f, lead=(3, 41), dtype=dtype, bias=bias, requires_grad=True)
    y = block_diag_matmul(x, w, in_f, out_f, bias=b, backend="torch")
    gy = torch.randn_like(y)
    y.backward(gy)
    dx, dw, db = _ref64_grads(x, w, b, in_f, out_f, gy)
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    assert_rel(x.grad, dx, TOL[dtype], f"{case} dx")
    assert_rel(w.grad, dw, TOL[dtype], f"{case} dw")
    if bias:
        assert_rel(b.grad, db, TOL[dtype], f"{case} dbias")


def test_gradcheck_float64():
    in_f, out_f = [3, 1, 4], [2, 5, 1]
    for backend in ("torch", "auto"):
        x, w, b = _make(in_f, out_f, lead=(2, 3), dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w, b: block_diag_matmul(x, w, in_f, out_f, bias=b, backend=backend), (x, w, b))
    x, w, b = _make([4] * 3, [2] * 3, lead=(5,), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: block_diag_matmul(x, w, [4] * 3, [2] * 3, bias=b), (x, w, b))


def test_auto_single_block_is_linear():
    x, w, b = _make([37], [19], lead=(5, 7))
    y = block_diag_matmul(x, w, [37], [19], bias=b)
    assert torch.equal(y, torch.nn.functional.linear(x, w.view(19, 37), b))
    assert bd_op._resolve("auto", torch.device("cpu"), [16] * 4, [16] * 4, torch.float32) == "torch"


def test_weight_3d_for_equal_blocks():
    x, w, b = _make([8] * 4, [6] * 4)
    y = block_diag_matmul(x, w.view(4, 6, 8), [8] * 4, [6] * 4, bias=b)
    assert torch.equal(y, block_diag_matmul(x, w, [8] * 4, [6] * 4, bias=b))


# ----------------------------------------------------------------------------- layouts


def _layouts(n):
    """x variants with shape (..., n) and awkward strides: name -> tensor."""
    base = torch.randn(3, 5, 2 * n)
    return {
        "leading_dims": torch.randn(2, 3, 5, n),
        "row_stride_view": base[..., :n],  # flattens to a 2-D view with row stride 2n
        "transposed_batch": torch.randn(5, 3, n).transpose(0, 1),  # not flattenable: one copy
        "column_stride": torch.randn(n, 13).t(),  # feature stride 13
        "vector": torch.randn(n),
        "zero_tokens": torch.randn(0, n),
        "zero_tokens_batched": torch.randn(2, 0, n),
    }


@pytest.mark.parametrize("layout", list(_layouts(4)))
@pytest.mark.parametrize("case", ["equal_g8", "unequal"])
def test_layouts_forward_backward(case, layout):
    in_f, out_f = SPLITS[case]
    x = _layouts(sum(in_f))[layout].requires_grad_(True)
    _, w, b = _make(in_f, out_f, requires_grad=True)
    y = block_diag_matmul(x, w, in_f, out_f, bias=b, backend="torch")
    assert y.shape == (*x.shape[:-1], sum(out_f))
    ref = _ref64(x, w, b, in_f, out_f)
    assert_rel(y, ref, TOL[torch.float32], layout)
    gy = torch.randn_like(y)
    y.backward(gy)
    dx, dw, db = _ref64_grads(x, w, b, in_f, out_f, gy)
    assert_rel(x.grad, dx, TOL[torch.float32], f"{layout} dx")
    assert_rel(w.grad, dw, TOL[torch.float32], f"{layout} dw")
    assert_rel(b.grad, db, TOL[torch.float32], f"{layout} db")
    if x.numel() == 0:
        assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_broadcast_grad_with_zero_strides():
    # sum().backward() hands the op an expanded gradient (stride 0 everywhere)
    in_f, out_f = SPLITS["unequal"]
    x, w, b = _make(in_f, out_f, lead=(11,), requires_grad=True)
    block_diag_matmul(x, w, in_f, out_f, bias=b, backend="torch").sum().backward()
    dx, dw, db = _ref64_grads(x, w, b, in_f, out_f, torch.ones(11, sum(out_f)))
    assert_rel(x.grad, dx, TOL[torch.float32], "dx")
    assert_rel(w.grad, dw, TOL[torch.float32], "dw")
    assert_rel(b.grad, db, TOL[torch.float32], "db")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_IDS[d])
@pytest.mark.parametrize("case", ["equal_g8", "unequal", "single_block"])
def test_torch_impl_writes_every_element(case, dtype):
    in_f, out_f = SPLITS[case]
    x, w, b = _make(in_f, out_f, lead=(23,), dtype=dtype)
    gy = torch.randn(23, sum(out_f)).to(dtype)
    y = poison_(torch.empty(23, sum(out_f), dtype=dtype))
    dx = poison_(torch.empty(23, sum(in_f), dtype=dtype))
    dw = poison_(torch.empty_like(w))
    torch_impl.forward(x, w, b, in_f, out_f, out=y)
    torch_impl.backward_dx(gy, w, in_f, out_f, out=dx)
    torch_impl.backward_dw(gy, x, in_f, out_f, out=dw)
    for name, t in (("y", y), ("dx", dx), ("dw", dw)):
        assert torch.isfinite(t).all(), f"{name}: unwritten elements"
    assert_rel(y, _ref64(x, w, b, in_f, out_f), TOL[dtype], "y")


# ----------------------------------------------------------------------------- property tests


@st.composite
def _problems(draw):
    g = draw(st.integers(1, 6))
    equal = draw(st.booleans())
    if equal:
        n, m = draw(st.integers(1, 20)), draw(st.integers(1, 20))
        in_f, out_f = [n] * g, [m] * g
    else:
        in_f = draw(st.lists(st.integers(1, 20), min_size=g, max_size=g))
        out_f = draw(st.lists(st.integers(1, 20), min_size=g, max_size=g))
    lead = draw(st.lists(st.integers(0, 7), min_size=1, max_size=3))
    bias = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return in_f, out_f, tuple(lead), bias, dtype, draw(st.integers(0, 2**32 - 1))


# Tensors come from a generator seeded by the drawn integer: a failure replays from the
# example hypothesis prints.
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_problems())
def test_property_random_splits(problem):
    in_f, out_f, lead, bias, dtype, seed = problem
    gen = torch.Generator().manual_seed(seed)
    x, w, b = _make(in_f, out_f, lead=lead, dtype=dtype, bias=bias, requires_grad=True, generator=gen)
    y = block_diag_matmul(x, w, in_f, out_f, bias=b)
    ref = _ref64(x, w, b, in_f, out_f)
    assert_close(y.detach(), ref, dtype, f"{in_f}->{out_f} y", _lowp_ref(x, w, b, in_f, out_f).detach())
    gy = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(gy)
    dx, dw, db = _ref64_grads(x, w, b, in_f, out_f, gy)
    assert_rel(x.grad, dx, TOL[dtype], "dx")
    assert_rel(w.grad, dw, TOL[dtype], "dw")
    if bias:
        assert_rel(b.grad, db, TOL[dtype], "db")


# ----------------------------------------------------------------------------- torch.library


def test_opcheck():
    op = torch.ops.sft_kernels.block_diag_matmul.default
    for in_f, out_f, lead, bias in (([8, 40, 1, 17], [33, 5, 64, 1], (5,), True), ([4] * 3, [6] * 3, (2, 3), False)):
        x, w, b = _make(in_f, out_f, lead=lead, bias=bias, requires_grad=True)
        torch.library.opcheck(op, (x, w, b, in_f, out_f, "torch"))
        torch.library.opcheck(op, (x, w, b, in_f, out_f, "auto"))


def test_torch_compile_fullgraph():
    in_f, out_f = [8, 24, 4], [16, 8, 12]
    x, w, b = _make(in_f, out_f, lead=(2, 9), requires_grad=True)

    def f(x, w, b):
        return torch.relu(block_diag_matmul(x, w, in_f, out_f, bias=b)).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, w, b)
    loss.backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    f(x, w, b).backward()
    assert torch.allclose(loss, f(x, w, b))
    for got, t in zip(grads, (x, w, b)):
        assert torch.allclose(got, t.grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bad inputs


def _bad(**kw):
    in_f, out_f = [4, 4], [3, 5]
    x, w, b = _make(in_f, out_f, lead=(6,))
    args = dict(x=x, weight=w, in_features=in_f, out_features=out_f, bias=b, backend="auto")
    args.update(kw)
    return args


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(in_features=[4, 5]), ValueError, r"in_features \[4, 5\] sum to 9 but x has 8 features"),
        (dict(in_features=[8, 0]), ValueError, r"in_features\[1\] must be a positive block size, got 0"),
        (dict(out_features=[3, -5]), ValueError, r"out_features\[1\] must be a positive block size, got -5"),
        (dict(out_features=[3, 5, 1]), ValueError, "same number of blocks, got 2 and 3"),
        (dict(in_features=[]), ValueError, "at least one block size"),
        (dict(in_features=[4.0, 4]), TypeError, r"in_features\[0\] must be an int"),
        (dict(in_features=8), TypeError, "in_features must be a list"),
        (dict(weight=torch.randn(33)), ValueError, r"weight has 33 elements but .* need sum\(m_i \* n_i\) = 32"),
        (dict(weight=torch.randn(4, 8)), ValueError, "weight must be the flat packed weight"),
        (dict(weight=torch.randn(32, dtype=torch.float64)), TypeError, "weight dtype torch.float64 must match x's dtype torch.float32"),
        (dict(bias=torch.randn(7)), ValueError, r"bias must have shape \(sum\(out_features\),\) = \(8,\), got \(7,\)"),
        (dict(bias=torch.randn(8).half()), TypeError, "bias dtype torch.float16 must match"),
        (dict(x=torch.randn(6, 8).int()), TypeError, "x must be float16, bfloat16, float32 or float64"),
        (dict(x=torch.tensor(1.0)), ValueError, "0-d tensor"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(backend="cudnn"), ValueError, "backend must be one of"),
        (dict(weight=torch.randn(32, device="meta")), ValueError, "weight is on meta but x is on cpu"),
        (dict(bias=torch.randn(8, device="meta")), ValueError, "bias is on meta but x is on cpu"),
        (dict(backend="cuda"), ValueError, "backend='cuda'"),
    ],
    ids=[
        "splits_not_summing", "zero_size", "negative_size", "length_mismatch", "empty_splits", "float_size",
        "int_not_list", "weight_numel", "weight_2d", "weight_dtype", "bias_shape", "bias_dtype", "x_int",
        "x_0d", "x_not_tensor", "bad_backend", "weight_device", "bias_device", "cuda_backend_unavailable",
    ],
)
def test_bad_inputs(kw, exc, match):
    with pytest.raises(exc, match=match):
        block_diag_matmul(**_bad(**kw))


def test_bias_and_backend_are_keyword_only():
    x, w, b = _make([4, 4], [2, 6])
    with pytest.raises(TypeError, match="positional"):
        block_diag_matmul(x, w, [4, 4], [2, 6], b)


def test_triton_rejects_float64():
    x, w, b = _make([4], [4], dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        bd_op._resolve("triton", torch.device("cuda"), [4, 4], [2, 2], torch.float64)


# ----------------------------------------------------------------------------- Triton kernels


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_IDS[d])
@pytest.mark.parametrize("case", list(TRITON_SPLITS))
def test_triton_forward_backward(case, dtype, triton_device):
    in_f, out_f = TRITON_SPLITS[case]
    x, w, b = _make(in_f, out_f, lead=(2, 23), dtype=dtype, device=triton_device, requires_grad=True)
    y = block_diag_matmul(x, w, in_f, out_f, bias=b, backend="triton")
    ref = _ref64(x, w, b, in_f, out_f)
    tol = _tol(dtype, "triton", triton_device)
    assert_rel(y.cpu(), ref.cpu(), tol, f"{case} y")
    if dtype != torch.float32:
        assert_fa_bar(y.cpu(), ref.cpu(), _lowp_ref(x, w, b, in_f, out_f).cpu(), f"{case} y")
    gy = torch.randn_like(y)
    y.backward(gy)
    dx, dw, db = _ref64_grads(x, w, b, in_f, out_f, gy)
    assert_rel(x.grad.cpu(), dx.cpu(), tol, f"{case} dx")
    assert_rel(w.grad.cpu(), dw.cpu(), tol, f"{case} dw")
    assert_rel(b.grad.cpu(), db.cpu(), tol, f"{case} db")


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["row_stride_view", "transposed_batch", "column_stride", "vector", "zero_tokens"])
def test_triton_layouts(layout, triton_device):
    in_f, out_f = TRITON_SPLITS["unequal"]
    x = _layouts(sum(in_f))[layout].to(triton_device).requires_grad_(True)
    _, w, b = _make(in_f, out_f, device=triton_device, requires_grad=True)
    y = block_diag_matmul(x, w, in_f, out_f, bias=b, backend="triton")
    assert y.shape == (*x.shape[:-1], sum(out_f))
    tol = _tol(torch.float32, "triton", triton_device)
    assert_rel(y.cpu(), _ref64(x, w, b, in_f, out_f).cpu(), tol, layout)
    gy = torch.randn_like(y)
    y.backward(gy)
    dx, dw, db = _ref64_grads(x, w, b, in_f, out_f, gy)
    assert_rel(x.grad.cpu(), dx.cpu(), tol, f"{layout} dx")
    assert_rel(w.grad.cpu(), dw.cpu(), tol, f"{layout} dw")
    assert_rel(b.grad.cpu(), db.cpu(), tol, f"{layout} db")


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: DT_IDS[d])
@pytest.mark.parametrize("case", ["aligned_g2", "unequal", "g16_unequal"])
def test_triton_kernels_write_every_element(case, dtype, triton_device):
    from sft_kernels.ops.block_diag import triton_kernels as tk

    in_f, out_f = TRITON_SPLITS[case]
    T = 45
    x, w, b = _make(in_f, out_f, lead=(T,), dtype=dtype, device=triton_device)
    gy = torch.randn(T, sum(out_f), device=triton_device).to(dtype)
    y = poison_(torch.empty(T, sum(out_f), dtype=dtype, device=triton_device))
    dx = poison_(torch.empty(T, sum(in_f), dtype=dtype, device=triton_device))
    tk.gemm_forward(x, w, b, in_f, out_f, out=y)
    tk.gemm_backward_dx(gy, w, in_f, out_f, out=dx)
    tol = _tol(dtype, "triton", triton_device)
    for split in (1, 3):
        dw = poison_(torch.empty_like(w))
        tk.gemm_backward_dw(gy, x, in_f, out_f, split=split, out=dw)
        assert torch.isfinite(dw).all(), f"dw split={split}: unwritten elements"
        assert_rel(dw.cpu(), torch_impl.backward_dw(gy.double(), x.double(), in_f, out_f).cpu(), tol, f"dw split={split}")
    assert torch.isfinite(y).all() and torch.isfinite(dx).all(), "unwritten elements"
    assert_rel(y.cpu(), _ref64(x, w, b, in_f, out_f).cpu(), tol, "y")
    assert_rel(dx.cpu(), torch_impl.backward_dx(gy.double(), w.double(), in_f, out_f).cpu(), tol, "dx")


@pytest.mark.interpret
def test_triton_dw_split_is_deterministic_and_matches(triton_device):
    from sft_kernels.ops.block_diag import triton_kernels as tk

    in_f, out_f = [16, 32], [32, 16]
    x, _, _ = _make(in_f, out_f, lead=(64,), device=triton_device)
    gy = torch.randn(64, sum(out_f), device=triton_device)
    ref = torch_impl.backward_dw(gy.double(), x.double(), in_f, out_f)
    for split in (1, 2, 4):
        a = tk.gemm_backward_dw(gy, x, in_f, out_f, split=split)
        b = tk.gemm_backward_dw(gy, x, in_f, out_f, split=split)
        assert torch.equal(a, b), f"split={split} not deterministic"
        assert_rel(a.cpu(), ref.cpu(), _tol(torch.float32, "triton", triton_device), f"split={split}")


def test_split_heuristic():
    from sft_kernels.ops.block_diag import triton_kernels as tk

    big = torch.device("cuda", 0)
    # pretend 132 SMs without a GPU
    tk._num_sms.cache_clear()
    orig = tk._num_sms
    tk._num_sms = lambda index: 132
    try:
        assert tk.choose_split(16384, [4096] * 4, [4096] * 4, big) == 1  # 4 x 1024 tiles: plenty
        assert tk.choose_split(16384, [1024], [1024], big) == 3  # 64 tiles: ceil(132 / 64)
        assert tk.choose_split(2048, [512], [512], big) == 2  # capped at T // 1024
        assert tk.choose_split(512, [512], [512], big) == 1
    finally:
        tk._num_sms = orig


def test_compile_specs_cover_every_config():
    from sft_kernels.ops.block_diag import triton_kernels as tk

    specs = tk.compile_specs()
    names = [s["name"] for s in specs]
    assert len(names) == len(set(names))
    # unaligned block sizes run padded on the aligned kernels: one config list per kernel
    per_dtype = 3 * len(tk.GEMM_CONFIGS) + 2 * len(tk.DW_CONFIGS)
    assert len(specs) == 2 * per_dtype
    for s in specs:
        for v in ("BLOCK_T", "BLOCK_N", "BLOCK_K", "BLOCK_M"):
            if v in s["constexprs"]:
                b = s["constexprs"][v]
                assert b >= 16 and b & (b - 1) == 0, f"{s['name']}: {v}={b} must be a power of two >= 16"


def test_pinned_config_env(monkeypatch):
    from sft_kernels.ops.block_diag import triton_kernels as tk

    monkeypatch.setenv("SFT_KERNELS_BD_CONFIG", "gemm=64,32,16,4,2;dw=32,32,64,4,3")
    assert tk._pinned("gemm") == dict(BLOCK_T=64, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2)
    assert tk._pinned("dw") == dict(BLOCK_M=32, BLOCK_N=32, BLOCK_T=64, num_warps=4, num_stages=3)
    monkeypatch.setenv("SFT_KERNELS_BD_CONFIG", "gemm=64,48,16,4,2")
    with pytest.raises(ValueError, match="power-of-two"):
        tk._pinned("gemm")


@pytest.mark.interpret
def test_triton_pinned_config_runs(monkeypatch, triton_device):
    from sft_kernels.ops.block_diag import triton_kernels as tk

    monkeypatch.setenv("SFT_KERNELS_BD_CONFIG", "gemm=16,16,16,4,2;dw=16,16,16,4,2")
    in_f, out_f = TRITON_SPLITS["unequal"]
    x, w, b = _make(in_f, out_f, lead=(37,), device=triton_device)
    y = tk.gemm_forward(x, w, b, in_f, out_f)
    assert_rel(y.cpu(), _ref64(x, w, b, in_f, out_f).cpu(), _tol(torch.float32, "triton", triton_device), "y")
