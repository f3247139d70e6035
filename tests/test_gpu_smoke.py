"""The GPU check's first measurement: every op once on the GPU against its float64 dense
reference, forward and backward, compared per element, before any benchmark runs.

Each Triton kernel runs its first-choice config, pinned (``SFT_KERNELS_SWA_CONFIG``,
``SFT_KERNELS_BD_CONFIG``), so the autotuner compiles one config per kernel instead of
three or four and times none: the step's cost from a cold cache is the compiles (see
docs/gpu-check.md). The headline attention shape (bf16, batch 2, 16 heads, head_dim 128,
causal window 4096, L = 16k) is checked on two query slices, one at each end of the
sequence: the upstream gradient is zero outside them, so dq is exactly zero there, and
dk / dv are the slices' contributions, which the reference computes from those rows alone
(``query_range``). The other cases are small and whole.

On a machine without a GPU (``scripts/gpu_check.sh --dry-run``) the same cases run at toy
sizes through Triton's interpreter, with its one small tile (nothing pinned).
"""

import pytest
import torch

from helpers import assert_close

pytestmark = pytest.mark.interpret


def _on_gpu(device) -> bool:
    return device == "cuda"


def _pin_first_choice(monkeypatch, head_dim):
    """Pin each attention kernel's and the block-diagonal kernels' first-choice config."""
    from sft_kernels.ops.block_diag import triton_kernels as bd
    from sft_kernels.ops.sliding_window_attention import triton_kernels as swa

    arch = 90 if torch.cuda.get_device_capability()[0] >= 9 else 80
    monkeypatch.delenv("SFT_KERNELS_SWA_CONFIG", raising=False)
    first = {kind: swa.config_list(kind, head_dim, arch)[0] for kind in ("fwd", "dkdv", "dq")}
    monkeypatch.setenv("SFT_KERNELS_SWA_CONFIG",
                       ";".join(f"{kind}=" + ",".join(map(str, cfg)) for kind, cfg in first.items()))
    g, d = bd.GEMM_CONFIGS[0], bd.DW_CONFIGS[0]
    gemm = ",".join(str(g[k]) for k in ("BLOCK_T", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))
    dw = ",".join(str(d[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_T", "num_warps", "num_stages"))
    monkeypatch.setenv("SFT_KERNELS_BD_CONFIG", f"gemm={gemm};dw={dw}")


def _attention_grads(q, k, v, do, **kw):
    from sft_kernels import sliding_window_attention

    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = sliding_window_attention(q, k, v, backend="triton", **kw)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do))


def _reference_grads(q, k, v, do, ranges, upcast, **kw):
    """Reference output and gradients: the rows of each ``(start, stop)`` in ``ranges``
    (None: every row), the output of other rows left zero."""
    from sft_kernels import sliding_window_attention_reference

    dtype = torch.float64 if upcast else q.dtype
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = torch.zeros_like(q)
    loss = 0
    for r in ranges:
        part, _ = sliding_window_attention_reference(q, k, v, upcast=upcast, query_range=r, **kw)
        rows = slice(*r) if r else slice(None)
        loss = loss + (part * do[:, rows].to(dtype)).sum()
        out[:, rows] = part.detach()
    return (out, *torch.autograd.grad(loss, (q, k, v)))


def _check_attention(q, k, v, do, ranges, **kw):
    got = _attention_grads(q, k, v, do, **kw)
    ref = _reference_grads(q, k, v, do, ranges, True, **kw)
    low = _reference_grads(q, k, v, do, ranges, False, **kw) if q.dtype != torch.float32 else ref
    for name, g, r, lw in zip(("out", "dq", "dk", "dv"), got, ref, low):
        if name == "out" and ranges != [None]:  # only the slices' rows are compared
            idx = torch.cat([torch.arange(*rg, device=q.device) for rg in ranges])
            g, r, lw = (t.index_select(1, idx) for t in (g, r, lw))
        assert_close(g, r, q.dtype, f"{name}", lowp_ref=lw)


def test_attention_headline_shape(triton_device, monkeypatch):
    """bf16, causal window 4096 at L = 16k (GPU); the same structure at L = 160 (dry run)."""
    gpu = _on_gpu(triton_device)
    b, L, h, d, w, n = (2, 16384, 16, 128, 4096, 256) if gpu else (1, 160, 2, 32, 24, 32)
    if gpu:
        _pin_first_choice(monkeypatch, d)
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, L, h, d, device=triton_device, dtype=torch.bfloat16) for _ in range(3))
    ranges = [(0, n), (L - n, L)]
    do = torch.zeros_like(q)
    for r in ranges:
        do[:, slice(*r)] = torch.randn_like(do[:, slice(*r)])
    _check_attention(q, k, v, do, ranges, window_size=w, causal=True)


