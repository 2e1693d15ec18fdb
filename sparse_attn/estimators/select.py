"""Block selection shared by the block estimators: budgets, forced blocks, GQA grouping.

An estimator that scores key blocks produces block probabilities ``[B, H, NQB, NKB]`` (the
estimated share of each query block's softmax mass that falls in each key block); this module
turns them into a :class:`BlockLayout` under a budget:

- ``mass``: per (batch, head, query block) the fewest blocks whose probabilities reach that share
  of the row's total, so every head gets its own budget;
- ``density`` / ``top_k``: a fixed number of blocks per query block.

The sink block(s) and the local diagonal block(s) are always kept and count towards the budget.
Everything is torch on the inputs' device with no host synchronisation (one sort, one cumsum,
one scatter), so it runs under CUDA-graph capture.

The config dataclasses the block estimators share live here too: :class:`BlockEstimator`
(block sizes, input checks), :class:`WindowEstimator` (+ sink and local blocks),
:class:`BudgetEstimator` (+ budget and GQA grouping, and ``select`` that applies them).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..layout import BlockLayout, causal_pair_counts
from ..ops._validate import check_qkv
from .base import Estimator

__all__ = [
    "BLOCK_SIZES", "GQA_REDUCE", "BlockEstimator", "BudgetEstimator", "WindowEstimator",
    "reduce_gqa", "select_blocks",
]

# tile sizes the block estimators produce (the kernel's tuned tiles)
BLOCK_SIZES = (64, 128)
# how the query heads of a GQA group are combined into one per-KV-head layout
GQA_REDUCE = ("max", "mean", "none")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def select_blocks(probs: torch.Tensor, *, valid: torch.Tensor | None = None,
                  keep: torch.Tensor | None = None, mass: float | None = None,
                  count: int | torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Bool block mask from block probabilities under a mass or a count budget.

    Args:
        probs: float ``[B, H, NQB, NKB]``, >= 0: each block's estimated share of its query
            block's attention (rows need not sum to 1; a mass budget is taken relative to the
            sum over ``valid`` blocks). Values on invalid blocks are ignored.
        valid: bool, broadcastable to ``probs``: blocks that may be selected (causally
            reachable); default ``probs > 0``.
        keep: bool, broadcastable to ``probs``: blocks always selected (sink, local); only the
            valid ones are kept. They count towards either budget.
        mass: in ``(0, 1]``: per row the forced blocks plus the fewest highest blocks whose
            probabilities reach ``mass`` of the row total; ``1.0`` keeps every block with
            nonzero probability.
        count: int or int tensor broadcastable to ``[B, H, NQB]``: blocks per row, forced ones
            included (the forced blocks are kept even beyond it); capped by the valid blocks.
        backend: ``"auto"`` (the CUDA selection kernel for CUDA inputs when the extension is
            available, else torch), ``"cuda"`` (raise when it is not) or ``"torch"`` (one sort
            and a cumsum: the reference). Ties are taken lowest block first by the kernel, in
            an unspecified order by torch.

    Returns:
        bool ``[B, H, NQB, NKB]``, True = compute that tile.

    Example:
        >>> p = torch.tensor([[[[0.1, 0.6, 0.2, 0.1]]]])
        >>> select_blocks(p, keep=torch.tensor([True, False, False, False]), mass=0.8)
        tensor([[[[ True,  True,  True, False]]]])
    """
    if (mass is None) == (count is None):
        raise ValueError("select_blocks needs exactly one budget: mass= or count=")
    if mass is not None and not (_is_real(mass) and 0.0 < mass <= 1.0):
        raise ValueError(f"select_blocks: mass must lie in (0, 1], got {mass!r}")
    if backend not in ("auto", "cuda", "torch"):
        raise ValueError(f"select_blocks: backend must be 'auto', 'cuda' or 'torch', got "
                         f"{backend!r}")
    if backend != "torch" and probs.is_cuda and probs.dim() >= 1 and probs.numel() > 0:
        from .. import _cuda

        ext = _cuda.ops()
        if ext is not None and probs.shape[-1] <= _cuda.SELECT_MAX_BLOCKS:
            return _select_blocks_cuda(ext, probs, valid, keep, mass, count)
    if backend == "cuda":
        raise RuntimeError(
            f"select_blocks: backend='cuda' needs CUDA inputs (got {probs.device}), the CUDA "
            f"extension ({_cuda_state()}) and at most {_max_blocks()} key blocks per row (got "
            f"{probs.shape[-1] if probs.dim() else 0})")
    probs = probs.float().clamp(min=0)
    valid = (probs > 0) if valid is None else valid.expand_as(probs)
    keep = torch.zeros_like(valid) if keep is None else keep.expand_as(probs) & valid
    # candidates ranked by probability; forced and invalid blocks sort last (key -1)
    key = torch.where(valid & ~keep, probs, -1.0)
    sorted_key, order = key.sort(dim=-1, descending=True)
    if mass is not None:
        if mass >= 1.0:  # exact: a cumulative test would drop tiny blocks to rounding
            take = sorted_key > 0
        else:
            total = torch.where(valid, probs, 0.0).sum(-1, keepdim=True)
            forced = torch.where(keep, probs, 0.0).sum(-1, keepdim=True)
            p = sorted_key.clamp(min=0)
            before = forced + p.cumsum(-1) - p  # mass already covered ahead of each block
            take = (sorted_key > 0) & (before < mass * total)
    else:
        extra = (count - keep.sum(-1)).clamp(min=0)  # [B, H, NQB]
        slot = torch.arange(probs.shape[-1], device=probs.device)
        take = (slot < extra[..., None]) & (sorted_key >= 0)
    chosen = torch.zeros_like(valid).scatter(-1, order, take)
    return chosen | keep


