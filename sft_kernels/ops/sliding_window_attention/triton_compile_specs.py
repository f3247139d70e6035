"""GPU compile specs of the sliding-window attention kernels: every kernel in every
autotune configuration, in the format ``sft_kernels.testing.compile_check`` consumes (found
there by this module's name, ``triton*``, and its ``compile_specs()``). Test tooling: nothing
at run time imports it."""

from __future__ import annotations

import inspect

import triton

from ...window import MODE_EXPLICIT, MODE_SQRT
from .triton_configs import _CONFIGS, _FP32_CONFIGS, _TF32_CONFIGS, _entry_archs
from .triton_jit import _swa_bwd_dkdv_kernel, _swa_bwd_dq_kernel, _swa_fwd_kernel

_KERNELS = {"fwd": _swa_fwd_kernel, "dkdv": _swa_bwd_dkdv_kernel, "dq": _swa_bwd_dq_kernel}
_TENSOR_ARGS = {
    "fwd": ("Q", "K", "V", "O"),
    "dkdv": ("Q", "K", "V", "DO", "DK", "DV"),
    "dq": ("Q", "K", "V", "DO", "DQ"),
}


def _signature(kind: str, dtype: str, absent=()) -> dict:
    """Runtime argument types; the pointers named in ``absent`` are left out (the launch
    passes None: a constexpr)."""
    sig = {}
    for name in _param_names(kind):
        if name in absent or (name.isupper() and name not in _TENSOR_ARGS[kind] + ("LSE", "DELTA", "SINKS", "DSINK")):
            continue  # constexpr
        if name in _TENSOR_ARGS[kind]:
            sig[name] = f"*{dtype}"
        elif name in ("LSE", "DELTA", "SINKS", "DSINK"):
            sig[name] = "*fp32"
        elif name.startswith("cu_seqlens"):
            sig[name] = "*i32"
        elif name in ("sm_scale", "softcap"):
            sig[name] = "fp32"
        elif name.endswith("_strides"):  # one tuple per tensor: (batch, row, head) or (batch, head)
            sig[name] = ("i32",) * (2 if name == "lse_strides" else 3)
        else:
            sig[name] = "i32"
    return sig


def _param_names(kind: str):
    fn = _KERNELS[kind]
    return tuple(inspect.signature(getattr(fn, "fn", fn)).parameters)


def compile_spec(kind: str, dtype: str, head_dim: int, cfg, mode: int = MODE_EXPLICIT, varlen: bool = False,
                 causal: bool = True, tma: bool = False, first: bool = False, softcap: bool = False,
                 sinks: bool = False, dot_prec: str = "") -> dict:
    """One compile-check spec (``sft_kernels.testing.compile_check``) of ``kind`` in
    ``dtype`` ("fp16"/"bf16"/"fp32") at ``cfg = (BLOCK_M, BLOCK_N, num_warps, num_stages[,
    archs])``; ``softcap`` / ``sinks`` compile those score modifiers in (sinks: the forward
    and dQ, where their gradient is summed; dK/dV has none). Pointers a launch leaves out
    (``cu_seqlens`` unpacked, ``SINKS`` / ``DSINK`` without sinks) are constexpr None, as the
    launchers pass them. ``dot_prec``: the dots' ``input_precision``, by default what a
    launch with torch's defaults gets (fp32: "ieee", FMA units, no tensor-core MMA expected;
    "tf32" is fp32 under ``allow_tf32``)."""
    dot_prec = dot_prec or ("ieee" if dtype == "fp32" else "tf32")
    bm, bn, warps, stages = cfg[:4]
    archs = (90,) if tma else tuple(_entry_archs(cfg))
    absent = (() if varlen else ("cu_seqlens_q", "cu_seqlens_k")) + (() if sinks else ("SINKS", "DSINK"))
    sig = _signature(kind, dtype, absent)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=bm, BLOCK_N=bn,
                      WINDOW_MODE=mode, CAUSAL=causal, IS_VARLEN=varlen, UPCAST=False,
                      DOT_PREC=dot_prec, SOFTCAP=softcap)
    constexprs.update({n: None for n in absent if n in _param_names(kind)})
    if kind == "fwd":
        constexprs["USE_TMA"] = tma
    if kind in ("fwd", "dq"):
        constexprs["HAS_SINKS"] = sinks
    tags = (("tma," if tma else "") + ("softcap," if softcap else "") + ("sinks," if sinks else "")
            + f"D={head_dim},{dtype}{',tf32' if dtype == 'fp32' and dot_prec == 'tf32' else ''},BM={bm},BN={bn},w={warps},s={stages}")
    return {
        "name": f"swa_{kind}[{tags}" + (",varlen,sqrt" if varlen else "") + "]",
        "fn": _KERNELS[kind],
        "signature": sig,
        "constexprs": constexprs,
        "num_warps": warps,
        "num_stages": stages,
        "expect_mma": dot_prec != "ieee",  # IEEE fp32 dots run on the FMA units
        "mma_rows": bn if kind == "dkdv" else bm,  # the dots' rows: the key tile in dK/dV
        "first_choice": first,  # the first entry of its autotune list (the report's table)
        # TMA is a Hopper engine: that variant is only ever launched on sm_90 (as are the
        # Hopper-only list entries)
        "archs": archs,
        # what a launch on (batch, seqlen, heads, head_dim) tensors with head_dim a
        # multiple of 16 gets: Triton specialises such strides as 16-divisible
        "divisible_by_16": [n for n, t in sig.items() if n.endswith("_strides") or t.startswith("*")],
    }


