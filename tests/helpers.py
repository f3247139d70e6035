"""Tolerances (one table) and comparison helpers shared by the tests."""

import torch

# Relative Frobenius error ||out - ref|| / ||ref|| against a float64 reference.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    "tf32": 1e-3,  # fp32 inputs whose kernel multiplies in tf32 (Triton tl.dot on GPU)
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double()
    ref = ref.detach().double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def assert_rel(out, ref, tol, what=""):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all() or not torch.isfinite(ref).all(), f"{what}: non-finite values"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
    return err


def assert_fa_bar(out, ref64, lowp_ref, what="", floor=1e-4):
    """FlashAttention's bar: error vs float64 at most 2x that of PyTorch in low precision.

    ``floor`` keeps the bar meaningful when the low-precision reference happens to be
    almost exact (tiny tensors).
    """
    err = rel_err(out, ref64)
    base = rel_err(lowp_ref, ref64)
    assert err <= 2 * base + floor, f"{what}: error {err:.3e} > 2 x low-precision PyTorch {base:.3e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a freshly allocated output with NaN so unwritten elements are caught."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-12345)
