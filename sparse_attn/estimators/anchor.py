"""``anchor``: AnchorAttention (2025): difference-aware stripe selection against an anchor score.

1. Anchor: every query row's maximum score taken exactly over the keys it computes densely
   anyway (the sink blocks and the local window); these positions hold the near-maximum scores
   of almost every row, so the row maximum over them is a cheap stand-in for the true maximum.
   A query block's anchor is the mean of its rows' anchors.
2. Difference-aware identification: each query block is mean-pooled to one vector and scored
   against every key; a key whose pooled score comes within ``theta`` of the block's anchor
   (``score >= anchor - theta``) is a stripe: the whole column is gathered for that block.
3. The result is a :class:`StripeLayout`: sink + local blocks dense, the selected columns as
   gathered stripes.

Budget forms: ``theta`` (the paper's difference threshold), or ``mass`` (the fewest columns whose
estimated softmax mass ``exp(score - anchor)`` reaches that share, the dense blocks' mass
included), ``density`` or ``top_k`` (columns per query block).

On CUDA the estimation runs in Triton (``kernels/stripe_estimate.py``: the anchor and pooling in
one kernel, then one pass over the keys that selects and compacts the columns; ``mass`` /
``density`` / ``top_k`` add a histogram pass that turns the budget into a per-block threshold,
so the kept set can exceed the exact budget by one histogram bin). On the CPU it runs in torch,
chunked over query blocks, with exact selection; beyond ``CONFIG["long_keys"]`` keys both
paths take a budget's threshold from every ``CONFIG["long_stride"]``-th candidate key, each
weighing ``long_stride`` keys, with the forced sink and local keys summed exactly
(:meth:`Anchor.sample_stride`).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..layout import BlockLayout, StripeLayout
from .base import register
from .block_topk import pool_blocks
from .select import _is_real, select_blocks
from ._stripe import StripeEstimator, last_rows

# fp32 bytes of one chunk's [B, H, rows, Sk] score tensor on the torch path
_CHUNK_BYTES = 128 * 2**20


def dense_block_mask(seqlen_q: int, seqlen_k: int, block_m: int, block_n: int, sink_blocks: int,
                     local_blocks: int, causal: bool, device) -> torch.Tensor:
    """Bool ``[NQB, NKB]``: the sink + local blocks each query block computes densely."""
    nkb = -(-seqlen_k // block_n)
    last = last_rows(seqlen_q, seqlen_k, block_m, device)
    diag = (last // block_n).clamp(max=nkb - 1)
    kb = torch.arange(nkb, device=device)
    keep = (kb[None, :] < sink_blocks) | (
        (kb[None, :] <= diag[:, None]) & (kb[None, :] > diag[:, None] - local_blocks))
    if causal:
        keep &= kb[None, :] * block_n <= last[:, None]
    return keep


def anchor_pool(q: torch.Tensor, k: torch.Tensor, *, block_m: int, block_n: int,
                sink_blocks: int, local_blocks: int, causal: bool = True,
                scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled queries and block anchors (torch).

    Args:
        q: ``[B, Hq, Sq, D]``; k: ``[B, Hkv, Sk, D]`` (GQA; queries aligned to the end of keys).
        block_m, block_n, sink_blocks, local_blocks: the layout's tiles and dense window.
        causal: mask keys after each row's absolute position.
        scale: score scale, default ``1/sqrt(D)``.

    Returns:
        ``(qbar, abar)``: float32 ``[B, Hq, NQB, D]`` mean of each block's query rows, and
        float32 ``[B, Hq, NQB]`` the mean over the block's rows of each row's maximum scaled
        score over its dense (sink + local) keys (rows that see no dense key are left out; 0
        when no row sees one).

    Example:
        >>> qbar, abar = anchor_pool(torch.randn(1, 4, 300, 64), torch.randn(1, 2, 300, 64),
        ...                          block_m=64, block_n=64, sink_blocks=1, local_blocks=1)
        >>> abar.shape
        torch.Size([1, 4, 5])
    """
    batch, hq, sq, dim = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    nqb = -(-sq // block_m)
    dense = dense_block_mask(sq, sk, block_m, block_n, sink_blocks, local_blocks, causal,
                             q.device)
    offset = sk - sq
    sink_end = min(sk, sink_blocks * block_n)
    kf = k.float()
    abar = torch.zeros(batch, hq, nqb, device=q.device)
    step = 16  # query blocks per chunk: the window keys of a chunk stay a short range
    for m0 in range(0, nqb, step):
        m1 = min(nqb, m0 + step)
        r0, r1 = m0 * block_m, min(sq, m1 * block_m)
        last0 = min(m0 * block_m + block_m - 1, sq - 1) + offset  # host ints: no sync
        last1 = min(m1 * block_m - 1, sq - 1) + offset
        lo = max(0, (last0 // block_n - local_blocks + 1) * block_n)
        hi = min(sk, (last1 // block_n + 1) * block_n)
        cols = torch.cat([torch.arange(0, min(sink_end, lo), device=q.device),
                          torch.arange(lo, hi, device=q.device)])
        qc = q[:, :, r0:r1].float().unflatten(1, (hkv, hq // hkv))
        s = torch.matmul(qc, kf[:, :, cols].transpose(-1, -2)[:, :, None]).flatten(1, 2) * scale
        rows = torch.arange(r0, r1, device=q.device)
        allowed = dense[rows // block_m][:, cols // block_n]  # [rows, cols]
        if causal:
            allowed &= cols[None, :] <= rows[:, None] + offset
        s = s.masked_fill(~allowed, float("-inf"))
        row_max = s.amax(-1)  # [B, Hq, rows]
        ok = torch.isfinite(row_max)
        pad = (m1 - m0) * block_m - (r1 - r0)
        total = torch.nn.functional.pad(torch.where(ok, row_max, 0.0), (0, pad))
        n_ok = torch.nn.functional.pad(ok.float(), (0, pad))
        total = total.unflatten(-1, (m1 - m0, block_m)).sum(-1)
        n_ok = n_ok.unflatten(-1, (m1 - m0, block_m)).sum(-1)
        abar[:, :, m0:m1] = total / n_ok.clamp(min=1)
    return pool_blocks(q, block_m, "mean"), abar


def anchor_diff(qbar: torch.Tensor, abar: torch.Tensor, k: torch.Tensor, m0: int, m1: int, *,
                scale: float, gqa_reduce: str) -> torch.Tensor:
    """Pooled score minus anchor for query blocks ``m0:m1`` against every key (torch).

    Returns float32 ``[B, H, m1 - m0, Sk]`` (``H = Hkv`` with ``gqa_reduce="max"``: the
    group's maximum), before any causal or dense-block masking.
    """
    hq, hkv = qbar.shape[1], k.shape[1]
    pq = qbar[:, :, m0:m1].unflatten(1, (hkv, hq // hkv))  # [B, Hkv, G, n, D]
    s = torch.matmul(pq, k.float().transpose(-1, -2)[:, :, None]) * scale
    diff = s - abar[:, :, m0:m1].unflatten(1, (hkv, hq // hkv))[..., None]
    return diff.amax(2) if gqa_reduce == "max" else diff.flatten(1, 2)


@register("anchor")
@dataclasses.dataclass
class Anchor(StripeEstimator):
    """AnchorAttention: sink + local blocks dense, plus the key columns near the anchor score.

    Args:
        block_m, block_n: layout tiles (64 or 128, default 64); the query pooling block is
            ``block_m``.
        sink_blocks: leading key blocks computed densely (>= 0, default 1).
        local_blocks: key blocks ending at the diagonal computed densely (>= 1, default 2).
        theta: keep the columns whose pooled score is at least ``anchor - theta`` (> 0; in
            units of scaled logits: ``theta = 3`` keeps keys within ``e**3`` of the anchor).
        mass: or keep the fewest columns whose estimated mass ``exp(score - anchor)`` reaches
            this share of the block's estimated total, the dense blocks' share included, in
            ``(0, 1]`` (the default, 0.95, when no budget is given).
        density: or keep this share of each query block's reachable keys (dense blocks
            included), in ``(0, 1]``.
        top_k: or keep this many columns per query block beyond the dense blocks (>= 1).
        max_columns: at most this many columns per query block (the first ones by position
            when more are selected); default ``None``: ``top_k``, ``density * seqlen_k`` or,
            for ``mass`` / ``theta``, ``min(seqlen_k, 16384)``.
        gqa_reduce: ``"max"`` (default, per-KV-head layout: a column kept for any head of the
            group) or ``"none"`` (per query head).
        backend: ``"auto"`` (Triton on CUDA), ``"triton"`` or ``"torch"``.

    Returns (from ``estimate``):
        A :class:`StripeLayout` with ``H = Hkv`` (``Hq`` with ``gqa_reduce="none"``).

    Example:
        >>> est = sparse_attn.estimators.get("anchor", theta=3.0)
        >>> layout = est.estimate(torch.randn(1, 8, 2048, 64), torch.randn(1, 2, 2048, 64))
        >>> layout.density(2048, 2048)
    """

    local_blocks: int = 2
    theta: float | None = None

    def __post_init__(self):
        if self.theta is not None:
            if not (_is_real(self.theta) and self.theta > 0):
                raise ValueError(
                    f"estimator {self.name!r}: theta must be a number > 0, got {self.theta!r}")
            given = [f for f in ("mass", "density", "top_k") if getattr(self, f) is not None]
            if given:
                raise ValueError(
                    f"estimator {self.name!r}: give one budget, got ['theta', *{given}]; "
                    f"accepted: theta > 0, mass in (0, 1], density in (0, 1], or top_k >= 1")
        super().__post_init__()
        if self.theta is not None:
            self.mass = None  # the base defaults to mass=0.95 when it sees no budget

    # ------------------------------------------------------------------------- estimate
    def estimate(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True) -> StripeLayout:
        self._check(q, k, causal)
        batch, _, sq, dim = q.shape
        sk = k.shape[2]
        heads = self._out_heads(q, k)
        self._window(1, 1, sq, sk, causal, q.device)  # raises if the window does not fit
        dense = dense_block_mask(sq, sk, self.block_m, self.block_n, self.sink_blocks,
                                 self.local_blocks, causal, q.device)
        width = self._column_width(sk)
        if self._use_triton(q):
            from ..kernels.stripe_estimate import anchor_stripes
            counts, indices = anchor_stripes(
                q, k, block_m=self.block_m, block_n=self.block_n, sink_blocks=self.sink_blocks,
                local_blocks=self.local_blocks, causal=causal, theta=self.theta,
                mass=self.mass, density=self.density, top_k=self.top_k, max_columns=width,
                per_kv_head=self.gqa_reduce == "max")
            blocks = _blocks(dense, batch, heads, self.block_m, self.block_n,
                             self.sink_blocks + self.local_blocks)
            return StripeLayout(blocks, counts, indices)
        column_mask = self.column_mask(q, k, causal=causal)
        block_mask = dense.expand(batch, heads, *dense.shape).contiguous()
        return StripeLayout.from_mask(block_mask, column_mask, block_m=self.block_m,
                                      block_n=self.block_n, max_columns=width)

    def column_mask(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True,
                    dense: torch.Tensor | None = None) -> torch.Tensor:
        """The selected stripe columns (torch path): bool ``[B, H, NQB, Sk]``.

        Never inside a dense (sink/local) block of the same query block, never after the
        block's last row when ``causal``.
        """
        batch, hq, sq, dim = q.shape
        sk = k.shape[2]
        scale = 1.0 / math.sqrt(dim)
        if dense is None:
            dense = dense_block_mask(sq, sk, self.block_m, self.block_n, self.sink_blocks,
                                     self.local_blocks, causal, q.device)
        qbar, abar = anchor_pool(q, k, block_m=self.block_m, block_n=self.block_n,
                                 sink_blocks=self.sink_blocks, local_blocks=self.local_blocks,
                                 causal=causal, scale=scale)
        heads = self._out_heads(q, k)
        nqb = qbar.shape[2]
        last = last_rows(sq, sk, self.block_m, q.device)
        keys = torch.arange(sk, device=q.device)
        stride = self.sample_stride(sk)
        out = torch.zeros(batch, heads, nqb, sk, dtype=torch.bool, device=q.device)
        step = max(1, _CHUNK_BYTES // max(1, batch * hq * sk * 4))
        for m0 in range(0, nqb, step):
            m1 = min(nqb, m0 + step)
            diff = anchor_diff(qbar, abar, k, m0, m1, scale=scale, gqa_reduce=self.gqa_reduce)
            forced = dense[m0:m1].repeat_interleave(self.block_n, dim=-1)[:, :sk]  # [n, Sk]
            reach = (keys[None, :] <= last[m0:m1, None]) if causal else torch.ones_like(forced)
            cand = reach & ~forced
            if self.theta is not None:
                out[:, :, m0:m1] = (diff >= -self.theta) & cand
                continue
            diff = diff.masked_fill(~reach, float("-inf"))
            probs = torch.softmax(diff, dim=-1).nan_to_num_(0.0)
            count = None
            if self.density is not None:
                count = (self.density * reach.sum(-1)).round().clamp(min=1).long()
            elif self.top_k is not None:
                count = (forced & reach).sum(-1) + self.top_k
            if stride == 1:
                chosen = select_blocks(probs, valid=reach, keep=forced & reach, mass=self.mass,
                                       count=count)
                out[:, :, m0:m1] = chosen & cand
                continue
            # the GPU rule: the budget's threshold from every stride-th candidate, each
            # weighing stride keys, against the exact forced (sink + local) keys; applied to all
            smp = keys % stride == 0
            kept = forced & reach
            scan = kept | (cand & smp)
            weight = torch.where(smp & ~forced, probs * stride, probs).masked_fill(~scan, 0.0)
            if count is not None:  # sampled candidates for the count beyond the forced keys
                n_forced = kept.sum(-1)
                count = n_forced + torch.ceil((count - n_forced).clamp(min=0) / stride).long()
            chosen = select_blocks(weight, valid=scan, keep=kept, mass=self.mass, count=count)
            picked = chosen & cand & smp
            thr = torch.where(picked, diff, float("inf")).amin(-1, keepdim=True)
            every = (picked == (cand & smp)).all(-1, keepdim=True)  # the sample needs all
            thr = torch.where(every & picked.any(-1, keepdim=True), float("-inf"), thr)
            out[:, :, m0:m1] = (diff >= thr) & cand
        return out

    def sample_stride(self, seqlen_k: int) -> int:
        """Key stride of the budget search: the Triton kernel's rule
        (``kernels/stripe_estimate.search_stride``), so both paths select with the same sampled
        threshold; 1 for ``theta`` (no search)."""
        if self.theta is not None:
            return 1
        from ..kernels.stripe_estimate import search_stride  # triton is a dependency, CPU too

        return search_stride(seqlen_k)


def _blocks(dense: torch.Tensor, batch: int, heads: int, block_m: int, block_n: int,
            max_blocks: int):
    """The sink + local BlockLayout shared by every (batch, head): built once on ``[NQB, NKB]``
    with ``max_blocks`` (sink + local) wide lists, then expanded (no ``[B, H, NQB, NKB]`` sort)."""
    one = BlockLayout.from_mask(dense[None, None], block_m, block_n,
                                max_blocks=min(max_blocks, dense.shape[-1]))
    counts = one.counts.expand(batch, heads, -1).contiguous()
    indices = one.indices.expand(batch, heads, -1, -1).contiguous()
    return BlockLayout(counts, indices, block_m, block_n, one.num_k_blocks)

