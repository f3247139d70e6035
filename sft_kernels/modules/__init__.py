from .block_diagonal_linear import BlockDiagonalLinear
from .sft_attention import SFTAttention

__all__ = ["BlockDiagonalLinear", "SFTAttention"]
