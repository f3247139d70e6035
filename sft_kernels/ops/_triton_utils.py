"""Triton plumbing shared by both ops' kernels and launchers: one home for each concept.

- :func:`interpreting`: whether Triton runs kernels in its interpreter, by Triton's own
  rule (``triton.knobs.runtime.interpret``: ``TRITON_INTERPRET`` = 1/true/on/yes/y, any
  case), the rule that also decides whether ``@triton.jit`` makes an interpreted function.
- :func:`pinned_config`: the one checked parser of the ``SFT_KERNELS_*_CONFIG`` variables.
- :func:`device_limits`: shared memory per block and the per-SM resources, read from the
  device (torch's device properties, else Triton's driver); the sm_80 / sm_90 figures in
  :data:`ARCH_LIMITS` serve only where there is no GPU (the compile check, the interpreter).
- :func:`occupancy` / :func:`ctas_per_sm`: programs of a compiled kernel one SM holds.
- :func:`upcast_dots`, :func:`cast_out`: the interpreter's fp16/bf16 ``tl.dot`` and its
  truncating fp32 -> bf16 cast, worked around the same way in every kernel.
- :func:`dot_precision`: ``input_precision`` of fp32 dots, from torch's tf32 switch.
- :func:`ensure_tma_allocator`: the scratch allocator device-side tensor descriptors need.
- :class:`Tuner`: the one autotuner of both ops (why this one: its docstring).

Nothing here imports ``sft_kernels.testing``: the compile check imports from here.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Optional, Sequence

import torch
import triton
import triton.language as tl


# ----------------------------------------------------------------------------- interpreter
def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET``)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")  # pragma: no cover


def upcast_dots(device: torch.device) -> bool:
    """Whether kernels on ``device`` cast ``tl.dot`` operands to fp32: on CPU tensors (the
    interpreter, whose fp16/bf16 ``tl.dot`` multiplies raw bit patterns)."""
    return device.type != "cuda" or interpreting()


@triton.jit
def cast_out(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 -> ``DTYPE``, rounding to nearest even as the GPU's cvt.rn does. Triton's
    interpreter (``UPCAST``) truncates fp32 -> bf16 (1 ulp of error instead of 0.5: 4.528 ->
    4.5, not 4.53125), so there the rounding is done by hand on the bits first."""
    if UPCAST and DTYPE == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' ``tl.dot``: fp32 operands multiply in IEEE fp32
    unless ``torch.backends.cuda.matmul.allow_tf32`` is set (torch's own switch for its
    fp32 matmuls, off by default); fp16/bf16 operands ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# ----------------------------------------------------------------------------- pinned configs
def pinned_config(env: str, kind: str, names: Sequence[str], kinds: Sequence[str]) -> Optional[Dict[str, int]]:
    """The config ``env`` pins for ``kind``, or None.

    ``env`` holds ``kind=v1,v2,...`` parts separated by ``;`` (``"fwd=128,64,8,3;dq=..."``),
    one integer per name in ``names``: the block sizes, then ``num_warps``, ``num_stages``.
    Checked, with a message naming the variable: a known kind, the count, block sizes and
    num_warps powers of two, num_stages at least 1.
    """
    spec = os.environ.get(env, "")
    found = None
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, _, vals = part.partition("=")
        key = key.strip()
        if key not in kinds:
            raise ValueError(f"{env}: unknown kernel {key!r} in {part!r}; kernels are {', '.join(kinds)}")
        if key != kind:
            continue
        try:
            nums = [int(v) for v in vals.split(",")]
        except ValueError:
            nums = []
        blocks = nums[:-2]
        if (len(nums) != len(names) or any(v <= 0 or v & (v - 1) for v in blocks + nums[-2:-1])
                or nums[-1] < 1):
            raise ValueError(
                f"{env}: {kind}= needs {len(names)} integers ({len(names) - 2} power-of-two block sizes "
                f"{', '.join(names[:-2])}, a power-of-two num_warps, num_stages >= 1), got {vals!r}")
        found = dict(zip(names, nums))
    return found


# ----------------------------------------------------------------------------- device limits
@dataclass(frozen=True)
class DeviceLimits:
    smem_per_block: int  # bytes, the opt-in maximum one block may use
    smem_per_sm: int  # bytes, of which 1 KiB is reserved per resident block
    regs_per_sm: int
    max_warps: int  # resident warps per SM
    max_blocks: int = 32  # resident blocks per SM
    sms: int = 0  # multiprocessors (0: unknown, no device)


# The no-GPU fallback (the compile check, the interpreter): what sm_90 (H100/H200) and
# sm_80 (A100) report. On a GPU :func:`device_limits` reads the device instead.
ARCH_LIMITS = {
    90: DeviceLimits(smem_per_block=232448, smem_per_sm=233472, regs_per_sm=65536, max_warps=64),
    80: DeviceLimits(smem_per_block=166912, smem_per_sm=167936, regs_per_sm=65536, max_warps=64),
}


