"""Every Triton kernel compiles for sm_90 and sm_80, without a GPU.

Op modules export ``compile_specs()`` (a list of spec dicts, format in
``sft_kernels/testing/compile_check.py``); every module under ``sft_kernels.ops`` whose
name starts with ``triton`` is imported and asked (``compile_check.op_specs``).  Each spec is compiled for each
architecture and fails on a compile error, register spills, shared memory over the
chip's limit, or (``expect_mma``) a Hopper build without ``wgmma``.

The self-tests below prove the check works both ways: a small fp16 matmul passes with
wgmma on sm_90 and mma.sync on sm_80, and a spilling kernel, an over-shared-memory
kernel and a kernel the compiler rejects (though the interpreter runs it) all fail.

The kernels here are at module level on purpose: under ``TRITON_INTERPRET=1`` they are
compiled in a worker process that re-imports this module.
"""

import pytest
import triton
import triton.language as tl

from sft_kernels.ops._triton_utils import ctas_per_sm
from sft_kernels.testing.compile_check import op_specs
from sft_kernels.testing.ptxas import CompileError, analyse_dots, perf_warnings
from sft_kernels.testing.report import SMEM_LIMIT, CompileReport, spec_failures
from sft_kernels.testing.runner import check_specs, compile_kernel, run_specs

ARCHS = (90, 80)


# --------------------------------------------------------------------------------------
# Specs exported by the ops
# --------------------------------------------------------------------------------------


_OP_SPECS, _OP_PROBLEMS = op_specs()
_CASES = [(s["name"], a) for s in _OP_SPECS for a in ARCHS if a in tuple(s.get("archs", ARCHS))]


def test_op_specs_collected():
    assert not _OP_PROBLEMS, "\n".join(_OP_PROBLEMS)


@pytest.fixture(scope="module")
def op_results(request):
    """Compile, in one batch, the op specs whose test cases were selected."""
    wanted = set()
    for item in request.session.items:
        cs = getattr(item, "callspec", None)
        if cs is not None and getattr(item, "originalname", None) == "test_op_kernel_compiles":
            wanted.add(cs.params["case"])
    specs = [s for s in _OP_SPECS if any(n == s["name"] for n, _ in wanted)]
    archs = tuple(a for a in ARCHS if any(x == a for _, x in wanted))
    return {(r.name, r.arch): r for r in run_specs(specs, archs)}


if _CASES:  # no placeholder test while no op exports specs

    @pytest.mark.parametrize("case", _CASES, ids=[f"{n}-sm{a}" for n, a in _CASES])
    def test_op_kernel_compiles(case, op_results):
        res = op_results[case]
        assert not res.failures, "\n".join(res.failures)


# --------------------------------------------------------------------------------------
# Self-tests of the harness
# --------------------------------------------------------------------------------------


@triton.jit
def _selftest_epilogue(acc, scale):
    # a jit helper: the worker must see it as a JITFunction too
    return (acc * scale).to(tl.float16)


@triton.jit
def _selftest_matmul(a_ptr, b_ptr, c_ptr, K, stride_am, stride_bk, stride_cm, scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * stride_bk + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], _selftest_epilogue(acc, scale))


@triton.jit
def _selftest_bad_arange(x_ptr, BLOCK: tl.constexpr):
    # runs under the interpreter, but tl.arange needs a power-of-two length to compile
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1)


