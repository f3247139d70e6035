"""Empty inputs on every backend: batch 0, zero-length sequences, zero tokens (issue 16).

Every public op returns correctly shaped empty (or zero) outputs, an LSE of -inf where a
row sees no key, and zero (or empty) gradients, checked against the independent dense
references (which handle these sizes with their own arithmetic). Mixed packed batches
(some sequences empty, some not) are checked element by element against the reference.
"""

import pytest
import torch

from helpers import TOL, assert_rel
from sft_kernels import (
    BlockDiagonalLinear,
    block_diag_matmul,
    block_diag_matmul_reference,
    sliding_window_attention,
    sliding_window_attention_reference,
)
from sft_kernels.ops.sliding_window_attention import op as swa_op

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpret)]
WINDOWS = [((-1, -1), False), ((-1, -1), True), ((3, 0), True), ((2, 5), False), (4, True), ("sqrt", False)]
WINDOW_IDS = ["full", "causal", "causal_left3", "asym_2_5", "int4_causal", "sqrt"]

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim)
PADDED = {
    "batch0": (0, 7, 7, 4, 2, 8),
    "batch0_q_ne_k": (0, 3, 9, 2, 1, 16),
    "seqlen_q0": (2, 0, 7, 4, 2, 8),
    "seqlen_k0": (2, 5, 0, 4, 2, 8),
    "both0": (3, 0, 0, 2, 2, 8),
}


def _device(backend, triton_device):
    return triton_device if backend == "triton" else "cpu"


