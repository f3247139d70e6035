"""What a compile gives back and the verdict on it: :class:`CompileReport` (ptxas's figures
and the dot analysis of one kernel build), :class:`SpecResult` (a spec on an arch: report
or error, and its failures), :func:`spec_failures` (the rules: a compile error, register
spills, shared memory over the chip's limit, a ptxas performance warning, and for
``expect_mma`` specs a redundant MMA layout or no wgmma / mma.sync) and
:func:`report_table` (the Markdown table the CLI prints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from sft_kernels.ops._triton_utils import ARCH_LIMITS, ctas_per_sm

from .ptxas import gpu_name

# Shared memory one block may use (the opt-in maximum), by compute capability.
SMEM_LIMIT = {arch: lim.smem_per_block for arch, lim in ARCH_LIMITS.items()}
WGMMA_ROWS = 64  # the M of a Hopper wgmma: one warpgroup multiplies 64 rows


@dataclass
class CompileReport:
    name: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int  # Triton's dynamic shared memory plus any static smem ptxas reports
    uses_wgmma: bool
    uses_mma: bool
    ptx_len: int
    num_warps: int = 4
    num_stages: int = 3
    stack_bytes: int = 0
    compile_seconds: float = 0.0
    ptxas_log: str = field(default="", repr=False)
    # what the tensor cores are asked to do, read from TTGIR and PTX (see analyse_dots)
    dots: list = field(default_factory=list)  # per tt.dot / warp_group_dot: shape, layout, redundancy
    redundancy: float = 1.0  # MMA work issued / MMA work of the tile shapes (1.0 = none replicated)
    mma_shapes: dict = field(default_factory=dict)  # PTX instruction shape -> static count
    perf_warnings: list = field(default_factory=list)  # ptxas "Potential Performance Loss" lines
    async_copies: int = 0  # cp.async instructions in the PTX (pointer loads pipelined to smem)
    tma_copies: int = 0  # cp.async.bulk.tensor instructions (TMA)

    @property
    def ctas_per_sm(self) -> int:
        return ctas_per_sm(self.arch, self.registers, self.num_warps, self.shared_bytes)


@dataclass
class SpecResult:
    """Outcome of compiling one spec for one architecture."""

    name: str
    arch: int
    report: Optional[CompileReport]
    error: Optional[str]
    failures: list


def spec_failures(spec: dict, arch: int, report: Optional[CompileReport], error: Optional[str]) -> list:
    tag = f"{spec['name']} [{gpu_name(arch)}]"
    if error is not None:
        return [f"{tag}: compile failed: {error}"]
    out = []
    if report.spill_stores or report.spill_loads:
        out.append(f"{tag}: register spills: {report.spill_stores} B stored, {report.spill_loads} B loaded "
                   f"({report.registers} registers, num_warps={report.num_warps})")
    limit = SMEM_LIMIT.get(arch)
    if limit is not None and report.shared_bytes > limit:
        out.append(f"{tag}: shared memory {report.shared_bytes} B over the {limit} B limit "
                   f"(num_stages={report.num_stages})")
    for w in report.perf_warnings:
        out.append(f"{tag}: ptxas performance warning: {w}")
    if spec.get("expect_mma"):
        bad = [d for d in report.dots if d["redundancy"] > 1.0]
        if bad:
            desc = "; ".join(f"{d['op']} {d['mnk'][0]}x{d['mnk'][1]}x{d['mnk'][2]} on warpsPerCTA={d['warps_per_cta']}"
                             f" ({d['redundancy']:.2f}x)" for d in bad)
            out.append(f"{tag}: redundant MMA layout, {report.redundancy:.2f}x the tile's MMA work "
                       f"(num_warps={report.num_warps}): {desc}")
        # wgmma multiplies tiles of WGMMA_ROWS rows: a smaller dot tile is mma.sync's on sm_90 too
        if arch >= 90 and not report.uses_wgmma and spec.get("mma_rows", WGMMA_ROWS) >= WGMMA_ROWS:
            out.append(f"{tag}: expected wgmma in the Hopper build, found "
                       f"{'mma.sync only' if report.uses_mma else 'no tensor-core MMA'}")
        elif arch < 90 and not report.uses_mma:
            out.append(f"{tag}: expected mma.sync, found no tensor-core MMA")
    return out


def report_table(results: Sequence[SpecResult]) -> str:
    """Markdown: registers, spills, shared memory, CTAs/SM, MMA shapes, redundancy and
    ptxas performance warnings per (kernel config, architecture)."""
    lines = ["| kernel config | arch | regs | spill B | smem KiB | CTAs/SM | MMA instructions (static count) "
             "| redundancy | serialised | async copies |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rep = r.report
        if rep is None:
            lines.append(f"| {r.name} | {gpu_name(r.arch)} | compile failed | | | | | | | |")
            continue
        shapes = ", ".join(f"{k} x{v}" for k, v in sorted(rep.mma_shapes.items()))
        copies = f"{rep.tma_copies} TMA" if rep.tma_copies else str(rep.async_copies)
        lines.append(f"| {r.name} | {gpu_name(r.arch)} | {rep.registers} | {rep.spill_stores + rep.spill_loads} "
                     f"| {rep.shared_bytes / 1024:.0f} | {rep.ctas_per_sm} | {shapes} | {rep.redundancy:.2f} "
                     f"| {'yes' if rep.perf_warnings else 'no'} | {copies} |")
    return "\n".join(lines)
