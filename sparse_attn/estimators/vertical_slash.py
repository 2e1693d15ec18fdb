"""``vertical_slash``: MInference's vertical-and-slash pattern, estimated from the last queries.

The last ``last_q`` query rows attend densely (causal softmax) to every key. Summed over those
rows, the probabilities give each key column a *vertical* score and each diagonal offset
``o = query position - key position`` a *slash* score (both are shares of the rows' mass). The
first ``sink_blocks`` key blocks and the ``local_blocks`` key blocks at each diagonal are dense
(their entries are left out of the scores); the other lines are ranked together: verticals by
their score, slashes by the best score of their group of ``block_n`` offsets (a slash is
computed as a band of whole blocks, so once a group is open its other slashes are free), then by
their own. The budget takes a prefix of that ranking:

- ``mass``: until the dense share plus the added scores reach the target;
- ``density``: until the *layout* density reaches it: each block diagonal a slash band opens
  is counted once (its causal pairs), each vertical by the rows that see it (so at 128k a
  10% budget gives about 10%, not a band of blocks for each of 13k scattered slashes);
- ``top_k``: a number of lines.

The layout: slash bands and sink/local blocks as dense blocks (built per block diagonal and
query-block phase, ``O(B H NQB NKB)``), verticals as per-query-block stripe lists (chunked,
``B H chunk width`` at a time). It runs in torch on any device (one ``[last_q, Sk]`` attention
per head, a few sorts over ``2 Sk`` lines), free of host synchronisation.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..layout import (BlockLayout, StripeLayout, causal_pair_counts, diagonal_phases,
                      slash_block_mask, slash_diagonals, vertical_columns)
from .anchor import dense_block_mask
from .base import register
from .select import _is_int, reduce_gqa
from ._stripe import StripeEstimator, last_rows

# fp32 bytes of one chunk of the last rows' [B, H, rows, Sk] probabilities
_CHUNK_BYTES = 128 * 2**20


def vertical_slash_scores(q: torch.Tensor, k: torch.Tensor, last_q: int, *, causal: bool = True,
                          forced_keys: int = 0, forced_offsets: int = 0,
                          scale: float | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vertical and slash scores of the last ``last_q`` query rows, per query head.

    Args:
        q: ``[B, Hq, Sq, D]``; k: ``[B, Hkv, Sk, D]`` (GQA; queries aligned to the end).
        last_q: how many of the last query rows estimate (capped at ``Sq``).
        causal: causal softmax (keys up to each row's absolute position).
        forced_keys, forced_offsets: the lines kept anyway (keys ``< forced_keys``, offsets
            ``< forced_offsets``): their (query, key) entries are left out of every score, so
            the scores rank what the other lines add.
        scale: default ``1/sqrt(D)``.

    Returns:
        ``(vertical, slash, covered)``, float32: ``vertical [B, Hq, Sk]`` the mean over the rows
        of their probability on key ``j``, ``slash [B, Hq, Sk]`` on key ``position - o``, both
        without the forced entries; ``covered [B, Hq]`` the rows' mean mass on the forced lines.
        Without forced lines each score sums to 1.

    Example:
        >>> v, s, c = vertical_slash_scores(torch.randn(1, 4, 256, 64),
        ...                                 torch.randn(1, 2, 256, 64), 64)
        >>> v.shape, s.shape, c.shape
        (torch.Size([1, 4, 256]), torch.Size([1, 4, 256]), torch.Size([1, 4]))
    """
    batch, hq, sq, dim = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    n = min(last_q, sq)
    # fp32 scores on the CPU; on the GPU the tensor-core product in K's dtype (fp32 output)
    kt = (k if q.is_cuda else k.float()).transpose(-1, -2)  # [B, Hkv, D, Sk]
    keys = torch.arange(sk, device=q.device)
    vertical = torch.zeros(batch, hq, sk, device=q.device)
    covered = torch.zeros(batch, hq, device=q.device)
    step = max(1, _CHUNK_BYTES // max(1, batch * hq * sk * 4))
    slash_f = torch.zeros(batch, hq, sk, device=q.device)  # slash, indexed sk - 1 - offset
    for r0 in range(sq - n, sq, step):
        r1 = min(sq, r0 + step)
        # the group's heads and rows share M ([B, Hkv, G * rows, D]): a broadcast batch dim
        # would make matmul copy K once per query head (2/3 of the estimate's time at 128k)
        qc = (q[:, :, r0:r1].float() * scale).to(kt.dtype).unflatten(1, (hkv, hq // hkv))
        s = torch.matmul(qc.flatten(2, 3), kt).unflatten(2, qc.shape[2:4])
        s = s.flatten(1, 2).float()  # [B, Hq, rows, Sk] scaled scores
        pos = torch.arange(r0, r1, device=q.device) + (sk - sq)  # absolute positions
        if causal:
            s.masked_fill_(keys[None, :] > pos[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        del s
        off = pos[:, None] - keys[None, :]  # [rows, Sk]: the offset of every entry
        forced = (keys[None, :] < forced_keys) | ((off >= 0) & (off < forced_offsets))
        p.masked_fill_(forced, 0.0)
        rows = p.sum(2)
        vertical += rows
        covered += (r1 - r0) - rows.sum(-1)  # every row's probabilities sum to 1
        for i in range(r1 - r0):  # row at absolute P: key k has offset P - k (no index tensor)
            top = r0 + i + sk - sq + 1
            slash_f[..., sk - top:] += p[:, :, i, :top]
    slash = slash_f.flip(-1)
    return vertical / n, slash / n, covered / n


def _compact(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Sorted positions of a bool ``[..., N]`` mask, ``-1`` padded, ``[..., width]`` (static
    width: no host sync; kept positions past ``width`` are dropped, the last first)."""
    n = mask.shape[-1]
    order = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)[..., :width]
    slot = torch.arange(min(n, width), device=mask.device)
    return torch.where(slot < mask.sum(-1, keepdim=True), order, -1).to(torch.int32)


@register("vertical_slash")
@dataclasses.dataclass
class VerticalSlash(StripeEstimator):
    """MInference vertical + slash lines from the attention of the last query rows.

    Args:
        block_m, block_n: layout tiles (64 or 128, default 64).
        sink_blocks: leading key blocks computed densely (>= 0, default 1).
        local_blocks: key blocks ending at each query block's diagonal computed densely
            (>= 1, default 1).
        last_q: query rows (the last ones) that estimate the lines (>= 1, default 64).
        mass: keep lines in rank order until the dense blocks' share of the rows' mass plus the
            added scores reach this share, in ``(0, 1]`` (default 0.95 when no budget is
            given; a vertical and a slash crossing share one entry, counted twice).
        density: or keep lines until the layout's density (computed pairs over the causal
            area, ``layout.density``) would pass this share (the dense sink + local share is
            always kept, even when larger).
        top_k: or keep this many lines beyond the forced ones (>= 1).
        max_columns: at most this many verticals (the stripe lists' width); default
            ``density * seqlen_k`` or ``top_k`` (+ 8), ``min(seqlen_k, 16384)`` for ``mass``.
        gqa_reduce: ``"max"`` (default: a per-KV-head layout from the group's maximum scores)
            or ``"none"`` (per query head).

    Returns (from ``estimate``):
        A :class:`StripeLayout` with ``H = Hkv`` (``Hq`` with ``gqa_reduce="none"``).

    Example:
        >>> est = sparse_attn.estimators.get("vertical_slash", density=0.1)
        >>> layout = est.estimate(torch.randn(1, 8, 2048, 64), torch.randn(1, 2, 2048, 64))
    """

    last_q: int = 64

    def __post_init__(self):
        if not _is_int(self.last_q) or self.last_q < 1:
            raise ValueError(
                f"estimator {self.name!r}: last_q must be an int >= 1, got {self.last_q!r}")
        super().__post_init__()

    def lines(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept lines as bool masks ``(vertical [B, H, Sk], slash [B, H, Sk])`` (the
        forced ones included)."""
        sq, sk = q.shape[2], k.shape[2]
        n_keys = min(sk, self.sink_blocks * self.block_n)
        n_offsets = min(sk, self.local_blocks * self.block_n)
        vertical, slash, covered = vertical_slash_scores(
            q, k, self.last_q, causal=causal, forced_keys=n_keys, forced_offsets=n_offsets)
        scores = torch.cat([vertical, slash], dim=-1)  # [B, Hq, 2 Sk]
        if self.gqa_reduce == "max":
            scores = reduce_gqa(scores, k.shape[1], "max")
            covered = reduce_gqa(covered, k.shape[1], "mean")
        pos = torch.arange(sk, device=q.device)
        forced = torch.cat([pos < n_keys, pos < n_offsets])
        gain = torch.where(forced, -1.0, scores)  # the mass each line adds
        # a slash is computed as a band of blocks: once its group of block_n offsets is open,
        # the group's other slashes cost nothing more, so they follow it in the ranking (a
        # group ranks by its best slash; inside a group, and for the verticals, by own mass)
        bn, nkb = self.block_n, -(-sk // self.block_n)
        group = torch.nn.functional.pad(gain[..., sk:], (0, nkb * bn - sk), value=-1.0)
        group = group.unflatten(-1, (nkb, bn)).amax(-1).repeat_interleave(bn, -1)[..., :sk]
        value = torch.where(forced, -1.0, torch.cat([gain[..., :sk], group], -1))
        by_gain = torch.argsort(gain, dim=-1, descending=True, stable=True)
        order = torch.gather(by_gain, -1, torch.argsort(
            torch.gather(value, -1, by_gain), dim=-1, descending=True, stable=True))
        ranked = torch.gather(gain, -1, order)
        # the static width of the stripe lists bounds the verticals (the forced ones are dense)
        is_vertical = order < sk
        allowed = ~is_vertical | (torch.cumsum(is_vertical & (ranked >= 0), -1)
                                  <= self._column_width(sk))
        if self.mass is not None:
            # lines by decreasing added mass until the rows' covered share reaches the target
            gain = torch.where(allowed, ranked.clamp(min=0), 0.0)
            before = covered[..., None] + gain.cumsum(-1) - gain
            take = (ranked >= 0) & allowed & (before < self.mass)
        elif self.density is not None:
            share = self._layout_shares(order, allowed, sq, sk, causal)
            take = (ranked >= 0) & allowed & (share <= self.density)
        else:
            take = (torch.arange(2 * sk, device=q.device) < self.top_k) & (ranked >= 0)
        chosen = torch.zeros_like(take).scatter(-1, order, take) | forced
        return chosen[..., :sk], chosen[..., sk:]

    def _layout_shares(self, order: torch.Tensor, allowed: torch.Tensor, sq: int, sk: int,
                       causal: bool) -> torch.Tensor:
        """Layout density (share of the causal area) after taking the lines of ``order`` up to
        each rank: float ``[B, H, 2 Sk]``.

        The dense sink + local blocks count first; a slash costs the block diagonals its band
        opens (once, at the first slash that opens them), a vertical the rows that see it.
        Vectorised over ranks: ``O(B H (Sk + phases NKB))`` memory, no host sync.
        """
        bm, bn, dev = self.block_m, self.block_n, order.device
        nkb, n2 = -(-sk // bn), 2 * sk
        b, h = order.shape[:2]
        pairs = causal_pair_counts(sq, sk, bm, bn, causal, dev).double()
        pairs = pairs / pairs.sum().clamp(min=1)
        dense = dense_block_mask(sq, sk, bm, bn, self.sink_blocks, self.local_blocks, causal,
                                 dev)
        forced_share = (pairs * dense).sum().float()
        phases, phase_of_block, diag = diagonal_phases(sq, sk, bm, bn, dev)
        n_diag = len(phases) * nkb
        # the share of block diagonal d (key block diag - d) per phase: a gather along the
        # diagonals and a sum over the phase's query blocks (no contended atomics)
        kb = diag[:, None] - torch.arange(nkb, device=dev)[None, :]  # [NQB, d]
        kbc = kb.clamp(min=0)
        on = torch.where((kb >= 0) & ~torch.gather(dense, 1, kbc),
                         torch.gather(pairs, 1, kbc), 0.0)
        diag_cost = torch.stack([
            (on * (phase_of_block == p)[:, None]).sum(0) for p in range(len(phases))
        ]).flatten().float()  # [phases * NKB]
        rank = torch.empty_like(order).scatter_(
            -1, order, torch.arange(n2, device=dev).expand_as(order))
        offs = torch.arange(sk, device=dev)
        movable = offs >= min(sk, self.local_blocks * bn)  # forced slashes open nothing
        first = torch.full((b, h, n_diag + 1), n2, dtype=torch.long, device=dev)
        for p, phase in enumerate(phases):
            for dd, hit in slash_diagonals(offs, phase, bn):
                at = torch.where(hit & movable & (dd < nkb), p * nkb + dd, n_diag)
                first.scatter_reduce_(-1, at.expand(b, h, sk), rank[..., sk:], "amin")
        cost = torch.zeros(b, h, n2 + 1, device=dev)
        cost.scatter_add_(-1, first[..., :n_diag], diag_cost.expand(b, h, n_diag).contiguous())
        if causal:
            rows = (sq - (offs - (sk - sq)).clamp(min=0)).clamp(min=0)
        else:
            rows = torch.full_like(offs, sq)
        area = _causal_area(sq, sk) if causal else float(sq * sk)
        v_cost = (rows.double() / area).float()
        v_cost = torch.where(offs < min(sk, self.sink_blocks * bn), 0.0, v_cost)
        v_cost = torch.where(torch.gather(allowed, -1, rank[..., :sk]), v_cost, 0.0)
        cost.scatter_add_(-1, rank[..., :sk], v_cost)
        return forced_share + cost[..., :n2].cumsum(-1)

    def estimate(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True) -> StripeLayout:
        self._check(q, k, causal)
        self._window(1, 1, q.shape[2], k.shape[2], causal, q.device)  # raises if it cannot fit
        sq, sk = q.shape[2], k.shape[2]
        bm, bn = self.block_m, self.block_n
        vertical, slash = self.lines(q, k, causal=causal)
        # dense: sink + local window + the block diagonals the slashes cross
        dense = dense_block_mask(sq, sk, bm, bn, self.sink_blocks, self.local_blocks, causal,
                                 q.device)
        offs = torch.arange(sk, device=q.device)
        # the forced offsets are the local window's (dense already): they open no band
        moved = slash & (offs >= min(sk, self.local_blocks * bn))
        block_mask = slash_block_mask(offs.expand_as(slash), moved, sq, sk, bm, bn) | dense
        blocks = BlockLayout.from_mask(block_mask, bm, bn)
        # verticals (the sink keys are dense): per query block, the seen ones outside dense
        width = self._column_width(sk)
        v = _compact(vertical & (offs >= min(sk, self.sink_blocks * bn)), width)
        counts, indices = vertical_columns(v, v >= 0, block_mask, last_rows(sq, sk, bm, q.device),
                                           width, bn)
        return StripeLayout(blocks, counts, indices)


def _causal_area(sq: int, sk: int) -> float:
    """Attendable (query, key) pairs of a causal attention, queries aligned to the end."""
    return float(sq * (sk - sq) + sq * (sq + 1) // 2)
