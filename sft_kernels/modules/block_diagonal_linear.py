"""``BlockDiagonalLinear``: g independent linear maps merged into one block-diagonal layer.

``y = x @ block_diag(W_1, ..., W_g).T + bias``, computed by
:func:`sft_kernels.ops.block_diag.block_diag_matmul` in one grouped kernel. It stores
``sum(m_i n_i)`` weights instead of the dense ``(sum m_i)(sum n_i)``.

State dict (stable): ``weight`` is the flat packed weight (block ``i`` row-major
``(m_i, n_i)`` at offset ``sum_{j<i} m_j n_j``), ``bias`` is ``(sum m_i,)`` (absent when
``bias=False``). The block sizes are constructor arguments, not state.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..ops.block_diag.op import _check_sizes, block_diag_matmul


def _sizes(name: str, value, groups: Optional[int]) -> List[int]:
    if isinstance(value, bool):
        raise TypeError(f"BlockDiagonalLinear: {name} must be an int or a list of ints, got bool")
    if isinstance(value, int):
        if groups is None:
            raise ValueError(
                f"BlockDiagonalLinear: {name}={value} is an int, so groups= is needed to split it "
                "(or pass a list of per-block sizes)"
            )
        if value % groups != 0:
            raise ValueError(f"BlockDiagonalLinear: {name}={value} is not divisible by groups={groups}")
        return [value // groups] * groups
    if isinstance(value, (list, tuple)):
        sizes = list(value)
        if groups is not None and len(sizes) != groups:
            raise ValueError(f"BlockDiagonalLinear: {name} lists {len(sizes)} blocks but groups={groups}")
        return sizes
    raise TypeError(f"BlockDiagonalLinear: {name} must be an int or a list of ints, got {type(value).__name__}")


class BlockDiagonalLinear(nn.Module):
    """A linear layer whose weight is block diagonal: ``diag(W_1, ..., W_g)``.

    Args:
        in_features: per-block input sizes ``[n_1, ..., n_g]``, or the total as an int
            with ``groups=`` (split evenly).
        out_features: per-block output sizes ``[m_1, ..., m_g]``, or an int with ``groups=``.
        bias: learn an additive bias ``(sum m_i,)``.
        groups: number of blocks when sizes are given as ints (checked against lists).
        backend: passed to ``block_diag_matmul`` (``"auto"``, ``"triton"``, ``"torch"``, ``"cuda"``).

    Input ``(..., sum n_i)``, output ``(..., sum m_i)``. Each block is initialised as
    ``nn.Linear(n_i, m_i)`` would be (Kaiming-uniform with its own fan-in ``n_i``; bias
    uniform in ``+-1/sqrt(n_i)``).
    """

    def __init__(
        self,
        in_features: Union[int, Sequence[int]],
        out_features: Union[int, Sequence[int]],
        bias: bool = True,
        groups: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if groups is not None and (isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0):
            raise ValueError(f"BlockDiagonalLinear: groups must be a positive int, got {groups!r}")
        in_sizes = _sizes("in_features", in_features, groups)
        out_sizes = _sizes("out_features", out_features, groups)
        _check_sizes(in_sizes, out_sizes)
        self.in_sizes: List[int] = in_sizes
        self.out_sizes: List[int] = out_sizes
        self.in_features = sum(in_sizes)
        self.out_features = sum(out_sizes)
        self.backend = backend
        numel = sum(m * n for n, m in zip(in_sizes, out_sizes))
        factory = dict(dtype=dtype, device=device)
        self.weight = nn.Parameter(torch.empty(numel, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def groups(self) -> int:
        return len(self.in_sizes)

    @property
    def equal_blocks(self) -> bool:
        return len(set(self.in_sizes)) == 1 and len(set(self.out_sizes)) == 1

    def _offsets(self):
        w = o = 0
        for n, m in zip(self.in_sizes, self.out_sizes):
            yield w, o, n, m
            w += m * n
            o += m

    def blocks(self) -> List[torch.Tensor]:
        """The blocks ``W_i (m_i, n_i)`` as views of the flat weight."""
        return [self.weight[w : w + m * n].view(m, n) for w, _, n, m in self._offsets()]

    def weight_3d(self) -> torch.Tensor:
        """Equal blocks only: the weight viewed as ``(g, m, n)``."""
        if not self.equal_blocks:
            raise ValueError(
                f"BlockDiagonalLinear.weight_3d: blocks are unequal (in {self.in_sizes}, out {self.out_sizes}); "
                "use blocks()"
            )
        return self.weight.view(self.groups, self.out_sizes[0], self.in_sizes[0])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for (w, o, n, m), block in zip(self._offsets(), self.blocks()):
            # nn.Linear.reset_parameters on a (m, n) weight
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(n)
                nn.init.uniform_(self.bias[o : o + m], -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_diag_matmul(x, self.weight, self.in_sizes, self.out_sizes, bias=self.bias, backend=self.backend)

    # --------------------------------------------------------------- merge / split

    @classmethod
    def from_linears(cls, linears: Sequence[nn.Linear], backend: str = "auto") -> "BlockDiagonalLinear":
        """Merge ``nn.Linear`` layers (applied to consecutive input slices) exactly.

        The result computes ``cat([l(x_i) for l, x_i in zip(linears, split(x))], -1)``;
        weights and biases are copied bit for bit. All layers must share dtype and
        device, and either all have a bias or none.
        """
        linears = list(linears)
        if not linears:
            raise ValueError("BlockDiagonalLinear.from_linears: needs at least one nn.Linear")
        for i, lin in enumerate(linears):
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"BlockDiagonalLinear.from_linears: linears[{i}] must be nn.Linear, got {type(lin).__name__}")
        has_bias = {lin.bias is not None for lin in linears}
        if len(has_bias) != 1:
            raise ValueError("BlockDiagonalLinear.from_linears: either every layer has a bias or none does")
        dtypes = {lin.weight.dtype for lin in linears}
        devices = {lin.weight.device for lin in linears}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                f"BlockDiagonalLinear.from_linears: layers must share dtype and device, got {dtypes} on {devices}"
            )
        layer = cls(
            [lin.in_features for lin in linears],
            [lin.out_features for lin in linears],
            bias=has_bias.pop(),
            dtype=dtypes.pop(),
            device=devices.pop(),
            backend=backend,
        )
        with torch.no_grad():
            layer.weight.copy_(torch.cat([lin.weight.detach().reshape(-1) for lin in linears]))
            if layer.bias is not None:
                layer.bias.copy_(torch.cat([lin.bias.detach() for lin in linears]))
        return layer

    def to_linears(self) -> nn.ModuleList:
        """The exact inverse of :meth:`from_linears`: one ``nn.Linear`` per block (copies)."""
        out = nn.ModuleList()
        for (w, o, n, m), block in zip(self._offsets(), self.blocks()):
            lin = nn.Linear(n, m, bias=self.bias is not None, dtype=self.weight.dtype, device=self.weight.device)
            with torch.no_grad():
                lin.weight.copy_(block)
                if self.bias is not None:
                    lin.bias.copy_(self.bias[o : o + m])
            out.append(lin)
        return out

    def to_dense(self) -> torch.Tensor:
        """The dense ``(sum m_i, sum n_i)`` weight ``block_diag(W_1, ..., W_g)`` (zeros materialised)."""
        return torch.block_diag(*[b.detach() for b in self.blocks()])

    def extra_repr(self) -> str:
        dense = self.in_features * self.out_features
        # from the block sizes, not weight.numel(): 0 for a ZeRO-3 partitioned weight, whose
        # repr deepspeed.initialize formats
        ours = sum(m * n for n, m in zip(self.in_sizes, self.out_sizes))
        if self.equal_blocks:
            blocks = f"{self.groups} x ({self.out_sizes[0]}, {self.in_sizes[0]})"
        else:
            pairs = [f"({m}, {n})" for n, m in zip(self.in_sizes, self.out_sizes)]
            if len(pairs) > 8:
                pairs = pairs[:4] + ["..."] + pairs[-2:]
            blocks = "[" + ", ".join(pairs) + "]"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocks(out, in)={blocks}, weights={ours:,} vs dense {dense:,} "
            f"({dense / ours:.1f}x fewer, {100.0 * (1 - ours / dense):.1f}% saved), backend={self.backend!r}"
        )
