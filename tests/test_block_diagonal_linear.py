"""BlockDiagonalLinear: construction, init, exact merge/split, state_dict, forward/backward."""

import math

import pytest
import torch
import torch.nn as nn

from helpers import TOL, assert_rel
from sft_kernels.modules.block_diagonal_linear import BlockDiagonalLinear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _linears(in_f, out_f, bias=True, dtype=torch.float32):
    return [nn.Linear(n, m, bias=bias, dtype=dtype) for n, m in zip(in_f, out_f)]


def _apply_separately(linears, x):
    outs, k = [], 0
    for lin in linears:
        outs.append(lin(x[..., k : k + lin.in_features]))
        k += lin.in_features
    return torch.cat(outs, -1)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    "in_f, out_f", [([16] * 4, [16] * 4), ([8, 40, 1, 17], [33, 5, 64, 1]), ([1] * 9, [1] * 9), ([37], [19])],
    ids=["equal", "unequal", "one_by_one", "single"],
)
def test_merge_split_round_trip_bit_exact(in_f, out_f, bias):
    linears = _linears(in_f, out_f, bias)
    layer = BlockDiagonalLinear.from_linears(linears)
    assert layer.in_sizes == in_f and layer.out_sizes == out_f
    back = layer.to_linears()
    assert len(back) == len(linears)
    for a, b in zip(linears, back):
        assert torch.equal(a.weight, b.weight)
        assert (a.bias is None) == (b.bias is None)
        if a.bias is not None:
            assert torch.equal(a.bias, b.bias)
    again = BlockDiagonalLinear.from_linears(back)
    assert torch.equal(again.weight, layer.weight)
    dense = layer.to_dense()
    assert torch.equal(dense, torch.block_diag(*[lin.weight.detach() for lin in linears]))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_merged_matches_separate_linears(dtype):
    in_f, out_f = [8, 40, 1, 17], [33, 5, 64, 1]
    linears = _linears(in_f, out_f, dtype=dtype)
    layer = BlockDiagonalLinear.from_linears(linears)
    x = torch.randn(3, 29, sum(in_f)).to(dtype)
    ref = _apply_separately(linears, x)
    offsets = [sum(in_f[:i]) for i in range(len(in_f))]
    ref64 = torch.cat(
        [
            torch.nn.functional.linear(x[..., k : k + lin.in_features].double(), lin.weight.double(), lin.bias.double())
            for lin, k in zip(linears, offsets)
        ],
        -1,
    )
    y = layer(x)
    assert y.dtype == dtype
    assert_rel(y, ref64, TOL[dtype], "merged vs float64 separate")
    if dtype == torch.float32:
        assert_rel(y, ref, TOL[dtype], "merged vs separate fp32")


def test_gradients_match_separate_linears():
    in_f, out_f = [8, 40, 1, 17], [33, 5, 64, 1]
    linears = _linears(in_f, out_f, dtype=torch.float64)
    layer = BlockDiagonalLinear.from_linears(linears)
    x = torch.randn(2, 13, sum(in_f), dtype=torch.float64)
    gy = torch.randn(2, 13, sum(out_f), dtype=torch.float64)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    layer(xa).backward(gy)
    _apply_separately(linears, xb).backward(gy)
    assert_rel(xa.grad, xb.grad, TOL[torch.float64], "dx")
    assert_rel(layer.weight.grad, torch.cat([lin.weight.grad.reshape(-1) for lin in linears]), TOL[torch.float64], "dw")
    assert_rel(layer.bias.grad, torch.cat([lin.bias.grad for lin in linears]), TOL[torch.float64], "db")


def test_int_sizes_with_groups_and_3d_view():
    layer = BlockDiagonalLinear(64, 32, groups=4)
    assert layer.in_sizes == [16] * 4 and layer.out_sizes == [8] * 4
    assert layer.weight.shape == (4 * 8 * 16,)
    assert layer.weight_3d().shape == (4, 8, 16)
    assert layer.weight_3d().data_ptr() == layer.weight.data_ptr()
    with pytest.raises(ValueError, match="unequal"):
        BlockDiagonalLinear([3, 5], [2, 2]).weight_3d()


def test_state_dict_is_stable_and_loads():
    a = BlockDiagonalLinear([8, 40, 1, 17], [33, 5, 64, 1])
    sd = a.state_dict()
    assert list(sd) == ["weight", "bias"]
    assert sd["weight"].shape == (8 * 33 + 40 * 5 + 64 + 17,) and sd["bias"].shape == (103,)
    b = BlockDiagonalLinear([8, 40, 1, 17], [33, 5, 64, 1])
    b.load_state_dict(sd)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert list(BlockDiagonalLinear(8, 8, bias=False, groups=2).state_dict()) == ["weight"]