def _cuda_state() -> str:
    from .. import _cuda

    return "{state}: {detail}".format(**_cuda.status())


def _max_blocks() -> int:
    from .. import _cuda

    return _cuda.SELECT_MAX_BLOCKS


def _row_table(t: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``t`` broadcast to ``shape``, as a contiguous table over the trailing dims that vary:
    ``[X, shape[-1]]`` (or ``[X]`` for a per-row table) read at ``row % X`` by the kernel."""
    t = t.to(dtype).expand(shape)
    lead = 0  # leading dims along which t is broadcast
    while lead < len(shape) - 1 and (t.stride(lead) == 0 or shape[lead] == 1):
        lead += 1
    return t[(0,) * lead].contiguous().reshape(-1, *shape[-1:])


def _select_blocks_cuda(ext, probs, valid, keep, mass, count) -> torch.Tensor:
    """select_blocks on the CUDA radix-select kernel (csrc/select.cu)."""
    shape = probs.shape
    rows_shape = shape[:-1]
    p2 = probs.float().contiguous().reshape(-1, shape[-1])
    v2 = None if valid is None else _row_table(valid, shape, torch.bool)
    k2 = None if keep is None else _row_table(keep, shape, torch.bool)
    c1 = None
    if count is not None:
        if isinstance(count, torch.Tensor):
            c = count.to(device=probs.device).clamp(-2**31, 2**31 - 1).to(torch.int32)
        else:
            c = torch.full((), max(min(int(count), 2**31 - 1), -2**31), dtype=torch.int32,
                           device=probs.device)
        c1 = _row_table(c[..., None], (*rows_shape, 1), torch.int32).reshape(-1)
    mask, _, _ = ext.select_blocks(p2, v2, k2, c1, float(mass) if mass is not None else 1.0)
    return mask.reshape(shape)


def reduce_gqa(probs: torch.Tensor, num_kv_heads: int, how: str) -> torch.Tensor:
    """Combine the query heads of each GQA group: ``[B, Hq, ...]`` -> ``[B, Hkv, ...]``.

    Args:
        probs: ``[B, Hq, ...]`` with query head ``h`` in group ``h // (Hq // Hkv)``.
        num_kv_heads: ``Hkv``.
        how: ``"max"`` or ``"mean"`` over the group, or ``"none"`` (returned unchanged: a
            per-query-head layout).

    Returns:
        ``[B, Hkv, ...]`` (``[B, Hq, ...]`` for ``"none"``).

    Example:
        >>> reduce_gqa(torch.rand(1, 8, 4, 4), 2, "max").shape
        torch.Size([1, 2, 4, 4])
    """
    if how not in GQA_REDUCE:
        raise ValueError(f"gqa_reduce must be one of {GQA_REDUCE}, got {how!r}")
    if how == "none" or probs.shape[1] == num_kv_heads:
        return probs
    grouped = probs.unflatten(1, (num_kv_heads, probs.shape[1] // num_kv_heads))
    return grouped.amax(2) if how == "max" else grouped.mean(2)


@dataclasses.dataclass
class BlockEstimator(Estimator):
    """Base of the block estimators: tile sizes and input checks (not registered).

    Args:
        block_m: query rows per block, one of ``BLOCK_SIZES``.
        block_n: key positions per block, one of ``BLOCK_SIZES``.

    Example:
        >>> from sparse_attn import estimators
        >>> estimators.get("dense", block_m=64).block_m
        64
    """

    layouts_valid_by_construction = True  # every layout is built by from_mask

    block_m: int = 128
    block_n: int = 128

    def __post_init__(self):
        for field in ("block_m", "block_n"):
            value = getattr(self, field)
            if not _is_int(value) or value not in BLOCK_SIZES:
                raise ValueError(
                    f"estimator {self.name!r}: {field} must be one of {BLOCK_SIZES}, got {value!r}")

    def _check(self, q: torch.Tensor, k: torch.Tensor, causal: bool) -> None:
        """Shapes of ``q [B, Hq, Sq, D]`` and ``k [B, Hkv, Sk, D]`` (shape reads only)."""
        check_qkv(q, k, k, op=f"estimator {self.name!r}")
        if causal and q.shape[2] > k.shape[2]:
            raise ValueError(
                f"estimator {self.name!r}: causal estimation needs seqlen_q <= seqlen_k (queries "
                f"aligned to the end of the keys), got seqlen_q={q.shape[2]}, "
                f"seqlen_k={k.shape[2]}")


@dataclasses.dataclass
class WindowEstimator(BlockEstimator):
    """Block estimator with always-computed sink and local blocks (not registered).

    Args:
        sink_blocks: leading key blocks every query block computes (>= 0).
        local_blocks: key blocks ending at each query block's diagonal (>= 1; the diagonal
            block keeps every row's own key).

    Example:
        >>> from sparse_attn import estimators
        >>> estimators.get("streaming", sink_blocks=1, local_blocks=8).local_blocks
        8
    """

    sink_blocks: int = 1
    local_blocks: int = 1

    def __post_init__(self):
        super().__post_init__()
        for field, low in (("sink_blocks", 0), ("local_blocks", 1)):
            value = getattr(self, field)
            if not _is_int(value) or value < low:
                raise ValueError(
                    f"estimator {self.name!r}: {field} must be an int >= {low}, got {value!r}")

    def _window(self, batch: int, num_heads: int, seqlen_q: int, seqlen_k: int, causal: bool,
                device) -> BlockLayout:
        """The sink + local layout; raises if the window does not fit the key length."""
        nkb = -(-seqlen_k // self.block_n)
        if self.local_blocks > nkb or self.sink_blocks > nkb:
            raise ValueError(
                f"estimator {self.name!r}: sink_blocks={self.sink_blocks} and local_blocks="
                f"{self.local_blocks} (blocks of {self.block_n} keys) must each be at most the "
                f"{nkb} key blocks of seqlen_k={seqlen_k}; use fewer blocks or a longer sequence")
        return BlockLayout.streaming(
            batch, num_heads, seqlen_q, seqlen_k, sink_blocks=self.sink_blocks,
            local_blocks=self.local_blocks, causal=causal, block_m=self.block_m,
            block_n=self.block_n, device=device)


@dataclasses.dataclass
class BudgetEstimator(WindowEstimator):
    """Block estimator with a budget and GQA grouping (not registered).

    Subclasses compute block probabilities ``[B, Hq, NQB, NKB]`` and return
    ``self.select(probs, q, k, causal)``.

    Args:
        mass: cumulative estimated attention mass to keep per (batch, head, query block), in
            ``(0, 1]``; the default (0.95) when no budget is given.
        density: share of the causally reachable key blocks each query block computes, in
            ``(0, 1]`` (never fewer than the forced sink/local blocks).
        top_k: key blocks per query block (>= 1, forced blocks included).
        gqa_reduce: ``"max"`` or ``"mean"`` of a group's query-head probabilities for one
            per-KV-head layout, or ``"none"`` for a per-query-head layout.

    Exactly one of ``mass``, ``density``, ``top_k`` may be set.

    Example:
        >>> from sparse_attn import estimators
        >>> estimators.get("block_topk", density=0.1).mass is None
        True
    """

    mass: float | None = None
    density: float | None = None
    top_k: int | None = None
    gqa_reduce: str = "max"

    def __post_init__(self):
        super().__post_init__()
        given = [f for f in ("mass", "density", "top_k") if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(
                f"estimator {self.name!r}: give one budget, got {given}; accepted: mass in "
                f"(0, 1], density in (0, 1], or top_k >= 1")
        if not given:
            self.mass = 0.95
        for field in ("mass", "density"):
            value = getattr(self, field)
            if value is not None and not (_is_real(value) and 0.0 < value <= 1.0):
                raise ValueError(
                    f"estimator {self.name!r}: {field} must be a number in (0, 1], got {value!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(
                f"estimator {self.name!r}: top_k must be an int >= 1, got {self.top_k!r}")
        if self.gqa_reduce not in GQA_REDUCE:
            raise ValueError(
                f"estimator {self.name!r}: gqa_reduce must be one of {GQA_REDUCE}, got "
                f"{self.gqa_reduce!r}")

    def select(self, probs: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               causal: bool) -> BlockLayout:
        """Layout from block probabilities ``[B, Hq, NQB, NKB]`` under this config's budget."""
        batch, _, seqlen_q, _ = q.shape
        num_kv_heads, seqlen_k = k.shape[1], k.shape[2]
        probs = reduce_gqa(probs, num_kv_heads, self.gqa_reduce)
        keep = self._window(1, 1, seqlen_q, seqlen_k, causal, q.device).to_mask()[0, 0]
        valid = causal_pair_counts(
            seqlen_q, seqlen_k, self.block_m, self.block_n, causal, q.device) > 0
        count = self.top_k
        if self.density is not None:
            count = (self.density * valid.sum(-1)).round().clamp(min=1).long()  # [NQB]
        mask = select_blocks(probs, valid=valid, keep=keep, mass=self.mass, count=count)
        return BlockLayout.from_mask(mask, self.block_m, self.block_n)