@triton.jit
def _selftest_spill(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # one warp keeps BLOCK / 32 fp32 values per thread live across the reduction
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    s = tl.sum(x * x, axis=0)
    tl.store(y_ptr + offs, x / s)


@triton.jit
def _selftest_chained(a_ptr, b_ptr, c_ptr, o_ptr, M: tl.constexpr, D: tl.constexpr):
    # S = A B, then O = S C: the first dot feeds the second, so Triton puts every warp on
    # its M axis (warpsPerCTA [num_warps, 1]); 8 warps on 64 rows compute it twice
    rm = tl.arange(0, M)
    rd = tl.arange(0, D)
    a = tl.load(a_ptr + rm[:, None] * D + rd[None, :])
    b = tl.load(b_ptr + rd[:, None] * D + rd[None, :])
    c = tl.load(c_ptr + rd[:, None] * D + rd[None, :])
    s = tl.dot(a, b)
    o = tl.dot(s.to(tl.float16), c)
    tl.store(o_ptr + rm[:, None] * D + rd[None, :], o)


_MM_SIG = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "K": "i32", "stride_am": "i32",
           "stride_bk": "i32", "stride_cm": "i32", "scale": "fp32"}


def _mm_spec(name, bm, bn, bk, num_warps=4, num_stages=3, **extra):
    return {"name": name, "fn": _selftest_matmul, "signature": dict(_MM_SIG),
            "constexprs": {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
            "num_warps": num_warps, "num_stages": num_stages, "expect_mma": True,
            # what a launch with 16-divisible pointers, K and strides specialises on
            "divisible_by_16": ["a_ptr", "b_ptr", "c_ptr", "K", "stride_am", "stride_bk", "stride_cm"],
            **extra}


_SELFTEST_SPECS = [
    _mm_spec("matmul64", 64, 64, 64),
    # 5 stages of 128x128 + 128x128 fp16 operand tiles: 320 KiB (sm_90), 256 KiB (sm_80)
    _mm_spec("matmul128_too_much_smem", 128, 128, 128, num_warps=8, num_stages=5),
    # 8192 fp32 over 32 threads: 256 live values per thread, more than 255 registers
    {"name": "spill", "fn": _selftest_spill, "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32"},
     "constexprs": {"BLOCK": 8192}, "num_warps": 1, "num_stages": 1},
    {"name": "bad_arange", "fn": _selftest_bad_arange, "signature": {"x_ptr": "*fp32"},
     "constexprs": {"BLOCK": 48}, "num_warps": 4, "num_stages": 1},
    {"name": "chained_w8", "fn": _selftest_chained, "constexprs": {"M": 64, "D": 64}, "num_warps": 8, "num_stages": 1,
     "signature": {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "o_ptr": "*fp32"}, "expect_mma": True},
    {"name": "chained_w4", "fn": _selftest_chained, "constexprs": {"M": 64, "D": 64}, "num_warps": 4, "num_stages": 1,
     "signature": {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "o_ptr": "*fp32"}, "expect_mma": True},
    # an elementwise kernel declared matmul-heavy fails the wgmma / mma check
    {"name": "not_a_matmul", "fn": _selftest_bad_arange, "signature": {"x_ptr": "*fp32"},
     "constexprs": {"BLOCK": 64}, "num_warps": 4, "num_stages": 1, "expect_mma": True},
]


@pytest.fixture(scope="module")
def selftest_results():
    return {(r.name, r.arch): r for r in run_specs(_SELFTEST_SPECS, ARCHS)}


def test_matmul_compiles_with_tensor_cores(selftest_results):
    hopper = selftest_results[("matmul64", 90)]
    ampere = selftest_results[("matmul64", 80)]
    for res in (hopper, ampere):
        assert res.error is None, res.error
        assert not res.failures, res.failures
        rep = res.report
        assert 0 < rep.registers <= 255
        assert rep.spill_stores == 0 and rep.spill_loads == 0
        assert 0 < rep.shared_bytes <= SMEM_LIMIT[res.arch]
        assert rep.ptx_len > 0
    assert hopper.report.uses_wgmma
    assert ampere.report.uses_mma and not ampere.report.uses_wgmma


def test_spills_are_failures(selftest_results):
    for arch in ARCHS:
        res = selftest_results[("spill", arch)]
        assert res.error is None, res.error
        assert res.report.spill_stores > 0
        assert any("register spills" in f for f in res.failures), res.failures


