"""``threshold``: BLASST (2025): no estimation, the kernel's softmax-threshold tile skipping.

The layout is dense (every causal tile); the attention kernel skips a key tile whose scores all
sit below ``running_max + log(lambda)`` (its exponentials, V load and P.V product), see
``block_sparse_attention(softmax_threshold=)``. Any other method combines with it through the
one keyword ``softmax_threshold=`` (``sparse_attention(q, k, v, "proxy",
softmax_threshold=1e-3)``).

BLASST finds that the threshold giving a fixed output error falls inversely with the context
length, so one constant per model serves every length: ``lambda = threshold_scale / seqlen_k``.
The default ``threshold_scale`` (``DEFAULT_THRESHOLD_SCALE = 20``) targets a relative L2
output error of 1e-2, calibrated on SmolLM2-135M at 2k-8k tokens: 0.6e-3 to 1.2e-3 on the
median layer, at most 7.5e-3 on the worst of six layers (see the constant's comment).
:func:`calibrate_threshold` picks ``lambda`` for a target output error on a sample, and
:func:`threshold_vs_length` runs it at several lengths and fits ``lambda = a * L^-beta``
(``beta`` near 1 reproduces the paper's relation).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..layout import BlockLayout
from .base import register
from .select import BlockEstimator, _is_real

__all__ = ["Threshold", "ThresholdCalibration", "blasst_attention_ref", "calibrate_threshold",
           "sink_sample", "threshold_vs_length"]

# Default lambda * seqlen_k, calibrated for a relative L2 output error of 1e-2 on the real
# attention of SmolLM2-135M (fp32, CPU; natural text; 2k, 4k and 8k tokens; layers 0, 5, 11, 17,
# 23, 29; 128x128 tiles; the torch emulation, per query head), by bench/calibrate_threshold.py
# (bench/results/cpu_20261125_s4/threshold_calib). Per layer, the lambda * L that meets 1e-2
# spreads from 19 to 88 on the late layers (17, 23, 29) to 205 .. 1200 (layer 5), and layers 0
# and 11 meet it even at the 0.5 clamp (their tiles are rarely skippable). Conservative: the
# largest scale tried (20, 30, 50, 70, 100, ...) that keeps EVERY measured layer and length
# within 1e-2. At 20 the output error at 2k / 4k / 8k is: median over the six layers 1.2e-3 /
# 0.9e-3 / 0.6e-3 (upper median layer, 29: 2.3e-3 / 1.7e-3 / 1.1e-3), worst layer (17) 7.0e-3 /
# 7.5e-3 / 5.3e-3; 2 / 4 / 10 % of the tiles skipped (median; 15-35 % on layer 17). At 30 the
# worst layer reaches 1.2e-2, at 100 three of six layers exceed 1e-2 (up to 3.1e-2); the old
# default 1.0 skipped almost nothing (median <= 1.6 % of the tiles). lambda fell more slowly
# than 1 / L over 2k-8k (fitted beta 0.28 median, -0.28 .. 1.1 over layers), so scale / L errs
# on the safe side at longer L. Smaller tiles skip more at the same lambda: with 64x64 tiles
# (threshold_calib/block64) 20 is not conservative (30: worst layer 2.2e-2); 10 keeps every
# layer within 7.7e-3. Other models and targets: calibrate_threshold / threshold_vs_length.
DEFAULT_THRESHOLD_SCALE = 20.0
# candidate thresholds of calibrate_threshold: 1e-1 .. 1e-8, three per decade
_CANDIDATES = tuple(10.0 ** (-e / 3) for e in range(3, 25))


@register("threshold")
@dataclasses.dataclass
class Threshold(BlockEstimator):
    """BLASST: a dense layout, computed with softmax-threshold tile skipping.

    Args:
        block_m, block_n: block sizes (64 or 128).
        threshold: a fixed ``lambda`` in ``(0, 1)``; or None (default) for
            ``threshold_scale / seqlen_k``.
        threshold_scale: ``lambda * seqlen_k`` (> 0) when ``threshold`` is None (default
            ``DEFAULT_THRESHOLD_SCALE`` = 20: a relative L2 output error within 1e-2 on every
            measured layer of SmolLM2-135M at 2k-8k tokens, about 1e-3 on the median layer,
            with 128x128 tiles; 64x64 tiles want about 10; calibrate it for another model,
            tile or target with :func:`calibrate_threshold`).

    ``SparseAttention`` / ``sparse_attention`` pass :meth:`softmax_threshold_for` to the kernel
    unless an explicit ``softmax_threshold=`` is given. The torch (CPU) attention backend
    ignores the threshold (exact dense); :func:`blasst_attention_ref` emulates it.

    Returns (from ``estimate``):
        A per-KV-head dense :class:`BlockLayout`.

    Example:
        >>> est = sparse_attn.estimators.get("threshold", threshold_scale=2.0)
        >>> est.softmax_threshold_for(131072)  # 2 / 128k
        1.52587890625e-05
    """

    threshold: float | None = None
    threshold_scale: float = DEFAULT_THRESHOLD_SCALE

    def __post_init__(self):
        super().__post_init__()
        if self.threshold is not None and not (_is_real(self.threshold)
                                               and 0.0 < self.threshold < 1.0):
            raise ValueError(f"estimator {self.name!r}: threshold must be a number in (0, 1) "
                             f"or None, got {self.threshold!r}")
        if not (_is_real(self.threshold_scale) and self.threshold_scale > 0):
            raise ValueError(f"estimator {self.name!r}: threshold_scale must be a number > 0, "
                             f"got {self.threshold_scale!r}")

    def softmax_threshold_for(self, seqlen_k: int) -> float:
        """The kernel's ``softmax_threshold`` for a key length (a Python float: no sync)."""
        if self.threshold is not None:
            return float(self.threshold)
        return min(0.5, self.threshold_scale / max(1, seqlen_k))

    def estimate(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True) -> BlockLayout:
        self._check(q, k, causal)
        return BlockLayout.dense(q.shape[0], k.shape[1], q.shape[2], k.shape[2], causal=causal,
                                 block_m=self.block_m, block_n=self.block_n, device=q.device)


