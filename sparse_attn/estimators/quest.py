"""Quest page selection for sparse decode (Tang et al., 2024, "Quest: Query-Aware Sparsity").

Each key page keeps the elementwise min and max of its keys. For a query ``q`` and any key ``k``
of the page, ``q . k = sum_i q_i k_i <= sum_i max(q_i min_i, q_i max_i)``, an upper bound that
is two small matmuls: ``relu(q) . max + min(q, 0) . min``. The pages with the highest bounds
(max over the query heads of a KV group and the query tokens) are attended; the last page (the
local window, holding the newest keys) is always kept.

The selector is not an :class:`~sparse_attn.estimators.Estimator` (those map prefill ``q, k`` to
a layout): its state lives beside a KV cache and is updated incrementally as tokens are
appended, and its output is the ``block_indices`` of :func:`sparse_attn.decode_attention`.

Everything is torch on the cache's device with static shapes (no host synchronisation), so
``update`` and ``select`` capture in a CUDA graph.
"""
from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["QuestMetadata", "QuestSelector"]


@dataclasses.dataclass
class QuestMetadata:
    """Per-page key bounds.

    Attributes:
        kmin, kmax: ``[B, Hkv, num_pages, D]`` for a contiguous cache (page ``p`` holds
            positions ``p*page_size ..``) or ``[num_pages, Hkv, D]`` per physical page of a paged
            cache, in the selector's ``metadata_dtype``. A page without keys holds ``+inf`` /
            ``-inf``.
        page_size: keys per page (the ``block_size`` of ``decode_attention``).
        paged: which of the two layouts.
    """

    kmin: torch.Tensor
    kmax: torch.Tensor
    page_size: int
    paged: bool


def _check_page_size(page_size) -> None:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"QuestSelector: page_size must be a positive int, got {page_size!r}")


