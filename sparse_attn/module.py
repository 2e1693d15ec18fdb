"""``SparseAttention``: an estimator and a sparse kernel behind an SDPA-shaped call.

Short contexts and single-token decode go to dense attention (estimating a pattern costs more
than it saves there); everything else is estimated (``sparse_attn.estimators``) and computed by
the op that runs the estimator's layout type (``BlockLayout`` -> ``block_sparse_attention``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import estimators
from .layout import BlockLayout, StripeLayout
from .ops._validate import check_qkv, check_threshold
from .ops.block_sparse import block_sparse_attention
from .ops.stripe import stripe_attention
from .reference.dense import dense_attention_ref

__all__ = ["DEFAULT_MIN_SEQLEN", "SparseAttention", "sparse_attention"]

# Key length below which SparseAttention runs dense attention: the crossover bench/e2e.py
# measured on an H100 (2026-11-25, bench/RESULTS.md): streaming beats cuDNN SDPA from 8k,
# block_topk (10%) from 16k (0.81x at 8k, 1.76x at 16k); the larger one keeps the patched model
# never slower than the dense one. The same run's proxy (10%) and lowbit (10%) cross at 16k too;
# anchor (10%) only from 32k (0.89x at 16k, 1.84x at 32k; e2e rerun in the second GPU session
# of 2026-11-25), so it gets its own default. vertical_slash was not timed end to end; its
# 128k estimate (53 ms per layer, 21% of dense) is anchor's class, so it takes anchor's default.
DEFAULT_MIN_SEQLEN = 16384
_MIN_SEQLEN_BY_METHOD = {"anchor": 32768, "vertical_slash": 32768}


def default_min_seqlen(method: str) -> int:
    """The key length from which ``method`` runs sparse by default (measured crossovers)."""
    return _MIN_SEQLEN_BY_METHOD.get(method, DEFAULT_MIN_SEQLEN)

# decode (q_len == 1) policies
_DECODE = ("dense", "sparse")
# SparseAttention's own options, beside the estimator's config (for error messages)
MODULE_OPTIONS = ("min_seqlen", "decode", "softmax_threshold", "backend", "record_stats")
# an end-aligned causal mask for SDPA up to this many elements; the chunked reference beyond
_MAX_SDPA_MASK = 1 << 26

# layout type -> the op that computes it (new layout families add their op here)
_LAYOUT_OPS: dict[type, Callable] = {BlockLayout: block_sparse_attention,
                                     StripeLayout: stripe_attention}


def _check_shapes(q, k, v, causal: bool, op: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(
                f"{op}: {name} must be a rank-4 tensor [B, H, S, D] (SDPA layout), got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"{op}: query heads ({q.shape[1]}) must be a multiple of key/value heads "
            f"({k.shape[1]}) (GQA)")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(
            f"{op}: causal attention needs seqlen_q <= seqlen_k (queries aligned to the end of "
            f"the keys), got seqlen_q={q.shape[2]}, seqlen_k={k.shape[2]}")


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    scale: float | None = None) -> torch.Tensor:
    """Dense attention with the package's conventions (GQA; causal queries aligned to the end).

    torch SDPA where it can express the mask cheaply, the chunked torch reference otherwise
    (a short query block against a very long cache).
    """
    sq, sk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if not causal or sq == 1 or sq == sk:
        # one query at the end of the keys sees every key: no mask at all
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal and sq == sk and sq > 1, scale=scale, enable_gqa=gqa)
    if sq * sk <= _MAX_SDPA_MASK:
        rows = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        mask = torch.arange(sk, device=q.device)[None, :] <= rows
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=gqa)
    out, _ = dense_attention_ref(q, k, v, causal=True, scale=scale)
    return out.to(q.dtype)


class SparseAttention(nn.Module):
    """Sparse attention for long-context prefill: estimate a layout, compute only its tiles.

    Args:
        method: estimator name (``sparse_attn.estimators.available()``).
        min_seqlen: dense attention when the key length is below this
            (default ``None``: :func:`default_min_seqlen` of the method, the GPU crossover
            measured by ``bench/e2e.py``: 16384, or 32768 for anchor and vertical_slash).
        decode: ``"dense"`` (default) or ``"sparse"``: what a single query (``q_len == 1``) does.
        softmax_threshold: BLASST tile skipping on top of the layout (see
            :func:`sparse_attn.block_sparse_attention`); ``None`` computes listed tiles exactly.
        backend: ``"auto"`` (Triton on CUDA, the torch reference on CPU: a whole model under the
            Triton interpreter would take hours), ``"triton"`` or ``"torch"``.
        record_stats: append one dict per call to ``self.stats`` (path, lengths, density).
        **config: the estimator's config (e.g. ``local_blocks=8``); unknown keys raise, listing
            the accepted ones.

    ``forward(q, k, v, *, causal=True, scale=None)`` takes SDPA-layout ``q [B, Hq, Sq, D]``,
    ``k, v [B, Hkv, Sk, D]`` (GQA: ``Hq % Hkv == 0``; ``Sq <= Sk``, queries aligned to the end
    of the keys) and returns ``[B, Hq, Sq, D]`` in q's dtype.

    Set ``on_layout = fn`` to observe every estimated layout as ``fn(q, k, layout, causal)``
    (the demo computes attention recall that way).

    Example:
        >>> attn = SparseAttention("streaming", min_seqlen=4096, local_blocks=8)
        >>> out = attn(q, k, v)  # q [1, 32, 32768, 128], k/v [1, 8, 32768, 128] on CUDA
    """

    def __init__(self, method: str = "streaming", *, min_seqlen: int | None = None,
                 decode: str = "dense", softmax_threshold: float | None = None,
                 backend: str = "auto", record_stats: bool = False, **config):
        super().__init__()
        if min_seqlen is None:
            min_seqlen = default_min_seqlen(method)
        if isinstance(min_seqlen, bool) or not isinstance(min_seqlen, int) or min_seqlen < 0:
            raise ValueError(f"SparseAttention: min_seqlen must be an int >= 0, got {min_seqlen!r}")
        if decode not in _DECODE:
            raise ValueError(f"SparseAttention: decode must be one of {_DECODE}, got {decode!r}")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(
                f"SparseAttention: backend must be one of ('auto', 'triton', 'torch'), got "
                f"{backend!r}")
        check_threshold(softmax_threshold, op="SparseAttention")
        try:
            self.estimator = estimators.get(method, **config)
        except ValueError as exc:
            if config and "has no config" in str(exc):
                raise ValueError(
                    f"{exc}; SparseAttention options: {list(MODULE_OPTIONS)}") from None
            raise
        self.method = method
        self.config = dict(config)
        self.min_seqlen = min_seqlen
        self.decode = decode
        self.softmax_threshold = softmax_threshold
        self.backend = backend
        self.record_stats = record_stats
        self.stats: list[dict] = []
        self.on_layout: Callable | None = None

    def extra_repr(self) -> str:
        cfg = "".join(f", {k}={v!r}" for k, v in self.config.items())
        thr = ("" if self.softmax_threshold is None
               else f", softmax_threshold={self.softmax_threshold}")
        return (f"method={self.method!r}{cfg}, min_seqlen={self.min_seqlen}, "
                f"decode={self.decode!r}{thr}")

    # ---------------------------------------------------------------------------- policy
    def dense_reason(self, seqlen_q: int, seqlen_k: int) -> str | None:
        """Why a call of these lengths runs dense (``"decode"``, ``"min_seqlen"``), or None."""
        if seqlen_q == 1 and self.decode == "dense":
            return "decode"
        if seqlen_k < self.min_seqlen:
            return "min_seqlen"
        return None

    def record(self, path: str, seqlen_q: int, seqlen_k: int, density: float,
               reason: str | None = None) -> None:
        if self.record_stats:
            self.stats.append({"path": path, "reason": reason, "seqlen_q": seqlen_q,
                               "seqlen_k": seqlen_k, "density": density})

    def reset_stats(self) -> None:
        self.stats.clear()

    # --------------------------------------------------------------------------- compute
    def sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
               scale: float | None = None):
        """Estimate and run the sparse op, whatever the lengths. Returns ``(out, layout)``."""
        check_qkv(q, k, v, op="SparseAttention")
        layout = self.estimator.estimate(q, k, causal=causal)
        op = next((fn for cls, fn in _LAYOUT_OPS.items() if isinstance(layout, cls)), None)
        if op is None:
            raise TypeError(
                f"SparseAttention: estimator {self.method!r} returned a {type(layout).__name__}; "
                f"layouts with an op: {[c.__name__ for c in _LAYOUT_OPS]}")
        backend = self.backend
        if backend == "auto":
            backend = "triton" if q.device.type == "cuda" else "torch"
        # built-in estimators make valid layouts: skip the index check and its host sync
        check = None if not self.estimator.layouts_valid_by_construction else False
        threshold = self.softmax_threshold
        if threshold is None and hasattr(self.estimator, "softmax_threshold_for"):
            # the ``threshold`` method (BLASST): its lambda for this key length
            threshold = self.estimator.softmax_threshold_for(k.shape[2])
        out = op(q, k, v, layout, causal=causal, scale=scale,
                 softmax_threshold=threshold, backend=backend,
                 check_indices=check)
        sq, sk = q.shape[2], k.shape[2]
        if self.record_stats:
            self.record("sparse", sq, sk, layout.density(sq, sk, causal=causal))
        if self.on_layout is not None:
            self.on_layout(q, k, layout, causal)
        return out, layout

    def run(self, q, k, v, *, causal: bool = True, scale: float | None = None):
        """Dense or sparse by the policy. Returns ``(out, layout or None when dense)``."""
        _check_shapes(q, k, v, causal, "SparseAttention")
        sq, sk = q.shape[2], k.shape[2]
        reason = self.dense_reason(sq, sk)
        if reason is not None:
            self.record("dense", sq, sk, 1.0, reason)
            return dense_attention(q, k, v, causal=causal, scale=scale), None
        return self.sparse(q, k, v, causal=causal, scale=scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                scale: float | None = None) -> torch.Tensor:
        return self.run(q, k, v, causal=causal, scale=scale)[0]


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     method: str = "streaming", *, causal: bool = True,
                     scale: float | None = None, return_layout: bool = False, **config):
    """Functional :class:`SparseAttention`: same policy and options, no module to keep.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Sk, D]`` (GQA; ``Sq <= Sk``, end-aligned).
        method: estimator name; ``**config``: its config and the module options
            (``min_seqlen``, ``decode``, ``softmax_threshold``, ``backend``).
        return_layout: also return the layout used (``None`` when the call ran dense).

    Returns:
        ``out [B, Hq, Sq, D]``, or ``(out, layout)`` with ``return_layout``.

    Example:
        >>> out = sparse_attention(q, k, v, "streaming", min_seqlen=0, local_blocks=8)
    """
    out, layout = SparseAttention(method, **config).run(q, k, v, causal=causal, scale=scale)
    return (out, layout) if return_layout else out
