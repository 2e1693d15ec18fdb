"""``vertical_slash``: MInference's vertical-and-slash pattern, estimated from the last queries.

The last ``last_q`` query rows attend densely (causal softmax) to every key. Summed over those
rows, the probabilities give each key column a *vertical* score and each diagonal offset
``o = query position - key position`` a *slash* score (both are shares of the rows' mass). The
highest verticals and slashes, ranked together, are kept under the budget; the first
``sink_blocks * block_n`` keys (verticals) and the nearest ``local_blocks * block_n`` offsets
(slashes) are always kept. The lines become a :class:`StripeLayout` through
``StripeLayout.from_vertical_slash`` (slashes as dense blocks along their diagonals, verticals as
gathered columns).

It runs in torch on any device (one ``[last_q, Sk]`` attention per head, a scatter into the
offsets, one sort): cheap next to the attention and free of host synchronisation.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..layout import StripeLayout
from .base import register
from .select import _is_int, reduce_gqa
from ._stripe import StripeEstimator

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
    kt = k.float().transpose(-1, -2)[:, :, None]  # [B, Hkv, 1, D, Sk]
    keys = torch.arange(sk, device=q.device)
    vertical = torch.zeros(batch, hq, sk, device=q.device)
    slash = torch.zeros(batch, hq, sk, device=q.device)
    covered = torch.zeros(batch, hq, device=q.device)
    step = max(1, _CHUNK_BYTES // max(1, batch * hq * sk * 4))
    for r0 in range(sq - n, sq, step):
        r1 = min(sq, r0 + step)
        qc = q[:, :, r0:r1].float().unflatten(1, (hkv, hq // hkv))
        s = torch.matmul(qc, kt).flatten(1, 2) * scale  # [B, Hq, rows, Sk]
        pos = torch.arange(r0, r1, device=q.device) + (sk - sq)  # absolute positions
        if causal:
            s = s.masked_fill(keys[None, :] > pos[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        off = pos[:, None] - keys[None, :]  # [rows, Sk]: the offset of every entry
        forced = (keys[None, :] < forced_keys) | ((off >= 0) & (off < forced_offsets))
        covered += torch.where(forced, p, 0.0).sum((-1, -2))
        p = torch.where(forced, 0.0, p)
        vertical += p.sum(2)
        ok = off >= 0  # keys after the row (non-causal) lie on no slash
        slash.scatter_add_(-1, off.clamp(min=0).expand_as(p).flatten(2),
                           torch.where(ok, p, 0.0).flatten(2))
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
        sink_blocks: the first ``sink_blocks * block_n`` keys are always vertical lines
            (>= 0, default 1).
        local_blocks: the nearest ``local_blocks * block_n`` diagonals (offsets) are always
            slash lines (>= 1, default 1).
        last_q: query rows (the last ones) that estimate the lines (>= 1, default 64).
        mass: keep the fewest lines (verticals and slashes ranked together by the mass they add
            beyond the forced lines) until the forced lines' share of the rows' mass plus the
            added scores reach this share, in ``(0, 1]`` (default 0.95 when no budget is
            given; a vertical and a slash crossing share one entry, counted twice).
        density: or keep ``density * seqlen_k`` lines (forced included): a line covers half
            the causal area's rows on average, but a slash is computed as a band of dense
            blocks, so the layout's density is higher (check ``layout.density``).
        top_k: or keep this many lines beyond the forced ones (>= 1).
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
        """The kept lines as bool masks ``(vertical [B, H, Sk], slash [B, H, Sk])``."""
        sk = k.shape[2]
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
        ranked, order = torch.where(forced, -1.0, scores).sort(dim=-1, descending=True)
        if self.mass is not None:
            # lines by decreasing added mass until the rows' covered share reaches the target
            before = covered[..., None] + ranked.clamp(min=0).cumsum(-1) - ranked.clamp(min=0)
            take = (ranked >= 0) & (before < self.mass)
        else:
            if self.density is not None:
                extra = max(0, round(self.density * sk) - n_keys - n_offsets)
            else:
                extra = self.top_k
            take = (torch.arange(2 * sk, device=q.device) < extra) & (ranked >= 0)
        chosen = torch.zeros_like(take).scatter(-1, order, take) | forced
        return chosen[..., :sk], chosen[..., sk:]

    def estimate(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True) -> StripeLayout:
        self._check(q, k, causal)
        self._window(1, 1, q.shape[2], k.shape[2], causal, q.device)  # raises if it cannot fit
        sk = k.shape[2]
        vertical, slash = self.lines(q, k, causal=causal)
        width = self._column_width(sk)
        forced_keys = min(sk, self.sink_blocks * self.block_n)
        if self.top_k is not None or self.density is not None:
            width = min(sk, width + forced_keys)  # the forced verticals come on top
        return StripeLayout.from_vertical_slash(
            _compact(vertical, width), _compact(slash, sk), q.shape[2], sk,
            block_m=self.block_m, block_n=self.block_n, max_columns=width)