@dataclasses.dataclass
class QuestSelector:
    """Quest-style top-k page selection for :func:`sparse_attn.decode_attention`.

    Args:
        page_size: keys per page; the paged cache's page size, or the ``block_size`` passed to
            ``decode_attention`` for a contiguous cache (default 64, its default).
        top_k: pages kept per (batch, KV head), the last page included.
        density: or keep this share of the cache's pages (``ceil(density * pages)``), in
            ``(0, 1]``; exactly one of ``top_k`` / ``density``.
        sink_pages: leading pages always kept (default 0, as in Quest).
        metadata_dtype: dtype of the page bounds and of the bound matmuls (None: the cache's;
            min/max of bf16 keys are bf16 values, so nothing is lost, and a select reads half
            the bytes of float32; the bounds are then rounded to bf16 before the ranking).

    Example:
        >>> quest = QuestSelector(page_size=64, density=1 / 16)
        >>> meta = quest.build(k_cache, cache_seqlens=lens)   # once, after prefill
        >>> # each step: write the new key, then lens += 1
        >>> quest.update(meta, k_cache, cache_seqlens=lens)
        >>> idx = quest.select(q, meta, cache_seqlens=lens)     # [B, Hkv, K] int32
        >>> out = sparse_attn.decode_attention(q, k_cache, v_cache, cache_seqlens=lens,
        ...                                    block_indices=idx, block_size=64)
    """

    page_size: int = 64
    top_k: int | None = None
    density: float | None = None
    sink_pages: int = 0
    metadata_dtype: torch.dtype | None = None

    def __post_init__(self):
        _check_page_size(self.page_size)
        if (self.top_k is None) == (self.density is None):
            raise ValueError("QuestSelector: give exactly one of top_k and density")
        if self.top_k is not None and (isinstance(self.top_k, bool)
                                       or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"QuestSelector: top_k must be a positive int, got {self.top_k!r}")
        if self.density is not None and not (isinstance(self.density, (int, float))
                                             and 0 < self.density <= 1):
            raise ValueError(f"QuestSelector: density must lie in (0, 1], got {self.density!r}")
        if isinstance(self.sink_pages, bool) or not isinstance(self.sink_pages, int) \
                or self.sink_pages < 0:
            raise ValueError(
                f"QuestSelector: sink_pages must be an int >= 0, got {self.sink_pages!r}")

    # ---- metadata ----

    def build(self, k_cache: torch.Tensor, *, cache_seqlens: torch.Tensor | None = None,
              block_table: torch.Tensor | None = None,
              out: QuestMetadata | None = None) -> QuestMetadata:
        """Per-page min/max of the keys held (positions ``< cache_seqlens``).

        Args:
            k_cache: contiguous ``[B, Hkv, S_max, D]`` or paged ``[num_pages, page_size, Hkv,
                D]`` (with ``block_table [B, max_pages]`` int32).
            cache_seqlens: int32 ``[B]`` keys held (default: the whole cache).
            out: metadata to overwrite in place (keeps addresses for CUDA-graph replay).

        Returns:
            :class:`QuestMetadata`.
        """
        page = self.page_size
        if block_table is None:
            if k_cache.dim() != 4:
                raise ValueError(f"QuestSelector.build: k_cache must be [B, Hkv, S_max, D], got "
                                 f"{tuple(k_cache.shape)}")
            batch, hkv, s_max, dim = k_cache.shape
            n_pages = -(-s_max // page)
            keys = torch.nn.functional.pad(k_cache, (0, 0, 0, n_pages * page - s_max))
            keys = keys.view(batch, hkv, n_pages, page, dim)
            pos = torch.arange(n_pages * page, device=k_cache.device).view(n_pages, page)
            lens = (torch.full((batch,), s_max, device=k_cache.device) if cache_seqlens is None
                    else cache_seqlens.long())
            held = (pos[None] < lens[:, None, None])[:, None, :, :, None]  # [B,1,NP,page,1]
            dim_slot = 3
        else:
            if k_cache.dim() != 4 or k_cache.shape[1] != page:
                raise ValueError(f"QuestSelector.build: paged k_cache must be [num_pages, "
                                 f"page_size={page}, Hkv, D], got {tuple(k_cache.shape)}")
            num_pages = k_cache.shape[0]
            keys = k_cache
            batch, max_pages = block_table.shape
            lens = (torch.full((batch,), max_pages * page, device=k_cache.device)
                    if cache_seqlens is None else cache_seqlens.long())
            # keys held in each physical page: the most any sequence using it holds
            starts = torch.arange(max_pages, device=k_cache.device) * page
            fill = (lens[:, None] - starts[None]).clamp(0, page)  # [B, max_pages]
            held_n = torch.zeros(num_pages, dtype=torch.long, device=k_cache.device)
            table = block_table.long().clamp(0, num_pages - 1)
            held_n.scatter_reduce_(0, table.flatten(), fill.flatten(), reduce="amax")
            slots = torch.arange(page, device=k_cache.device)
            held = (slots[None] < held_n[:, None])[:, :, None, None]  # [pages, page, 1, 1]
            dim_slot = 1
        inf = torch.tensor(float("inf"), dtype=keys.dtype, device=keys.device)
        dtype = self.metadata_dtype or keys.dtype
        kmin = torch.where(held, keys, inf).amin(dim_slot).to(dtype)
        kmax = torch.where(held, keys, -inf).amax(dim_slot).to(dtype)
        if out is not None:
            out.kmin.copy_(kmin)
            out.kmax.copy_(kmax)
            return out
        return QuestMetadata(kmin, kmax, page, block_table is not None)

    def update(self, meta: QuestMetadata, k_cache: torch.Tensor, *,
               cache_seqlens: torch.Tensor, num_new: int = 1,
               block_table: torch.Tensor | None = None) -> QuestMetadata:
        """Fold the ``num_new`` newest keys of each sequence (positions ``cache_seqlens -
        num_new .. cache_seqlens - 1``, already written to the cache) into the metadata, in place.

        Appending only narrows nothing: a page's min can only fall and its max only rise.
        """
        if num_new < 1:
            raise ValueError(f"QuestSelector.update: num_new must be >= 1, got {num_new}")
        page = meta.page_size
        lens = cache_seqlens.long()
        steps = torch.arange(num_new, device=lens.device)
        pos = lens[:, None] - num_new + steps[None]  # [B, T]
        ok = pos >= 0
        pos = pos.clamp(min=0)
        if block_table is None:
            batch, hkv, _, dim = k_cache.shape
            gather_idx = pos[:, None, :, None].expand(batch, hkv, num_new, dim)
            new = k_cache.gather(2, gather_idx).to(meta.kmin.dtype)  # [B, Hkv, T, D]
            keep = ok[:, None, :, None]
            page_idx = (pos // page)[:, None, :, None].expand(batch, hkv, num_new, dim)
            meta.kmin.scatter_reduce_(2, page_idx, torch.where(keep, new, math.inf), "amin")
            meta.kmax.scatter_reduce_(2, page_idx, torch.where(keep, new, -math.inf), "amax")
        else:
            num_pages, _, hkv, dim = k_cache.shape
            phys = block_table.long().gather(1, pos // page).clamp(0, num_pages - 1)  # [B, T]
            new = k_cache[phys, pos % page].to(meta.kmin.dtype)  # [B, T, Hkv, D]
            keep = ok[:, :, None, None]
            page_idx = phys[:, :, None, None].expand(-1, -1, hkv, dim).flatten(0, 1)
            lo = torch.where(keep, new, math.inf).flatten(0, 1)
            hi = torch.where(keep, new, -math.inf).flatten(0, 1)
            meta.kmin.scatter_reduce_(0, page_idx, lo, "amin")
            meta.kmax.scatter_reduce_(0, page_idx, hi, "amax")
        return meta

    # ---- selection ----

    def num_selected(self, n_pages: int) -> int:
        """Pages kept per (batch, KV head) for a cache of ``n_pages`` pages (a static shape)."""
        if self.top_k is not None:
            return max(1, min(self.top_k, n_pages))
        return max(1, min(n_pages, math.ceil(self.density * n_pages)))

    def scores(self, q: torch.Tensor, meta: QuestMetadata, *,
               block_table: torch.Tensor | None = None) -> torch.Tensor:
        """Upper bounds of ``q . k`` per page, max over each KV group's query heads and tokens:
        float32 ``[B, Hkv, pages]`` (pages of the sequence; through ``block_table`` if paged)."""
        kmin, kmax = meta.kmin, meta.kmax
        if meta.paged:
            if block_table is None:
                raise ValueError("QuestSelector: paged metadata needs block_table")
            table = block_table.long().clamp(0, kmin.shape[0] - 1)
            kmin = kmin[table].transpose(1, 2)  # [B, Hkv, max_pages, D]
            kmax = kmax[table].transpose(1, 2)
        batch, hq, sq, dim = q.shape
        hkv = kmin.shape[1]
        if hq % hkv or kmin.shape[0] != batch or kmin.shape[-1] != dim:
            raise ValueError(f"QuestSelector: q {tuple(q.shape)} does not fit metadata "
                             f"{tuple(kmin.shape)} (batch, KV heads, head dim)")
        qg = q.to(kmin.dtype).reshape(batch, hkv, (hq // hkv) * sq, dim)
        # sum_i max(q_i min_i, q_i max_i) = relu(q) . max + min(q, 0) . min
        bound = (torch.matmul(qg.clamp(min=0), kmax.transpose(-1, -2)).float()
                 + torch.matmul(qg.clamp(max=0), kmin.transpose(-1, -2)).float())
        return bound.amax(2)

    def select(self, q: torch.Tensor, meta: QuestMetadata, *,
               cache_seqlens: torch.Tensor | None = None,
               block_table: torch.Tensor | None = None) -> torch.Tensor:
        """Top pages per (batch, KV head) for queries ``q [B, Hq, Sq, D]``.

        Returns:
            int32 ``[B, Hkv, K]`` page indices (logical pages of each sequence), strictly
            increasing, ``-1``-padded where a sequence has fewer than ``K`` pages: the
            ``block_indices`` of :func:`sparse_attn.decode_attention` (with
            ``block_size=page_size`` for a contiguous cache).
        """
        score = self.scores(q, meta, block_table=block_table)  # [B, Hkv, NP]
        batch, _, n_pages = score.shape
        page = meta.page_size
        cols = torch.arange(n_pages, device=score.device)
        if cache_seqlens is None:
            held = torch.full((batch,), n_pages, device=score.device)
        else:
            held = (cache_seqlens.long() + page - 1) // page  # pages holding keys
        valid = cols[None, :] < held[:, None]
        forced = (cols[None, :] == held[:, None] - 1) | (cols[None, :] < self.sink_pages)
        score = torch.where(forced[:, None], math.inf, score)
        # invalid last: pages without keys may hold inf - inf = nan bounds
        score = torch.where(valid[:, None], score, -math.inf)
        k = self.num_selected(n_pages)
        top, idx = score.topk(k, dim=-1)
        idx = torch.where(top == -math.inf, n_pages, idx)
        idx = idx.sort(dim=-1).values
        return torch.where(idx == n_pages, -1, idx).to(torch.int32)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, *,
                 cache_seqlens: torch.Tensor | None = None,
                 block_table: torch.Tensor | None = None) -> torch.Tensor:
        """One-shot: build the metadata and select (see :meth:`select`)."""
        meta = self.build(k_cache, cache_seqlens=cache_seqlens, block_table=block_table)
        return self.select(q, meta, cache_seqlens=cache_seqlens, block_table=block_table)
