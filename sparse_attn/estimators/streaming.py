"""``streaming``: sink blocks plus a causal local window ("A-shape", StreamingLLM/MInference)."""
from __future__ import annotations

import dataclasses

import torch

from ..layout import BlockLayout
from .base import register
from .select import WindowEstimator


@register("streaming")
@dataclasses.dataclass
class Streaming(WindowEstimator):
    """The first ``sink_blocks`` key blocks and the ``local_blocks`` ending at the diagonal.

    Input-independent: the same layout for every head and batch entry (per KV head).

    Args:
        block_m: query rows per block (64 or 128).
        block_n: key positions per block (64 or 128).
        sink_blocks: leading key blocks every query block computes (>= 0).
        local_blocks: key blocks ending at each query block's diagonal (>= 1, at most the number
            of key blocks: ``estimate`` raises otherwise). The window is ``local_blocks *
            block_n`` tokens; set it for the context you run (e.g. 16 = 2k tokens at 128).

    Returns (from ``estimate``):
        A per-KV-head :class:`BlockLayout` (``H = Hkv``).

    Example:
        >>> est = sparse_attn.estimators.get("streaming", sink_blocks=1, local_blocks=4)
        >>> layout = est.estimate(torch.randn(1, 8, 4096, 64), torch.randn(1, 2, 4096, 64))
        >>> layout.counts[0, 0, -1]  # 1 sink + 4 local blocks
        tensor(5, dtype=torch.int32)
    """

    local_blocks: int = 2

    def estimate(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True) -> BlockLayout:
        self._check(q, k, causal)
        return self._window(q.shape[0], k.shape[1], q.shape[2], k.shape[2], causal, q.device)
