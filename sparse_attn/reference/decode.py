"""Decode attention against a KV cache (contiguous or paged), in pure torch.

Ground truth for ``kernels/decode.py``. One batch item at a time: gather its keys (through the
block table for a paged cache), cut them to its length, and run :func:`attention_ref` with the
queries aligned to the end (causal among the few query tokens) and, when ``block_indices`` is
given, a mask keeping only the selected key blocks.
"""
from __future__ import annotations

import torch

from .dense import attention_ref


def gather_cache(k_cache: torch.Tensor, block_table: torch.Tensor | None, batch: int,
                 seqlen: int) -> torch.Tensor:
    """Keys (or values) ``[Hkv, seqlen, D]`` of one batch item.

    Contiguous cache ``[B, Hkv, S_max, D]`` (``block_table`` None) or paged cache
    ``[num_pages, page_size, Hkv, D]`` with ``block_table [B, max_pages]``.
    """
    if block_table is None:
        return k_cache[batch, :, :seqlen]
    page = k_cache.shape[1]
    n_pages = -(-seqlen // page)
    pages = block_table[batch, :n_pages].long()
    # [n_pages, page, Hkv, D] -> [Hkv, n_pages * page, D]
    rows = k_cache[pages].flatten(0, 1)[:seqlen]
    return rows.permute(1, 0, 2)


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    block_indices: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    block_size: int = 64,
    scale: float | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Few-token attention over a KV cache, optionally restricted to selected key blocks.

    Args:
        q: ``[B, Hq, Sq, D]``: the last ``Sq`` positions of each sequence (causal among them).
        k_cache, v_cache: contiguous ``[B, Hkv, S_max, D]``, or paged
            ``[num_pages, page_size, Hkv, D]`` when ``block_table`` is given.
        block_indices: int ``[B, Hkv, NSEL]``, the key blocks each (batch, KV head) attends to
            (-1 entries ignored); None attends to every key.
        cache_seqlens: int ``[B]`` valid keys per batch item (default: the whole cache).
        block_table: int ``[B, max_pages]`` pages of each sequence (paged cache).
        block_size: key block of ``block_indices`` for a contiguous cache (the page size for a
            paged one).
        scale: softmax scale (default ``1/sqrt(D)``).
        upcast: compute in float32, else in the input dtype.

    Returns:
        ``(out [B, Hq, Sq, D], lse [B, Hq, Sq] float32)``; a query row with no visible key gives
        zeros and ``lse = -inf``.
    """
    batch, hq, sq, dim = q.shape
    paged = block_table is not None
    if paged:
        block_size = k_cache.shape[1]
        capacity = block_table.shape[1] * block_size
    else:
        capacity = k_cache.shape[2]
    lengths = ([capacity] * batch if cache_seqlens is None
               else [int(x) for x in cache_seqlens.tolist()])
    outs, lses = [], []
    for b in range(batch):
        length = lengths[b]
        qb = q[b:b + 1]
        if length == 0:
            dtype = q.dtype if not upcast or q.dtype == torch.float64 else torch.float32
            outs.append(torch.zeros(1, hq, sq, dim, dtype=dtype, device=q.device))
            lses.append(torch.full((1, hq, sq), float("-inf"), device=q.device))
            continue
        kb = gather_cache(k_cache, block_table, b, length).unsqueeze(0)
        vb = gather_cache(v_cache, block_table, b, length).unsqueeze(0)
        mask_fn = None
        if block_indices is not None:
            hkv = kb.shape[1]
            n_blocks = -(-length // block_size)
            sel = torch.zeros(hkv, n_blocks + 1, dtype=torch.bool, device=q.device)
            idx = block_indices[b].long()
            # -1 and blocks past this length land in the spare last column
            idx = torch.where((idx < 0) | (idx >= n_blocks), n_blocks, idx)
            sel.scatter_(1, idx, True)
            cols = sel[:, :n_blocks].repeat_interleave(hq // hkv, dim=0)
            key_mask = cols[:, torch.arange(length, device=q.device) // block_size]

            def mask_fn(start, stop, key_mask=key_mask):
                return key_mask[None, :, None, :]

        o, lse = attention_ref(qb, kb, vb, causal=True, scale=scale, mask_fn=mask_fn,
                               upcast=upcast)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)
