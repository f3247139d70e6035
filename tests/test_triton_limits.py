"""Sizes past the 32-bit and grid limits, checked on CPU through the Triton interpreter.

- 64-bit row offsets: the attention kernels run (``TRITON_INTERPRET=1``) on q, k, v, out
  and the gradients viewed out of one fused buffer whose row stride times the number of
  rows exceeds 2**31 elements (a fused QKV projection at long L); the block-diagonal
  kernels on activations viewed the same way. The buffer is a sparse
  memory-mapped file: only the pages of the rows the kernels touch are ever written, so
  the test needs a few MB, not the 4.4 GB the view spans. Rows past 2**31 / stride are
  exactly where a 32-bit ``row * stride`` wraps (the interpreter's int32 arithmetic wraps
  as the GPU's does), so they are compared with a float64 reference. It runs in a child
  process: a wrapped offset is an out-of-bounds read, which may kill the process.
- grid limits: grid.y and grid.z hold at most 65,535 blocks. The launchers put heads and
  sequences on separate axes and split batches of more sequences into several launches;
  the grids of a 70,000-sequence x 32-head problem are checked without running it, and
  the split launches are run for real (interpreter) with the limit lowered to 3, so that
  chunk boundaries fall inside a tiny batch.
"""

import os
import subprocess
import sys

import pytest
import torch

from helpers import TOL, assert_rel

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS, STRIDE, D = 2080, (1 << 20) + 64, 16  # 2080 * (2**20 + 64) > 2**31 elements