def test_shared_memory_over_limit_is_failure(selftest_results):
    for arch in ARCHS:
        res = selftest_results[("matmul128_too_much_smem", arch)]
        assert res.error is None, res.error
        assert res.report.shared_bytes > SMEM_LIMIT[arch]
        assert any("shared memory" in f for f in res.failures), res.failures


def test_compile_error_is_failure(selftest_results):
    for arch in ARCHS:
        res = selftest_results[("bad_arange", arch)]
        assert res.report is None
        assert "power of 2" in res.error or "power of two" in res.error, res.error
        assert len(res.failures) == 1 and "compile failed" in res.failures[0]


def test_missing_mma_is_failure(selftest_results):
    for arch, want in ((90, "expected wgmma"), (80, "expected mma.sync")):
        res = selftest_results[("not_a_matmul", arch)]
        assert res.error is None, res.error
        assert not res.report.uses_mma
        assert len(res.failures) == 1 and want in res.failures[0], res.failures


def test_check_specs_and_compile_kernel():
    reports, failures = check_specs([_mm_spec("matmul64_k32", 64, 64, 32, num_stages=2)], archs=(90, ))
    assert len(reports) == 1 and reports[0].uses_wgmma and not failures
    rep = compile_kernel(_selftest_matmul, _MM_SIG, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32},
                         arch=80, num_warps=4, num_stages=2)
    assert rep.arch == 80 and rep.uses_mma and rep.spill_stores == 0
    # a malformed spec is refused before anything is compiled
    with pytest.raises(CompileError, match="BLOCK"):
        compile_kernel(_selftest_bad_arange, {"x_ptr": "*fp32"}, {}, arch=80)


def test_redundant_mma_layout_is_failure(selftest_results):
    """8 warps on a 64-row chained dot replicate its wgmma (the layout the old backward
    configs had); 4 warps do not. Read from the TTGIR layouts, checked on sm_90."""
    bad, good = selftest_results[("chained_w8", 90)], selftest_results[("chained_w4", 90)]
    assert bad.error is None and good.error is None, (bad.error, good.error)
    assert bad.report.uses_wgmma and good.report.uses_wgmma
    assert bad.report.redundancy == 1.5, bad.report.dots  # the first of two equal dots done twice
    assert any(d["warps_per_cta"] == [8, 1] and d["mnk"][0] == 64 for d in bad.report.dots), bad.report.dots
    assert any("redundant MMA layout" in f for f in bad.failures), bad.failures
    assert good.report.redundancy == 1.0 and not good.failures, (good.report.dots, good.failures)


def test_analyse_dots_weights_by_work():
    ttgir = """#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 64, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], instrShape = [16, 32, 16]}>
    %1 = ttng.warp_group_dot %a, %b, %c {isAsync = true} : !ttg.memdesc<64x128xf16, #s> * !ttg.memdesc<128x64xf16, #s> -> tensor<64x64xf32, #mma>
    %2 = ttng.warp_group_dot %d, %e, %f {isAsync = true} : tensor<64x64xf16, #ttg.dot_op<{opIdx = 0, parent = #mma1}>> * !ttg.memdesc<64x128xf16, #s> -> tensor<64x128xf32, #mma1>
"""
    dots, red = analyse_dots(ttgir)
    assert [d["mnk"] for d in dots] == [[64, 64, 128], [64, 128, 64]]
    assert [d["redundancy"] for d in dots] == [2.0, 1.0]
    assert red == (2 * 64 * 64 * 128 + 64 * 128 * 64) / (64 * 64 * 128 + 64 * 128 * 64)


def test_serialised_wgmma_warning_is_failure():
    """ptxas C7515 / C7512 (wgmma serialised) fail a spec, as spills do."""
    log = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
           "non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline "
           "stage in the function 'k'\nptxas info    : Used 133 registers, used 1 barriers\n")
    warnings = perf_warnings(log)
    assert len(warnings) == 1 and "C7515" in warnings[0]
    rep = CompileReport(name="k", arch=90, registers=133, spill_stores=0, spill_loads=0, shared_bytes=1024,
                        uses_wgmma=True, uses_mma=True, ptx_len=1, perf_warnings=warnings)
    fails = spec_failures({"name": "k", "expect_mma": True}, 90, rep, None)
    assert len(fails) == 1 and "performance warning" in fails[0] and "C7515" in fails[0]


