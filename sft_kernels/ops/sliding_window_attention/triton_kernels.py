"""Launchers of the sliding-window attention kernels (``triton_jit.py``): the tuner over
the config lists (``triton_configs.py``), the argument plumbing (strides, packed sequences,
absent pointers, batches split over several grids, the tensor-descriptor switch) and the
grids. ``op.py`` imports ``swa_fwd_triton`` / ``swa_bwd_triton`` from here (lazily:
``import sft_kernels`` does not import triton); the inputs arrive validated.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...window import MODE_EXPLICIT
from .._triton_utils import Tuner, arch_of, dot_precision, ensure_tma_allocator, interpreting, upcast_dots
from .triton_compile_specs import compile_spec  # noqa: F401 (re-exported: scripts/sweep_triton_configs.py)
from .triton_configs import _CONFIGS, _INTERPRET_CONFIG, config_list  # noqa: F401 (tests read them here)
from .triton_jit import _bwd_preprocess_kernel, _swa_bwd_dkdv_kernel, _swa_bwd_dq_kernel, _swa_fwd_kernel

# ----------------------------------------------------------------------------- launchers
_MAX_GRID_YZ = 65535  # CUDA's limit on grid.y and grid.z

_TUNER = Tuner("sliding_window_attention")
_TUNE_KEYS = ("HEAD_DIM", "IS_VARLEN", "WINDOW_MODE", "USE_TMA")  # with tune_bucket and the dtypes


class _Tuned:
    """A kernel launched with the config :data:`_TUNER` picks from ``configs``:
    ``tuned[grid](*args, tune_bucket=b, **constexprs)``, ``grid`` a function of the config's
    meta-parameters. The key is the kind, the config list, the dtypes and the shape-class
    constexprs (HEAD_DIM, IS_VARLEN, WINDOW_MODE, USE_TMA, ...) plus ``tune_bucket`` (the
    band's width class), never a raw length; ``tune_bucket`` is the tuner's, not an
    argument of the kernel."""

    def __init__(self, kernel, kind: str, configs):
        self.kernel, self.kind = kernel, kind
        self.configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                        for bm, bn, w, s in configs]

    def __getitem__(self, grid):
        def launch(*args, tune_bucket: int, **kwargs):
            def run(cfg):
                meta = dict(kwargs, **cfg.kwargs)
                self.kernel[grid(meta)](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

            key = (self.kind, tuple(str(c) for c in self.configs), tune_bucket,
                   tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor)),
                   tuple(kwargs.get(k) for k in _TUNE_KEYS))
            run(_TUNER.choose(key, self.configs, run))

        return launch


def _autotuned(kernel, kind: str):
    """The tuned launcher of ``kernel`` for a head_dim, an arch, fp32 or not and tf32 dots or
    not: the config list depends on all four (and on a pinned config, read at each call)."""

    def get(head_dim: int, arch: int = 90, fp32: bool = False, tf32: bool = False):
        return _Tuned(kernel, kind, tuple(config_list(kind, head_dim, arch, fp32, tf32)))

    return get


_fwd_tuned = _autotuned(_swa_fwd_kernel, "fwd")
_dkdv_tuned = _autotuned(_swa_bwd_dkdv_kernel, "dkdv")
_dq_tuned = _autotuned(_swa_bwd_dq_kernel, "dq")


def tune_bucket(left: int, right: int, mode: int, max_seqlen_k: int) -> int:
    """Shape bucket for autotuning: log2 of the band width (or of the length, unbounded)."""
    if mode != MODE_EXPLICIT or left < 0 or right < 0:
        width = max_seqlen_k if mode == MODE_EXPLICIT else max(1, int(max_seqlen_k**0.5))
    else:
        width = left + right + 1
    return max(1, min(int(width), 1 << 16)).bit_length()


def _empty_like(t):
    """Contiguous output allocation (tests replace it to poison outputs and catch unwritten
    elements)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def _tma_ok(*tensors) -> bool:
    """Whether the forward may use tensor descriptors for these (b, s, h, d) / (t, h, d)
    tensors: sm_90, fp16/bf16, a 16-byte aligned base and 16-byte multiple strides (what
    the copy engine needs). ``SFT_KERNELS_SWA_TMA=0`` turns it off, ``=1`` forces it (also
    under the interpreter, which emulates descriptors: how the CPU tests run this path)."""
    mode = os.environ.get("SFT_KERNELS_SWA_TMA", "auto")
    if mode == "0" or not hasattr(tl, "make_tensor_descriptor"):
        return False
    t0 = tensors[0]
    if mode != "1":
        if t0.device.type != "cuda" or torch.cuda.get_device_capability(t0.device)[0] != 9:
            return False
        if t0.dtype not in (torch.float16, torch.bfloat16):
            return False
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any((s * size) % 16 for s in t.stride()[:-1]) or t.stride(-1) != 1:
            return False
    return True


def _batch_chunks(batch: int):
    """(start, count) pieces of at most 65,535 sequences: one launch each (grid.z)."""
    return [(b0, min(_MAX_GRID_YZ, batch - b0)) for b0 in range(0, batch, _MAX_GRID_YZ)]


def _rows(t, b0, n, varlen):
    """Sequences [b0, b0 + n) of a (batch, ...) tensor; packed tensors are indexed through
    cu_seqlens and stay whole."""
    return t if varlen or (b0 == 0 and n == t.shape[0]) else t[b0:b0 + n]


def _lists(q, meta):
    """What picks the config lists besides the kind: head_dim, arch, fp32, tf32 dots."""
    return q.shape[-1], arch_of(q.device), q.dtype == torch.float32, meta["DOT_PREC"] == "tf32"


def _common(q, k, spec, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    varlen = cu_seqlens_q is not None
    d = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    meta = dict(
        HEAD_DIM=d, BLOCK_D=block_d, WINDOW_MODE=spec.mode, CAUSAL=spec.causal, IS_VARLEN=varlen,
        UPCAST=upcast_dots(q.device), DOT_PREC=dot_precision(q.dtype),
    )
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        lq, lk = max_seqlen_q, max_seqlen_k
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        cu_q = cu_k = None  # absent: a constexpr None in the kernels
    if q.shape[-2] > _MAX_GRID_YZ:
        raise ValueError(f"sliding_window_attention: backend='triton' launches one grid row per head; "
                         f"{q.shape[-2]} query heads exceed {_MAX_GRID_YZ}")
    scalars = (spec.left, spec.right, spec.keys, float(scale), tune_bucket(spec.left, spec.right, spec.mode, lk))
    return batch, lq, lk, cu_q, cu_k, scalars, meta


def _cu(cu, b0, varlen):
    return cu[b0:] if varlen and b0 else cu


def _bsh(t, varlen):
    """(batch, row, head) strides, one kernel argument; packed input has no batch stride."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(lse, varlen):
    """(batch, head) strides of an LSE / delta tensor, one kernel argument."""
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def swa_fwd_triton(q, k, v, spec, scale, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
                   softcap=0.0, sinks=None):
    """Launch the forward. Inputs already validated; last dim contiguous; ``sinks`` None or
    (heads_q,) fp32. -> (out, lse)."""
    varlen = cu_seqlens_q is not None
    batch, lq, lk, cu_q, cu_k, (left, right, keys, scale, bucket), meta = _common(
        q, k, spec, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    hq, hkv = q.shape[-2], k.shape[-2]
    out = _empty_like(q)
    lse_shape = (hq, q.shape[0]) if varlen else (batch, hq, lq)
    lse = _empty(lse_shape, torch.float32, q.device)
    if q.numel() == 0:
        return out, lse.fill_(float("-inf"))
    use_tma = _tma_ok(q, k, v, out)
    if use_tma:
        ensure_tma_allocator(q.device)
    for b0, nb in _batch_chunks(batch):
        qc, kc, vc, oc, lc = (_rows(t, b0, nb, varlen) for t in (q, k, v, out, lse))
        grid = lambda meta_: (triton.cdiv(lq, meta_["BLOCK_M"]), hq, nb)  # noqa: E731
        _fwd_tuned(*_lists(q, meta))[grid](
            qc, kc, vc, oc, lc, sinks, _cu(cu_q, b0, varlen), _cu(cu_k, b0, varlen),
            _bsh(qc, varlen), _bsh(kc, varlen), _bsh(vc, varlen), _bsh(oc, varlen), _lse_strides(lc, varlen),
            lq, lk, hq // hkv, left, right, keys, scale, float(softcap), tune_bucket=bucket, USE_TMA=use_tma,
            SOFTCAP=softcap > 0, HAS_SINKS=sinks is not None, **meta,
        )
    return out, lse


def swa_bwd_triton(do, q, k, v, out, lse, spec, scale, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
                   max_seqlen_k=0, softcap=0.0, sinks=None):
    """Launch the backward: delta pre-pass (and the sinks' gradient), dK/dV over key tiles,
    dQ over query tiles. -> (dq, dk, dv, dsinks); dsinks is None without sinks."""
    varlen = cu_seqlens_q is not None
    batch, lq, lk, cu_q, cu_k, (left, right, keys, scale, bucket), meta = _common(
        q, k, spec, scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    hq, hkv = q.shape[-2], k.shape[-2]
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    dsinks = None if sinks is None else torch.zeros(hq, dtype=torch.float32, device=q.device)
    if q.numel() == 0 or k.numel() == 0:  # (op.py does not launch these) no key: dsinks = 0 too
        return dq.zero_(), dk.zero_(), dv.zero_(), dsinks
    delta = _empty_like(lse)
    pre_m = 16 if interpreting() else 64
    cap = dict(SOFTCAP=softcap > 0)
    for b0, nb in _batch_chunks(batch):
        oc, doc, qc, kc, vc, lc, dc, dqc, dkc, dvc = (
            _rows(t, b0, nb, varlen) for t in (out, do, q, k, v, lse, delta, dq, dk, dv))
        cq, ck = _cu(cu_q, b0, varlen), _cu(cu_k, b0, varlen)
        _bwd_preprocess_kernel[(triton.cdiv(lq, pre_m), hq, nb)](
            oc, doc, dc, cq, _bsh(oc, varlen), _bsh(doc, varlen), _lse_strides(lc, varlen), lq,
            HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"], BLOCK_M=pre_m, IS_VARLEN=varlen,
        )
        common = (_bsh(qc, varlen), _bsh(kc, varlen), _bsh(vc, varlen), _bsh(doc, varlen))
        grid = lambda meta_: (triton.cdiv(lk, meta_["BLOCK_N"]), hkv, nb)  # noqa: E731
        _dkdv_tuned(*_lists(q, meta))[grid](
            qc, kc, vc, doc, lc, dc, dkc, dvc, cq, ck, *common, _bsh(dkc, varlen), _bsh(dvc, varlen),
            _lse_strides(lc, varlen), lq, lk, hq // hkv, left, right, keys, scale, float(softcap),
            tune_bucket=bucket, **cap, **meta,
        )
        grid = lambda meta_: (triton.cdiv(lq, meta_["BLOCK_M"]), hq, nb)  # noqa: E731
        dq_tuned = _dq_tuned(*_lists(q, meta))
        # one slot per (sequence, head, query tile) at the smallest tile of the list; zeros: a
        # tile past its sequence's end returns before writing its slot
        tiles, dsink_part = 0, None
        if sinks is not None:
            tiles = triton.cdiv(lq, min(c.kwargs["BLOCK_M"] for c in dq_tuned.configs))
            dsink_part = torch.zeros((nb, hq, tiles), dtype=torch.float32, device=q.device)
        dq_tuned[grid](
            qc, kc, vc, doc, lc, dc, dqc, sinks, dsink_part, cq, ck, *common, _bsh(dqc, varlen),
            _lse_strides(lc, varlen), lq, lk, hq // hkv, left, right, keys, scale, float(softcap), tiles,
            tune_bucket=bucket, HAS_SINKS=sinks is not None, **cap, **meta,
        )
        if sinks is not None:
            dsinks += dsink_part.sum((0, 2))
    return dq, dk, dv, dsinks