def _rand(*shape, device, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(device, dtype).requires_grad_()


def _check_empty_grads(q, k, v, out):
    do = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    grads = torch.autograd.grad(out, (q, k, v), do)
    for name, g, t in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype, f"{name}: {tuple(g.shape)} {g.dtype}"
        assert torch.equal(g, torch.zeros_like(t)), f"{name} must be zero"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window, causal", WINDOWS, ids=WINDOW_IDS)
@pytest.mark.parametrize("name", list(PADDED))
def test_attention_padded_empty(name, window, causal, backend, triton_device):
    b, lq, lk, hq, hkv, d = PADDED[name]
    device = _device(backend, triton_device)
    q, k, v = _rand(b, lq, hq, d, device=device), _rand(b, lk, hkv, d, device=device), _rand(b, lk, hkv, d, device=device)
    out, lse = sliding_window_attention(q, k, v, window_size=window, causal=causal, return_lse=True, backend=backend)
    ref, ref_lse = sliding_window_attention_reference(*(t.detach().cpu().double() for t in (q, k, v)), window, causal)
    assert out.shape == q.shape == ref.shape and out.dtype == q.dtype
    assert lse.shape == (b, hq, lq) == ref_lse.shape and lse.dtype == torch.float32
    assert torch.equal(out.cpu().double(), ref), "out must be zero"
    assert torch.isneginf(lse).all() and torch.isneginf(ref_lse).all()
    _check_empty_grads(q, k, v, out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_attention_padded_empty_dtypes_torch(dtype):
    for b, lq, lk, hq, hkv, d in PADDED.values():
        q, k, v = (_rand(b, n, h, d, device="cpu", dtype=dtype) for n, h in ((lq, hq), (lk, hkv), (lk, hkv)))
        out, lse = sliding_window_attention(q, k, v, window_size=(3, 0), causal=True, return_lse=True, backend="torch")
        assert out.shape == q.shape and out.dtype == dtype
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert lse.shape == (b, hq, lq) and torch.isneginf(lse).all()
        _check_empty_grads(q, k, v, out)


# packed: (lens_q, lens_k), heads_q, heads_kv
PACKED_EMPTY = {
    "one_seq_zero_tokens": ([0], [0]),
    "three_seqs_zero_tokens": ([0, 0, 0], [0, 0, 0]),
    "no_queries": ([0, 0], [2, 3]),
    "no_keys": ([3, 3], [0, 0]),
}


def _packed_inputs(lens_q, lens_k, device):
    """cu_seqlens for the given per-sequence lengths and packed q (4 heads), k, v (2 heads), d 16."""
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = _rand(sum(lens_q), 4, 16, device=device)
    k, v = _rand(sum(lens_k), 2, 16, device=device), _rand(sum(lens_k), 2, 16, device=device)
    return cu_q, cu_k, q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window, causal", WINDOWS, ids=WINDOW_IDS)
@pytest.mark.parametrize("name", list(PACKED_EMPTY))
def test_attention_packed_no_tokens(name, window, causal, backend, triton_device):
    lens_q, lens_k = PACKED_EMPTY[name]
    device = _device(backend, triton_device)
    cu_q, cu_k, q, k, v = _packed_inputs(lens_q, lens_k, device)
    out, lse = sliding_window_attention(q, k, v, window_size=window, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                        return_lse=True, backend=backend)
    ref, ref_lse = sliding_window_attention_reference(*(t.detach().cpu().double() for t in (q, k, v)), window, causal,
                                                      cu_seqlens_q=cu_q.cpu(), cu_seqlens_k=cu_k.cpu())
    assert out.shape == q.shape == ref.shape and lse.shape == (4, sum(lens_q)) == ref_lse.shape
    assert torch.equal(out.cpu().double(), ref) and torch.isneginf(lse).all()
    _check_empty_grads(q, k, v, out)


# Packed batches mixing empty and non-empty sequences: compared with the reference.
PACKED_MIXED = {
    "empty_q_then_full": ([0, 9, 5], [4, 9, 5]),
    "empty_k_middle": ([6, 4, 7], [6, 0, 7]),
    "empty_both_edges": ([0, 11, 0], [0, 11, 0]),
    "q_ne_k_with_empty": ([3, 0, 10], [8, 2, 4]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window, causal", WINDOWS, ids=WINDOW_IDS)
@pytest.mark.parametrize("name", list(PACKED_MIXED))
def test_attention_packed_zero_length_sequences(name, window, causal, backend, triton_device):
    lens_q, lens_k = PACKED_MIXED[name]
    device = _device(backend, triton_device)
    cu_q, cu_k, q, k, v = _packed_inputs(lens_q, lens_k, device)
    out, lse = sliding_window_attention(q, k, v, window_size=window, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                        return_lse=True, backend=backend)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = sliding_window_attention_reference(q64, k64, v64, window, causal, cu_seqlens_q=cu_q.cpu(),
                                                      cu_seqlens_k=cu_k.cpu())
    assert_rel(out.cpu(), ref, TOL[torch.float32], "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse.cpu()), ~finite), "rows without keys must have lse -inf"
    assert_rel(lse.cpu()[finite], ref_lse[finite], TOL[torch.float32], "lse")
    do = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), do.to(device, out.dtype))
    want = torch.autograd.grad(ref, (q64, k64, v64), do)
    for n, g, r in zip(("dq", "dk", "dv"), got, want):
        assert_rel(g.cpu(), r, TOL[torch.float32], n)


def test_attention_empty_launches_no_kernel(monkeypatch):
    """The Triton and CUDA launchers are never reached with an empty input (op.py answers
    first), so a kernel never sees a zero-sized grid or a null pointer."""
    from sft_kernels.ops.sliding_window_attention import cuda_backend, triton_kernels

    def boom(*a, **k):
        raise AssertionError("a launcher was called with an empty input")

    for mod, names in ((triton_kernels, ("swa_fwd_triton", "swa_bwd_triton")),
                       (cuda_backend, ("swa_fwd_cuda", "swa_bwd_cuda"))):
        for n in names:
            monkeypatch.setattr(mod, n, boom)
    for backend in ("triton", "cuda"):
        for b, lq, lk, hq, hkv, d in PADDED.values():
            q = torch.randn(b, lq, hq, 64, requires_grad=True)
            k, v = (torch.randn(b, lk, hkv, 64, requires_grad=True) for _ in range(2))
            # the custom op directly: on this CPU-only machine the public API refuses "cuda"
            # before it gets here, which is what a GPU-less user should see
            out, lse = swa_op._swa_forward(q, k, v, None, None, lq, lk, 0, 3, 0, 0, True, 0.125, backend)
            assert out.shape == q.shape and torch.equal(out, torch.zeros_like(out))
            assert lse.shape == (b, hq, lq) and torch.isneginf(lse).all()
            _check_empty_grads(q, k, v, out)
        cu0 = torch.tensor([0, 0, 0], dtype=torch.int32)
        cu5 = torch.tensor([0, 2, 5], dtype=torch.int32)
        for cu_q, cu_k, tq, tk in ((cu0, cu0, 0, 0), (cu0, cu5, 0, 5), (cu5, cu0, 5, 0)):
            q = torch.randn(tq, 4, 64, requires_grad=True)
            k, v = (torch.randn(tk, 2, 64, requires_grad=True) for _ in range(2))
            out, lse = swa_op._swa_forward(q, k, v, cu_q, cu_k, 3, 3, 0, -1, -1, 0, False, 0.125, backend)
            assert out.shape == q.shape and lse.shape == (4, tq) and torch.isneginf(lse).all()
            _check_empty_grads(q, k, v, out)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_attention_empty_on_gpu(backend):
    from sft_kernels.backends import backend_status

    if not backend_status()[backend].available:
        pytest.skip(backend_status()[backend].reason)
    for b, lq, lk, hq, hkv, _ in PADDED.values():
        q = torch.randn(b, lq, hq, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(b, lk, hkv, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        out, lse = sliding_window_attention(q, k, v, window_size=(3, 0), causal=True, return_lse=True, backend=backend)
        assert out.shape == q.shape and lse.shape == (b, hq, lq) and torch.isneginf(lse).all()
        _check_empty_grads(q, k, v, out)


# ----------------------------------------------------------------------------- block-diagonal
BD_SIZES = {
    "unequal": ([3, 5], [4, 2]),
    "equal": ([4, 4, 4], [6, 6, 6]),
    "one_block": ([7], [3]),
}
BD_BACKENDS = ["auto", "torch", pytest.param("triton", marks=pytest.mark.interpret)]


@pytest.mark.parametrize("lead", [(0,), (0, 5), (3, 0), (2, 0, 4)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("backend", BD_BACKENDS)
@pytest.mark.parametrize("sizes", list(BD_SIZES))
def test_block_diag_zero_tokens(sizes, backend, bias, lead, triton_device):
    in_f, out_f = BD_SIZES[sizes]
    device = triton_device if backend == "triton" else "cpu"
    blocks = [torch.randn(m, n, dtype=torch.float64) for n, m in zip(in_f, out_f)]
    weight = torch.cat([w.reshape(-1) for w in blocks]).float().to(device).requires_grad_()
    b = torch.randn(sum(out_f), device=device, requires_grad=True) if bias else None
    x = torch.randn(*lead, sum(in_f), device=device, requires_grad=True)
    y = block_diag_matmul(x, weight, in_f, out_f, bias=b, backend=backend)
    ref = block_diag_matmul_reference(x.detach().cpu().double(), blocks, None if b is None else b.detach().cpu().double())
    assert y.shape == (*lead, sum(out_f)) == ref.shape and y.dtype == x.dtype
    inputs = (x, weight) + ((b,) if bias else ())
    grads = torch.autograd.grad(y, inputs, torch.randn_like(y))
    assert grads[0].shape == x.shape
    for name, g, t in zip(("dw", "db"), grads[1:], inputs[1:]):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(t)), f"{name} must be zero with no tokens"


def test_block_diagonal_linear_zero_tokens():
    layer = BlockDiagonalLinear([3, 5], [4, 2], bias=True)
    x = torch.randn(2, 0, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 0, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in layer.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


def test_block_diag_reference_zero_tokens():
    blocks = [torch.randn(2, 3), torch.randn(4, 1)]
    y = block_diag_matmul_reference(torch.randn(0, 4), blocks, torch.randn(6))
    assert y.shape == (0, 6)


@pytest.mark.parametrize("shape", [(0, 10), (2, 0)], ids=["batch0", "seqlen0"])
@pytest.mark.parametrize("mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("sinks", [False, True], ids=["plain", "sinks"])
def test_sft_attention_empty_batch(shape, mask, sinks):
    """The module on batch 0 / no tokens, with and without an attention_mask: an empty
    output and zero parameter gradients (a padded empty batch used to fail unpadding)."""
    from sft_kernels import SFTAttention

    layer = SFTAttention(32, 4, 2, window_size=8, bias=True, attention_sinks=sinks)
    x = torch.randn(*shape, 32, requires_grad=True)
    out = layer(x, attention_mask=torch.ones(shape, dtype=torch.long) if mask else None)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    for name, p in layer.named_parameters():
        assert p.grad is None or not p.grad.any(), name
