"""Public functions, one module per kernel family."""
from .block_sparse import block_sparse_attention
from .decode import decode_attention

__all__ = ["block_sparse_attention", "decode_attention"]
