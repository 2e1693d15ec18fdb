"""Attention restricted to a BlockLayout, in pure torch (ground truth for kernels/block_sparse)."""
from __future__ import annotations

import torch

from ..layout import BlockLayout
from .dense import attention_ref


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    causal: bool = True,
    scale: float | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over exactly the tiles the layout lists (plus causality when ``causal``).

    Shapes as :func:`attention_ref`; ``layout`` is per query head or per KV head.
    Returns ``(out, lse)``; rows with no visible key give zeros and ``lse = -inf``.
    """
    sq, sk = q.shape[2], k.shape[2]
    layout.validate(sq, sk, check_indices=False)
    group = q.shape[1] // layout.num_heads
    block = layout.to_mask()  # [B, H, NQB, NKB]
    if group > 1:  # per-KV-head layout: every query head of the group shares it
        block = block.repeat_interleave(group, dim=1)
    key_block = torch.arange(sk, device=q.device) // layout.block_n

    def mask_fn(start: int, stop: int) -> torch.Tensor:
        rows = torch.arange(start, stop, device=q.device) // layout.block_m
        return block[:, :, rows][..., key_block]

    return attention_ref(q, k, v, causal=causal, scale=scale, mask_fn=mask_fn, upcast=upcast)
