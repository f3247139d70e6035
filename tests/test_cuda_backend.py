"""backend="cuda" (the CUDA C++ extension) against the float64 references, on a GPU.

Every test is ``@pytest.mark.gpu`` (skipped without CUDA) and needs the built extension
(``SFT_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .``, or ``SFT_KERNELS_JIT=1``); otherwise it
skips with the reason. Two layers are checked: the launchers in ``cuda_backend.py``
directly (outputs poisoned with NaN first, so unwritten elements fail), and the public
ops with ``backend="cuda"`` (forward and autograd), which needs the dispatch in op.py.
Tolerances: the TOL table and FlashAttention's 2x bar (tests/helpers.py).
"""

import os
import re

import pytest
import torch

from helpers import TOL, assert_fa_bar, assert_rel
from sft_kernels import _build
from sft_kernels.ops.block_diag import block_diag_matmul, block_diag_matmul_reference
from sft_kernels.ops.block_diag import cuda_backend as bd_cuda
from sft_kernels.ops.sliding_window_attention import cuda_backend as swa_cuda
from sft_kernels.ops.sliding_window_attention.reference import sliding_window_attention_reference
from sft_kernels.window import parse_window

pytestmark = pytest.mark.gpu
DTYPES = [torch.float16, torch.bfloat16]
DT = {torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(scope="module", autouse=True)
def _requires_extension():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    err = _build.extension_error()
    if err:
        pytest.skip(f"requires the CUDA extension: {err}")


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs of the attention launcher start as NaN."""
    monkeypatch.setattr(swa_cuda, "_empty_like", lambda t: torch.full(t.shape, float("nan"), dtype=t.dtype,
                                                                       device=t.device))


# ----------------------------------------------------------------------------- attention
# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, window_size, causal)
ATTN = {
    "full": (2, 97, 97, 2, 2, 64, (-1, -1), False),
    "causal": (2, 97, 97, 2, 2, 64, (-1, -1), True),
    "diag_only": (1, 70, 70, 2, 2, 64, (0, 0), False),
    "asym_3_17_mqa": (1, 97, 97, 2, 1, 128, (3, 17), False),
    "left_only_unbounded_right": (1, 97, 97, 2, 2, 64, (9, -1), False),
    "causal_w16_gqa": (2, 130, 130, 4, 2, 64, (15, 0), True),
    "int_window_bidir": (1, 97, 97, 2, 2, 64, 9, False),
    "int_window_causal_hd128": (1, 300, 300, 4, 1, 128, 64, True),
    "sqrt_causal": (1, 1025, 1025, 2, 2, 64, "sqrt", True),
    "sqrt_bidir_hd128": (1, 257, 257, 2, 2, 128, "sqrt", False),
    "q_shorter_causal": (2, 33, 97, 2, 2, 64, (16, 0), True),
    "q_longer_causal_empty_rows": (1, 97, 33, 2, 2, 64, (-1, 0), True),
    "q_longer_window": (1, 90, 45, 2, 1, 128, (5, 3), False),
    "long_causal_w256": (2, 2048, 2048, 8, 2, 128, (255, 0), True),
}


def _attn_inputs(case, dtype):
    b, lq, lk, hq, hkv, d, window, causal = case
    q = torch.randn(b, lq, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(b, lk, hkv, d, device="cuda", dtype=dtype)
    v = torch.randn(b, lk, hkv, d, device="cuda", dtype=dtype)
    return q, k, v, window, causal


def _ref_all(q, k, v, window, causal, do, **kw):
    q64, k64, v64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref, lse = sliding_window_attention_reference(q64, k64, v64, window, causal, **kw)
    grads = torch.autograd.grad(ref, (q64, k64, v64), do.cpu().double())
    ql, kl, vl = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    low, _ = sliding_window_attention_reference(ql, kl, vl, window, causal, upcast=False, **kw)
    low_grads = torch.autograd.grad(low, (ql, kl, vl), do.cpu())
    return ref, lse, grads, low, low_grads


def _compare(dtype, out, lse, dq, dk, dv, ref, ref_lse, grads, low, low_grads):
    tol = TOL[dtype]
    assert torch.isfinite(out).all(), "out: unwritten (NaN) or non-finite elements"
    assert_rel(out.cpu(), ref, tol, "out")
    assert_fa_bar(out.cpu(), ref, low, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite), "lse: -inf rows differ from the reference"
    assert (lse.cpu()[~finite] == float("-inf")).all()
    assert_rel(lse.cpu()[finite], ref_lse[finite], 1e-4, "lse")
    for name, g, r, lo in zip(("dq", "dk", "dv"), (dq, dk, dv), grads, low_grads):
        assert torch.isfinite(g).all(), f"{name}: unwritten or non-finite elements"
        assert_rel(g.cpu(), r, tol, name)
        assert_fa_bar(g.cpu(), r, lo, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("name", list(ATTN))
def test_attention_launchers(name, dtype, poisoned):
    _check_launchers(ATTN[name], dtype)


def _check_launchers(case, dtype):
    """Forward and backward launchers on one case against the float64 reference."""
    q, k, v, window, causal = _attn_inputs(case, dtype)
    spec = parse_window(window, causal)
    scale = q.shape[-1] ** -0.5
    out, lse = swa_cuda.swa_fwd_cuda(q, k, v, spec, scale)
    do = torch.randn_like(out)
    dq, dk, dv = swa_cuda.swa_bwd_cuda(do, q, k, v, out, lse, spec, scale)
    _compare(dtype, out, lse, dq, dk, dv, *_ref_all(q, k, v, window, causal, do))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("window,causal", [((31, 0), True), ("sqrt", True), (24, False)], ids=str)
def test_attention_varlen(window, causal, dtype, poisoned):
    lens_q, lens_k = [70, 0, 129, 5, 300], [70, 0, 129, 9, 250]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lens_q), 4, 64, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), 2, 64, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    spec = parse_window(window, causal)
    out, lse = swa_cuda.swa_fwd_cuda(q, k, v, spec, 0.125, cu_q, cu_k, max(lens_q), max(lens_k))
    do = torch.randn_like(out)
    dq, dk, dv = swa_cuda.swa_bwd_cuda(do, q, k, v, out, lse, spec, 0.125, cu_q, cu_k, max(lens_q), max(lens_k))
    kw = dict(softmax_scale=0.125, cu_seqlens_q=cu_q.cpu(), cu_seqlens_k=cu_k.cpu())
    _compare(dtype, out, lse, dq, dk, dv, *_ref_all(q, k, v, window, causal, do, **kw))


# Tile edges (issue 20): test_attention.py's tile-edge cases for the CUDA kernels' tile sizes,
# read from their source (the forward's, dK/dV's and dQ's BM and BN; dK/dV's query tile
# depends on head_dim), at head_dim 64 and 128. tests/cuda/kernel_tests.h runs the same
# conditions on the kernel source through the CPU emulator.
def _cuda_tile_sizes(head_dim):
    src = open(os.path.join(_build.csrc_dir(), "swa_kernels.cuh")).read()
    sizes = dict(re.findall(r"constexpr int k(FwdBM|FwdBN|DkdvBN|DqBM|DqBN) = (\d+);", src))
    dkdv_bm = re.search(r"static constexpr int BM = D <= 64 \? (\d+) : (\d+);", src)
    assert len(sizes) == 5 and dkdv_bm, "swa_kernels.cuh: tile sizes not found where this test reads them"
    return {int(n) for n in sizes.values()} | {int(dkdv_bm.group(1 if head_dim <= 64 else 2))}


def _tile_edge_cases():
    from test_attention import _edge_cases

    cases = {}
    for d in (64, 128):
        sizes = _cuda_tile_sizes(d)
        for name, case in _edge_cases(sizes, max(sizes)).items():
            cases[f"{name}_d{d}"] = case[:5] + (d,) + case[6:]
    return cases


ATTN_TILE_EDGES = _tile_edge_cases()


@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("name", list(ATTN_TILE_EDGES))
def test_attention_launchers_tile_edges(name, dtype, poisoned):
    _check_launchers(ATTN_TILE_EDGES[name], dtype)


def test_attention_strided_inputs(poisoned):
    """q/k/v as views of one packed qkv tensor (row stride 3 * heads * head_dim)."""
    qkv = torch.randn(2, 200, 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    spec = parse_window((40, 0), True)
    out, lse = swa_cuda.swa_fwd_cuda(q, k, v, spec, 0.125)
    do = torch.randn_like(out)
    dq, dk, dv = swa_cuda.swa_bwd_cuda(do, q, k, v, out, lse, spec, 0.125)
    _compare(torch.bfloat16, out, lse, dq, dk, dv, *_ref_all(q, k, v, (40, 0), True, do, softmax_scale=0.125))


def test_attention_misaligned_contiguous_view(poisoned):
    """A contiguous view starting 2 bytes into its storage: cp.async needs 16-byte aligned
    rows, so the launcher copies it (``.contiguous()`` alone would return it unchanged)."""
    base = torch.randn(1 * 160 * 2 * 64 + 1, device="cuda", dtype=torch.float16)
    q = base[1:].view(1, 160, 2, 64)
    assert q.is_contiguous() and q.data_ptr() % 16 != 0
    k, v = (torch.randn(1, 160, 2, 64, device="cuda", dtype=torch.float16) for _ in range(2))
    spec = parse_window((30, 0), True)
    out, lse = swa_cuda.swa_fwd_cuda(q, k, v, spec, 0.125)
    do = torch.randn_like(out)
    dq, dk, dv = swa_cuda.swa_bwd_cuda(do, q, k, v, out, lse, spec, 0.125)
    _compare(torch.float16, out, lse, dq, dk, dv, *_ref_all(q, k, v, (30, 0), True, do, softmax_scale=0.125))


def test_attention_more_than_65535_sequence_head_pairs(poisoned):
    """70,000 packed sequences x 4 heads: heads on grid.y, sequences on grid.z in launches of
    65,535 (the old binding refused batch x heads > 65,535). Checked on sequences on both
    sides of the launch boundary."""
    batch, lens = 70_000, torch.zeros(70_000, dtype=torch.int64)
    real = {0: 40, 65_534: 33, 65_535: 70, 69_999: 17}  # non-empty sequences
    for i, n in real.items():
        lens[i] = n
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32).cuda()
    total = int(lens.sum())
    q = torch.randn(total, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(total, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    spec = parse_window((15, 0), True)
    out, lse = swa_cuda.swa_fwd_cuda(q, k, v, spec, 0.125, cu, cu, 70, 70)
    do = torch.randn_like(out)
    dq, dk, dv = swa_cuda.swa_bwd_cuda(do, q, k, v, out, lse, spec, 0.125, cu, cu, 70, 70)
    starts = cu.cpu().tolist()
    for i in real:
        a, b = starts[i], starts[i + 1]
        sl = lambda t: t[a:b][None]  # noqa: E731
        res = _ref_all(sl(q), sl(k), sl(v), (15, 0), True, sl(do), softmax_scale=0.125)
        _compare(torch.bfloat16, sl(out), lse[:, a:b][None], sl(dq), sl(dk), sl(dv), *res)
    assert batch > 65535 and batch * 4 > 65535


def test_attention_backward_deterministic():
    q, k, v, window, causal = _attn_inputs(ATTN["causal_w16_gqa"], torch.bfloat16)
    spec = parse_window(window, causal)
    out, lse = swa_cuda.swa_fwd_cuda(q, k, v, spec, 0.125)
    do = torch.randn_like(out)
    first = swa_cuda.swa_bwd_cuda(do, q, k, v, out, lse, spec, 0.125)
    second = swa_cuda.swa_bwd_cuda(do, q, k, v, out, lse, spec, 0.125)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_attention_unsupported():
    q = torch.randn(1, 8, 2, 80, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="head_dim"):
        swa_cuda.swa_fwd_cuda(q, q, q, parse_window((3, 0), True), 0.1)
    q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.float32)
    with pytest.raises(TypeError, match="float16 and bfloat16"):
        swa_cuda.swa_fwd_cuda(q, q, q, parse_window((3, 0), True), 0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("name", ["causal_w16_gqa", "sqrt_causal", "asym_3_17_mqa", "q_longer_causal_empty_rows"])
def test_attention_public_api(name, dtype):
    """sliding_window_attention(..., backend="cuda") forward + autograd (op.py dispatch)."""
    from sft_kernels import sliding_window_attention

    q, k, v, window, causal = _attn_inputs(ATTN[name], dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = sliding_window_attention(q, k, v, window_size=window, causal=causal, return_lse=True, backend="cuda")
    do = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    _compare(dtype, out, lse, dq, dk, dv, *_ref_all(q, k, v, window, causal, do))


# ----------------------------------------------------------------------------- block-diagonal
SPLITS = {
    "equal_g8_aligned": ([128] * 8, [128] * 8),
    "equal_rect_g4": ([96] * 4, [160] * 4),
    "unequal": ([8, 40, 1, 17], [33, 5, 64, 1]),
    "one_by_one_g32": ([1] * 32, [1] * 32),
    "single_block": ([37], [19]),
    "g256_unequal": ([(i * 7) % 5 + 1 for i in range(256)], [(i * 3) % 4 + 1 for i in range(256)]),
    "wide_blocks": ([1024, 512], [512, 1536]),
}


def _bd_inputs(split, tokens, dtype, bias):
    in_f, out_f = split
    x = torch.randn(tokens, sum(in_f), device="cuda", dtype=dtype)
    blocks = [torch.randn(m, n, device="cuda", dtype=dtype) * n**-0.5 for n, m in zip(in_f, out_f)]
    w = torch.cat([b.reshape(-1) for b in blocks])
    b = torch.randn(sum(out_f), device="cuda", dtype=dtype) if bias else None
    return x, blocks, w, b


def _bd_ref(x, blocks, b, dy):
    x64 = x.detach().cpu().double().requires_grad_()
    w64 = [t.detach().cpu().double().requires_grad_() for t in blocks]
    b64 = b.detach().cpu().double().requires_grad_() if b is not None else None
    y = block_diag_matmul_reference(x64, w64, b64)
    grads = torch.autograd.grad(y, [x64] + w64 + ([b64] if b64 is not None else []), dy.cpu().double())
    dw = torch.cat([g.reshape(-1) for g in grads[1:1 + len(blocks)]])
    return y, grads[0], dw, (grads[-1] if b is not None else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("tokens", [1, 97, 4096])
@pytest.mark.parametrize("name", list(SPLITS))
def test_block_diag_launchers(name, tokens, dtype):
    in_f, out_f = SPLITS[name]
    x, blocks, w, b = _bd_inputs(SPLITS[name], tokens, dtype, bias=True)
    dy = torch.randn(tokens, sum(out_f), device="cuda", dtype=dtype)
    y_ref, dx_ref, dw_ref, _ = _bd_ref(x, blocks, b, dy)
    tol = TOL[dtype]
    y = bd_cuda.gemm_forward(x, w, b, in_f, out_f, out=torch.full_like(y_ref, float("nan"), dtype=dtype,
                                                                          device="cuda"))
    assert torch.isfinite(y).all()
    assert_rel(y.cpu(), y_ref, tol, "y")
    dx = bd_cuda.gemm_backward_dx(dy, w, in_f, out_f, out=torch.full_like(x, float("nan")))
    assert torch.isfinite(dx).all()
    assert_rel(dx.cpu(), dx_ref, tol, "dx")
    for split in (1, 3, None):
        dw = bd_cuda.gemm_backward_dw(dy, x, in_f, out_f, split=split)
        assert torch.isfinite(dw).all()
        assert_rel(dw.cpu(), dw_ref, tol, f"dw split={split}")


def test_block_diag_strided_rows():
    in_f, out_f = [40, 24, 8], [136, 8, 72]
    base = torch.randn(300, sum(in_f) + 24, device="cuda", dtype=torch.float16)
    x = base[:, 8:8 + sum(in_f)]  # row stride != width, unaligned start
    _, blocks, w, b = _bd_inputs((in_f, out_f), 300, torch.float16, bias=True)
    dy = torch.randn(300, sum(out_f), device="cuda", dtype=torch.float16)
    y_ref, dx_ref, dw_ref, _ = _bd_ref(x, blocks, b, dy)
    assert_rel(bd_cuda.gemm_forward(x, w, b, in_f, out_f).cpu(), y_ref, TOL[torch.float16], "y")
    assert_rel(bd_cuda.gemm_backward_dw(dy, x, in_f, out_f, split=2).cpu(), dw_ref, TOL[torch.float16], "dw")


def test_block_diag_unsupported():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(TypeError, match="float16 and bfloat16"):
        bd_cuda.gemm_forward(x, torch.randn(32, device="cuda"), None, [4, 4], [4, 4])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("name", ["equal_g8_aligned", "unequal", "g256_unequal"])
def test_block_diag_public_api(name, dtype):
    """block_diag_matmul(..., backend="cuda") forward + autograd (op.py dispatch)."""
    in_f, out_f = SPLITS[name]
    x, blocks, w, b = _bd_inputs(SPLITS[name], 513, dtype, bias=True)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = block_diag_matmul(x, w, in_f, out_f, bias=b, backend="cuda")
    dy = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    y_ref, dx_ref, dw_ref, db_ref = _bd_ref(x, blocks, b, dy)
    tol = TOL[dtype]
    for what, got, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref), ("db", db, db_ref)):
        assert_rel(got.detach().cpu(), ref, tol, what)
