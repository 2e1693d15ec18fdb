"""Public stripe attention: validation, backend choice, and the result tuple."""
from __future__ import annotations

import torch

from ..layout import StripeLayout
from ..reference.stripe import stripe_attention_ref
from ._validate import check_qkv, check_scale, check_threshold, choose_backend
from .block_sparse import check_layout, op_result

_OP = "stripe_attention"


def stripe_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: StripeLayout,
    *,
    causal: bool = True,
    scale: float | None = None,
    softmax_threshold: float | None = None,
    return_lse: bool = False,
    return_skipped: bool = False,
    backend: str = "auto",
    check_indices: bool | None = None,
):
    """Attention over a :class:`StripeLayout`: its dense key blocks, then its stripe positions
    gathered from K and V (AnchorAttention's fine-grained pattern, MInference's vertical-slash).

    Args:
        q: ``[B, Hq, Sq, D]`` (fp16, bf16 or fp32; any strides).
        k, v: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0`` (GQA). ``Sq <= Sk`` for chunked
            prefill: query row ``i`` sits at absolute position ``Sk - Sq + i``.
        layout: per query head (``H = Hq``) or per KV head (``H = Hkv``: the query heads of a
            group are computed against one K/V tile, dense or gathered). Built for these
            lengths.
        causal: also mask keys after each query's absolute position (per stripe position).
        scale: softmax scale, default ``1/sqrt(D)``.
        softmax_threshold: BLASST skipping on top of the layout: a key tile (dense or gathered)
            whose every score satisfies ``exp(s - running_max) < softmax_threshold`` skips its
            exponentials, V load and P.V. ``None``/``0`` computes everything exactly; so does
            the torch backend (CPU), which logs once that the threshold is ignored.
        return_lse: also return the log-sum-exp ``[B, Hq, Sq]`` (float32, natural log;
            ``-inf`` for rows with nothing to attend, whose output is 0).
        return_skipped: also return the fraction of visited tiles the threshold skipped (a
            0-dim float32 tensor on the device; no host synchronisation).
        backend: ``"auto"`` (Triton on CUDA, the torch reference on CPU), ``"triton"``,
            ``"torch"``.
        check_indices: check the layout's indices before launch (a host sync, once per layout
            object by default; skipped automatically under CUDA-graph capture).

    Returns:
        ``out [B, Hq, Sq, D]`` in q's dtype, or a tuple ``(out, lse?, skipped?)`` with the
        requested extras in that order.

    Example:
        >>> q = torch.randn(1, 32, 8192, 128, device="cuda", dtype=torch.bfloat16)
        >>> k = torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16)
        >>> v = torch.randn_like(k)
        >>> vert = torch.randint(0, 8192, (1, 8, 256), device="cuda")  # vertical lines
        >>> slash = torch.arange(64, device="cuda").expand(1, 8, 64)    # local diagonals
        >>> layout = StripeLayout.from_vertical_slash(vert, slash, 8192, 8192)
        >>> out = stripe_attention(q, k, v, layout)
    """
    check_qkv(q, k, v, op=_OP)
    scale = check_scale(scale, q.shape[-1], op=_OP)
    softmax_threshold = check_threshold(softmax_threshold, op=_OP)
    check_layout(layout, q, k, op=_OP, check_indices=check_indices, layout_type=StripeLayout)
    chosen = choose_backend(backend, q.device, op=_OP,
                            softmax_threshold=softmax_threshold)

    if chosen == "torch":
        out, lse = stripe_attention_ref(q, k, v, layout, causal=causal, scale=scale)
        return op_result(out.to(q.dtype), lse, None, return_lse=return_lse,
                         return_skipped=return_skipped)
    from ..kernels.stripe import stripe_fwd

    out, lse, stats = stripe_fwd(q, k, v, layout, causal=causal, scale=scale,
                                 softmax_threshold=softmax_threshold, return_lse=return_lse)
    return op_result(out, lse, stats, return_lse=return_lse, return_skipped=return_skipped)
