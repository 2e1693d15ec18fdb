"""sparse_attn: Triton and CUDA kernels for sparse attention in long-context LLM prefill."""
from ._info import info
from .integrations import patch, unpatch
from .layout import BlockLayout, StripeLayout, TopKLayout
from .module import SparseAttention, sparse_attention
from .ops.block_sparse import block_sparse_attention
from .ops.decode import decode_attention
from .ops.stripe import stripe_attention
from .ops.topk import topk_attention, topk_indices
from .reference import (block_sparse_attention_ref, dense_attention_ref, stripe_attention_ref,
                        topk_attention_ref)

__version__ = "0.1.0"

__all__ = [
    "BlockLayout",
    "SparseAttention",
    "StripeLayout",
    "TopKLayout",
    "block_sparse_attention",
    "block_sparse_attention_ref",
    "decode_attention",
    "dense_attention_ref",
    "info",
    "patch",
    "sparse_attention",
    "stripe_attention",
    "stripe_attention_ref",
    "topk_attention",
    "topk_attention_ref",
    "topk_indices",
    "unpatch",
    "__version__",
]