def blasst_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                         softmax_threshold: float, causal: bool = True,
                         scale: float | None = None, block_m: int = 128, block_n: int = 128
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention with BLASST skipping, emulated in torch (fp32).

    Each tile of ``block_m`` query rows of one query head visits its key tiles in ascending
    order with an online softmax; a tile whose max score is, in every row, below the running
    max by more than ``-log(softmax_threshold)`` is skipped. (The Triton kernel packs the
    query heads of a GQA group into one tile, so its skip decisions can differ slightly.)

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Sk, D]`` (GQA; ``Sq <= Sk`` end-aligned).
        softmax_threshold: ``lambda`` in ``[0, 1)``; 0 skips nothing.

    Returns:
        ``(out fp32 [B, Hq, Sq, D], skipped)``: the fraction of visited tiles skipped (0-dim).

    Example:
        >>> q = k = v = torch.randn(1, 2, 256, 64)
        >>> out, skipped = blasst_attention_ref(q, k, v, softmax_threshold=1e-4, block_m=64,
        ...                                     block_n=64)
    """
    batch, hq, sq, dim = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    log_thr = math.log(softmax_threshold) if softmax_threshold > 0 else float("-inf")
    nqb = -(-sq // block_m)
    pad = nqb * block_m - sq
    qf = torch.nn.functional.pad(q.float(), (0, 0, 0, pad)).unflatten(2, (nqb, block_m))
    qf = qf.unflatten(1, (hkv, hq // hkv))  # [B, Hkv, G, NQB, bm, D]
    rows = (torch.arange(nqb * block_m, device=q.device) + (sk - sq)).view(nqb, block_m)
    m = torch.full(qf.shape[:-1], float("-inf"), device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros_like(qf)
    visited = torch.zeros((), device=q.device)
    skipped = torch.zeros((), device=q.device)
    for n0 in range(0, sk, block_n):
        n1 = min(sk, n0 + block_n)
        # query tiles that reach this key tile (all of them without causality)
        t0 = max(0, (n0 - (sk - sq)) // block_m) if causal else 0
        if t0 >= nqb:
            break
        kt = k[:, :, None, n0:n1].float()  # [B, Hkv, 1, bn, D]
        s = torch.einsum("bhgmrd,bhgnd->bhgmrn", qf[:, :, :, t0:], kt) * scale
        ok = torch.ones(nqb - t0, block_m, n1 - n0, dtype=torch.bool, device=q.device)
        if causal:
            ok = torch.arange(n0, n1, device=q.device)[None, None, :] <= rows[t0:, :, None]
        s = s.masked_fill(~ok, float("-inf"))
        mt = m[..., t0:, :]
        m_blk = s.amax(-1)  # [B, Hkv, G, NQB - t0, bm]
        gap = torch.where(torch.isinf(m_blk), float("-inf"), m_blk - mt)
        gap = torch.where(torch.isinf(mt) & ~torch.isinf(m_blk), float("inf"), gap)
        live = ok.any(-1).any(-1)  # [NQB - t0]: the tile has a reachable key
        skip = (gap.amax(-1) < log_thr) & live  # [B, Hkv, G, NQB - t0]
        visited = visited + live.sum() * (batch * hq)
        skipped = skipped + skip.sum()
        use = (~skip & live)[..., None]
        m_new = torch.where(use, torch.maximum(mt, m_blk), mt)
        m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
        p = torch.exp(s - m_safe[..., None]) * use[..., None]
        alpha = torch.exp(torch.where(torch.isinf(mt), float("-inf"), mt - m_safe))
        alpha = torch.where(use, alpha, 1.0)
        l[..., t0:, :] = l[..., t0:, :] * alpha + p.sum(-1)
        acc[..., t0:, :, :] = acc[..., t0:, :, :] * alpha[..., None] + torch.einsum(
            "bhgmrn,bhgnd->bhgmrd", p, v[:, :, None, n0:n1].float())
        m[..., t0:, :] = m_new
    out = torch.where(l[..., None] > 0, acc / l.clamp(min=1e-30)[..., None], 0.0)
    out = out.flatten(3, 4)[:, :, :, :sq].flatten(1, 2)
    return out, skipped / visited.clamp(min=1)


@dataclasses.dataclass
class ThresholdCalibration:
    """Result of :func:`calibrate_threshold`.

    Attributes:
        threshold: the largest candidate ``lambda`` whose output error met the target (the
            smallest candidate when none did).
        threshold_scale: ``threshold * seqlen_k``, for ``estimators.get("threshold",
            threshold_scale=...)``.
        seqlen_k: the sample's key length.
        candidates, errors, skipped: the tried ``lambda`` (descending, down to the chosen one)
            with its relative L2 output error against dense attention and the share of tiles
            skipped.
    """

    threshold: float
    threshold_scale: float
    seqlen_k: int
    candidates: list[float]
    errors: list[float]
    skipped: list[float]


def _attend(q, k, v, lam, causal, block_m, block_n, backend):
    if backend == "torch":
        return blasst_attention_ref(q, k, v, softmax_threshold=lam, causal=causal,
                                    block_m=block_m, block_n=block_n)
    from ..ops.block_sparse import block_sparse_attention
    layout = BlockLayout.dense(q.shape[0], k.shape[1], q.shape[2], k.shape[2], causal=causal,
                               block_m=block_m, block_n=block_n, device=q.device)
    out, skipped = block_sparse_attention(
        q, k, v, layout, causal=causal, softmax_threshold=lam or None, return_skipped=True,
        backend="triton", check_indices=False)
    return out.float(), skipped


def calibrate_threshold(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        target_error: float = 0.01, causal: bool = True,
                        candidates=None, block_m: int = 128, block_n: int = 128,
                        backend: str = "auto") -> ThresholdCalibration:
    """Pick the BLASST ``lambda`` for a target output error on a sample (BLASST's calibration).

    Tries ``candidates`` from the largest down and stops at the first (largest) whose relative
    L2 output error ``||o_lambda - o_dense|| / ||o_dense||`` stays within ``target_error`` (the
    error grows with ``lambda``). Offline: it reads results back to the host.

    Args:
        q: ``[B, Hq, S, D]``; k, v: ``[B, Hkv, S, D]``: a sample of real activations.
        target_error: the accepted relative L2 output error, in ``(0, 1)``.
        candidates: thresholds to try, each in ``(0, 1)`` (default 1e-1 .. 1e-8, three per
            decade).
        block_m, block_n: tile sizes of the kernel the threshold is for.
        backend: ``"auto"`` (the Triton kernel on CUDA, the torch emulation on CPU),
            ``"triton"`` or ``"torch"``.

    Returns:
        A :class:`ThresholdCalibration` (``threshold``, ``threshold_scale`` = ``threshold *
        Sk``, and the error curve).

    Example:
        >>> cal = calibrate_threshold(q, k, v, target_error=0.01)
        >>> est = sparse_attn.estimators.get("threshold", threshold_scale=cal.threshold_scale)
    """
    if not (_is_real(target_error) and 0.0 < target_error < 1.0):
        raise ValueError(f"calibrate_threshold: target_error must be a number in (0, 1), got "
                         f"{target_error!r}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"calibrate_threshold: backend must be one of ('auto', 'triton', "
                         f"'torch'), got {backend!r}")
    cands = sorted(_CANDIDATES if candidates is None else candidates, reverse=True)
    if not cands or not all(_is_real(c) and 0.0 < c < 1.0 for c in cands):
        raise ValueError(f"calibrate_threshold: candidates must be numbers in (0, 1), got "
                         f"{candidates!r}")
    BlockEstimator(block_m=block_m, block_n=block_n)._check(q, k, causal)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    ref = _attend(q, k, v, 0.0, causal, block_m, block_n, backend)[0]
    norm = ref.norm().clamp(min=1e-30)
    errors, skipped = [], []
    chosen = None
    for lam in cands:
        out, sk = _attend(q, k, v, lam, causal, block_m, block_n, backend)
        errors.append(float((out - ref).norm() / norm))
        skipped.append(float(sk))
        if errors[-1] <= target_error:
            chosen = lam
            break
    if chosen is None:
        chosen = cands[-1]
    return ThresholdCalibration(threshold=chosen, threshold_scale=chosen * k.shape[2],
                                seqlen_k=k.shape[2], candidates=cands[:len(errors)],
                                errors=errors,
                                skipped=skipped)


def threshold_vs_length(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths, *,
                        target_error: float = 0.01, **kwargs) -> dict:
    """Calibrate on the first ``L`` tokens of a sample for each ``L`` and fit
    ``lambda = a * L^-beta`` (BLASST's inverse relation: ``beta`` near 1).

    Args:
        q, k, v: a sample as for :func:`calibrate_threshold` (self-attention, ``Sq == Sk``).
        lengths: prefix lengths to calibrate at (each <= the sample length; >= 2 of them).
        target_error, **kwargs: passed to :func:`calibrate_threshold`.

    Returns:
        ``{"lengths", "thresholds", "calibrations", "a", "beta"}`` (``a`` and ``beta`` from a
        least-squares line in log-log space).

    Example:
        >>> fit = threshold_vs_length(q, k, v, [1024, 2048, 4096], target_error=0.01)
        >>> fit["beta"]  # ~1: the threshold falls as 1 / L
    """
    lengths = sorted(int(n) for n in lengths)
    if len(lengths) < 2 or lengths[0] < 1 or lengths[-1] > k.shape[2]:
        raise ValueError(f"threshold_vs_length: need >= 2 lengths in [1, {k.shape[2]}], got "
                         f"{lengths}")
    cals = [calibrate_threshold(q[:, :, :n], k[:, :, :n], v[:, :, :n],
                                target_error=target_error, **kwargs) for n in lengths]
    a, beta = _fit_power(lengths, [c.threshold for c in cals])
    return {"lengths": lengths, "thresholds": [c.threshold for c in cals], "calibrations": cals,
            "a": a, "beta": beta}


def _fit_power(lengths, thresholds) -> tuple[float, float]:
    """``(a, beta)`` of ``threshold = a * L^-beta``, least squares in log-log space."""
    x = torch.tensor([math.log(n) for n in lengths], dtype=torch.float64)
    y = torch.tensor([math.log(t) for t in thresholds], dtype=torch.float64)
    xm, ym = x.mean(), y.mean()
    slope = float(((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum())
    return math.exp(float(ym - slope * xm)), -slope


def sink_sample(seqlen: int, heads: int = 2, dim: int = 64, block: int = 64, *, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A synthetic sample where BLASST's skipped mass grows with the length at a fixed lambda
    (for tests and benchmarks of the calibration): key 0 is a sink holding most of every row's
    mass; every other key block's log mass relative to it lies in [-18, -8], spread evenly in
    every prefix (a golden-ratio sequence), so longer contexts hold proportionally more
    skippable blocks.

    Returns:
        fp32 ``q, k, v [1, heads, seqlen, dim]`` on the CPU.

    Example:
        >>> q, k, v = sink_sample(1024)
        >>> fit = threshold_vs_length(q, k, v, [256, 512, 1024], target_error=1e-3)
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(1, heads, 1, dim, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    nb = -(-seqlen // block)
    phase = torch.rand(1, heads, 1, 1, generator=g)
    level = ((torch.arange(nb)[None, None, :, None] * 0.6180339887 + phase) % 1.0) * 10 - 18
    beta = 8 + level.repeat_interleave(block, dim=2)[:, :, :seqlen]
    beta = beta + 0.3 * torch.randn(1, heads, seqlen, 1, generator=g)
    beta[:, :, 0] = 8.0
    k = beta * u + 0.05 * torch.randn(1, heads, seqlen, dim, generator=g)
    q = math.sqrt(dim) * u + 0.05 * torch.randn(1, heads, seqlen, dim, generator=g)
    v = torch.randn(1, heads, seqlen, dim, generator=g)
    return q, k, v
