"""Public functions, one module per kernel family."""
from .block_sparse import block_sparse_attention
from .decode import decode_attention
from .stripe import stripe_attention
from .topk import topk_attention, topk_indices

__all__ = ["block_sparse_attention", "decode_attention", "stripe_attention", "topk_attention",
           "topk_indices"]