def arch_of(device: torch.device) -> int:
    """90 for Hopper and newer, 80 below (and off the GPU): the config lists' two classes."""
    return 90 if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9 else 80


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _cuda_limits(index: int) -> DeviceLimits:
    props = torch.cuda.get_device_properties(index)
    smem_block = getattr(props, "shared_memory_per_block_optin", 0)
    if not smem_block:  # an older torch: Triton's driver reads the same attribute
        smem_block = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return DeviceLimits(smem_per_block=int(smem_block), smem_per_sm=int(props.shared_memory_per_multiprocessor),
                        regs_per_sm=int(props.regs_per_multiprocessor),
                        max_warps=int(props.max_threads_per_multi_processor) // 32, sms=props.multi_processor_count)


def device_limits(device: torch.device) -> DeviceLimits:
    """This device's limits (read once per device); off the GPU the sm_90 figures."""
    if device.type == "cuda":
        return _cuda_limits(device_index(device))
    return ARCH_LIMITS[90]


def occupancy(registers: int, num_warps: int, shared_bytes: int, regs_per_sm: int = 65536,
              smem_per_sm: int = 233472, max_warps: int = 64, max_blocks: int = 32) -> int:
    """Blocks of a kernel one SM holds at once (the occupancy calculator's rule).

    Registers are allocated per warp in units of 256 (8 per thread), shared memory per
    block plus the 1 KiB the runtime reserves for each resident block. The launchers of
    persistent kernels size their grids with this, from the compiled kernel's figures.
    """
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    warps = max(num_warps, 1)
    by_regs = (regs_per_sm // regs_per_warp) // warps
    by_smem = smem_per_sm // (shared_bytes + 1024)
    return max(0, min(by_regs, by_smem, max_blocks, max_warps // warps))


def ctas_per_sm(arch: int, registers: int, num_warps: int, shared_bytes: int) -> int:
    """:func:`occupancy` on the per-SM limits of compute capability ``arch`` (no GPU)."""
    lim = ARCH_LIMITS.get(arch, ARCH_LIMITS[80])
    return occupancy(registers, num_warps, shared_bytes, lim.regs_per_sm, lim.smem_per_sm, lim.max_warps,
                     lim.max_blocks)


def resident(compiled, num_warps: int, device: torch.device) -> int:
    """Programs of a compiled kernel (``kernel.warmup(...)``) one SM of ``device`` holds."""
    compiled._init_handles()
    lim = device_limits(device)
    return max(1, occupancy(compiled.n_regs, num_warps, compiled.metadata.shared, lim.regs_per_sm,
                            lim.smem_per_sm, lim.max_warps, lim.max_blocks))


# ----------------------------------------------------------------------------- TMA
def _tma_allocator(size: int, alignment: int, stream):
    # global scratch for the descriptors a program builds (128 bytes each)
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_tma_allocator(device: torch.device) -> None:
    """Device-side descriptors need Triton's scratch allocator; set ours unless the caller
    set one (a context variable: backward and checkpoint-recompute threads need it too)."""
    if device.type != "cuda":
        return
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_tma_allocator)


# ----------------------------------------------------------------------------- the tuner
class Tuner:
    """Picks, once per key, the fastest config of a list by timing real launches.

    One tuner for both ops, and this one rather than ``triton.autotune``: a config of the
    block-diagonal kernels changes more than constexprs (their grids are persistent, SMs x
    the programs one SM holds of that compiled config, and their tile tables are built for
    the config's block sizes), which ``triton.autotune`` cannot express (a config sets
    constexprs, warps and stages; the grid sees only the meta-parameters). Timing a closure
    ``launch(config)`` serves both: the attention launchers build their grid from the config
    as their ``triton.autotune`` grid lambdas did. The measurement is autotune's
    (``triton.testing.do_bench``, its default warmup / repetitions, median); the key is what
    the caller passes (shape buckets, never a raw length: STYLE); the kernels it times write
    their outputs without accumulating, so a timed launch leaves them as one launch would.
    A config the device cannot run (``OutOfResources``, a ptxas error) is skipped; any
    other error propagates. ``TRITON_PRINT_AUTOTUNING=1`` prints each choice.
    """

    def __init__(self, name: str):
        self.name = name
        self.best: Dict[Hashable, object] = {}

    def choose(self, key: Hashable, configs: Sequence, launch: Callable[[object], None]):
        if len(configs) == 1:
            return configs[0]
        if key in self.best:
            return self.best[key]
        from triton.runtime.errors import OutOfResources, PTXASError
        from triton.testing import do_bench

        timings = {}
        for i, cfg in enumerate(configs):
            try:
                timings[i] = do_bench(lambda: launch(cfg))
            except (OutOfResources, PTXASError):
                continue
        if not timings:
            raise RuntimeError(f"{self.name}: no Triton config of {list(configs)} could run (key {key})")
        best = configs[min(timings, key=timings.get)]
        self.best[key] = best
        if getattr(getattr(triton, "knobs", None), "autotuning", None) is not None and triton.knobs.autotuning.print:
            print(f"{self.name}: key {key}: {best} ({min(timings.values()):.4f} ms)")
        return best
