"""``lowbit``: SALE (2025): low-bit quantized Q.K scores, ranked by a relative attention score.

Q and K are quantized to int8 with one scale per block (query: per query block over its sampled
rows; key: per key block); ``rows`` sampled query rows per query block are scored against every
reachable key with an int8 x int8 -> int32 dot (tensor cores on the GPU; exact dequantized fp32
in torch on the CPU). A score is turned into a *relative attention score*: its exponential
relative to the query's attention on the sink and local key blocks (``exp(s - m_w) / l_w``,
``m_w`` and ``l_w`` the max and normaliser over that window only), so no full-row softmax pass is
needed; a key block's score is the mean over the sampled rows of its keys' summed relative
scores. Blocks are kept by rank under the budget (``mass`` is taken relative to the row's total
relative score). 4-bit: ``bits=4`` is reserved for the CUDA path (int4 tensor cores);
:meth:`LowBit.quantize` is the hook it plugs into.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch

from .. import _cuda
from ..layout import BlockLayout
from .base import register
from .proxy import estimate_block_scores, gather_rows, quantize_int8
from .select import BudgetEstimator, _is_int

__all__ = ["LowBit"]

BITS = (8,)
BACKENDS = ("auto", "cuda", "triton")
# key-block sizes where "auto" takes the CUDA int8 kernel (csrc/lowbit_qk.cu) over the Triton
# one. None at present: H100, 128k, 32/8 heads, d=128, 16 rows per query block, same run
# (2026-11-25): 128-key blocks Triton 20.4 ms vs CUDA 23.0 ms (before the Triton kernel's
# speedups of that day: Triton 33.7 ms); 64-key blocks Triton 38 ms vs CUDA 49 ms
CUDA_BLOCK_N: tuple = ()

logger = logging.getLogger("sparse_attn")
_fallback_logged: set = set()


def _log_fallback_once(why: str) -> None:
    if why not in _fallback_logged:
        _fallback_logged.add(why)
        logger.info("lowbit: Triton int8 block scores instead of the CUDA kernel (%s)", why)


@register("lowbit")
@dataclasses.dataclass
class LowBit(BudgetEstimator):
    """SALE: int8 Q.K block scores ranked by the relative attention score.

    Args:
        block_m, block_n: block sizes (64 or 128); also the quantization blocks.
        sink_blocks: leading key blocks always kept and part of the reference window
            (>= 0, default 1).
        local_blocks: key blocks ending at the diagonal always kept and part of the reference
            window (>= 1, default 1).
        mass: keep the fewest blocks whose relative score reaches this share of the row total,
            in ``(0, 1]`` (default 0.95).
        density: or keep this share of the reachable key blocks, in ``(0, 1]``.
        top_k: or keep this many key blocks per query block (forced ones included).
        gqa_reduce: ``"max"`` (default) or ``"mean"`` for a per-KV-head layout, ``"none"`` for
            a per-query-head layout.
        rows: sampled query rows per query block (a power of two dividing ``block_m``;
            ``rows=block_m`` scores every row: SALE's full estimate, ``block_m / rows`` x the
            work of the default).
        bits: quantization width; only 8 here (4 needs the CUDA int4 path).
        backend: int8 score kernel on the GPU: ``"auto"`` (default: the CUDA extension's
            kernel, csrc/lowbit_qk.cu, where it is loaded, supports the shape (head dim 64/128)
            and was measured faster (``block_n`` in ``CUDA_BLOCK_N``: none at present), else
            the Triton kernel of kernels/estimate.py, said once at INFO), ``"cuda"`` (raise
            when it cannot run) or ``"triton"``. CPU inputs always take the torch reference.

    Returns (from ``estimate``):
        A :class:`BlockLayout` with ``H = Hkv`` (``Hq`` with ``gqa_reduce="none"``).

    Example:
        >>> est = sparse_attn.estimators.get("lowbit", density=0.2, block_m=64, block_n=64)
        >>> layout = est.estimate(torch.randn(1, 8, 1000, 64), torch.randn(1, 2, 1000, 64))
    """

    rows: int = 16
    bits: int = 8
    backend: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        ok = [r for r in (1, 2, 4, 8, 16, 32, 64, 128) if r <= self.block_m]
        if not _is_int(self.rows) or self.rows not in ok:
            raise ValueError(f"estimator {self.name!r}: rows must be one of {ok} (a power of "
                             f"two <= block_m={self.block_m}), got {self.rows!r}")
        if self.bits not in BITS:
            raise ValueError(f"estimator {self.name!r}: bits must be one of {BITS} (4-bit needs "
                             f"the CUDA int4 path), got {self.bits!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"estimator {self.name!r}: backend must be one of {BACKENDS}, got "
                             f"{self.backend!r}")

    def quantize(self, q_rows: torch.Tensor, k: torch.Tensor):
        """``(q_int, q_scale [B, Hq, NQB], k_int, k_scale [B, Hkv, NKB])``: the low-bit hook."""
        qq, qs = quantize_int8(q_rows, self.rows)
        kq, ks = quantize_int8(k, self.block_n)
        return qq, qs, kq, ks

    def estimate(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True) -> BlockLayout:
        self._check(q, k, causal)
        seqlen_q, dim = q.shape[2], q.shape[3]
        self._window(1, 1, seqlen_q, k.shape[2], causal, q.device)  # raises if it cannot fit
        q_rows, pos = gather_rows(q, self.block_m, self.rows)
        qq, qs, kq, ks = self.quantize(q_rows, k)
        kw = dict(rows=self.rows, block_n=self.block_n, seqlen_q=seqlen_q, causal=causal,
                  scale=1.0 / math.sqrt(dim), q_scale=qs, k_scale=ks,
                  window=(self.sink_blocks, self.local_blocks))
        if self._use_cuda(qq, kq):
            probs = _cuda.lowbit_block_scores(qq, kq, pos, **kw)
        else:
            probs = estimate_block_scores(qq, kq, pos, **kw)
        return self.select(probs, q, k, causal)

    def _use_cuda(self, qq: torch.Tensor, kq: torch.Tensor) -> bool:
        """Whether the int8 scores run on the CUDA kernel (see ``backend``)."""
        if not qq.is_cuda or self.backend == "triton":
            return False
        ok = _cuda.lowbit_supported(qq, kq, rows=self.rows, block_n=self.block_n)
        if self.backend == "cuda":
            if not ok:
                raise RuntimeError(
                    f"estimator {self.name!r}: backend='cuda' needs the CUDA extension "
                    f"({_cuda.status()['state']}: {_cuda.status()['detail']}), head dim in "
                    f"{_cuda.LOWBIT_HEAD_DIMS} and block_n in {_cuda.LOWBIT_BLOCK_N}")
            return True
        if not ok:
            _log_fallback_once(f"CUDA extension {_cuda.status()['state']} or shape not "
                               f"supported: head dim {qq.shape[-1]}, block_n {self.block_n}")
            return False
        if self.block_n not in CUDA_BLOCK_N:
            _log_fallback_once(f"block_n={self.block_n}: the Triton kernel was measured faster")
            return False
        return True
