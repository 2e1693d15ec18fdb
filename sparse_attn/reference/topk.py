"""Token-level top-k attention in pure torch (ground truth for kernels/topk).

Gather-based: for a chunk of query tokens it gathers only the listed K/V rows
(``[B, Hkv, chunk, K, D]``), so memory scales with ``Sq * K``, never with ``Sq * Sk``.
"""
from __future__ import annotations

import math

import torch

from ..layout import TopKLayout

# keep a chunk's gathered K (or V) tile near this many bytes
_CHUNK_BYTES = 128 * 2**20


def topk_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TopKLayout,
    *,
    causal: bool = True,
    scale: float | None = None,
    upcast: bool = True,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query token over exactly the key positions its layout row lists.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0`` (GQA).
        layout: :class:`TopKLayout` with ``indices [B, Hkv, Sq, K]`` (-1 padded).
        causal: also drop listed keys after the query's absolute position ``Sk - Sq + i``.
        upcast: compute in float32 (float64 stays float64); otherwise in the input dtype.

    Returns:
        ``(out [B, Hq, Sq, D], lse [B, Hq, Sq])`` (``lse`` float32, natural log); a row with
        nothing to attend gives zeros and ``lse = -inf``.
    """
    batch, hq, sq, dim = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    layout.validate(sq, sk, check_indices=False)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    dtype = q.dtype if not upcast or q.dtype == torch.float64 else torch.float32
    topk = layout.k
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_BYTES // max(1, batch * hkv * topk * dim * 4))
    out = torch.empty(batch, hq, sq, dim, dtype=dtype, device=q.device)
    lse = torch.empty(batch, hq, sq, dtype=torch.float32, device=q.device)
    kx, vx = k.to(dtype), v.to(dtype)
    for start in range(0, sq, chunk_size):
        stop = min(sq, start + chunk_size)
        n = stop - start
        idx = layout.indices[:, :, start:stop].long()  # [B, Hkv, n, K]
        valid = idx >= 0
        if causal:
            pos = torch.arange(start, stop, device=q.device) + (sk - sq)
            valid &= idx <= pos[:, None]
        flat = idx.clamp(min=0).reshape(batch, hkv, n * topk, 1).expand(-1, -1, -1, dim)
        kg = torch.gather(kx, 2, flat).reshape(batch, hkv, n, topk, dim)
        vg = torch.gather(vx, 2, flat).reshape(batch, hkv, n, topk, dim)
        # [B, Hkv, n, G, D]: the group's heads share each token's key list
        qc = q[:, :, start:stop].to(dtype).reshape(batch, hkv, group, n, dim).transpose(2, 3)
        s = torch.matmul(qc, kg.transpose(-1, -2)) * scale  # [B, Hkv, n, G, K]
        s = s.float() if dtype != torch.float64 else s
        s = s.masked_fill(~valid[:, :, :, None], float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        o = torch.matmul(p.to(dtype), vg)  # [B, Hkv, n, G, D]
        o = o / torch.where(l > 0, l, torch.ones_like(l)).to(dtype)
        out[:, :, start:stop] = o.transpose(2, 3).reshape(batch, hq, n, dim)
        lse[:, :, start:stop] = (torch.log(l) + m).squeeze(-1).float().transpose(2, 3).reshape(
            batch, hq, n)
    return out, lse