def compile_specs():
    """Every kernel in every autotune configuration, fp16 and bf16, for
    ``sft_kernels.testing.compile_check`` (the forward also in its TMA variant).

    Register and shared-memory use depend on the tile shapes, head_dim class and dtype, not
    on the window mode, so the config sweep uses causal explicit windows; a packed
    ``"sqrt"`` variant and head_dim 80 (a padded BLOCK_D) per kernel cover the other code
    paths at each list's first config.
    """
    specs = []
    for kind, by_dim in _CONFIGS.items():
        for head_dim, configs in by_dim.items():
            for i, cfg in enumerate(configs):
                for dtype in ("fp16", "bf16"):
                    first = i == 0 and dtype == "bf16"
                    specs.append(compile_spec(kind, dtype, head_dim, cfg, first=first))
                    if kind == "fwd":
                        specs.append(compile_spec(kind, dtype, head_dim, cfg, tma=True, first=first))
        specs.append(compile_spec(kind, "bf16", 80, by_dim[128][0]))
        specs.append(compile_spec(kind, "bf16", 128, by_dim[128][0], mode=MODE_SQRT, varlen=True))
        # the score modifiers (Gemma 2's softcap, GPT-OSS's sinks) at every head_dim's first
        # choice on each arch: they must add no spill / serialisation either
        for head_dim, configs in by_dim.items():
            firsts = [configs[0]]
            if 80 not in _entry_archs(configs[0]):
                firsts += [next(c for c in configs if 80 in _entry_archs(c))]
            for cfg in firsts:
                specs.append(compile_spec(kind, "bf16", head_dim, cfg, softcap=True))
                if kind in ("fwd", "dq"):
                    specs.append(compile_spec(kind, "bf16", head_dim, cfg, sinks=True, softcap=kind == "dq"))
            if kind == "fwd":
                specs.append(compile_spec(kind, "bf16", head_dim, configs[0], sinks=True, softcap=True, tma=True))
        if kind == "fwd":
            specs.append(compile_spec(kind, "bf16", 80, by_dim[128][0], tma=True))
            specs.append(compile_spec(kind, "bf16", 128, by_dim[128][0], mode=MODE_SQRT, varlen=True, tma=True))
    return specs


def fp32_compile_specs():
    """fp32 inputs on their own lists: every entry of ``triton_configs._FP32_CONFIGS`` with
    IEEE dots (torch's default) and of ``_TF32_CONFIGS`` with tf32 dots (``allow_tf32``); the
    pointer forward only (the launcher takes tensor descriptors for fp16/bf16 alone)."""
    specs = []
    for table, dot_prec in ((_FP32_CONFIGS, "ieee"), (_TF32_CONFIGS, "tf32")):
        for kind, by_dim in table.items():
            for head_dim, configs in by_dim.items():
                for i, cfg in enumerate(configs):
                    specs.append(compile_spec(kind, "fp32", head_dim, cfg, first=i == 0, dot_prec=dot_prec))
    return specs
