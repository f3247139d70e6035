"""The attention kernels' load paths against float64: the tensor-descriptor (TMA) forward
and q, k, v of different layouts.

On a GPU the forward takes the descriptor path on sm_90 only; the interpreter emulates
descriptors, so ``SFT_KERNELS_SWA_TMA=1`` runs that path here on CPU tensors: padded
head_dim (80 in a 128-wide tile: columns past head_dim must read as zero and never be
stored), rows past the sequence (zero-filled loads, clipped stores), packed sequences
(descriptors built per sequence), GQA and empty rows. The gradients come from the
pointer backward, fed the descriptor forward's output and LSE. Separately, q, k and v
with three different row strides (k out of a fused KV buffer, v a column slice), on both
forward paths.
"""

import pytest
import torch

from helpers import TOL, assert_rel, poison_
from sft_kernels import sliding_window_attention
from sft_kernels.ops.sliding_window_attention import triton_kernels as tk
from sft_kernels.ops.sliding_window_attention.reference import sliding_window_attention_reference

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, window_size, causal)
CASES = {
    "hd80_gqa_causal_w20": (1, 70, 70, 4, 2, 80, (20, 0), True),
    "hd32_bidir_3_17": (2, 45, 45, 2, 1, 32, (3, 17), False),
    "q_longer_empty_rows": (1, 50, 20, 2, 2, 16, (-1, 0), True),
    "sqrt_hd64": (1, 65, 65, 2, 2, 64, "sqrt", True),
}


@pytest.fixture
def tma(monkeypatch):
    monkeypatch.setenv("SFT_KERNELS_SWA_TMA", "1")
    calls = []
    real = tk._tma_ok
    monkeypatch.setattr(tk, "_tma_ok", lambda *ts: calls.append(real(*ts)) or calls[-1])
    monkeypatch.setattr(tk, "_empty_like", lambda t: poison_(torch.empty_like(t)))
    return calls


@pytest.mark.interpret
@pytest.mark.parametrize("name", list(CASES))
def test_tma_forward(name, tma, triton_device):
    b, lq, lk, hq, hkv, d, window, causal = CASES[name]
    q = torch.randn(b, lq, hq, d, device=triton_device, requires_grad=True)
    k = torch.randn(b, lk, hkv, d, device=triton_device, requires_grad=True)
    v = torch.randn(b, lk, hkv, d, device=triton_device, requires_grad=True)
    out, lse = sliding_window_attention(q, k, v, window_size=window, causal=causal, return_lse=True, backend="triton")
    assert tma == [True], "the descriptor path did not run"
    assert not torch.isnan(out).any(), "unwritten output elements"
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = sliding_window_attention_reference(q64, k64, v64, window, causal)
    assert_rel(out.cpu(), ref, TOL[torch.float32], "out")
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), fin)
    assert_rel(lse.cpu()[fin], ref_lse[fin], TOL[torch.float32], "lse")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    for gname, g, r in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, (q64, k64, v64), do.cpu().double())):
        assert_rel(g.cpu(), r, TOL[torch.float32], gname)


@pytest.mark.interpret
def test_tma_forward_packed(tma, triton_device):
    lens = [17, 40, 1, 0, 33]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=triton_device)
    q = torch.randn(sum(lens), 4, 48, device=triton_device)
    k = torch.randn(sum(lens), 2, 48, device=triton_device)
    v = torch.randn(sum(lens), 2, 48, device=triton_device)
    out, lse = sliding_window_attention(q, k, v, window_size=(7, 0), causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True,
                                        backend="triton")
    assert tma == [True]
    ref, ref_lse = sliding_window_attention_reference(q.double(), k.double(), v.double(), (7, 0), True,
                                                      cu_seqlens_q=cu.cpu(), cu_seqlens_k=cu.cpu())
    assert_rel(out.cpu(), ref, TOL[torch.float32], "out")
    assert_rel(lse.cpu(), ref_lse, TOL[torch.float32], "lse")


def test_tma_needs_aligned_bases_and_strides(monkeypatch):
    monkeypatch.setenv("SFT_KERNELS_SWA_TMA", "1")
    x = torch.randn(2, 16, 4, 64)
    assert tk._tma_ok(x, x)
    assert not tk._tma_ok(x, torch.randn(2 * 16 * 4 * 64 + 1)[1:].view(2, 16, 4, 64))  # base off by 4 bytes
    assert not tk._tma_ok(torch.randn(2, 16, 4, 66)[..., :62], x)  # head stride of 264 bytes is not a multiple of 16
    monkeypatch.setenv("SFT_KERNELS_SWA_TMA", "0")
    assert not tk._tma_ok(x, x)
    monkeypatch.setenv("SFT_KERNELS_SWA_TMA", "auto")
    assert not tk._tma_ok(x, x)  # CPU tensors: only with =1 (the interpreter)


@pytest.mark.interpret
@pytest.mark.parametrize("tma", ["0", "1"], ids=["pointer", "tma"])
def test_q_k_v_with_different_row_strides(tma, monkeypatch, triton_device):
    monkeypatch.setenv("SFT_KERNELS_SWA_TMA", tma)
    b, L, hq, hkv, d = 2, 50, 4, 2, 32
    q = torch.randn(b, L, hq, d, device=triton_device)  # row stride 128
    kv = torch.randn(b, L, 2, hkv, d, device=triton_device)
    k = kv[:, :, 0]  # row stride 128 (fused KV)
    v = torch.randn(b, L, hkv, d + 8, device=triton_device)[..., :d]  # row stride 80, head stride 40
    q, k, v = (t.requires_grad_() for t in (q.clone(), k.detach(), v.detach()))
    assert len({q.stride(1), k.stride(1), v.stride(1)}) == 2 and k.stride(1) != v.stride(1)
    out = sliding_window_attention(q, k, v, window_size=(9, 0), causal=True, backend="triton")
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, _ = sliding_window_attention_reference(q64, k64, v64, (9, 0), True)
    assert_rel(out.cpu(), ref, TOL[torch.float32], "out")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    for gname, g, r in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(ref, (q64, k64, v64), do.cpu().double())):
        assert_rel(g.cpu(), r, TOL[torch.float32], gname)
