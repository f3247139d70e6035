from .op import block_diag_matmul
from .reference import block_diag_matmul_reference

__all__ = ["block_diag_matmul", "block_diag_matmul_reference"]