def test_ctas_per_sm():
    # 255 registers x 256 threads fill the register file once; 128 x 128 threads four times
    assert ctas_per_sm(90, 255, 8, 1024) == 1
    assert ctas_per_sm(90, 128, 4, 1024) == 4
    assert ctas_per_sm(90, 64, 4, 100 * 1024) == 2  # shared memory: 2 x (100 + 1) KiB of 228 KiB
    assert ctas_per_sm(80, 64, 4, 100 * 1024) == 1  # 164 KiB on sm_80


def test_one_occupancy_rule():
    """The check's CTAs/SM and the persistent launchers' grids come from one rule, with
    the launchers' no-GPU limits (ops/_triton_utils: nothing at run time imports testing/)."""
    from sft_kernels.ops import _triton_utils as tu
    from sft_kernels.testing import compile_check as cc
    from sft_kernels.testing import report

    assert cc.occupancy is tu.occupancy and cc.ctas_per_sm is tu.ctas_per_sm is report.ctas_per_sm
    assert cc.SMEM_LIMIT is report.SMEM_LIMIT
    assert report.SMEM_LIMIT == {arch: lim.smem_per_block for arch, lim in tu.ARCH_LIMITS.items()}


@triton.jit
def _selftest_tuple_strides(x_ptr, y_ptr, x_strides, y_strides, BLOCK: tl.constexpr):
    # strides as one tuple argument per tensor (batch, row; the last dimension contiguous), as
    # the attention kernels take them
    b, row = tl.program_id(1), tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + b * x_strides[0] + row * x_strides[1] + offs)
    tl.store(y_ptr + b * y_strides[0] + row * y_strides[1] + offs, x)


def test_tuple_arguments_marked_divisible_per_element():
    """A tuple argument named in divisible_by_16 is specialised element by element (Triton's
    attrs key by path): the copy's rows are then 16-aligned and its loads vectorise (a shorter
    PTX than the same kernel without the mark)."""
    from sft_kernels.testing.runner import _prepare

    sig = {"x_ptr": "*fp16", "y_ptr": "*fp16", "x_strides": ("i32", "i32"), "y_strides": ("i32", "i32")}
    _, _, attrs = _prepare(_selftest_tuple_strides, sig, {"BLOCK": 1024}, ["x_ptr", "y_ptr", "x_strides"])
    assert sorted(attrs) == [(0,), (1,), (2, 0), (2, 1)]
    marked, unmarked = (compile_kernel(_selftest_tuple_strides, sig, {"BLOCK": 1024}, arch=90, num_stages=1,
                                       divisible_by_16=["x_ptr", "y_ptr"] + strides)
                        for strides in (["x_strides", "y_strides"], []))
    assert marked.ptx_len < unmarked.ptx_len, (marked.ptx_len, unmarked.ptx_len)


def test_wgmma_expected_unless_the_spec_says_its_tile_is_too_small(selftest_results):
    """An mma.sync build judged as sm_90's fails for want of wgmma, unless the spec says its dot
    tile has fewer than 64 rows (``mma_rows``): then mma.sync is right there too."""
    ampere = selftest_results[("matmul64", 80)].report
    assert ampere.uses_mma and not ampere.uses_wgmma
    spec = _mm_spec("matmul64", 64, 64, 64)
    assert any("expected wgmma" in f for f in spec_failures(spec, 90, ampere, None))
    assert any("expected wgmma" in f for f in spec_failures(dict(spec, mma_rows=64), 90, ampere, None))
    assert not spec_failures(dict(spec, mma_rows=32), 90, ampere, None)
