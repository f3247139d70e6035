from .block_diagonal_linear import BlockDiagonalLinear

__all__ = ["BlockDiagonalLinear"]
