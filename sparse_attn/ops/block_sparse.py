"""Public block-sparse attention: validation, backend choice, and the result tuple."""
from __future__ import annotations

import torch

from ..layout import BlockLayout
from ..reference.block_sparse import block_sparse_attention_ref
from ._validate import check_qkv, check_scale, check_threshold, choose_backend

_OP = "block_sparse_attention"


def check_layout(layout, q: torch.Tensor, k: torch.Tensor, *, op: str,
                 check_indices: bool | None, layout_type: type = BlockLayout) -> None:
    """The layout fits q/k: type, batch, heads, device, sequence lengths (and indices).

    Index checks read the layout back to the host once per layout object; they are skipped
    under CUDA-graph capture, with ``check_indices=False``, or for a layout already checked.
    ``layout_type``: the layout class the op takes (any with batch/num_heads/device/validate).
    """
    if not isinstance(layout, layout_type):
        raise TypeError(
            f"{op}: layout must be a {layout_type.__name__}, got {type(layout).__name__}")
    hq, hkv = q.shape[1], k.shape[1]
    if layout.batch != q.shape[0]:
        raise ValueError(f"{op}: layout batch {layout.batch} but q has batch {q.shape[0]}")
    if layout.num_heads not in (hq, hkv):
        raise ValueError(
            f"{op}: layout has {layout.num_heads} heads; expected the query heads ({hq}) or "
            f"the KV heads ({hkv})")
    if layout.device != q.device:
        raise ValueError(f"{op}: layout on {layout.device} but q on {q.device}")
    sq, sk = q.shape[2], k.shape[2]
    capturing = q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if check_indices is None:
        check_indices = not capturing and getattr(layout, "_checked_for", None) != (sq, sk)
    layout.validate(sq, sk, check_indices=check_indices)
    if check_indices:
        layout._checked_for = (sq, sk)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    causal: bool = True,
    scale: float | None = None,
    softmax_threshold: float | None = None,
    return_lse: bool = False,
    return_skipped: bool = False,
    backend: str = "auto",
    check_indices: bool | None = None,
):
    """Attention over the key blocks a :class:`BlockLayout` lists.

    Args:
        q: ``[B, Hq, Sq, D]`` (fp16, bf16 or fp32; any strides).
        k, v: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0`` (GQA). ``Sq <= Sk`` for chunked
            prefill: query row ``i`` sits at absolute position ``Sk - Sq + i``.
        layout: per query head (``H = Hq``) or per KV head (``H = Hkv``; then all query heads of a
            group are computed against one K/V tile load). Built for these lengths.
        causal: also mask keys after each query's absolute position.
        scale: softmax scale, default ``1/sqrt(D)``.
        softmax_threshold: BLASST skipping: a key tile whose every score satisfies
            ``exp(s - running_max) < softmax_threshold`` skips its exponentials, V load and P.V.
            ``None``/``0`` computes every listed tile exactly. The torch backend (CPU) always
            computes exactly and logs once that the threshold is ignored.
        return_lse: also return the log-sum-exp ``[B, Hq, Sq]`` (float32, natural log;
            ``-inf`` for rows with nothing to attend, whose output is 0).
        return_skipped: also return the fraction of visited tiles skipped by the threshold
            (a 0-dim float32 tensor on the device; no host synchronisation).
        backend: ``"auto"`` (Triton on CUDA, the torch reference on CPU), ``"triton"``, ``"torch"``.
        check_indices: check the layout's indices before launch (a host sync, done once per
            layout object by default; skipped automatically under CUDA-graph capture).

    Returns:
        ``out [B, Hq, Sq, D]`` in q's dtype, or a tuple ``(out, lse?, skipped?)`` with the
        requested extras in that order.

    Example:
        >>> q = torch.randn(1, 32, 8192, 128, device="cuda", dtype=torch.bfloat16)
        >>> k = torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16)
        >>> v = torch.randn_like(k)
        >>> layout = BlockLayout.streaming(1, 8, 8192, device="cuda")  # per KV head
        >>> out = block_sparse_attention(q, k, v, layout)
    """
    check_qkv(q, k, v, op=_OP)
    scale = check_scale(scale, q.shape[-1], op=_OP)
    softmax_threshold = check_threshold(softmax_threshold, op=_OP)
    check_layout(layout, q, k, op=_OP, check_indices=check_indices)
    chosen = choose_backend(backend, q.device, op=_OP,
                            softmax_threshold=softmax_threshold)

    if chosen == "torch":
        out, lse = block_sparse_attention_ref(q, k, v, layout, causal=causal, scale=scale)
        return op_result(out.to(q.dtype), lse, None, return_lse=return_lse,
                         return_skipped=return_skipped)
    from ..kernels.block_sparse import block_sparse_fwd

    out, lse, stats = block_sparse_fwd(
        q, k, v, layout.counts, layout.indices, layout.block_m, layout.block_n,
        causal=causal, scale=scale, softmax_threshold=softmax_threshold,
        return_lse=return_lse)
    return op_result(out, lse, stats, return_lse=return_lse, return_skipped=return_skipped)


def op_result(out: torch.Tensor, lse, stats, *, return_lse: bool, return_skipped: bool):
    """``out`` or ``(out, lse?, skipped?)``; ``skipped`` is the share of visited tiles the
    threshold skipped, from the kernel's per-program ``stats [programs, 2]`` (0 without them),
    a 0-dim device tensor (no host synchronisation)."""
    extras = []
    if return_lse:
        extras.append(lse)
    if return_skipped:  # only when asked: each is a kernel launch on every call
        if stats is None:
            skipped = torch.zeros((), dtype=torch.float32, device=out.device)
        else:
            totals = stats.sum(0, dtype=torch.int64).float()
            skipped = totals[0] / totals[1].clamp(min=1.0)
        extras.append(skipped)
    return (out, *extras) if extras else out
