"""``oracle``: the exact top-mass blocks of full attention (evaluation only, never fast)."""
from __future__ import annotations

import dataclasses

import torch

from ..layout import BlockLayout
from .base import register
from .metrics import block_attention_mass
from .select import BudgetEstimator


@register("oracle")
@dataclasses.dataclass
class Oracle(BudgetEstimator):
    """Key blocks chosen by their true softmax mass (dense attention, chunked over queries).

    Per (batch, head, query block) the mass of a key block is the mean over the block's query
    rows of the softmax probability on its keys; the fewest blocks reaching ``mass`` are kept
    (or a fixed density / top-k), the sink and local blocks always. It is the upper bound a
    block estimator can reach at a given density: with the default per-query-head layout its
    attention recall is at least ``mass``. Costs a full attention pass (8k fits on a CPU).

    Args:
        block_m, block_n: block sizes (64 or 128).
        sink_blocks: leading key blocks always kept (>= 0, default 1).
        local_blocks: key blocks ending at the diagonal always kept (>= 1, default 1).
        mass: keep the fewest blocks whose true mass reaches this share, in ``(0, 1]``
            (default 0.95 when no budget is given; 1.0 keeps every block with nonzero mass).
        density: or keep this share of the reachable key blocks of each query block, in
            ``(0, 1]``.
        top_k: or keep this many key blocks per query block (forced ones included).
        gqa_reduce: ``"none"`` (default, per query head) or ``"max"`` / ``"mean"`` of a group's
            block masses for a per-KV-head layout.

    Returns (from ``estimate``):
        A :class:`BlockLayout` with ``H = Hq`` (``Hkv`` with ``gqa_reduce="max"``/``"mean"``).

    Example:
        >>> from sparse_attn.estimators.metrics import attention_recall
        >>> est = sparse_attn.estimators.get("oracle", mass=0.95, block_m=64, block_n=64)
        >>> q, k = torch.randn(1, 8, 1000, 64), torch.randn(1, 2, 1000, 64)
        >>> bool((attention_recall(q, k, est.estimate(q, k)) >= 0.95).all())
        True
    """

    gqa_reduce: str = "none"

    def estimate(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True) -> BlockLayout:
        self._check(q, k, causal)
        probs = block_attention_mass(q, k, self.block_m, self.block_n, causal=causal)
        return self.select(probs, q, k, causal)
