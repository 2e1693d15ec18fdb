"""Pure-PyTorch references: the ground truth for tests and the CPU path. Never imports Triton."""
from .dense import attention_ref, dense_attention_ref
from .block_sparse import block_sparse_attention_ref
from .decode import decode_attention_ref
from .stripe import stripe_attention_ref
from .topk import topk_attention_ref

__all__ = ["attention_ref", "dense_attention_ref", "block_sparse_attention_ref",
           "decode_attention_ref", "stripe_attention_ref", "topk_attention_ref"]