def _strided_case(path):
    """Run forward and backward on views of one big buffer (a sparse file on CPU, ``path``
    "cuda" for device memory); return the relative errors against float64."""
    from sft_kernels.ops.sliding_window_attention import triton_kernels as tk
    from sft_kernels.ops.sliding_window_attention.reference import sliding_window_attention_reference
    from sft_kernels.window import parse_window

    assert (ROWS - 1) * STRIDE >= 2**31
    dtype = torch.float16
    if path == "cuda":
        buf = torch.zeros(ROWS * STRIDE, dtype=dtype, device="cuda")  # 4.4 GB
    else:
        buf = torch.from_file(path, shared=True, size=ROWS * STRIDE, dtype=dtype)
    cols = iter(range(0, 16 * D, D))

    def view():  # (1, ROWS, 1, D) with row stride STRIDE, the next free D columns of each row
        return buf.as_strided((1, ROWS, 1, D), (ROWS * STRIDE, STRIDE, D, 1), next(cols))

    gen = torch.Generator().manual_seed(0)
    q, k, v, do = view(), view(), view(), view()
    for t in (q, k, v, do):
        t.copy_(torch.randn(t.shape, generator=gen).to(dtype).to(buf.device))
    outs = []

    def strided_empty(t):  # outputs and gradients land in the same buffer (16-bit 4-D only)
        if t.dim() == 4 and t.dtype == dtype:
            out = view()
            outs.append(out)
            return out.fill_(float("nan"))
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)

    real_empty, tk._empty_like = tk._empty_like, strided_empty
    spec = parse_window((40, 0), True)
    scale = D ** -0.5
    try:
        out, lse = tk.swa_fwd_triton(q, k, v, spec, scale)
        dq, dk, dv, _ = tk.swa_bwd_triton(do, q, k, v, out, lse, spec, scale)
    finally:
        tk._empty_like = real_empty
    assert all(t.stride(1) == STRIDE for t in (out, dq, dk, dv)), "outputs were not the strided views"

    out, lse, dq, dk, dv = (t.cpu() for t in (out, lse, dq, dk, dv))
    q64, k64, v64 = (t.detach().cpu().double().contiguous().requires_grad_() for t in (q, k, v))
    ref, ref_lse = sliding_window_attention_reference(q64, k64, v64, (40, 0), True, softmax_scale=scale)
    grads = torch.autograd.grad(ref, (q64, k64, v64), do.cpu().double())
    first_wrapped = -(-(2**31) // STRIDE)  # the first row whose 32-bit offset wraps
    errs = {}
    for name, got, want in (("out", out, ref), ("dq", dq, grads[0]), ("dk", dk, grads[1]), ("dv", dv, grads[2])):
        errs[name] = float((got.double() - want).norm() / want.norm())
        tail_g, tail_w = got[:, first_wrapped:].double(), want[:, first_wrapped:]
        errs[name + "_wrapped_rows"] = float((tail_g - tail_w).norm() / tail_w.norm())
    errs["lse"] = float((lse.double() - ref_lse).norm() / ref_lse.norm())
    return errs


def _strided_block_diag(path):
    """Block-diagonal forward, dX and dW on x viewed with the same huge row stride."""
    from sft_kernels.ops.block_diag import triton_kernels as tk

    in_f, out_f = [16, 32], [32, 16]
    buf = torch.from_file(path, shared=True, size=ROWS * STRIDE, dtype=torch.float16)
    x = buf.as_strided((ROWS, sum(in_f)), (STRIDE, 1), 0)
    gen = torch.Generator().manual_seed(1)
    x.copy_(torch.randn(x.shape, generator=gen).to(torch.float16))
    w = (torch.randn(sum(m * n for n, m in zip(in_f, out_f)), generator=gen) * 0.2).to(torch.float16)
    dy = torch.randn(ROWS, sum(out_f), generator=gen).to(torch.float16)
    y = tk.gemm_forward(x, w, None, in_f, out_f)
    dw = tk.gemm_backward_dw(dy, x, in_f, out_f, split=1)
    blocks, off = [], 0
    for n, m in zip(in_f, out_f):
        blocks.append(w[off:off + m * n].double().view(m, n))
        off += m * n
    dense = torch.block_diag(*blocks)
    x64 = x.double()
    ref_y, ref_dw = x64 @ dense.T, torch.cat([(dy.double()[:, mo:mo + m].T @ x64[:, no:no + n]).reshape(-1)
                                              for (n, m, no, mo) in ((16, 32, 0, 0), (32, 16, 16, 32))])
    first_wrapped = -(-(2**31) // STRIDE)
    return {"y": float((y.double() - ref_y).norm() / ref_y.norm()),
            "y_wrapped_rows": float((y[first_wrapped:].double() - ref_y[first_wrapped:]).norm()
                                    / ref_y[first_wrapped:].norm()),
            "dw": float((dw.double() - ref_dw).norm() / ref_dw.norm())}


@pytest.mark.interpret
@pytest.mark.parametrize("op", ["attention", "block_diag"])
def test_row_offsets_past_2_31_elements(op, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU runs test_row_offsets_past_2_31_elements_gpu instead")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([HERE] + sys.path))
    code = ("import json, sys; sys.path.insert(0, %r); import test_triton_limits as t; "
            "print('ERRS', json.dumps(t.%s(%r)))" % (HERE, "_strided_case" if op == "attention" else "_strided_block_diag",
                                                    str(tmp_path / "buf.bin")))
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    finally:  # up to 4 GB of written pages: pytest keeps its last three tmp_path trees
        (tmp_path / "buf.bin").unlink(missing_ok=True)
    assert res.returncode == 0, (f"kernels crashed or failed on a view spanning > 2**31 elements "
                                 f"(rc={res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    import json

    errs = json.loads(res.stdout.split("ERRS", 1)[1])
    for name, err in errs.items():
        assert err <= TOL[torch.float16], f"{name}: relative error {err:.3e} (all errors: {errs})"


@pytest.mark.gpu
def test_row_offsets_past_2_31_elements_gpu():
    """The same views in device memory (4.4 GB): the compiled kernels, TMA forward included."""
    errs = _strided_case("cuda")
    for name, err in errs.items():
        assert err <= TOL[torch.float16], f"{name}: relative error {err:.3e} (all errors: {errs})"


# ----------------------------------------------------------------------------- grids
class _GridRecorder:
    """Stands in for an autotuned kernel: records the grids it is launched with."""

    def __init__(self, grids, block):
        self.grids, self.block = grids, block

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            g = grid(self.block) if callable(grid) else grid
            self.grids.append(tuple(g) + (1,) * (3 - len(g)))

        return launch


def test_grids_of_70000_sequences_x_32_heads(monkeypatch):
    """Every launch of a packed batch of 70,000 sequences x 32 heads stays within CUDA's
    grid limits (x < 2**31, y and z <= 65,535) and together they cover every sequence."""
    from sft_kernels.ops.sliding_window_attention import triton_kernels as tk
    from sft_kernels.window import parse_window

    grids = []
    rec = _GridRecorder(grids, {"BLOCK_M": 64, "BLOCK_N": 64})
    for name in ("_fwd_tuned", "_dkdv_tuned", "_dq_tuned"):
        monkeypatch.setattr(tk, name, lambda head_dim, arch=90, fp32=False, tf32=False, rec=rec: rec)
    monkeypatch.setattr(tk, "_bwd_preprocess_kernel", _GridRecorder(grids, {}))
    batch, heads, kv_heads = 70_000, 32, 8
    cu = torch.arange(batch + 1, dtype=torch.int32) * 2  # 2 tokens each
    q = torch.empty(2 * batch, heads, 16)
    k = torch.empty(2 * batch, kv_heads, 16)
    spec = parse_window((7, 0), True)
    out, lse = tk.swa_fwd_triton(q, k, k, spec, 0.25, cu, cu, 2, 2)
    tk.swa_bwd_triton(q, q, k, k, out, lse, spec, 0.25, cu, cu, 2, 2)
    assert grids, "no launch recorded"
    for g in grids:
        assert g[0] < 2**31 and g[1] <= 65535 and g[2] <= 65535, f"grid {g} over CUDA's limits"
    fwd = grids[0:2]  # launches alternate: fwd, fwd, then (pre, dkdv, dq) per chunk
    assert sum(g[2] for g in fwd) == batch and all(g[1] == heads for g in fwd)
    bwd = grids[2:]
    assert [g[1] for g in bwd] == [heads, kv_heads, heads] * 2
    assert sum(g[2] for g in bwd[0::3]) == batch


@pytest.mark.interpret
@pytest.mark.parametrize("varlen", [True, False], ids=["packed", "batched"])
def test_batch_split_into_several_launches_is_exact(varlen, monkeypatch, triton_device):
    """With the per-launch limit lowered to 3, a batch of 8 sequences x 2 heads runs as 3
    launches per kernel; forward, LSE and gradients match the float64 reference."""
    from sft_kernels import sliding_window_attention
    from sft_kernels.ops.sliding_window_attention import triton_kernels as tk
    from sft_kernels.ops.sliding_window_attention.reference import sliding_window_attention_reference

    monkeypatch.setattr(tk, "_MAX_GRID_YZ", 3)
    seen = []
    real = tk._batch_chunks
    monkeypatch.setattr(tk, "_batch_chunks", lambda b: seen.append(real(b)) or seen[-1])
    lens = [5, 17, 0, 9, 20, 3, 11, 18]
    if varlen:
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=triton_device)
        shape, kw = (sum(lens), 2, 16), dict(cu_seqlens_q=cu, cu_seqlens_k=cu)
    else:
        shape, kw = (8, 20, 2, 16), {}
    q, k, v = (torch.randn(shape, device=triton_device, requires_grad=True) for _ in range(3))
    out, lse = sliding_window_attention(q, k, v, window_size=(6, 0), causal=True, return_lse=True, backend="triton", **kw)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert seen and all(len(chunks) == 3 for chunks in seen), seen
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref_kw = {n: t.cpu() for n, t in kw.items()}
    ref, ref_lse = sliding_window_attention_reference(q64, k64, v64, (6, 0), True, **ref_kw)
    rg = torch.autograd.grad(ref, (q64, k64, v64), do.cpu().double())
    assert_rel(out.cpu(), ref, TOL[torch.float32], "out")
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), fin)
    assert_rel(lse.cpu()[fin], ref_lse[fin], TOL[torch.float32], "lse")
    for name, g, r in zip(("dq", "dk", "dv"), grads, rg):
        assert_rel(g.cpu(), r, TOL[torch.float32], name)


# ----------------------------------------------------------------------------- shared plumbing
def test_ops_import_nothing_from_testing():
    """The kernels and launchers run without the test tooling (the compile check imports
    from ``ops._triton_utils``, never the other way)."""
    code = ("import sys, sft_kernels.ops.block_diag.triton_kernels, sft_kernels.ops.sliding_window_attention."
            "triton_kernels; bad = [m for m in sys.modules if m.startswith('sft_kernels.testing')]; "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("bad", ["fwd=128,64,8", "fwd=96,64,8,2", "fwd=128,64,6,2", "fwd=128,64,8,0",
                                 "fdw=128,64,8,2", "fwd=a,64,8,2"])
def test_attention_pinned_config_checked(bad, monkeypatch):
    """One checked parser for both ops' pinned configs: a wrong count, a block size or
    num_warps that is not a power of two, num_stages 0, an unknown kernel, a non-integer."""
    from sft_kernels.ops.sliding_window_attention import triton_kernels as tk

    monkeypatch.setenv("SFT_KERNELS_SWA_CONFIG", "fwd=128,64,8,3;dq=64,32,4,2")
    assert tk.config_list("fwd", 64) == [(128, 64, 8, 3)] and tk.config_list("dq", 256) == [(64, 32, 4, 2)]
    monkeypatch.setenv("SFT_KERNELS_SWA_CONFIG", bad)
    with pytest.raises(ValueError, match="SFT_KERNELS_SWA_CONFIG"):
        tk.config_list("fwd", 64)


@pytest.mark.parametrize("value", ["1", "true", "yes", "y", "0", "off"])
def test_one_interpreter_rule(value, monkeypatch):
    """backends, the kernels' launchers and the compile check agree with Triton's own
    reading of TRITON_INTERPRET (what makes ``@triton.jit`` interpret)."""
    import triton

    from sft_kernels.backends import triton_interpret
    from sft_kernels.ops._triton_utils import interpreting

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_interpret() == interpreting() == bool(triton.knobs.runtime.interpret)


def test_block_diag_configs_within_the_devices_shared_memory(monkeypatch):
    """On a device with sm_80's 163 KiB per block, the fp32 configs whose operand pipeline
    is larger are never tried (they used to be left to fail at launch)."""
    from sft_kernels.ops import _triton_utils as tu
    from sft_kernels.ops.block_diag import triton_kernels as tk

    assert tu.ARCH_LIMITS[80].smem_per_block == 163 * 1024 and tu.ARCH_LIMITS[90].smem_per_block == 227 * 1024
    monkeypatch.delenv("SFT_KERNELS_BD_CONFIG", raising=False)
    monkeypatch.setattr(tk, "device_limits", lambda device: tu.ARCH_LIMITS[80])
    tried = []
    monkeypatch.setattr(tk._TUNER, "choose", lambda key, cands, launch: tried.append(cands) or cands[0])
    cuda = torch.device("cuda", 0)
    for kind, configs in (("gemm", tk.GEMM_CONFIGS), ("dw", tk.DW_CONFIGS)):
        for elsize in (2, 4):
            tk._choose(kind, ("k", elsize), cuda, elsize, configs, None)
            assert tried[-1] and all(tk._smem_bytes(c, elsize, kind) <= 163 * 1024 for c in tried[-1])
            assert len(tried[-1]) == (len(configs) if elsize == 2 else sum(
                tk._smem_bytes(c, 4, kind) <= 163 * 1024 for c in configs))


def test_fp32_has_its_own_config_lists(monkeypatch):
    """fp32 inputs (IEEE dots on the FMA units, where the tensor-core tiles spill) get the
    fp32 lists, fp32 under allow_tf32 (tf32 dots: fp32 operands on the tensor cores) the tf32
    lists, fp16/bf16 the others: the attention launchers pass the dtype and the dots' precision
    through, the block-diagonal ones pick the list by dtype."""
    from sft_kernels.ops.block_diag import triton_kernels as bd
    from sft_kernels.ops.sliding_window_attention import triton_configs as cfgs
    from sft_kernels.ops.sliding_window_attention import triton_kernels as tk
    from sft_kernels.window import parse_window

    monkeypatch.delenv("SFT_KERNELS_SWA_CONFIG", raising=False)
    monkeypatch.setattr(cfgs, "interpreting", lambda: False)  # the GPU's lists, not the interpreter's tile
    for kind in ("fwd", "dkdv", "dq"):
        for d in (64, 128, 256):
            assert cfgs.config_list(kind, d, 90, fp32=True) == [tuple(c[:4]) for c in cfgs._FP32_CONFIGS[kind][d]]
            for arch in (90, 80):
                assert cfgs.config_list(kind, d, arch, fp32=True, tf32=True) == [
                    tuple(c[:4]) for c in cfgs._TF32_CONFIGS[kind][d] if arch in cfgs._entry_archs(c)]
                assert cfgs.config_list(kind, d, arch, tf32=True) == cfgs.config_list(kind, d, arch)  # fp16/bf16
            assert cfgs.config_list(kind, d, 90) == [tuple(c[:4]) for c in cfgs._CONFIGS[kind][d]
                                                    if 90 in cfgs._entry_archs(c)]
    seen = []
    for name in ("_fwd_tuned", "_dkdv_tuned", "_dq_tuned"):
        monkeypatch.setattr(tk, name, lambda head_dim, arch=90, fp32=False, tf32=False: seen.append(
            (fp32, tf32)) or _GridRecorder([], {"BLOCK_M": 16, "BLOCK_N": 16}))
    monkeypatch.setattr(tk, "_bwd_preprocess_kernel", _GridRecorder([], {}))
    spec = parse_window((7, 0), True)
    saved = torch.backends.cuda.matmul.allow_tf32  # torch's switch (monkeypatch cannot undo it)
    try:
        for dtype, allow_tf32 in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            q = torch.zeros(1, 4, 2, 16, dtype=dtype)
            out, lse = tk.swa_fwd_triton(q, q, q, spec, 0.25)
            tk.swa_bwd_triton(q, q, q, q, out, lse, spec, 0.25)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert [fp32 for fp32, _ in seen] == [True] * 6 + [False] * 3
    assert [tf32 for _, tf32 in seen[:6]] == [False] * 3 + [True] * 3

    assert bd.configs_for("gemm", torch.float32) is bd.GEMM_CONFIGS_FP32
    assert bd.configs_for("dw", torch.float32) is bd.DW_CONFIGS_FP32
    for dtype in (torch.float16, torch.bfloat16):
        assert bd.configs_for("gemm", dtype) is bd.GEMM_CONFIGS and bd.configs_for("dw", dtype) is bd.DW_CONFIGS
