"""Every autotune candidate of the Triton kernels, pinned one at a time, against float64.

The autotuner may pick any entry of a config list on the GPU, and the CPU tests only run
the interpreter's small tile, so each candidate is run here on a GPU once: the i-th
forward, dK/dV and dQ configs of a head_dim class together (``SFT_KERNELS_SWA_CONFIG``),
the forward with and without tensor descriptors (``SFT_KERNELS_SWA_TMA``), and each
block-diagonal GEMM / dW config (``SFT_KERNELS_BD_CONFIG``) on aligned and padded block
sizes; bf16 on the fp16/bf16 lists, fp32 on its own. Shapes cross several tiles and both band edges. GPU only (``-m gpu``).
"""

import pytest
import torch

from helpers import TOL, assert_rel

pytestmark = pytest.mark.gpu


def _swa_cases():
    from sft_kernels.ops.sliding_window_attention import triton_kernels as tk

    arch = 90 if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9 else 80
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        for head_dim, dim_class in ((64, 64), (128, 128), (256, 256), (80, 128)):
            lists = [tk.config_list(kind, dim_class, arch, fp32=dtype == torch.float32) for kind in ("fwd", "dkdv", "dq")]
            n = max(len(x) for x in lists)
            for i in range(n):
                fwd, dkdv, dq = (x[min(i, len(x) - 1)] for x in lists)
                for tma in ("0", "1") if dtype == torch.bfloat16 else ("0",):  # descriptors: fp16/bf16 only
                    cases.append((dtype, head_dim, fwd, dkdv, dq, tma))
    return cases


def _spec(name, cfg):
    return f"{name}=" + ",".join(str(v) for v in cfg)


@pytest.mark.parametrize("dtype, head_dim, fwd, dkdv, dq, tma", _swa_cases(),
                         ids=lambda v: str(v).replace(" ", "").replace("torch.", ""))
def test_attention_config(dtype, head_dim, fwd, dkdv, dq, tma, monkeypatch):
    from sft_kernels import sliding_window_attention
    from sft_kernels.ops.sliding_window_attention.reference import sliding_window_attention_reference

    if tma == "1" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("tensor descriptors: the forward's sm_90 variant")
    monkeypatch.setenv("SFT_KERNELS_SWA_CONFIG", ";".join((_spec("fwd", fwd), _spec("dkdv", dkdv), _spec("dq", dq))))
    monkeypatch.setenv("SFT_KERNELS_SWA_TMA", tma)
    torch.manual_seed(0)
    q = torch.randn(2, 333, 4, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 333, 2, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, 333, 2, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    out, lse = sliding_window_attention(q, k, v, window_size=(150, 0), causal=True, return_lse=True, backend="triton")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = sliding_window_attention_reference(q64, k64, v64, (150, 0), True)
    rg = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    assert_rel(out, ref, TOL[dtype], "out")
    assert_rel(lse, ref_lse, 1e-3, "lse")
    for name, g, r in zip(("dq", "dk", "dv"), grads, rg):
        assert_rel(g, r, TOL[dtype], name)


def _bd_cases():
    from sft_kernels.ops.block_diag import triton_kernels as tk

    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        gl, dl = tk.configs_for("gemm", dtype), tk.configs_for("dw", dtype)
        cases += [(dtype, gl[min(i, len(gl) - 1)], dl[min(i, len(dl) - 1)], splits)
                  for i in range(max(len(gl), len(dl))) for splits in ("aligned", "padded")]
    return cases


def _bd_id(v):
    return ",".join(str(x) for x in v.values()) if isinstance(v, dict) else str(v).replace("torch.", "")


@pytest.mark.parametrize("dtype, gemm, dw, splits", _bd_cases(), ids=_bd_id)
def test_block_diag_config(dtype, gemm, dw, splits, monkeypatch):
    from sft_kernels import block_diag_matmul

    g = ",".join(str(gemm[k]) for k in ("BLOCK_T", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))
    d = ",".join(str(dw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_T", "num_warps", "num_stages"))
    monkeypatch.setenv("SFT_KERNELS_BD_CONFIG", f"gemm={g};dw={d}")
    in_f, out_f = ([256, 128, 384], [128, 256, 64]) if splits == "aligned" else ([100, 37, 250], [130, 7, 90])
    torch.manual_seed(0)
    x = torch.randn(1000, sum(in_f), device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(sum(m * n for n, m in zip(in_f, out_f)), device="cuda") * 0.05).to(dtype).requires_grad_()
    b = torch.randn(sum(out_f), device="cuda", dtype=dtype, requires_grad=True)
    y = block_diag_matmul(x, w, in_f, out_f, bias=b, backend="triton")
    gy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    blocks, off = [], 0
    for n, m in zip(in_f, out_f):
        blocks.append(w64[off:off + m * n].view(m, n))
        off += m * n
    ref = x64 @ torch.block_diag(*blocks).T + b64
    rx, rw, rb = torch.autograd.grad(ref, (x64, w64, b64), gy.double())
    assert_rel(y, ref, TOL[dtype], "y")
    for name, got, want in (("dx", gx, rx), ("dw", gw, rw), ("db", gb, rb)):
        assert_rel(got, want, TOL[dtype], name)
