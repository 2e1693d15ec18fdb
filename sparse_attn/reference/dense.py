"""Dense attention in pure torch, chunked over queries so a 32k sequence fits in CPU memory."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

# keep a chunk's score tensor near this many bytes
_CHUNK_BYTES = 256 * 2**20

MaskFn = Callable[[int, int], Optional[torch.Tensor]]


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    mask_fn: MaskFn | None = None,
    upcast: bool = True,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted by an optional mask, one query chunk at a time.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0`` (GQA).
        causal: key ``j`` is visible to query row ``i`` iff ``j <= i + Sk - Sq``
            (queries aligned to the end of the keys).
        mask_fn: ``mask_fn(start, stop)`` returns a bool mask broadcastable to
            ``[B, Hq, stop - start, Sk]`` (True = attend) for those query rows, or None.
        upcast: compute in float32 (float64 stays float64); otherwise in the input dtype.

    Returns:
        ``(out [B, Hq, Sq, D], lse [B, Hq, Sq])``; ``out`` in the compute dtype, ``lse`` in
        float32 (natural log). A row with nothing to attend gives zeros and ``lse = -inf``.
    """
    batch, hq, sq, dim = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    dtype = q.dtype if not upcast or q.dtype == torch.float64 else torch.float32
    kx = k.to(dtype).repeat_interleave(group, dim=1)
    vx = v.to(dtype).repeat_interleave(group, dim=1)
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_BYTES // max(1, batch * hq * sk * 4))
    out = torch.empty(batch, hq, sq, dim, dtype=dtype, device=q.device)
    lse = torch.empty(batch, hq, sq, dtype=torch.float32, device=q.device)
    cols = torch.arange(sk, device=q.device)
    for start in range(0, sq, chunk_size):
        stop = min(sq, start + chunk_size)
        s = torch.matmul(q[:, :, start:stop].to(dtype), kx.transpose(-1, -2)) * scale
        s = s.float() if dtype != torch.float64 else s
        visible = None
        if causal:
            rows = torch.arange(start, stop, device=q.device)
            visible = cols[None, :] <= rows[:, None] + (sk - sq)
        if mask_fn is not None:
            extra = mask_fn(start, stop)
            if extra is not None:
                visible = extra if visible is None else visible & extra
        if visible is not None:
            s = s.masked_fill(~visible, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        o = torch.matmul(p.to(dtype), vx) / torch.where(l > 0, l, torch.ones_like(l)).to(dtype)
        out[:, :, start:stop] = o
        lse[:, :, start:stop] = (torch.log(l) + m).squeeze(-1).float()
    return out, lse


def dense_attention_ref(q, k, v, *, causal: bool = True, scale: float | None = None,
                        upcast: bool = True):
    """Dense (optionally causal) attention, GQA, any scale. Returns ``(out, lse)``."""
    return attention_ref(q, k, v, causal=causal, scale=scale, upcast=upcast)
