"""Window semantics shared by every attention path (kernels, PyTorch path, reference).

A query at row ``i`` of a sequence with ``seqlen_q`` queries and ``seqlen_k`` keys sits at
key position ``i + seqlen_k - seqlen_q`` (bottom-right alignment, as in FlashAttention-2)
and attends the keys ``j`` with::

    i + (seqlen_k - seqlen_q) - left  <=  j  <=  i + (seqlen_k - seqlen_q) + right

``left == -1`` / ``right == -1`` drop that bound; ``causal=True`` forces ``right = 0``.

The user-facing ``window_size`` argument takes three forms (one table in the README):

===================  =========================  ===============================
``window_size``       causal=True                causal=False
===================  =========================  ===============================
``(left, right)``     ``(left, 0)``              ``(left, right)``
``W`` (int >= 1)      ``(min(W, L) - 1, 0)``     ``(Wc // 2, (Wc - 1) // 2)``, Wc = min(W, L)
``"sqrt"``            ``(floor(sqrt(L)) - 1, 0)``  as ``W = floor(sqrt(L))``
===================  =========================  ===============================

``L`` is the key length of the sequence (per sequence for packed batches); an integer or
``"sqrt"`` window always means "this many keys including the query's own position", at
least one. ``sliding_window=W`` as Hugging Face / Mistral configs spell it is the integer
form: ``(W - 1, 0)`` for causal models.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Tuple, Union

WindowArg = Union[None, int, str, Tuple[int, int]]  # or integer-like: see parse_window

# Kernel-side encoding of the window (a constexpr of the Triton kernels):
MODE_EXPLICIT = 0  # (left, right) given directly; -1 = unbounded
MODE_KEYS = 1  # W keys including self, W clamped to the sequence's key length
MODE_SQRT = 2  # W = floor(sqrt(seqlen_k)) keys


@dataclass(frozen=True)
class WindowSpec:
    """A parsed ``window_size``: what the kernels receive.

    ``mode`` is one of MODE_EXPLICIT / MODE_KEYS / MODE_SQRT. For MODE_EXPLICIT, ``left`` and
    ``right`` are final (causal already applied). For MODE_KEYS, ``keys`` is W. For
    MODE_SQRT nothing else is needed. ``resolve(seqlen_k)`` gives the (left, right) pair a
    sequence of that key length uses.
    """

    mode: int
    left: int = -1
    right: int = -1
    keys: int = 0
    causal: bool = False

    def resolve(self, seqlen_k: int) -> Tuple[int, int]:
        if self.mode == MODE_EXPLICIT:
            return self.left, self.right
        w = isqrt(seqlen_k) if self.mode == MODE_SQRT else min(self.keys, seqlen_k)
        return keys_to_window(max(w, 1), self.causal)

    @property
    def is_full(self) -> bool:
        """True when no window bound applies at all (plain, non-causal attention)."""
        return self.mode == MODE_EXPLICIT and self.left < 0 and self.right < 0


def isqrt(n: int) -> int:
    """floor(sqrt(n)) for n >= 0, exact (the kernels use the same integer rule)."""
    return math.isqrt(max(int(n), 0))


def keys_to_window(w: int, causal: bool) -> Tuple[int, int]:
    """W keys including self -> (left, right): causal (W-1, 0), else centred (W//2, (W-1)//2)."""
    if causal:
        return w - 1, 0
    return w // 2, (w - 1) // 2


def sliding_window_to_window_size(sliding_window: int | None) -> Tuple[int, int]:
    """Hugging Face / Mistral ``config.sliding_window = W`` -> ``(W - 1, 0)``; None -> (-1, 0)."""
    if sliding_window is None:
        return (-1, 0)
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive int (keys including self) or None, got {sliding_window!r}")
    return (sliding_window - 1, 0)


def _int_like(value, what: str) -> int:
    """``operator.index`` of ``value``: a Python int, a numpy integer, a 0-d integer tensor.

    Bools and floats are refused (``True`` is not a window, ``4.0`` is a typo or a bug).
    """
    dtype = str(getattr(value, "dtype", ""))
    if isinstance(value, bool) or type(value).__name__ == "bool_" or dtype in ("torch.bool", "bool"):
        raise TypeError(f"{what} must be an int, got a bool ({value!r})")
    if getattr(value, "ndim", 0) != 0:
        raise TypeError(f"{what} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {value!r}") from None


def parse_window(window_size: WindowArg, causal: bool) -> WindowSpec:
    """Validate a user ``window_size`` and turn it into a :class:`WindowSpec`.

    Integer-like values are accepted wherever an int is (``operator.index``: numpy integers,
    0-d integer tensors; a pair may be a 2-element integer tensor or array, as
    FlashAttention's tests pass ``torch.randint(0, seqlen_k, (2,))``). Raises
    ``ValueError``/``TypeError`` naming ``window_size`` for anything else.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window_size is None:
        window_size = (-1, -1)
    if isinstance(window_size, str):
        if window_size != "sqrt":
            raise ValueError(f'window_size must be (left, right), an int >= 1 or "sqrt", got {window_size!r}')
        return WindowSpec(MODE_SQRT, causal=causal)
    if getattr(window_size, "ndim", None) == 1 or isinstance(window_size, (tuple, list)):
        if len(window_size) != 2:
            raise TypeError(f'window_size must be (left, right), an int >= 1 or "sqrt", got {window_size!r}')
        left, right = (_int_like(val, f"window_size {name}") for name, val in zip(("left", "right"), window_size))
        for name, val in (("left", left), ("right", right)):
            if val < -1:
                raise ValueError(f"window_size {name} must be >= -1 (-1 means unbounded), got {val}")
        if causal:
            right = 0
        return WindowSpec(MODE_EXPLICIT, left=left, right=right, causal=causal)
    try:
        keys = _int_like(window_size, "window_size")
    except TypeError:
        raise TypeError(f'window_size must be (left, right), an int >= 1 or "sqrt", got {window_size!r}') from None
    if keys < 1:
        raise ValueError(f"window_size as an int is a number of keys including self and must be >= 1, got {keys}")
    return WindowSpec(MODE_KEYS, keys=keys, causal=causal)


def resolve_window(window_size: WindowArg, causal: bool, seqlen_k: int) -> Tuple[int, int]:
    """The (left, right) pair, -1 = unbounded, a sequence with ``seqlen_k`` keys uses."""
    return parse_window(window_size, causal).resolve(seqlen_k)


def packed_sequences(cu_seqlens_q, cu_seqlens_k, spec: WindowSpec):
    """Yield ``(qs, qe, ks, ke, left, right)`` per packed sequence, its window resolved for
    its own key length (reads cu_seqlens on the host)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        left, right = spec.resolve(ck[i + 1] - ck[i])
        yield cq[i], cq[i + 1], ck[i], ck[i + 1], left, right


def band_mask(seqlen_q: int, seqlen_k: int, left: int, right: int, device=None, rows=None, cols=None):
    """Dense boolean mask (seqlen_q, seqlen_k): True where query i may attend key j.

    ``rows=(start, stop)`` / ``cols=(start, stop)`` return only those query rows / key columns
    (same alignment): the PyTorch path masks one chunk's scores with it.
    """
    import torch

    start, stop = rows if rows is not None else (0, seqlen_q)
    lo, hi = cols if cols is not None else (0, seqlen_k)
    i = torch.arange(start, stop, device=device).unsqueeze(1) + (seqlen_k - seqlen_q)
    j = torch.arange(lo, hi, device=device).unsqueeze(0)
    mask = torch.ones(stop - start, hi - lo, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    return mask


def keys_seen(seqlen_q: int, seqlen_k: int, left: int, right: int) -> int:
    """Number of (query, key) pairs inside the band: the useful work for FLOP counts."""
    off = seqlen_k - seqlen_q
    total = 0
    # closed form per row would be tidy, but this is only used for reporting (O(L)).
    for i in range(seqlen_q):
        lo = 0 if left < 0 else max(0, i + off - left)
        hi = seqlen_k - 1 if right < 0 else min(seqlen_k - 1, i + off + right)
        total += max(0, hi - lo + 1)
    return total
