"""sparse_attn: Triton and CUDA kernels for sparse attention in long-context LLM prefill."""
from .layout import BlockLayout
from .ops.block_sparse import block_sparse_attention
from .reference import block_sparse_attention_ref, dense_attention_ref

__version__ = "0.1.0"

__all__ = [
    "BlockLayout",
    "block_sparse_attention",
    "block_sparse_attention_ref",
    "dense_attention_ref",
    "__version__",
]