def test_attention_gqa_fp16(triton_device, monkeypatch):
    """fp16, 8 query heads over 2 key/value heads, an odd length, window (100, 0)."""
    gpu = _on_gpu(triton_device)
    b, L, d, left = (2, 1025, 64, 100) if gpu else (1, 97, 16, 9)
    if gpu:
        _pin_first_choice(monkeypatch, d)
    torch.manual_seed(1)
    q = torch.randn(b, L, 8, d, device=triton_device, dtype=torch.float16)
    k, v = (torch.randn(b, L, 2, d, device=triton_device, dtype=torch.float16) for _ in range(2))
    _check_attention(q, k, v, torch.randn_like(q), [None], window_size=(left, 0), causal=True)


def test_attention_packed_sqrt_window(triton_device, monkeypatch):
    """bf16 packed sequences, the adaptive window resolved per sequence, two-sided."""
    from sft_kernels import sliding_window_attention_reference

    gpu = _on_gpu(triton_device)
    lengths, d = ([300, 725, 75], 128) if gpu else ([30, 50, 17], 32)
    if gpu:
        _pin_first_choice(monkeypatch, d)
    torch.manual_seed(2)
    total = sum(lengths)
    cu = torch.tensor([0] + lengths, device=triton_device).cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(total, 4, d, device=triton_device, dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)
    kw = dict(window_size="sqrt", causal=False, cu_seqlens_q=cu, cu_seqlens_k=cu)
    from sft_kernels import sliding_window_attention

    results = []
    for dtype, upcast in ((None, None), (torch.float64, True), (torch.bfloat16, False)):
        x = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
        if dtype is None:
            out = sliding_window_attention(*x, backend="triton", max_seqlen_q=max(lengths),
                                           max_seqlen_k=max(lengths), **kw)
        else:
            out, _ = sliding_window_attention_reference(*x, upcast=upcast, **kw)
        results.append((out.detach(), *torch.autograd.grad(out, x, do.to(out.dtype))))
    for name, g, r, lw in zip(("out", "dq", "dk", "dv"), *results):
        assert_close(g, r, torch.bfloat16, name, lowp_ref=lw)


@pytest.mark.parametrize("case", ["headline", "uneven"])
def test_block_diag(case, triton_device, monkeypatch):
    """Headline: 8 equal blocks of 512 over 8192 tokens, bf16 (GPU). Uneven: blocks
    100x130, 37x7, 250x90 with a bias, fp16. Output and every gradient, per element."""
    from sft_kernels import block_diag_matmul

    gpu = _on_gpu(triton_device)
    if gpu:
        _pin_first_choice(monkeypatch, 128)
    if case == "headline":
        dtype, tokens = torch.bfloat16, (8192 if gpu else 64)
        sizes_in = sizes_out = [512 if gpu else 32] * (8 if gpu else 4)
        bias = False
    else:
        dtype, tokens, sizes_in, sizes_out, bias = torch.float16, (1000 if gpu else 37), [100, 37, 250], [130, 7, 90], True
    torch.manual_seed(3)
    dev = triton_device
    x = torch.randn(tokens, sum(sizes_in), device=dev, dtype=dtype)
    w = (torch.randn(sum(m * n for n, m in zip(sizes_in, sizes_out)), device=dev) * 0.05).to(dtype)
    b = torch.randn(sum(sizes_out), device=dev, dtype=dtype) if bias else None
    gy = torch.randn(tokens, sum(sizes_out), device=dev, dtype=dtype)

    def run(xx, ww, bb, ref_dtype):
        leaves = [t.detach().to(ref_dtype or t.dtype).requires_grad_() for t in (xx, ww, bb) if t is not None]
        if ref_dtype is None:
            y = block_diag_matmul(leaves[0], leaves[1], sizes_in, sizes_out, bias=leaves[2] if bias else None,
                                  backend="triton")
        else:  # the test's own dense answer: x @ block_diag(W_1..W_g)^T (+ b)
            blocks, off = [], 0
            for n, m in zip(sizes_in, sizes_out):
                blocks.append(leaves[1][off:off + m * n].view(m, n))
                off += m * n
            y = leaves[0] @ torch.block_diag(*blocks).T
            if bias:
                y = y + leaves[2]
        return (y.detach(), *torch.autograd.grad(y, leaves, gy.to(y.dtype)))

    got, ref, low = run(x, w, b, None), run(x, w, b, torch.float64), run(x, w, b, dtype)
    for name, g, r, lw in zip(("y", "dx", "dw", "db"), got, ref, low):
        assert_close(g, r, dtype, name, lowp_ref=lw)
