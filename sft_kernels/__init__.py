"""Fused kernels for long-sequence supervised fine-tuning.

- :func:`sliding_window_attention`: attention over a band of keys, O(L * w).
- :func:`block_diag_matmul`: a block-diagonal merged weight applied in one grouped kernel.
- :func:`context_parallel_attention`: sliding-window attention over a sequence split across
  ranks, by halo exchange (traffic independent of the sequence length).

``import sft_kernels`` never imports deepspeed or transformers; their integrations live
in :mod:`sft_kernels.integrations` and are imported on demand.
"""

__version__ = "0.1.0"

from .backends import BACKENDS, backend_status  # noqa: E402
from .modules.block_diagonal_linear import BlockDiagonalLinear  # noqa: E402
from .modules.sft_attention import SFTAttention  # noqa: E402
from .ops.block_diag import block_diag_matmul  # noqa: E402
from .ops.block_diag.reference import block_diag_matmul_reference  # noqa: E402
from .ops.sliding_window_attention.op import sliding_window_attention  # noqa: E402
from .ops.sliding_window_attention.reference import sliding_window_attention_reference  # noqa: E402
from .parallel.context_parallel import context_parallel_attention  # noqa: E402
from .window import WindowSpec, parse_window, resolve_window, sliding_window_to_window_size  # noqa: E402

__all__ = [
    "BACKENDS",
    "BlockDiagonalLinear",
    "SFTAttention",
    "WindowSpec",
    "backend_status",
    "block_diag_matmul",
    "block_diag_matmul_reference",
    "context_parallel_attention",
    "parse_window",
    "resolve_window",
    "sliding_window_attention",
    "sliding_window_attention_reference",
    "sliding_window_to_window_size",
]
