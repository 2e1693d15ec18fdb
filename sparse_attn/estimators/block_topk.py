"""``block_topk``: pooled query/key block scores, top blocks by estimated mass or count.

The block scoring of FlexPrefill's query-aware mode and XAttention-like methods: each query block
and each key block is pooled to one vector, the pooled scores are softmaxed over the causally
reachable key blocks of each query block, and the highest blocks are kept under the budget.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..layout import BlockLayout, causal_pair_counts
from .base import register
from .select import BudgetEstimator

POOLS = ("mean", "max")


def pool_blocks(x: torch.Tensor, block: int, how: str = "mean") -> torch.Tensor:
    """Pool ``x [B, H, S, D]`` over blocks of rows: float32 ``[B, H, ceil(S / block), D]``.

    The last block pools only the rows it has. Reads ``x`` in place (views, no padded copy),
    accumulating in float32.
    """
    seqlen = x.shape[2]
    full = seqlen // block

    def reduce(t: torch.Tensor) -> torch.Tensor:  # [B, H, n, rows, D] -> [B, H, n, D]
        if how == "max":
            return t.amax(3).float()
        return t.sum(3, dtype=torch.float32) / t.shape[3]

    parts = []
    if full:
        parts.append(reduce(x[:, :, : full * block].unflatten(2, (full, block))))
    if seqlen % block:
        parts.append(reduce(x[:, :, full * block:].unsqueeze(2)))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


@register("block_topk")
@dataclasses.dataclass
class BlockTopK(BudgetEstimator):
    """Top key blocks per query block from pooled Q/K block scores.

    A query block ``m`` and a key block ``n`` score ``<pool(Q_m), pool(K_n)> / sqrt(D) +
    log(pairs(m, n))`` (the log of their attendable (query, key) pairs, so the half-visible
    diagonal block and a short last block are not overrated); a softmax over the reachable key
    blocks gives each block's estimated share of the query block's mass. K is pooled once per KV
    head and shared by its query heads. The sink and local blocks are always kept.

    Args:
        block_m, block_n: block sizes (64 or 128), the tiles of the layout and of pooling.
        sink_blocks: leading key blocks always kept (>= 0, default 1).
        local_blocks: key blocks ending at the diagonal always kept (>= 1, default 1).
        mass: keep the fewest blocks whose estimated mass reaches this share, per (batch, head,
            query block), in ``(0, 1]`` (default 0.95 when no budget is given).
        density: or keep this share of the reachable key blocks of each query block, in
            ``(0, 1]``.
        top_k: or keep this many key blocks per query block (forced ones included).
        gqa_reduce: ``"max"`` (default) or ``"mean"`` of a group's block probabilities for a
            per-KV-head layout, or ``"none"`` for a per-query-head layout.
        pool: ``"mean"`` (default) or ``"max"`` (elementwise over a block's rows).

    Returns (from ``estimate``):
        A :class:`BlockLayout` with ``H = Hkv`` (``Hq`` with ``gqa_reduce="none"``).

    Example:
        >>> est = sparse_attn.estimators.get("block_topk", mass=0.9, block_m=64, block_n=64)
        >>> layout = est.estimate(torch.randn(2, 8, 1000, 64), torch.randn(2, 2, 1000, 64))
        >>> layout.density(1000, 1000, per_head=True).shape  # budgets differ per head
        torch.Size([2, 2])
    """

    pool: str = "mean"

    def __post_init__(self):
        super().__post_init__()
        if self.pool not in POOLS:
            raise ValueError(
                f"estimator {self.name!r}: pool must be one of {POOLS}, got {self.pool!r}")

    def estimate(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True) -> BlockLayout:
        self._check(q, k, causal)
        batch, hq, seqlen_q, dim = q.shape
        hkv, seqlen_k = k.shape[1], k.shape[2]
        pq = pool_blocks(q, self.block_m, self.pool).unflatten(1, (hkv, hq // hkv))
        pk = pool_blocks(k, self.block_n, self.pool)[:, :, None]  # [B, Hkv, 1, NKB, D]
        scores = torch.matmul(pq, pk.transpose(-1, -2)).flatten(1, 2) / math.sqrt(dim)
        pairs = causal_pair_counts(seqlen_q, seqlen_k, self.block_m, self.block_n, causal,
                                   q.device)
        # unreachable blocks get log(0) = -inf, so the softmax gives them 0
        probs = torch.softmax(scores + pairs.float().log(), dim=-1)  # [B, Hq, NQB, NKB]
        return self.select(probs, q, k, causal)
