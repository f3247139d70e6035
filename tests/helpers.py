"""Tolerances (one table) and comparison helpers shared by the tests."""

import os

import torch

# Relative Frobenius error ||out - ref|| / ||ref|| against a float64 reference.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    "tf32": 1e-3,  # fp32 inputs whose kernel multiplies in tf32 (Triton tl.dot on GPU)
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


# fp32 round-off allowed by the FlashAttention bar where the exact result is 0 (see
# assert_fa_bar); the tests' inputs are randn, O(1).
FA_ATOL = 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` (Frobenius). Where the reference is exactly zero (dq of a
    window of one key), the largest absolute element of ``out``: a size-independent
    measure of round-off against the O(1) values of the tests' randn inputs."""
    out = out.detach().double()
    ref = ref.detach().double()
    denom = ref.norm().item()
    if denom == 0.0:
        return out.abs().max().item() if out.numel() else 0.0
    return (out - ref).norm().item() / denom


def assert_rel(out, ref, tol, what=""):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all() or not torch.isfinite(ref).all(), f"{what}: non-finite values"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
    return err


def _max_abs(a, b) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def assert_fa_bar(out, ref64, lowp_ref, what=""):
    """FlashAttention's bar for fp16/bf16 (its tests/test_flash_attn.py): max abs error vs
    float64 at most twice that of plain PyTorch run in the same low precision, plus a slack.

    The slack is FlashAttention's, twice the rounding error of the reference's values in
    the output dtype at magnitude ``|ref| + 0.3`` (``2 * max|ref + 0.3 - 0.3 - ref|``,
    computed in that dtype), plus ``FA_ATOL`` of fp32 round-off for results that are
    exactly 0 (dq of a row that sees one key is 0 in any precision, where the low-precision
    PyTorch result is exact too). It keeps the bar meaningful on tiny tensors, where a
    maximum over a handful of elements is a noisy statistic.
    """
    err = _max_abs(out, ref64)
    base = _max_abs(lowp_ref, ref64)
    r = ref64.detach().to(out.dtype)
    slack = 2 * _max_abs(r + 0.3 - 0.3, r) + FA_ATOL
    assert err <= 2 * base + slack, (
        f"{what}: max error {err:.3e} > 2 x low-precision PyTorch {base:.3e} + slack {slack:.3e}"
    )


def assert_close(out, ref64, tol_key, what="", lowp_ref=None, fixed_bar=True):
    """The one comparison rule of the suite, against a float64 reference.

    fp64/fp32 (and "tf32"): relative error <= TOL[tol_key].
    fp16/bf16 (``lowp_ref`` = the same computation by plain PyTorch in that precision):
    FlashAttention's bar (:func:`assert_fa_bar`), and, with ``fixed_bar``, also a relative
    error <= TOL. The property tests pass ``fixed_bar=False``: they reach rows that see
    one or two keys, where a gradient is a difference of nearly equal terms and no
    kernel that keeps its forward output in fp16/bf16 (FlashAttention's design: delta =
    rowsum(dO * O) from the rounded O) can hold a fixed relative bar.
    """
    if tol_key in (torch.float16, torch.bfloat16):
        assert lowp_ref is not None, f"{what}: a low-precision PyTorch baseline is needed for {tol_key}"
        assert_fa_bar(out, ref64, lowp_ref, what)
        if not fixed_bar:
            return rel_err(out, ref64)
    return assert_rel(out, ref64, TOL[tol_key], what)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a freshly allocated output with NaN so unwritten elements are caught."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-12345)


def assert_rel_bar(out, ref, lowp_ref, what="", floor=1e-4):
    """Whole-model comparisons under autocast (the Hugging Face tests): relative error vs the
    precise run at most twice that of the same model run by eager in the same low precision,
    plus ``floor``. A max-abs bar (:func:`assert_fa_bar`, for single ops) would be decided by
    one outlier of a chaotic bf16 forward+backward through every layer."""
    err = rel_err(out, ref)
    base = rel_err(lowp_ref, ref)
    assert err <= 2 * base + floor, f"{what}: error {err:.3e} > 2 x low-precision eager {base:.3e} + {floor:.0e}"


def examples(n: int) -> int:
    """Hypothesis examples for a Triton property test: ``n``, capped by
    ``SFT_KERNELS_MAX_EXAMPLES`` (``make test-fast`` sets 10: the interpreter is slow;
    ``scripts/gpu_check.sh`` sets a few: on a GPU each example
    may draw a new autotune key, which compiles every candidate config)."""
    cap = os.environ.get("SFT_KERNELS_MAX_EXAMPLES")
    return min(n, int(cap)) if cap else n


def save_tiny_opt(path):
    """A tiny OPT model (DeepSpeed-Chat's family; seed 0) and the byte-level tokenizer as a
    Hugging Face one, saved to ``path`` (what ``--model_name_or_path`` loads). Returns ``path``."""
    from transformers import OPTConfig, OPTForCausalLM

    from sft_kernels.train.tokenizer import ByteTokenizer

    tok = ByteTokenizer().to_hf()
    config = OPTConfig(vocab_size=len(tok), hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=512, word_embed_proj_dim=64, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dropout=0.0)
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def summed_over_ranks(loss, model):
    """After a rank's backward on its shard: the loss and every parameter's gradient summed over
    the ranks (the parameters are replicated, so the whole batch's gradient is the sum of the
    shards'). Returns (loss, {name: gradient})."""
    import torch.distributed as dist

    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        grads[name] = g
    return total, grads
