"""The CUDA C++ extension builds, imports and is spill-free on a machine without a GPU.

- the just-in-time build (``sft_kernels._build.load``, ninja + nvcc, sm_80 and sm_90)
  compiles every source, links, imports, and ptxas reports no register spill for any
  kernel on either architecture;
- the Python launchers' argument lists match the binding (a call with CPU tensors must
  reach the binding's device check, not a pybind11 signature error);
- the kernel source itself runs on the CPU through the fiber emulator
  (tests/cuda/emu) and matches a float64 reference (tests/cuda/kernel_tests.h) element by
  element (FlashAttention's bar against a low-precision computation the harness makes, as
  tests/helpers.py does), with cp.async performed late and early, two scheduling seeds, and
  cases at the kernels' tile edges;
- unsupported dtypes / head dims raise the documented errors before any launch.

About 2 minutes for the build and 1.5 for the emulator on 2 cores. Skips without nvcc
(build) or g++ (emulator).
"""

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from sft_kernels import _build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED_KERNELS = ("swa_fwd_kernel", "swa_bwd_dkdv_kernel", "swa_bwd_dq_kernel", "swa_bwd_delta_kernel",
                    "bd_gemm_kernel", "bd_dw_kernel")


def _have_nvcc():
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(_build.cuda_home(), "bin", "nvcc"))


@pytest.fixture(scope="module")
def jit_build(tmp_path_factory):
    if not _have_nvcc():
        pytest.skip("nvcc not found")
    build_dir = str(tmp_path_factory.mktemp("sft_kernels_jit"))
    log = os.path.join(build_dir, "build.log")
    t0 = time.time()
    try:
        mod = _build.load(build_directory=build_dir, log_path=log, ptxas_verbose=True)
    except Exception as exc:  # noqa: BLE001 - show the compiler output
        text = open(log).read() if os.path.exists(log) else ""
        pytest.fail(f"CUDA extension build failed: {exc}\n{text[-6000:]}")
    seconds = time.time() - t0
    print(f"JIT build: {seconds:.0f} s")
    return mod, open(log).read()


def test_jit_build_imports(jit_build):
    mod, _ = jit_build
    for fn in ("swa_fwd", "swa_bwd", "bd_gemm", "bd_dw"):
        assert callable(getattr(mod, fn)), fn
    assert tuple(mod.SWA_HEAD_DIMS) == (64, 128)
    assert (mod.BD_BLOCK_M, mod.BD_BLOCK_N, mod.BD_BLOCK_K) == (128, 128, 32)


def test_no_register_spills(jit_build):
    _, log = jit_build
    report = _build.ptxas_report(log)
    assert report, "no ptxas -v output in the build log"
    for arch in ("sm_80", "sm_90"):
        names = [r["kernel"] for r in report if r["arch"] == arch]
        for k in EXPECTED_KERNELS:
            assert any(k in n for n in names), f"{k} was not compiled for {arch}"
    bad = [r for r in report if r["spill_stores"] or r["spill_loads"]]
    assert not bad, "register spills:\n" + "\n".join(
        f"{r['arch']} {r['kernel']}: {r['registers']} registers, {r['spill_stores']} B stores / "
        f"{r['spill_loads']} B loads" for r in bad)
    for r in report:
        print(f"{r['arch']} regs={r['registers']:>3} {r['kernel']}")


def test_launchers_match_binding(jit_build, monkeypatch):
    """CPU tensors must get through pybind11's overload resolution to the device check."""
    mod, _ = jit_build
    from sft_kernels.ops.block_diag import cuda_backend as bd
    from sft_kernels.ops.sliding_window_attention import cuda_backend as swa
    from sft_kernels.window import parse_window

    for m in (swa, bd):
        monkeypatch.setattr(m, "extension", lambda: mod)
        monkeypatch.setattr(m, "_stream", lambda device: 0)
    monkeypatch.setattr(bd, "_num_sms", lambda index: 132)
    q = torch.randn(1, 16, 2, 64, dtype=torch.float16)
    k = torch.randn(1, 16, 1, 64, dtype=torch.float16)
    spec = parse_window((3, 0), True)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        swa.swa_fwd_cuda(q, k, k, spec, 0.125)
    out = torch.zeros_like(q)
    lse = torch.zeros(1, 2, 16)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        swa.swa_bwd_cuda(q, q, k, k, out, lse, spec, 0.125)
    cu = torch.tensor([0, 16], dtype=torch.int32)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        swa.swa_fwd_cuda(q[0], k[0], k[0], spec, 0.125, cu, cu, 16, 16)
    x = torch.randn(8, 12, dtype=torch.bfloat16)
    w = torch.randn(5 * 4 + 7 * 8, dtype=torch.bfloat16)
    monkeypatch.setattr(bd, "_meta", lambda *a: (torch.zeros(2, 8, dtype=torch.int32), 2))
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        bd.gemm_forward(x, w, torch.randn(12, dtype=torch.bfloat16), [4, 8], [5, 7])
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        bd.gemm_backward_dx(torch.randn(8, 12, dtype=torch.bfloat16), w, [4, 8], [5, 7])
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        bd.gemm_backward_dw(torch.randn(8, 12, dtype=torch.bfloat16), x, [4, 8], [5, 7], split=1)


