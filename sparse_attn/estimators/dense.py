"""``dense``: every (causal) tile: the baseline every sparse method is measured against."""
from __future__ import annotations

import dataclasses

import torch

from ..layout import BlockLayout
from .base import register
from .select import BlockEstimator


@register("dense")
@dataclasses.dataclass
class Dense(BlockEstimator):
    """Every key block (every block on or below the diagonal when causal), per KV head.

    Args:
        block_m: query rows per block (64 or 128).
        block_n: key positions per block (64 or 128).

    Returns (from ``estimate``):
        A per-KV-head :class:`BlockLayout` (``H = Hkv``) for ``q``'s and ``k``'s lengths.

    Example:
        >>> est = sparse_attn.estimators.get("dense", block_m=64, block_n=64)
        >>> est.estimate(torch.randn(1, 8, 500, 64), torch.randn(1, 2, 500, 64)).density()
        1.0
    """

    def estimate(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True) -> BlockLayout:
        self._check(q, k, causal)
        return BlockLayout.dense(q.shape[0], k.shape[1], q.shape[2], k.shape[2], causal=causal,
                                 block_m=self.block_m, block_n=self.block_n, device=q.device)
