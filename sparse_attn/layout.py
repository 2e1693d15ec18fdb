"""Layouts: the one contract between estimators (where to compute) and kernels (how).

A ``BlockLayout`` lists, for every (batch, head, query block), the sorted key blocks to compute.
Query blocks tile the *query* rows from 0; key blocks tile the *key* positions from 0. When the
query is shorter than the key (chunked prefill, decode), query row ``i`` sits at absolute
position ``seqlen_k - seqlen_q + i`` (queries aligned to the end), which is what causality uses.
"""
from __future__ import annotations

from dataclasses import dataclass
import math

import torch

__all__ = ["BlockLayout", "StripeLayout", "causal_pair_counts", "TopKLayout"]

_BLOCK_SIZES = (16, 32, 64, 128, 256)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sum_clamped_ramp(n: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """sum_{a=1..n} min(a, width) for n >= 0 (closed form, elementwise)."""
    n = n.clamp(min=0)
    small = n * (n + 1) // 2
    large = width * (width + 1) // 2 + (n - width) * width
    return torch.where(n <= width, small, large)


def causal_pair_counts(
    seqlen_q: int, seqlen_k: int, block_m: int, block_n: int, causal: bool, device=None
) -> torch.Tensor:
    """Number of attendable (query, key) pairs in every (query block, key block) tile.

    Returns an int64 ``[NQB, NKB]`` tensor; with ``causal`` it counts only pairs with
    ``key <= query + (seqlen_k - seqlen_q)``. Closed form, so 128k sequences cost nothing.
    """
    nqb, nkb = _cdiv(seqlen_q, block_m), _cdiv(seqlen_k, block_n)
    r0 = torch.arange(nqb, device=device, dtype=torch.int64)[:, None] * block_m
    r1 = (r0 + block_m).clamp(max=seqlen_q)
    c0 = torch.arange(nkb, device=device, dtype=torch.int64)[None, :] * block_n
    c1 = (c0 + block_n).clamp(max=seqlen_k)
    width = c1 - c0
    if not causal:
        return (r1 - r0) * width
    offset = seqlen_k - seqlen_q
    # row r may see keys c0 .. r + offset: a ramp a(r) = r + offset + 1 - c0 clamped to [0, width]
    a_first = r0 + offset + 1 - c0
    a_last = r1 - 1 + offset + 1 - c0
    return _sum_clamped_ramp(a_last, width) - _sum_clamped_ramp(a_first - 1, width)


@dataclass
class BlockLayout:
    """Key blocks to compute for each (batch, head, query block).

    Attributes:
        counts: int32 ``[B, H, NQB]``, how many key blocks each query block computes.
        indices: int32 ``[B, H, NQB, MAXB]``, the key-block indices, strictly increasing in the
            first ``counts`` entries; entries past ``counts`` are padding (``-1``) and never read.
        block_m: query rows per block.
        block_n: key positions per block.
        num_k_blocks: number of key blocks the layout was built for (``ceil(seqlen_k / block_n)``).

    ``H`` is either the number of query heads or the number of KV heads; a per-KV-head layout is
    shared by every query head of its group (and lets the kernel serve the whole group from one
    K/V tile load).
    """

    counts: torch.Tensor
    indices: torch.Tensor
    block_m: int = 128
    block_n: int = 128
    num_k_blocks: int | None = None

    def __post_init__(self):
        if not isinstance(self.counts, torch.Tensor) or self.counts.dim() != 3:
            raise ValueError(
                f"BlockLayout.counts must be an int32 tensor [B, H, NQB], got "
                f"{getattr(self.counts, 'shape', type(self.counts))}"
            )
        if not isinstance(self.indices, torch.Tensor) or self.indices.dim() != 4:
            raise ValueError(
                f"BlockLayout.indices must be an int32 tensor [B, H, NQB, MAXB], got "
                f"{getattr(self.indices, 'shape', type(self.indices))}"
            )
        if self.indices.shape[:3] != self.counts.shape:
            raise ValueError(
                f"BlockLayout.indices {tuple(self.indices.shape)} and counts "
                f"{tuple(self.counts.shape)} disagree on [B, H, NQB]"
            )
        for name in ("counts", "indices"):
            t = getattr(self, name)
            if t.dtype != torch.int32:
                if t.dtype.is_floating_point or t.dtype == torch.bool:
                    raise TypeError(f"BlockLayout.{name} must be int32, got {t.dtype}")
                setattr(self, name, t.to(torch.int32))
        if self.counts.device != self.indices.device:
            raise ValueError(
                f"BlockLayout.counts on {self.counts.device} but indices on {self.indices.device}"
            )
        for name in ("block_m", "block_n"):
            if getattr(self, name) not in _BLOCK_SIZES:
                raise ValueError(
                    f"BlockLayout.{name} must be one of {_BLOCK_SIZES}, got {getattr(self, name)}"
                )
        if self.num_k_blocks is None:
            # without it we can only assume the widest index fits; prefer passing it
            self.num_k_blocks = max(int(self.indices.shape[-1]), 1)

    # ----------------------------------------------------------------------------- shape
    @property
    def batch(self) -> int:
        return self.counts.shape[0]

    @property
    def num_heads(self) -> int:
        return self.counts.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.counts.shape[2]

    @property
    def max_blocks(self) -> int:
        return self.indices.shape[3]

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def to(self, device) -> "BlockLayout":
        return BlockLayout(
            self.counts.to(device), self.indices.to(device), self.block_m, self.block_n,
            self.num_k_blocks,
        )

    def __repr__(self) -> str:
        return (
            f"BlockLayout(B={self.batch}, H={self.num_heads}, NQB={self.num_q_blocks}, "
            f"NKB={self.num_k_blocks}, MAXB={self.max_blocks}, block_m={self.block_m}, "
            f"block_n={self.block_n}, device={self.device})"
        )

    # ----------------------------------------------------------------------- construction
    @classmethod
    def from_mask(cls, block_mask: torch.Tensor, block_m: int = 128, block_n: int = 128,
                  max_blocks: int | None = None) -> "BlockLayout":
        """Build from a bool block mask ``[B, H, NQB, NKB]`` (True = compute that tile).

        ``max_blocks`` sets the padded width of ``indices``; by default it is NKB, which needs
        no host synchronisation (a data-dependent width would).
        """
        if not isinstance(block_mask, torch.Tensor) or block_mask.dim() != 4:
            raise ValueError(
                f"block_mask must be a bool tensor [B, H, NQB, NKB], got "
                f"{getattr(block_mask, 'shape', type(block_mask))}"
            )
        if block_mask.dtype != torch.bool:
            raise TypeError(f"block_mask must be torch.bool, got {block_mask.dtype}")
        nkb = block_mask.shape[-1]
        width = nkb if max_blocks is None else int(max_blocks)
        counts = block_mask.sum(-1, dtype=torch.int32)
        # stable argsort of ~mask puts the selected blocks first, in increasing order
        order = torch.argsort((~block_mask).to(torch.uint8), dim=-1, stable=True)
        order = order[..., :width].to(torch.int32)
        if width > nkb:
            pad = order.new_full((*order.shape[:-1], width - nkb), -1)
            order = torch.cat([order, pad], dim=-1)
        slot = torch.arange(width, device=block_mask.device, dtype=torch.int32)
        indices = torch.where(slot < counts[..., None], order, -1)
        if max_blocks is not None:
            counts = counts.clamp(max=width)
        return cls(counts, indices.contiguous(), block_m, block_n, nkb)

    @classmethod
    def dense(cls, batch: int, num_heads: int, seqlen_q: int, seqlen_k: int | None = None, *,
              causal: bool = True, block_m: int = 128, block_n: int = 128,
              device=None) -> "BlockLayout":
        """Every tile (every tile on or below the diagonal when ``causal``)."""
        seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
        reach = causal_pair_counts(seqlen_q, seqlen_k, block_m, block_n, causal, device) > 0
        return cls.from_mask(reach.expand(batch, num_heads, *reach.shape).contiguous(),
                             block_m, block_n)

    @classmethod
    def streaming(cls, batch: int, num_heads: int, seqlen_q: int, seqlen_k: int | None = None,
                  *, sink_blocks: int = 1, local_blocks: int = 4, causal: bool = True,
                  block_m: int = 128, block_n: int = 128, device=None) -> "BlockLayout":
        """Sink blocks plus a causal local window ("A-shape", StreamingLLM).

        Each query block keeps the first ``sink_blocks`` key blocks and the ``local_blocks``
        key blocks that end at its diagonal.
        """
        seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
        if sink_blocks < 0 or local_blocks < 1:
            raise ValueError(
                f"streaming layout needs sink_blocks >= 0 and local_blocks >= 1, got "
                f"sink_blocks={sink_blocks}, local_blocks={local_blocks}"
            )
        nqb, nkb = _cdiv(seqlen_q, block_m), _cdiv(seqlen_k, block_n)
        offset = seqlen_k - seqlen_q
        last_row = (torch.arange(nqb, device=device) * block_m + block_m - 1).clamp(
            max=seqlen_q - 1) + offset
        diag = (last_row // block_n).clamp(max=nkb - 1)  # key block holding the last row
        kb = torch.arange(nkb, device=device)
        keep = (kb[None, :] < sink_blocks) | (
            (kb[None, :] <= diag[:, None]) & (kb[None, :] > diag[:, None] - local_blocks))
        if causal:
            keep &= causal_pair_counts(seqlen_q, seqlen_k, block_m, block_n, True, device) > 0
        return cls.from_mask(keep.expand(batch, num_heads, nqb, nkb).contiguous(),
                             block_m, block_n)

    # ----------------------------------------------------------------------------- checks
    def validate(self, seqlen_q: int, seqlen_k: int, *, check_indices: bool = True) -> None:
        """Raise ``ValueError`` if the layout does not fit these sequence lengths.

        ``check_indices`` also checks every used index is in range and strictly increasing
        (this reads the layout back to the host: leave it off on a hot path).
        """
        nqb, nkb = _cdiv(seqlen_q, self.block_m), _cdiv(seqlen_k, self.block_n)
        if self.num_q_blocks != nqb:
            raise ValueError(
                f"layout has {self.num_q_blocks} query blocks of {self.block_m} but "
                f"seqlen_q={seqlen_q} needs {nqb}: was it built for another sequence length?"
            )
        if self.num_k_blocks != nkb:
            raise ValueError(
                f"layout was built for {self.num_k_blocks} key blocks of {self.block_n} but "
                f"seqlen_k={seqlen_k} needs {nkb}: was it built for another sequence length?"
            )
        if not check_indices:
            return
        counts = self.counts.long()
        if bool((counts < 0).any()) or bool((counts > self.max_blocks).any()):
            raise ValueError(
                f"layout counts must lie in [0, {self.max_blocks}] (the width of indices), got "
                f"range [{int(counts.min())}, {int(counts.max())}]"
            )
        slot = torch.arange(self.max_blocks, device=self.device)
        used = slot < counts[..., None]
        idx = self.indices.long()
        bad = used & ((idx < 0) | (idx >= nkb))
        if bool(bad.any()):
            where = tuple(int(x) for x in bad.nonzero()[0].tolist())
            raise ValueError(
                f"layout index out of range at [b, h, qblock, slot]={where}: "
                f"{int(idx[where])} not in [0, {nkb})"
            )
        if self.max_blocks > 1:
            step_used = used[..., 1:]
            unsorted = step_used & (idx[..., 1:] <= idx[..., :-1])
            if bool(unsorted.any()):
                b, h, m, j = (int(x) for x in unsorted.nonzero()[0].tolist())
                raise ValueError(
                    f"layout indices must be strictly increasing per query block; at "
                    f"[b, h, qblock]=({b}, {h}, {m}) slot {j + 1}: {int(idx[b, h, m, j + 1])} "
                    f"follows {int(idx[b, h, m, j])}"
                )

    # ------------------------------------------------------------------------ conversions
    def to_mask(self) -> torch.Tensor:
        """Bool block mask ``[B, H, NQB, NKB]``."""
        mask = torch.zeros(
            (*self.counts.shape, self.num_k_blocks + 1), dtype=torch.bool, device=self.device)
        slot = torch.arange(self.max_blocks, device=self.device)
        used = slot < self.counts[..., None].long()
        # unused slots scatter into a spare column that is dropped
        target = torch.where(used, self.indices.long(), self.num_k_blocks)
        mask.scatter_(-1, target, True)
        return mask[..., : self.num_k_blocks]

    def to_token_mask(self, seqlen_q: int, seqlen_k: int, *, causal: bool = False,
                      q_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Bool ``[B, H, Sq, Sk]`` of the (query, key) positions the layout attends.

        With ``causal`` the causal constraint (queries aligned to the end) is applied too.
        ``q_range=(start, stop)`` returns only those query rows (for chunked references).
        """
        self.validate(seqlen_q, seqlen_k, check_indices=False)
        start, stop = (0, seqlen_q) if q_range is None else q_range
        rows = torch.arange(start, stop, device=self.device)
        cols = torch.arange(seqlen_k, device=self.device)
        block = self.to_mask()[:, :, rows // self.block_m]  # [B, H, rows, NKB]
        tok = block[..., cols // self.block_n]
        if causal:
            tok = tok & (cols[None, :] <= rows[:, None] + (seqlen_k - seqlen_q))
        return tok

    def density(self, seqlen_q: int | None = None, seqlen_k: int | None = None, *,
                causal: bool = True, per_head: bool = False):
        """Share of the attendable (query, key) pairs the layout computes.

        Against the causal area when ``causal``. Sequence lengths default to the full block
        extents. Returns a float (mean over batch and heads) or, with ``per_head``, a float
        tensor ``[B, H]``.
        """
        seqlen_q = self.num_q_blocks * self.block_m if seqlen_q is None else seqlen_q
        seqlen_k = self.num_k_blocks * self.block_n if seqlen_k is None else seqlen_k
        self.validate(seqlen_q, seqlen_k, check_indices=False)
        pairs = causal_pair_counts(
            seqlen_q, seqlen_k, self.block_m, self.block_n, causal, self.device).double()
        total = pairs.sum().clamp(min=1)
        covered = (self.to_mask().double() * pairs).sum((-1, -2)) / total
        return covered if per_head else float(covered.mean())

    def repeat_heads(self, num_heads: int) -> "BlockLayout":
        """A per-query-head copy of a per-KV-head layout (each KV head's lists repeated for
        the ``num_heads // H`` query heads of its group)."""
        if num_heads % self.num_heads:
            raise ValueError(
                f"num_heads={num_heads} is not a multiple of the layout's {self.num_heads} heads")
        g = num_heads // self.num_heads
        return BlockLayout(self.counts.repeat_interleave(g, 1).contiguous(),
                           self.indices.repeat_interleave(g, 1).contiguous(),
                           self.block_m, self.block_n, self.num_k_blocks)

    def to_block_mask(self, seqlen_q: int | None = None, seqlen_k: int | None = None, *,
                      causal: bool = True, num_q_heads: int | None = None):
        """The same pattern as a FlexAttention ``BlockMask``.

        Built from the index lists (``BlockMask.from_kv_blocks``), never from a dense mask, so
        it works at 128k. ``block_m``/``block_n`` become its ``BLOCK_SIZE``. With ``causal``
        the mask function also applies token-level causality (queries aligned to the end).
        For a per-KV-head layout pass ``num_q_heads``: the mask is repeated per query head
        (FlexAttention's GPU kernel maps query head ``h`` to mask head ``h % H``, not to its
        GQA group, so a per-KV-head mask would be read wrongly).
        """
        from torch.nn.attention.flex_attention import BlockMask

        if num_q_heads is not None and num_q_heads != self.num_heads:
            return self.repeat_heads(num_q_heads).to_block_mask(seqlen_q, seqlen_k,
                                                                causal=causal)

        seqlen_q = self.num_q_blocks * self.block_m if seqlen_q is None else seqlen_q
        seqlen_k = self.num_k_blocks * self.block_n if seqlen_k is None else seqlen_k
        self.validate(seqlen_q, seqlen_k, check_indices=False)
        offset = seqlen_k - seqlen_q
        mask_mod = None
        if causal:
            def mask_mod(b, h, q_idx, kv_idx):  # noqa: E306 - FlexAttention's signature
                return kv_idx <= q_idx + offset
        # FlexAttention treats every listed block as partial (masked) unless told otherwise;
        # pass full blocks separately so it can skip mask_mod on them, as its own masks do.
        kv_indices = self.indices.clamp(min=0)
        if self.max_blocks < self.num_k_blocks:
            # FlexAttention reads the number of key blocks from the index tensor's width
            kv_indices = torch.nn.functional.pad(
                kv_indices, (0, self.num_k_blocks - self.max_blocks))
        if causal:
            pairs = causal_pair_counts(seqlen_q, seqlen_k, self.block_m, self.block_n, True,
                                       self.device)
            full_area = (
                (torch.arange(self.num_q_blocks, device=self.device)[:, None] * self.block_m
                 + self.block_m <= seqlen_q).long() * self.block_m
            ) * (
                (torch.arange(self.num_k_blocks, device=self.device)[None, :] * self.block_n
                 + self.block_n <= seqlen_k).long() * self.block_n
            )
            is_full = (pairs == full_area) & (full_area > 0)  # [NQB, NKB]
            slot = torch.arange(kv_indices.shape[-1], device=self.device)
            used = slot < self.counts[..., None].long()
            full_sel = used & is_full[
                torch.arange(self.num_q_blocks, device=self.device)[:, None], kv_indices.long()]
            # partial = listed and not full; both lists stay sorted (stable sort of a key)
            def _compact(sel):
                cnt = sel.sum(-1, dtype=torch.int32)
                order = torch.argsort((~sel).to(torch.uint8), dim=-1, stable=True)
                return cnt, torch.gather(kv_indices, -1, order).contiguous()
            full_cnt, full_idx = _compact(full_sel)
            qb = torch.arange(self.num_q_blocks, device=self.device)[:, None]
            # blocks wholly after the diagonal see nothing: leave them out
            reach = used & (pairs[qb, kv_indices.long()] > 0)
            part_cnt, part_idx = _compact(reach & ~full_sel)
            return BlockMask.from_kv_blocks(
                part_cnt, part_idx, full_cnt, full_idx,
                BLOCK_SIZE=(self.block_m, self.block_n), mask_mod=mask_mod,
                seq_lengths=(seqlen_q, seqlen_k))
        return BlockMask.from_kv_blocks(
            self.counts, kv_indices.contiguous(), BLOCK_SIZE=(self.block_m, self.block_n),
            mask_mod=None, seq_lengths=(seqlen_q, seqlen_k))


def _compact_positions(values: torch.Tensor, keep: torch.Tensor, width: int):
    """Move the kept entries of every row of ``values`` (``[..., W]``, in order) to the front.

    Returns ``(counts int32 [...], indices int32 [..., width])`` with ``-1`` after the kept
    entries; kept entries past ``width`` are dropped (``counts`` clamped). No host sync.
    """
    slot = torch.cumsum(keep, dim=-1, dtype=torch.int32) - 1
    target = torch.where(keep & (slot < width), slot, width).long()
    out = torch.full((*keep.shape[:-1], width + 1), -1, dtype=torch.int32,
                     device=values.device)
    out.scatter_(-1, target, values.to(torch.int32).expand_as(target).contiguous())
    out[..., width] = -1
    counts = keep.sum(-1, dtype=torch.int32).clamp(max=width)
    return counts, out[..., :width].contiguous()


def diagonal_phases(seqlen_q: int, seqlen_k: int, block_m: int, block_n: int, device):
    """Query blocks grouped by how their rows sit against the key blocks.

    A query block whose last row is ``L`` (absolute) and which has ``n`` rows meets a diagonal
    offset ``o = row - key`` in the key blocks ``L // block_n - d`` for
    ``d in [ceil((o - r) / block_n), ceil((o + n - 1 - r) / block_n)]``, ``r = L % block_n``:
    only ``(r, n)`` matters, and it repeats with period ``block_n / gcd(block_m, block_n)``
    (the last, possibly short, block aside).

    Returns:
        ``(phases, phase_of_block, diag_block)``: a host list of ``(r, n)``, int64 ``[NQB]`` the
        phase index of every query block and int64 ``[NQB]`` ``L // block_n``. No host sync.
    """
    nqb = _cdiv(seqlen_q, block_m)
    offset = seqlen_k - seqlen_q
    period = block_n // math.gcd(block_m, block_n)

    def key(m):
        last = min(m * block_m + block_m - 1, seqlen_q - 1) + offset
        return (last % block_n, last - (m * block_m + offset) + 1)

    phases = [key(m) for m in range(min(nqb - 1, period))]
    tail = key(nqb - 1)
    if tail not in phases:
        phases.append(tail)
    m = torch.arange(nqb, device=device)
    phase_of_block = torch.where(m == nqb - 1, phases.index(tail), m % period)
    last = (m * block_m + block_m - 1).clamp(max=seqlen_q - 1) + offset
    return phases, phase_of_block, last // block_n


def slash_diagonals(offsets: torch.Tensor, phase: tuple[int, int], block_n: int):
    """The block diagonals ``d`` (key block = the query block's last-row block minus ``d``)
    that diagonal offsets ``o >= 0`` meet in query blocks of one phase (see
    :func:`diagonal_phases`): yields ``(d, hit)`` tensors shaped like ``offsets``, one pair per
    diagonal a band can cross."""
    r, n = phase
    lo = -torch.div(r - offsets, block_n, rounding_mode="floor")  # ceil((o - r) / bn)
    hi = -torch.div(r - n + 1 - offsets, block_n, rounding_mode="floor")
    for j in range((n - 1) // block_n + 2):
        yield lo + j, lo + j <= hi


def slash_block_mask(slash_offsets: torch.Tensor, valid: torch.Tensor, seqlen_q: int,
                     seqlen_k: int, block_m: int, block_n: int,
                     diagonals: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[B, H, NQB, NKB]``: the key blocks that the diagonal bands of ``slash_offsets``
    (int ``[B, H, NS]``, used where ``valid``) cross in every query block, plus the block
    diagonals set in ``diagonals`` (bool ``[NKB]``, e.g. a local window). Memory
    ``O(B H NQB NKB)``, never ``B H NQB NS``; no host sync."""
    b, h = slash_offsets.shape[:2]
    dev = slash_offsets.device
    nkb = _cdiv(seqlen_k, block_n)
    phases, phase_of_block, diag = diagonal_phases(seqlen_q, seqlen_k, block_m, block_n, dev)
    per_phase = torch.zeros((b, h, len(phases), nkb + 1), dtype=torch.bool, device=dev)
    s = slash_offsets.long()
    for p, phase in enumerate(phases):
        for d, hit in slash_diagonals(s, phase, block_n):
            hit = hit & valid & (s >= 0) & (d < nkb)
            per_phase[:, :, p].scatter_(-1, torch.where(hit, d, nkb), True)
    if diagonals is not None:
        per_phase[..., :nkb] |= diagonals
    per_phase[..., nkb] = False
    d = diag[:, None] - torch.arange(nkb, device=dev)[None, :]  # [NQB, NKB]
    d = torch.where(d >= 0, d, nkb)
    return torch.gather(per_phase[:, :, phase_of_block], -1,
                        d.expand(b, h, *d.shape))


def vertical_columns(vertical: torch.Tensor, valid: torch.Tensor, block_mask: torch.Tensor,
                     last: torch.Tensor, width: int, block_n: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block stripe lists of vertical lines.

    Args:
        vertical: int ``[B, H, NV]`` key positions, increasing where ``valid``.
        valid: bool ``[B, H, NV]``.
        block_mask: bool ``[B, H, NQB, NKB]``, the dense blocks (their columns are dropped).
        last: int64 ``[NQB]`` absolute position of each query block's last row (later keys
            are unseen and dropped).
        width: static width of the lists; block_n: key block size.

    Returns:
        ``(col_counts int32 [B, H, NQB], col_indices int32 [B, H, NQB, width])``, ``-1``
        padded. Chunked over query blocks; no host sync.
    """
    b, h, nv = vertical.shape
    nqb = block_mask.shape[2]
    dev = vertical.device
    counts = torch.empty((b, h, nqb), dtype=torch.int32, device=dev)
    indices = torch.empty((b, h, nqb, width), dtype=torch.int32, device=dev)
    row_bytes = b * h * max(nv, 1) * 8
    step = _rows_per_chunk(row_bytes >> 4 if dev.type == "cuda" else row_bytes)  # 1 GiB on GPU
    v = vertical.long().clamp(0, block_mask.shape[3] * block_n - 1)
    vb = (v // block_n)[:, :, None, :]
    for m0 in range(0, nqb, step):
        m1 = min(nqb, m0 + step)
        dense = torch.gather(block_mask[:, :, m0:m1], -1, vb.expand(b, h, m1 - m0, nv))
        keep = (valid[:, :, None, :] & ~dense
                & (v[:, :, None, :] <= last[None, None, m0:m1, None]))
        counts[:, :, m0:m1], indices[:, :, m0:m1] = _compact_positions(
            v[:, :, None, :], keep, width)
    return counts, indices


def _rows_per_chunk(row_elems: int, budget: int = 1 << 26) -> int:
    return max(1, budget // max(1, row_elems))


def _from_blocks(name: str) -> property:
    """A read-only property forwarded to the layout's ``blocks``."""
    return property(lambda self: getattr(self.blocks, name),
                    doc=f"``blocks.{name}`` (see :class:`BlockLayout`).")


@dataclass
class StripeLayout:
    """Dense key blocks plus gathered key positions ("stripes") for each (batch, head, query block).

    AnchorAttention's fine-grained pattern and MInference's vertical-slash pattern: each query
    block computes the key blocks of ``blocks`` densely (sink, local window, slashes) and then
    the discrete key positions of ``col_indices``, which the kernel gathers from K and V.

    Attributes:
        blocks: :class:`BlockLayout` (``block_m`` x ``block_n`` tiles) computed densely.
        col_counts: int32 ``[B, H, NQB]``, how many stripe positions each query block uses.
        col_indices: int32 ``[B, H, NQB, MAXC]``, key positions strictly increasing in the first
            ``col_counts`` entries, ``-1`` after; never inside a dense block of the same query
            block (a position is computed once).

    ``H`` is the query heads or the KV heads (a per-KV-head layout is shared by the query heads
    of the group). Causality is not part of the layout: the kernel masks per position.

    Example:
        >>> bm = torch.zeros(1, 1, 2, 2, dtype=torch.bool); bm[..., 0, 0] = bm[..., 1, 1] = True
        >>> cm = torch.zeros(1, 1, 2, 32, dtype=torch.bool); cm[..., 1, 3] = True
        >>> lay = StripeLayout.from_mask(bm, cm, block_m=16, block_n=16)
        >>> lay.col_counts.tolist(), lay.col_indices[0, 0, 1, :1].tolist()
        ([[[0, 1]]], [3])
    """

    blocks: BlockLayout
    col_counts: torch.Tensor
    col_indices: torch.Tensor

    def __post_init__(self):
        if not isinstance(self.blocks, BlockLayout):
            raise TypeError(
                f"StripeLayout.blocks must be a BlockLayout, got {type(self.blocks).__name__}")
        if not isinstance(self.col_counts, torch.Tensor) or self.col_counts.dim() != 3:
            raise ValueError(
                f"StripeLayout.col_counts must be an int32 tensor [B, H, NQB], got "
                f"{getattr(self.col_counts, 'shape', type(self.col_counts))}")
        if not isinstance(self.col_indices, torch.Tensor) or self.col_indices.dim() != 4:
            raise ValueError(
                f"StripeLayout.col_indices must be an int32 tensor [B, H, NQB, MAXC], got "
                f"{getattr(self.col_indices, 'shape', type(self.col_indices))}")
        for name in ("col_counts", "col_indices"):
            t = getattr(self, name)
            if t.dtype != torch.int32:
                if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                    raise TypeError(f"StripeLayout.{name} must be int32, got {t.dtype}")
                setattr(self, name, t.to(torch.int32))
        if self.col_indices.shape[:3] != self.col_counts.shape:
            raise ValueError(
                f"StripeLayout.col_indices {tuple(self.col_indices.shape)} and col_counts "
                f"{tuple(self.col_counts.shape)} disagree on [B, H, NQB]")
        if self.col_counts.shape != self.blocks.counts.shape:
            raise ValueError(
                f"StripeLayout.col_counts {tuple(self.col_counts.shape)} and blocks.counts "
                f"{tuple(self.blocks.counts.shape)} disagree on [B, H, NQB]")
        if not (self.col_counts.device == self.col_indices.device == self.blocks.device):
            raise ValueError(
                f"StripeLayout tensors on different devices: blocks {self.blocks.device}, "
                f"col_counts {self.col_counts.device}, col_indices {self.col_indices.device}")

    # ----------------------------------------------------------------------------- shape
    # batch, num_heads, num_q_blocks, block_m, block_n, num_k_blocks, device: those of blocks
    batch = _from_blocks("batch")
    num_heads = _from_blocks("num_heads")
    num_q_blocks = _from_blocks("num_q_blocks")
    block_m = _from_blocks("block_m")
    block_n = _from_blocks("block_n")
    num_k_blocks = _from_blocks("num_k_blocks")
    device = _from_blocks("device")

    @property
    def max_columns(self) -> int:
        """Padded width ``MAXC`` of ``col_indices``."""
        return self.col_indices.shape[3]

    def to(self, device) -> "StripeLayout":
        return StripeLayout(self.blocks.to(device), self.col_counts.to(device),
                            self.col_indices.to(device))

    def __repr__(self) -> str:
        return (
            f"StripeLayout(B={self.batch}, H={self.num_heads}, NQB={self.num_q_blocks}, "
            f"NKB={self.num_k_blocks}, MAXB={self.blocks.max_blocks}, MAXC={self.max_columns}, "
            f"block_m={self.block_m}, block_n={self.block_n}, device={self.device})")

    # ----------------------------------------------------------------------- construction
    @classmethod
    def from_mask(cls, block_mask: torch.Tensor, column_mask: torch.Tensor, block_m: int = 64,
                  block_n: int = 64, max_columns: int | None = None) -> "StripeLayout":
        """Build from a bool block mask ``[B, H, NQB, NKB]`` and a bool column mask
        ``[B, H, NQB, Sk]`` (True = gather that key position for that query block).

        Columns inside a dense block of the same query block are dropped (computed once).
        ``max_columns`` sets the padded width of ``col_indices`` (default ``Sk``: no host
        synchronisation); columns past it are dropped, the latest first.
        """
        if not isinstance(column_mask, torch.Tensor) or column_mask.dim() != 4:
            raise ValueError(
                f"column_mask must be a bool tensor [B, H, NQB, Sk], got "
                f"{getattr(column_mask, 'shape', type(column_mask))}")
        if column_mask.dtype != torch.bool:
            raise TypeError(f"column_mask must be torch.bool, got {column_mask.dtype}")
        blocks = BlockLayout.from_mask(block_mask, block_m, block_n)
        if block_mask.shape[:3] != column_mask.shape[:3]:
            raise ValueError(
                f"block_mask {tuple(block_mask.shape)} and column_mask "
                f"{tuple(column_mask.shape)} disagree on [B, H, NQB]")
        sk = column_mask.shape[-1]
        if _cdiv(sk, block_n) != block_mask.shape[-1]:
            raise ValueError(
                f"column_mask has {sk} key positions, which need {_cdiv(sk, block_n)} key "
                f"blocks of {block_n}, but block_mask has {block_mask.shape[-1]}")
        width = sk if max_columns is None else int(max_columns)
        if width < 1:
            raise ValueError(f"max_columns must be >= 1, got {max_columns}")
        b, h, nqb, _ = column_mask.shape
        counts = torch.empty((b, h, nqb), dtype=torch.int32, device=column_mask.device)
        indices = torch.empty((b, h, nqb, width), dtype=torch.int32, device=column_mask.device)
        keys = torch.arange(sk, device=column_mask.device)
        step = _rows_per_chunk(b * h * sk * 8)
        for m0 in range(0, nqb, step):
            m1 = min(nqb, m0 + step)
            dense = block_mask[:, :, m0:m1][..., keys // block_n]
            counts[:, :, m0:m1], indices[:, :, m0:m1] = _compact_positions(
                keys, column_mask[:, :, m0:m1] & ~dense, width)
        return cls(blocks, counts, indices)

    @classmethod
    def from_vertical_slash(cls, vertical_indices: torch.Tensor, slash_offsets: torch.Tensor,
                            seqlen_q: int, seqlen_k: int, *, block_m: int = 64,
                            block_n: int = 64, max_columns: int | None = None
                            ) -> "StripeLayout":
        """MInference's vertical-slash pattern as a StripeLayout.

        Args:
            vertical_indices: int ``[B, H, NV]`` key positions (vertical lines); any order,
                repeats allowed, negative entries are padding.
            slash_offsets: int ``[B, H, NS]`` diagonal offsets ``query_abs_pos - key_pos >= 0``
                (queries aligned to the end: row ``i`` sits at ``seqlen_k - seqlen_q + i``);
                repeats allowed, negative entries are padding, offsets ``>= seqlen_k`` hit
                nothing.
            seqlen_q, seqlen_k: sequence lengths.
            block_m, block_n: tile sizes.
            max_columns: padded width of ``col_indices``. ``None`` trims it to the most columns
                any query block keeps (one host synchronisation); an int keeps it static.

        Returns:
            A :class:`StripeLayout`: every key block a query block's diagonal band crosses is
            dense; each vertical line is a stripe of every query block that can see it
            (causally), unless it falls inside one of that block's dense blocks.

        Example:
            >>> v = torch.tensor([[[0, 5]]]); s = torch.tensor([[[0]]])
            >>> lay = StripeLayout.from_vertical_slash(v, s, 64, 64, block_m=16, block_n=16)
            >>> lay.blocks.counts.tolist(), lay.col_counts.tolist()  # diagonal blocks, 2 stripes
            ([[[1, 1, 1, 1]]], [[[0, 2, 2, 2]]])
        """
        for name, t in (("vertical_indices", vertical_indices), ("slash_offsets", slash_offsets)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                raise ValueError(f"{name} must be an int tensor [B, H, N], got "
                                 f"{getattr(t, 'shape', type(t))}")
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
        if vertical_indices.shape[:2] != slash_offsets.shape[:2]:
            raise ValueError(
                f"vertical_indices {tuple(vertical_indices.shape)} and slash_offsets "
                f"{tuple(slash_offsets.shape)} disagree on [B, H]")
        if seqlen_q < 1 or seqlen_k < seqlen_q:
            raise ValueError(
                f"need 1 <= seqlen_q <= seqlen_k, got seqlen_q={seqlen_q}, seqlen_k={seqlen_k}")
        for name in ("block_m", "block_n"):
            if locals()[name] not in _BLOCK_SIZES:
                raise ValueError(f"{name} must be one of {_BLOCK_SIZES}, got {locals()[name]}")
        dev = vertical_indices.device
        nqb = _cdiv(seqlen_q, block_m)
        offset = seqlen_k - seqlen_q
        last = (torch.arange(nqb, device=dev) * block_m + block_m - 1).clamp(
            max=seqlen_q - 1) + offset
        s = slash_offsets.long()
        block_mask = slash_block_mask(s, s >= 0, seqlen_q, seqlen_k, block_m, block_n)
        blocks = BlockLayout.from_mask(block_mask, block_m, block_n)
        # verticals: sorted, unique, in range; per query block drop the unseen and the dense
        v = vertical_indices.long().sort(-1).values
        valid = (v >= 0) & (v < seqlen_k)
        if v.shape[-1] > 1:
            valid[..., 1:] &= v[..., 1:] != v[..., :-1]
        if max_columns is None:
            width = max(1, int(valid.sum(-1).max())) if valid.numel() else 1
        else:
            width = int(max_columns)
            if width < 1:
                raise ValueError(f"max_columns must be >= 1, got {max_columns}")
        counts, indices = vertical_columns(v, valid, block_mask, last, width, block_n)
        return cls(blocks, counts, indices)

    # ----------------------------------------------------------------------------- checks
    def validate(self, seqlen_q: int, seqlen_k: int, *, check_indices: bool = True) -> None:
        """Raise ``ValueError`` if the layout does not fit these sequence lengths.

        ``check_indices`` also checks the dense blocks (see :meth:`BlockLayout.validate`) and
        that every used stripe position lies in ``[0, seqlen_k)`` (so ``-1`` only pads the
        end), strictly increases and avoids the query block's dense blocks (reads the layout
        back to the host: leave it off on a hot path).
        """
        self.blocks.validate(seqlen_q, seqlen_k, check_indices=check_indices)
        if not check_indices:
            return
        counts = self.col_counts.long()
        if bool((counts < 0).any()) or bool((counts > self.max_columns).any()):
            raise ValueError(
                f"StripeLayout col_counts must lie in [0, {self.max_columns}] (the width of "
                f"col_indices), got range [{int(counts.min())}, {int(counts.max())}]")
        slot = torch.arange(self.max_columns, device=self.device)
        used = slot < counts[..., None]
        idx = self.col_indices.long()
        bad = used & ((idx < 0) | (idx >= seqlen_k))
        if bool(bad.any()):
            where = tuple(int(x) for x in bad.nonzero()[0].tolist())
            what = ("-1 padding before the end of the used entries" if int(idx[where]) == -1
                    else f"{int(idx[where])} not in [0, {seqlen_k})")
            raise ValueError(
                f"StripeLayout col_indices out of range at [b, h, qblock, slot]={where}: {what}")
        if self.max_columns > 1:
            unsorted = used[..., 1:] & (idx[..., 1:] <= idx[..., :-1])
            if bool(unsorted.any()):
                b, h, m, j = (int(x) for x in unsorted.nonzero()[0].tolist())
                raise ValueError(
                    f"StripeLayout col_indices must be strictly increasing per query block; at "
                    f"[b, h, qblock]=({b}, {h}, {m}) slot {j + 1}: "
                    f"{int(idx[b, h, m, j + 1])} follows {int(idx[b, h, m, j])}")
        inside = used & torch.gather(self.blocks.to_mask(), -1,
                                     (idx.clamp(min=0) // self.block_n))
        if bool(inside.any()):
            b, h, m, j = (int(x) for x in inside.nonzero()[0].tolist())
            raise ValueError(
                f"StripeLayout column {int(idx[b, h, m, j])} at [b, h, qblock]=({b}, {h}, {m}) "
                f"lies inside one of that query block's dense key blocks")

    # ------------------------------------------------------------------------ conversions
    def to_mask(self, seqlen_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(block_mask [B, H, NQB, NKB], column_mask [B, H, NQB, Sk])`` bool masks
        (``Sk`` defaults to ``NKB * block_n``)."""
        sk = self.num_k_blocks * self.block_n if seqlen_k is None else seqlen_k
        col = torch.zeros((*self.col_counts.shape, sk + 1), dtype=torch.bool,
                          device=self.device)
        slot = torch.arange(self.max_columns, device=self.device)
        used = slot < self.col_counts[..., None].long()
        idx = self.col_indices.long()
        col.scatter_(-1, torch.where(used & (idx >= 0) & (idx < sk), idx, sk), True)
        return self.blocks.to_mask(), col[..., :sk]

    def to_token_mask(self, seqlen_q: int, seqlen_k: int, *, causal: bool = False,
                      q_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Bool ``[B, H, Sq, Sk]`` of the (query, key) pairs attended (dense blocks and
        stripes); with ``causal`` keys after each query (aligned to the end) are dropped.
        ``q_range=(start, stop)`` returns only those rows."""
        start, stop = (0, seqlen_q) if q_range is None else q_range
        tok = self.blocks.to_token_mask(seqlen_q, seqlen_k, causal=causal, q_range=(start, stop))
        _, col = self.to_mask(seqlen_k)
        rows = torch.arange(start, stop, device=self.device)
        tok |= col[:, :, rows // self.block_m]
        if causal:
            cols = torch.arange(seqlen_k, device=self.device)
            tok &= cols[None, :] <= rows[:, None] + (seqlen_k - seqlen_q)
        return tok

    def density(self, seqlen_q: int | None = None, seqlen_k: int | None = None, *,
                causal: bool = True, per_head: bool = False):
        """Share of the attendable (query, key) pairs computed (dense blocks plus stripes),
        against the causal area when ``causal``, like :meth:`BlockLayout.density`. Returns a
        float, or with ``per_head`` a float tensor ``[B, H]``."""
        seqlen_q = self.num_q_blocks * self.block_m if seqlen_q is None else seqlen_q
        seqlen_k = self.num_k_blocks * self.block_n if seqlen_k is None else seqlen_k
        self.validate(seqlen_q, seqlen_k, check_indices=False)
        pairs = causal_pair_counts(
            seqlen_q, seqlen_k, self.block_m, self.block_n, causal, self.device).double()
        total = pairs.sum().clamp(min=1)
        covered = (self.blocks.to_mask().double() * pairs).sum((-1, -2))
        # a stripe column c of query block m is seen by the block's rows at or after it
        r0 = torch.arange(self.num_q_blocks, device=self.device) * self.block_m
        r1 = (r0 + self.block_m).clamp(max=seqlen_q)
        idx = self.col_indices.long()
        used = (torch.arange(self.max_columns, device=self.device)
                < self.col_counts[..., None].long()) & (idx >= 0) & (idx < seqlen_k)
        if causal:
            start = torch.maximum(r0[:, None], idx - (seqlen_k - seqlen_q))
            rows = (r1[:, None] - start).clamp(min=0)
        else:
            rows = (r1 - r0)[:, None].expand_as(idx)
        covered = covered + (rows * used).sum((-1, -2)).double()
        covered = covered / total
        return covered if per_head else float(covered.mean())

    def repeat_heads(self, num_heads: int) -> "StripeLayout":
        """A per-query-head copy of a per-KV-head layout (each KV head's lists repeated for the
        ``num_heads // H`` query heads of its group)."""
        blocks = self.blocks.repeat_heads(num_heads)
        g = num_heads // self.num_heads
        return StripeLayout(blocks, self.col_counts.repeat_interleave(g, 1).contiguous(),
                            self.col_indices.repeat_interleave(g, 1).contiguous())


@dataclass
class TopKLayout:
    """Key positions to attend for each (batch, KV head, query token): token-level top-k
    (DeepSeek sparse attention, HISA).

    Attributes:
        indices: int32 ``[B, Hkv, Sq, K]``: up to ``K`` key positions per query token, shared by
            the query heads of the KV head's group. Any order within a row (a top-k selection
            returns them unsorted), no duplicates; ``-1`` pads a row, and padding is trailing
            only (no ``-1`` before a valid entry).

    Causality is not part of the layout: with ``causal=True`` the kernel also masks positions
    after the query's absolute position (query row ``i`` sits at ``Sk - Sq + i``).

    Example:
        >>> idx = torch.tensor([[[[0, -1], [0, 1]]]], dtype=torch.int32)  # B=1, Hkv=1, Sq=2
        >>> TopKLayout(idx).to_mask(2, 2).int()
        tensor([[[[1, 0],
                  [1, 1]]]], dtype=torch.int32)
    """

    indices: torch.Tensor

    def __post_init__(self):
        idx = self.indices
        if not isinstance(idx, torch.Tensor) or idx.dim() != 4:
            raise ValueError(
                f"TopKLayout.indices must be an int32 tensor [B, Hkv, Sq, K], got "
                f"{getattr(idx, 'shape', type(idx))}")
        if idx.dtype != torch.int32:
            if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
                raise TypeError(f"TopKLayout.indices must be int32, got {idx.dtype}")
            self.indices = idx.to(torch.int32)
        if idx.shape[-1] == 0:
            raise ValueError("TopKLayout.indices has K=0 slots per token")
        self._merged: dict = {}

    # ----------------------------------------------------------------------------- shape
    @property
    def batch(self) -> int:
        return self.indices.shape[0]

    @property
    def num_heads(self) -> int:
        return self.indices.shape[1]

    @property
    def seqlen_q(self) -> int:
        return self.indices.shape[2]

    @property
    def k(self) -> int:
        """Slots per token (the padded width of ``indices``)."""
        return self.indices.shape[3]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def to(self, device) -> "TopKLayout":
        return TopKLayout(self.indices.to(device))

    def __repr__(self) -> str:
        return (f"TopKLayout(B={self.batch}, Hkv={self.num_heads}, Sq={self.seqlen_q}, "
                f"K={self.k}, device={self.device})")

    # ----------------------------------------------------------------------- construction
    @classmethod
    def from_mask(cls, token_mask: torch.Tensor, k: int | None = None) -> "TopKLayout":
        """Build from a bool ``[B, H, Sq, Sk]`` mask (True = attend).

        ``k`` is the padded width; by default the largest row count (a host synchronisation).
        A row with more than ``k`` True entries raises ``ValueError``. Indices come out sorted.
        """
        if not isinstance(token_mask, torch.Tensor) or token_mask.dim() != 4:
            raise ValueError(
                f"token_mask must be a bool tensor [B, H, Sq, Sk], got "
                f"{getattr(token_mask, 'shape', type(token_mask))}")
        if token_mask.dtype != torch.bool:
            raise TypeError(f"token_mask must be torch.bool, got {token_mask.dtype}")
        counts = token_mask.sum(-1)
        most = int(counts.max()) if counts.numel() else 0
        if k is None:
            k = max(most, 1)
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if most > k:
            raise ValueError(f"token_mask has a row with {most} keys, more than k={k}")
        sk = token_mask.shape[-1]
        order = torch.argsort((~token_mask).to(torch.uint8), dim=-1, stable=True)
        order = order[..., :k].to(torch.int32)
        if k > sk:
            order = torch.cat([order, order.new_full((*order.shape[:-1], k - sk), -1)], -1)
        slot = torch.arange(k, device=token_mask.device)
        return cls(torch.where(slot < counts[..., None], order, -1).contiguous())

    # ----------------------------------------------------------------------------- checks
    def validate(self, seqlen_q: int, seqlen_k: int, *, check_indices: bool = True) -> None:
        """Raise ``ValueError`` if the layout does not fit these lengths.

        ``check_indices`` also checks every index lies in ``[-1, seqlen_k)``, that ``-1`` only
        pads the end of a row and that no row repeats a position (reads back to the host and
        sorts the rows, in chunks: leave it off on a hot path).
        """
        if self.seqlen_q != seqlen_q:
            raise ValueError(
                f"TopKLayout has {self.seqlen_q} query tokens but seqlen_q={seqlen_q}: was it "
                f"built for another sequence length?")
        if not check_indices:
            return
        chunk = max(1, (1 << 26) // max(1, self.batch * self.num_heads * self.k))
        for start in range(0, seqlen_q, chunk):
            idx = self.indices[:, :, start:start + chunk].long()
            bad = (idx < -1) | (idx >= seqlen_k)
            if bool(bad.any()):
                b, h, t, j = (int(x) for x in bad.nonzero()[0].tolist())
                raise ValueError(
                    f"TopKLayout index out of range at [b, h, token, slot]=({b}, {h}, "
                    f"{start + t}, {j}): {int(idx[b, h, t, j])} not in [-1, {seqlen_k})")
            pad = idx < 0
            gap = pad[..., :-1] & ~pad[..., 1:]
            if bool(gap.any()):
                b, h, t, j = (int(x) for x in gap.nonzero()[0].tolist())
                raise ValueError(
                    f"TopKLayout -1 padding must be trailing; at [b, h, token]=({b}, {h}, "
                    f"{start + t}) slot {j} is -1 but slot {j + 1} is {int(idx[b, h, t, j + 1])}")
            srt = idx.sort(-1).values
            dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
            if bool(dup.any()):
                b, h, t, j = (int(x) for x in dup.nonzero()[0].tolist())
                raise ValueError(
                    f"TopKLayout indices repeat key {int(srt[b, h, t, j])} at [b, h, token]="
                    f"({b}, {h}, {start + t})")

    # ------------------------------------------------------------------------ conversions
    def to_mask(self, seqlen_q: int, seqlen_k: int, *, causal: bool = False,
                q_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Bool ``[B, Hkv, Sq, Sk]`` of the (query, key) pairs attended.

        With ``causal`` keys after each query's absolute position are dropped (queries aligned
        to the end). ``q_range=(start, stop)`` returns only those query rows.
        """
        self.validate(seqlen_q, seqlen_k, check_indices=False)
        start, stop = (0, seqlen_q) if q_range is None else q_range
        idx = self.indices[:, :, start:stop].long()
        mask = torch.zeros((*idx.shape[:-1], seqlen_k + 1), dtype=torch.bool, device=self.device)
        mask.scatter_(-1, torch.where(idx >= 0, idx, seqlen_k), True)  # pads to a spare column
        mask = mask[..., :seqlen_k]
        if causal:
            rows = torch.arange(start, stop, device=self.device)
            cols = torch.arange(seqlen_k, device=self.device)
            mask &= cols[None, :] <= rows[:, None] + (seqlen_k - seqlen_q)
        return mask

    to_token_mask = to_mask

    def density(self, seqlen_q: int | None = None, seqlen_k: int | None = None, *,
                causal: bool = True, per_head: bool = False):
        """Share of the attendable (query, key) pairs the layout attends (against the causal
        area when ``causal``; positions after a query then do not count). Returns a float, or
        with ``per_head`` a float tensor ``[B, Hkv]``."""
        seqlen_q = self.seqlen_q if seqlen_q is None else seqlen_q
        if seqlen_k is None:
            seqlen_k = seqlen_q
        self.validate(seqlen_q, seqlen_k, check_indices=False)
        idx = self.indices  # int32 comparisons: no int64 copy of a 128k x K layout
        pos = (torch.arange(seqlen_q, device=self.device, dtype=torch.int32)
               + (seqlen_k - seqlen_q))
        used = idx >= 0
        if causal:
            used &= idx <= pos[:, None]
            area = float((pos + 1).clamp(min=0, max=seqlen_k).sum())
        else:
            area = float(seqlen_q * seqlen_k)
        covered = used.sum((-1, -2), dtype=torch.float64) / max(area, 1.0)
        return covered if per_head else float(covered.mean())
