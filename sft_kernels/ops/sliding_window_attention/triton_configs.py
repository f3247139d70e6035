"""Autotune configurations of the sliding-window attention kernels: the lists per kernel
and head_dim class, what a pinned ``SFT_KERNELS_SWA_CONFIG`` or the interpreter replaces
them with, and which architectures an entry is for. Read by the launchers
(``triton_kernels.py``) and the GPU compile specs (``triton_compile_specs.py``)."""

from __future__ import annotations

from .._triton_utils import interpreting, pinned_config

# Autotune configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) per head_dim class,
# keyed on HEAD_DIM, the window bucket, the dtypes, IS_VARLEN and WINDOW_MODE (and
# USE_TMA for the forward), never on the raw sequence length.
# SFT_KERNELS_SWA_CONFIG="fwd=128,64,8,3;dkdv=32,128,4,3;dq=128,32,4,3" pins them (any
# subset; also under the interpreter, to run the GPU tile sizes on CPU).
_CONFIGS = {
    # Chosen by compiling candidates without a GPU (scripts/sweep_triton_configs.py: TTGIR
    # layouts, ptxas -v): every entry compiles for sm_90a and (unless Hopper-only, below)
    # sm_80, fp16 and bf16, under Triton 3.6 and 3.8, with no spill, no replicated MMA
    # (warps doing the same wgmma) and no serialised wgmma (ptxas C7512/C7515), pipelined
    # (num_stages >= 2) except the D=256 dK/dV fallback, in sm_80's 163 KiB of shared
    # memory. The table of
    # registers, CTAs/SM and wgmma shapes per first choice is in the README. Rules seen in
    # the sweep: 4 warps on 128 rows hold 128 x D fp32 accumulators in 128 threads and
    # spill at D >= 128; 8 warps on 64 rows split N and narrow the wgmma (n = BN / 2); the
    # tensor-descriptor forward needs 20-50 fewer registers than the pointer one. Speed on
    # hardware is unmeasured: the autotuner picks among these on the GPU. An entry ending in
    # (90,) is Hopper-only (it spills a few bytes in sm_80's mma.sync build).
    "fwd": {
        64: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
        128: [(128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
        256: [(128, 32, 8, 2, (90,)), (64, 32, 8, 2), (128, 32, 8, 3, (90,))],
    },
    "dkdv": {
        64: [(32, 128, 8, 2), (32, 64, 4, 2), (16, 64, 4, 3)],
        128: [(32, 128, 8, 2, (90,)), (32, 64, 8, 2), (16, 128, 8, 2, (90,)), (16, 64, 8, 2)],
        256: [(16, 64, 8, 2), (16, 64, 8, 1)],
    },
    "dq": {
        64: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2)],
        # (128, 64) at D = 128 sits at sm_80's 255 registers and spills there with softcap
        # under Triton 3.6: Hopper-only
        128: [(128, 64, 8, 2, (90,)), (128, 32, 8, 2), (64, 32, 4, 2)],
        256: [(64, 32, 8, 2), (128, 16, 8, 2)],
    },
}
# fp32 inputs: with IEEE dots (torch's default, allow_tf32 off) tl.dot runs on the FMA
# units, not the tensor cores, and keeps its operands in registers in another layout: the
# tiles above spill there (the forward at D = 128: ~1.5 KB on sm_90a). Their own lists,
# chosen by compiling candidates (ptxas -v, Triton 3.6 and 3.8, sm_90a and sm_80): 8 warps
# on tiles of 16-64 rows; 4 warps on 64 rows, or 64 rows at D = 128, spilled on sm_80 under
# 3.8 (registers per entry in docs/kernels.md).
_FP32_CONFIGS = {
    "fwd": {64: [(64, 32, 8, 2)], 128: [(16, 32, 8, 2)], 256: [(16, 32, 8, 2)]},
    "dkdv": {64: [(16, 32, 8, 2)], 128: [(16, 32, 8, 2)], 256: [(16, 32, 8, 2)]},
    "dq": {64: [(16, 32, 8, 2)], 128: [(32, 32, 8, 2)], 256: [(32, 16, 8, 2)]},
}
# fp32 inputs under torch.backends.cuda.matmul.allow_tf32: tf32 dots on the tensor cores with
# fp32 operands (twice fp16's registers and shared memory). The IEEE lists above replicate MMA
# work there (1.5-1.67x on 16-row tiles) and dK/dV D = 128 spills 40 B; these lists come from
# `scripts/sweep_triton_configs.py --dtype fp32 --dot-prec tf32` (sm_90a and sm_80, then Triton
# 3.6): largest tile first among the candidates with no spill, no replicated or serialised MMA
# and sm_80's shared memory. D = 256 dK/dV: every key tile of 64 spilled on sm_90a (16-44 B,
# 255 registers), so a tile of 32 keys, which Hopper multiplies with mma.sync (wgmma needs 64).
_TF32_CONFIGS = {
    "fwd": {64: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
            128: [(128, 32, 8, 2), (64, 64, 8, 2), (128, 16, 8, 2)],
            256: [(64, 32, 8, 2), (64, 16, 8, 2)]},
    "dkdv": {64: [(32, 128, 8, 2), (16, 128, 8, 2), (16, 64, 4, 2)],
             128: [(32, 64, 8, 2), (16, 64, 8, 2)],
             256: [(32, 32, 8, 1)]},
    "dq": {64: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
           128: [(64, 64, 8, 2), (128, 16, 8, 2), (64, 32, 8, 2)],
           256: [(64, 16, 8, 1)]},
}
_INTERPRET_CONFIG = (16, 16, 1, 1)  # TRITON_INTERPRET=1: one small config, no tuning
_CONFIG_NAMES = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def _pinned(kind: str):
    cfg = pinned_config("SFT_KERNELS_SWA_CONFIG", kind, _CONFIG_NAMES, tuple(_CONFIGS))
    return None if cfg is None else [tuple(cfg[n] for n in _CONFIG_NAMES)]


def head_dim_class(head_dim: int) -> int:
    return 64 if head_dim <= 64 else (128 if head_dim <= 128 else 256)


def _entry_archs(entry):
    return entry[4] if len(entry) > 4 else (80, 90)


def config_table(fp32: bool = False, tf32: bool = False):
    """The lists for fp16/bf16 inputs, for fp32 ones with IEEE dots, or (``tf32``) for fp32
    ones with tf32 dots (``allow_tf32``); ``tf32`` means nothing for fp16/bf16."""
    if not fp32:
        return _CONFIGS
    return _TF32_CONFIGS if tf32 else _FP32_CONFIGS


def config_list(kind: str, head_dim: int, arch: int = 90, fp32: bool = False, tf32: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tuples tried for ``kind`` on ``arch``
    (90 for Hopper and newer, 80 below) for fp16/bf16 inputs, or fp32 ones (IEEE or tf32 dots)."""
    pinned = _pinned(kind)
    if pinned:
        return pinned
    if interpreting():
        return [_INTERPRET_CONFIG]
    return [tuple(e[:4]) for e in config_table(fp32, tf32)[kind][head_dim_class(head_dim)]
            if arch in _entry_archs(e)]
