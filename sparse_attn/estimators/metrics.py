"""How good a layout is, measured on the true softmax: block attention mass and recall.

Both compute dense attention probabilities in query chunks (fp32), so an 8k-32k sequence fits in
CPU memory; they are for evaluation (and the ``oracle`` estimator), never for a hot path.
"""
from __future__ import annotations

import math

import torch

from ..layout import BlockLayout

__all__ = ["attention_recall", "block_attention_mass"]

# keep a chunk's fp32 score tensor near this many bytes
_CHUNK_BYTES = 256 * 2**20


def _rows_per_block(seqlen: int, block: int, first: int, stop: int, device) -> torch.Tensor:
    """Rows in blocks ``first .. stop - 1`` of ``seqlen`` rows (the last block may be short)."""
    start = torch.arange(first, stop, device=device) * block
    return (start + block).clamp(max=seqlen) - start


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, *,
                         causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """True softmax mass of every (query block, key block) tile, per query head.

    Entry ``[b, h, m, n]`` is the mean over the query rows of block ``m`` of the softmax
    probability those rows put on the keys of block ``n``; each query block's row sums to 1
    (0 for rows that see no key).

    Args:
        q: ``[B, Hq, Sq, D]``; k: ``[B, Hkv, Sk, D]`` (GQA, never repeated; ``Sq <= Sk`` when
            ``causal``: query row ``i`` sits at absolute position ``Sk - Sq + i``).
        block_m, block_n: block sizes; query blocks tile the query rows from 0, key blocks the
            keys from 0.
        causal: mask keys after each query's absolute position.
        scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        float32 ``[B, Hq, ceil(Sq / block_m), ceil(Sk / block_n)]``.

    Example:
        >>> q, k = torch.randn(1, 4, 300, 64), torch.randn(1, 2, 300, 64)
        >>> block_attention_mass(q, k, 64, 64).shape  # .sum(-1) is all ones
        torch.Size([1, 4, 5, 5])
    """
    batch, hq, sq, dim = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    nqb, nkb = -(-sq // block_m), -(-sk // block_n)
    kt = k.float().transpose(-1, -2)[:, :, None]  # [B, Hkv, 1, D, Sk]: shared by the group
    cols = torch.arange(sk, device=q.device)
    # whole query blocks per chunk
    rows_per_chunk = max(1, _CHUNK_BYTES // max(1, batch * hq * sk * 4))
    chunk = max(1, rows_per_chunk // block_m) * block_m
    out = torch.empty(batch, hq, nqb, nkb, dtype=torch.float32, device=q.device)
    for start in range(0, sq, chunk):
        stop = min(sq, start + chunk)
        qc = q[:, :, start:stop].float().unflatten(1, (hkv, group))  # [B, Hkv, G, rows, D]
        s = torch.matmul(qc, kt).flatten(1, 2) * scale  # [B, Hq, rows, Sk]
        if causal:
            rows = torch.arange(start, stop, device=q.device)
            s = s.masked_fill(cols[None, :] > rows[:, None] + (sk - sq), float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # a row that sees nothing keeps 0
        p = torch.nn.functional.pad(p, (0, nkb * block_n - sk)).unflatten(-1, (nkb, block_n))
        p = p.sum(-1)  # [B, Hq, rows, NKB]
        m0, m1 = start // block_m, -(-stop // block_m)
        p = torch.nn.functional.pad(p, (0, 0, 0, (m1 - m0) * block_m - (stop - start)))
        rows_in = _rows_per_block(sq, block_m, m0, m1, q.device)
        out[:, :, m0:m1] = p.unflatten(2, (m1 - m0, block_m)).sum(3) / rows_in[:, None]
    return out


def attention_recall(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, causal: bool = True,
                     *, scale: float | None = None) -> torch.Tensor:
    """Share of the dense softmax mass that falls inside the layout, per query head.

    For every query row, the softmax of the full (causal) attention is summed over the
    (query, key) pairs the layout lists; rows are averaged. 1.0 means the layout loses nothing.

    Args:
        q: ``[B, Hq, Sq, D]``; k: ``[B, Hkv, Sk, D]`` (GQA; ``Sq <= Sk``, queries aligned to the
            end of the keys when ``causal``).
        layout: a BlockLayout for these lengths, per query head or per KV head.
        causal: whether the dense attention (and so the mass) is causal.
        scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        float32 ``[B, Hq]`` (call ``.mean()`` for one number).

    Example:
        >>> layout = BlockLayout.streaming(1, 2, 512, local_blocks=1, block_m=64, block_n=64)
        >>> attention_recall(torch.randn(1, 4, 512, 64), torch.randn(1, 2, 512, 64), layout)
    """
    sq = q.shape[2]
    layout.validate(sq, k.shape[2], check_indices=False)
    mass = block_attention_mass(q, k, layout.block_m, layout.block_n, causal=causal, scale=scale)
    block = layout.to_mask()  # [B, H, NQB, NKB]
    if layout.num_heads != q.shape[1]:  # per-KV-head layout: every query head of a group shares it
        block = block.repeat_interleave(q.shape[1] // layout.num_heads, dim=1)
    rows_in = _rows_per_block(sq, layout.block_m, 0, layout.num_q_blocks, q.device)
    return (mass * block).sum(-1).mul(rows_in).sum(-1) / sq
