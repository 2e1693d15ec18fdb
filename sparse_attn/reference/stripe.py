"""Attention restricted to a StripeLayout, in pure torch (ground truth for kernels/stripe)."""
from __future__ import annotations

import torch

from ..layout import StripeLayout
from .dense import attention_ref


def stripe_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: StripeLayout,
    *,
    causal: bool = True,
    scale: float | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the layout's dense key blocks and stripe positions (plus causality when
    ``causal``), one query chunk at a time.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Sk, D]`` (GQA when ``Hq % Hkv == 0``).
        layout: a :class:`StripeLayout` per query head or per KV head, built for these lengths.
        causal: key ``j`` is visible to query row ``i`` iff ``j <= i + Sk - Sq``.
        scale: softmax scale, default ``1/sqrt(D)``.
        upcast: compute in float32 (otherwise in the input dtype).

    Returns:
        ``(out [B, Hq, Sq, D], lse [B, Hq, Sq])``; rows with no visible key give zeros and
        ``lse = -inf``.

    Example:
        >>> lay = StripeLayout.from_vertical_slash(torch.tensor([[[0]]]), torch.tensor([[[0]]]),
        ...                                        64, 64, block_m=16, block_n=16)
        >>> q = k = v = torch.randn(1, 1, 64, 32)
        >>> out, lse = stripe_attention_ref(q, k, v, lay)
    """
    sq, sk = q.shape[2], k.shape[2]
    layout.validate(sq, sk, check_indices=False)
    group = q.shape[1] // layout.num_heads
    block, column = layout.to_mask(sk)  # [B, H, NQB, NKB], [B, H, NQB, Sk]
    if group > 1:  # per-KV-head layout: every query head of the group shares it
        block = block.repeat_interleave(group, dim=1)
        column = column.repeat_interleave(group, dim=1)
    key_block = torch.arange(sk, device=q.device) // layout.block_n

    def mask_fn(start: int, stop: int) -> torch.Tensor:
        rows = torch.arange(start, stop, device=q.device) // layout.block_m
        return block[:, :, rows][..., key_block] | column[:, :, rows]

    return attention_ref(q, k, v, causal=causal, scale=scale, mask_fn=mask_fn, upcast=upcast)