def test_init_matches_nn_linear_per_block():
    torch.manual_seed(0)
    in_f, out_f = [4, 256, 64], [512, 256, 32]
    layer = BlockDiagonalLinear(in_f, out_f)
    for blk, n, (o, m) in zip(layer.blocks(), in_f, [(0, 512), (512, 256), (768, 32)]):
        bound = 1.0 / math.sqrt(n)  # kaiming_uniform(a=sqrt(5)) on fan_in n gives 1/sqrt(n)
        assert blk.abs().max() <= bound
        assert blk.abs().max() > 0.9 * bound  # fills its range
        b = layer.bias[o : o + m]
        assert b.abs().max() <= bound and b.abs().max() > 0.5 * bound
    # spread per block follows its own fan-in, not the total
    assert layer.blocks()[0].std() > 5 * layer.blocks()[1].std()


def test_extra_repr_reports_blocks_and_saving():
    r = repr(BlockDiagonalLinear(4096, 4096, groups=8))
    assert "8 x (512, 512)" in r and "2,097,152 vs dense 16,777,216" in r and "8.0x fewer" in r and "87.5% saved" in r
    r = repr(BlockDiagonalLinear([3, 5], [7, 2], bias=False))
    assert "[(7, 3), (2, 5)]" in r and "bias=False" in r
    # a ZeRO-3 partitioned layer holds an empty local weight; deepspeed.initialize formats its repr
    layer = BlockDiagonalLinear(64, 64, groups=4)
    layer.weight.data = torch.empty(0)
    assert "1,024 vs dense 4,096" in repr(layer) and "4.0x fewer" in repr(layer)


def test_dtype_device_and_backend_passthrough():
    layer = BlockDiagonalLinear([4, 4], [2, 6], dtype=torch.bfloat16, device="cpu", backend="torch")
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    y = layer(torch.randn(5, 8, dtype=torch.bfloat16))
    assert y.shape == (5, 8) and y.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "args, kw, exc, match",
    [
        ((64, 32), {}, ValueError, "groups= is needed"),
        ((64, 30), dict(groups=4), ValueError, "out_features=30 is not divisible by groups=4"),
        (([4, 4], [2, 2, 2]), {}, ValueError, "same number of blocks"),
        (([4, 0], [2, 2]), {}, ValueError, r"in_features\[1\] must be a positive block size"),
        (([4, 4], [2, 2]), dict(groups=3), ValueError, "lists 2 blocks but groups=3"),
        ((8, 8), dict(groups=0), ValueError, "groups must be a positive int"),
        (("8", 8), dict(groups=2), TypeError, "in_features must be an int or a list"),
    ],
    ids=["int_without_groups", "not_divisible", "length_mismatch", "zero_block", "groups_mismatch", "zero_groups", "str"],
)
def test_bad_constructor_args(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        BlockDiagonalLinear(*args, **kw)


def test_from_linears_rejects_mixed_layers():
    with pytest.raises(ValueError, match="either every layer has a bias or none"):
        BlockDiagonalLinear.from_linears([nn.Linear(2, 3), nn.Linear(2, 3, bias=False)])
    with pytest.raises(ValueError, match="share dtype and device"):
        BlockDiagonalLinear.from_linears([nn.Linear(2, 3), nn.Linear(2, 3, dtype=torch.float64)])
    with pytest.raises(TypeError, match=r"linears\[1\] must be nn.Linear"):
        BlockDiagonalLinear.from_linears([nn.Linear(2, 3), nn.Conv1d(2, 3, 1)])
    with pytest.raises(ValueError, match="at least one"):
        BlockDiagonalLinear.from_linears([])


@pytest.mark.interpret
def test_module_triton_backend(triton_device):
    linears = _linears([16, 32, 5], [8, 16, 3])
    layer = BlockDiagonalLinear.from_linears(linears, backend="triton").to(triton_device)
    x = torch.randn(2, 9, 53, device=triton_device, requires_grad=True)
    y = layer(x)
    ref = _apply_separately([lin.to(triton_device) for lin in linears], x.detach())
    tol = TOL["tf32"] if triton_device == "cuda" and torch.backends.cuda.matmul.allow_tf32 else TOL[torch.float32]
    assert_rel(y.detach().cpu(), ref.detach().cpu(), tol, "triton module")
    y.sum().backward()
    assert layer.weight.grad.shape == layer.weight.shape and torch.isfinite(layer.weight.grad).all()
