"""Config shared by the stripe estimators (``anchor``, ``vertical_slash``).

Both return a :class:`~sparse_attn.layout.StripeLayout`; they share the budget forms of the
block estimators (``mass``, ``density``, ``top_k``), the GQA grouping (``"max"`` or
``"none"``), a cap on the gathered columns and the backend choice.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .select import BudgetEstimator, _is_int

BACKENDS = ("auto", "triton", "torch")
# default cap on the gathered columns per query block under a mass / theta budget (a static
# width: col_indices is B * H * NQB * width int32, 1 GiB at 128k with 8 heads and 64-row blocks)
DEFAULT_MAX_COLUMNS = 16384
_COUNT_SLACK = 8
STRIPE_GQA_REDUCE = ("max", "none")


@dataclasses.dataclass
class StripeEstimator(BudgetEstimator):
    """Base of the stripe estimators (not registered).

    Args:
        block_m, block_n: tile sizes of the layout (64 or 128, default 64).
        sink_blocks: leading key blocks every query block computes densely (>= 0).
        local_blocks: key blocks ending at each query block's diagonal, computed densely (>= 1).
        mass / density / top_k: the budget (at most one; ``mass=0.95`` when none is given).
        gqa_reduce: ``"max"`` (one per-KV-head layout; a key is kept when any head of the group
            keeps it) or ``"none"`` (per query head).
        max_columns: width of ``col_indices``: at most this many gathered columns per query
            block (the first ones by position when more are selected). ``None``: what the
            budget can use (``top_k``, ``density * seqlen_k``) or, for ``mass`` / ``theta``,
            ``min(seqlen_k, DEFAULT_MAX_COLUMNS)`` (16384).
        backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"`` or ``"torch"``.
    """

    block_m: int = 64
    block_n: int = 64
    max_columns: int | None = None
    backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.max_columns is not None and (not _is_int(self.max_columns)
                                             or self.max_columns < 1):
            raise ValueError(
                f"estimator {self.name!r}: max_columns must be an int >= 1 or None, got "
                f"{self.max_columns!r}")
        if self.gqa_reduce not in STRIPE_GQA_REDUCE:
            raise ValueError(
                f"estimator {self.name!r}: gqa_reduce must be one of {STRIPE_GQA_REDUCE}, got "
                f"{self.gqa_reduce!r}")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"estimator {self.name!r}: backend must be one of {BACKENDS}, got "
                f"{self.backend!r}")

    def _use_triton(self, q: torch.Tensor) -> bool:
        if self.backend == "auto":
            return q.is_cuda
        return self.backend == "triton"

    def _column_width(self, seqlen_k: int) -> int:
        """Static width of ``col_indices`` for this budget and key length."""
        cap = DEFAULT_MAX_COLUMNS if self.max_columns is None else self.max_columns
        need = None
        if self.top_k is not None:
            need = self.top_k
        elif self.density is not None:
            need = math.ceil(self.density * seqlen_k)
        if need is not None:
            # + slack: the device search may keep a column or two past an exact count budget
            need += _COUNT_SLACK
            cap = min(cap, need) if self.max_columns is not None else need
        return max(1, min(seqlen_k, cap))

    def _out_heads(self, q: torch.Tensor, k: torch.Tensor) -> int:
        return k.shape[1] if self.gqa_reduce == "max" else q.shape[1]


def last_rows(seqlen_q: int, seqlen_k: int, block_m: int, device) -> torch.Tensor:
    """Absolute position of the last query row of each query block: int64 ``[NQB]``."""
    nqb = -(-seqlen_q // block_m)
    last = (torch.arange(nqb, device=device) * block_m + block_m - 1).clamp(max=seqlen_q - 1)
    return last + (seqlen_k - seqlen_q)