def test_window_modes_match_window_py(jit_build):
    """The binding exports csrc/'s named window modes; they must be window.py's."""
    from sft_kernels import window

    mod, _ = jit_build
    assert (mod.WINDOW_MODE_EXPLICIT, mod.WINDOW_MODE_KEYS, mod.WINDOW_MODE_SQRT) == (
        window.MODE_EXPLICIT, window.MODE_KEYS, window.MODE_SQRT)


def test_default_arch_list_embeds_ptx_for_the_newest():
    """sm_80 and sm_90 machine code plus compute_90 PTX: a newer GPU still gets kernels."""
    flags = _build.gencode_flags(_build.DEFAULT_ARCH_LIST)
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]


def test_rows_ready_copies_misaligned_contiguous_views():
    """cp.async needs a 16-byte aligned base: a contiguous view at an odd storage offset is
    copied to a fresh allocation (``.contiguous()`` would return the same view)."""
    from sft_kernels.ops.sliding_window_attention import cuda_backend as swa

    base = torch.randn(4 * 2 * 64 + 1, dtype=torch.float16)
    view = base[1:].view(1, 4, 2, 64)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    ready = swa._rows_ready(view)
    assert ready.data_ptr() % 16 == 0 and ready.data_ptr() != view.data_ptr()
    assert torch.equal(ready, view)
    strided = torch.randn(1, 4, 3, 64, dtype=torch.float16)[:, :, :2]  # head stride 64, row stride 192: fine
    assert swa._rows_ready(strided).data_ptr() == strided.data_ptr()
    odd = torch.randn(1, 4, 2, 68, dtype=torch.float16)[..., :64]  # row stride 136: not a multiple of 8
    assert swa._rows_ready(odd).stride() == (512, 128, 64, 1)


def test_unsupported_inputs_raise():
    from sft_kernels.ops.block_diag import cuda_backend as bd
    from sft_kernels.ops.sliding_window_attention import cuda_backend as swa

    with pytest.raises(TypeError, match="float16 and bfloat16"):
        swa.check_supported(torch.zeros(1, 4, 1, 64))
    with pytest.raises(ValueError, match="head_dim"):
        swa.check_supported(torch.zeros(1, 4, 1, 80, dtype=torch.float16))
    with pytest.raises(TypeError, match="float16 and bfloat16"):
        bd.check_supported(torch.zeros(2, 4), [4], [4])


@pytest.fixture(scope="module")
def emu_binary(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    out = str(tmp_path_factory.mktemp("emu") / "emu_test")
    here = os.path.join(ROOT, "tests", "cuda")
    cmd = [cxx, "-std=c++17", "-O2", "-DSFTK_EMULATE", "-I", os.path.join(here, "emu"), "-I", _build.csrc_dir(),
           "-Wno-unknown-pragmas", os.path.join(here, "test_emulated.cpp"), "-o", out]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"emulator build failed:\n{res.stderr[-4000:]}"
    return out


# cp.async modes x schedulers (see tests/cuda/emu/emu.h): "interleave" keeps warps in near
# lockstep, "runahead" lets one warp pass a whole barrier interval before the others start.
@pytest.mark.parametrize("mode,seed,sched", [("deferred", "1", "interleave"), ("immediate", "2", "interleave"),
                                             ("deferred", "3", "runahead"), ("immediate", "4", "runahead")])
def test_kernels_emulated_on_cpu(emu_binary, mode, seed, sched):
    env = dict(os.environ, EMU_CP_ASYNC=mode, EMU_SEED=seed, EMU_SCHED=sched)
    # the timeout is a hang guard (a deadlock aborts on its own): a run takes about 22 s of CPU
    # (measured 11 s user + 11 s system: every fiber switch saves the signal mask), single-threaded
    res = subprocess.run([emu_binary], capture_output=True, text=True, env=env, timeout=900)
    sys.stdout.write(res.stdout)
    assert res.returncode == 0, f"emulated kernels failed ({mode}):\n{res.stdout[-6000:]}\n{res.stderr[-2000:]}"
    assert "PASSED" in res.stdout
