"""Public token-level top-k attention and top-k selection: validation, backend choice."""
from __future__ import annotations

import torch

from ..layout import TopKLayout
from ..reference.topk import topk_attention_ref
from ._validate import check_qkv, check_scale, choose_backend

_OP = "topk_attention"

__all__ = ["topk_attention", "topk_indices"]


def _state(t: torch.Tensor) -> tuple:
    """Identity of a tensor's contents for caches: storage and in-place version (inference
    tensors have no version counter: storage only)."""
    try:
        return (t.data_ptr(), t._version)
    except RuntimeError:
        return (t.data_ptr(), None)


def _check_layout(layout, q, k, *, check_indices: bool | None) -> None:
    """Type, batch, heads, device and lengths of a TopKLayout; index values (range, trailing
    padding, no repeats) once per layout object, never under CUDA-graph capture."""
    if not isinstance(layout, TopKLayout):
        raise TypeError(f"{_OP}: layout must be a TopKLayout, got {type(layout).__name__}")
    if layout.batch != q.shape[0]:
        raise ValueError(f"{_OP}: layout batch {layout.batch} but q has batch {q.shape[0]}")
    if layout.num_heads != k.shape[1]:
        raise ValueError(
            f"{_OP}: layout has {layout.num_heads} heads; expected the KV heads ({k.shape[1]}) "
            f"(a TopKLayout is shared by the query heads of a group)")
    if layout.device != q.device:
        raise ValueError(f"{_OP}: layout on {layout.device} but q on {q.device}")
    sq, sk = q.shape[2], k.shape[2]
    capturing = q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = (sq, sk, *_state(layout.indices))
    if check_indices is None:
        check_indices = not capturing and getattr(layout, "_checked_for", None) != key
    layout.validate(sq, sk, check_indices=check_indices)
    if check_indices:
        layout._checked_for = key


def _merged_lists(layout: TopKLayout, tokens: int, seqlen_k: int, causal: bool):
    """Tile unions of the layout's lists, cached on the layout per (TOKENS, Sk, causal) (and
    invalidated when its indices change in place)."""
    from ..kernels.topk import merge_token_lists

    offset = seqlen_k - layout.seqlen_q if causal else None
    key = (tokens, seqlen_k, offset)
    state = _state(layout.indices)
    cached = layout._merged.get(key)
    if cached is None or cached[0] != state:
        cached = (state, merge_token_lists(layout.indices, tokens, seqlen_k=seqlen_k,
                                           causal_offset=offset))
        layout._merged[key] = cached
    return cached[1]


def topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TopKLayout,
    *,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    merge: bool = True,
    tokens: int | None = None,
    check_indices: bool | None = None,
):
    """Attention of every query token over its own list of key positions (token-level top-k).

    Args:
        q: ``[B, Hq, Sq, D]`` (fp16, bf16 or fp32; any strides).
        k, v: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0`` (GQA). ``Sq <= Sk``: query row ``i``
            sits at absolute position ``Sk - Sq + i``.
        layout: :class:`TopKLayout` with ``indices [B, Hkv, Sq, K]`` (int32, -1 padded at the
            end, any order, no repeats), shared by the query heads of each group.
        causal: also mask listed keys after each query's absolute position.
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp ``[B, Hq, Sq]`` (float32, natural log; ``-inf``
            for rows with nothing to attend, whose output is 0).
        backend: ``"auto"`` (Triton on CUDA, the torch reference on CPU), ``"triton"``,
            ``"torch"``.
        merge: the kernel iterates over the union of ``tokens`` neighbouring tokens' lists
            (one gather serves every token that listed a key; pays off when neighbours' sets
            overlap, as real top-k sets do). The union is built on the device (the CUDA
            extension's kernel, else a Triton pass; no sort) and cached on the layout.
            ``False``: each token's own list, row-masked (better when neighbours' lists are
            disjoint, e.g. random keys). Measured at 128k, K=2048 (H100): merged kernel
            13.1 ms + merge 5.7 ms (CUDA; Triton 35 ms) once per layout, per-token 171 ms,
            block-sparse kernel at the same keys 9.9 ms (1.89x with the merge).
        tokens: query tokens per tile (tile rows = next_pow2(G) x tokens, at most 128);
            default: 16 rows per-token, 128 rows merged (at most 32 tokens).
        check_indices: check the index values before launch (a host sync, once per layout;
            skipped automatically under CUDA-graph capture).

    Returns:
        ``out [B, Hq, Sq, D]`` in q's dtype, or ``(out, lse)`` with ``return_lse``.

    Example:
        >>> q = torch.randn(1, 32, 8192, 128, device="cuda", dtype=torch.bfloat16)
        >>> k = torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16)
        >>> v = torch.randn_like(k)
        >>> scores = torch.randn(1, 8, 8192, 8192, device="cuda")  # e.g. an indexer's scores
        >>> layout = topk_indices(scores, 512)  # causal, as topk_attention
        >>> out = topk_attention(q, k, v, layout)
    """
    check_qkv(q, k, v, op=_OP)
    scale = check_scale(scale, q.shape[-1], op=_OP)
    _check_layout(layout, q, k, check_indices=check_indices)
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int)
                               or not 1 <= tokens <= 32):
        raise ValueError(f"{_OP}: tokens must be an int in [1, 32] or None, got {tokens!r}")
    chosen = choose_backend(backend, q.device, op=_OP)
    if chosen == "torch":
        out, lse = topk_attention_ref(q, k, v, layout, causal=causal, scale=scale)
        out = out.to(q.dtype)
    else:
        from ..kernels.topk import default_tokens, topk_fwd

        group = q.shape[1] // k.shape[1]
        if tokens is None:
            tokens = default_tokens(group, merge)
        # the launcher raises tokens to fill 16 rows; merge for the tokens it will use
        g_pad = 1 << (group - 1).bit_length()
        tokens = max(tokens, -(-16 // g_pad))
        if g_pad * tokens > 128:
            raise ValueError(
                f"{_OP}: tokens={tokens} with a GQA group of {group} gives {g_pad * tokens} tile "
                f"rows; at most 128 (tokens <= {max(1, 128 // g_pad)})")
        merged = _merged_lists(layout, tokens, k.shape[2], causal) if merge else None
        out, lse = topk_fwd(q, k, v, layout.indices, causal=causal, scale=scale,
                            return_lse=return_lse, tokens=tokens, merged=merge,
                            merged_lists=merged)
    return (out, lse) if return_lse else out


def topk_indices(scores: torch.Tensor, k: int, *, causal: bool = True,
                 q_offset: int | None = None) -> TopKLayout:
    """The ``k`` highest-scoring key positions of every query row, as a :class:`TopKLayout`.

    Selection is ``torch.topk(..., sorted=False)`` (a radix select on the GPU: O(Sk) per row,
    no full sort of the Sk scores); the k winners come out unsorted, which the kernel accepts.
    Rows with fewer than ``k`` eligible keys (causal, or ``-inf`` scores) get ``-1`` padding,
    moved to the end by a prefix sum over the k winners (O(k) per row). No host
    synchronisation (CUDA-graph capturable). ``causal`` (the default, as for every attention
    op) masks a copy of ``scores`` (O(Sq Sk) memory): for long sequences score and select a
    chunk of query rows at a time (``q_offset``).

    Args:
        scores: ``[B, Hkv, Sq, Sk]`` float scores (an indexer's output; for a per-query-head
            score tensor, reduce over the group first). ``-inf`` marks keys never selected.
        k: keys per query token, ``1 <= k <= Sk``.
        causal: (default True, as in :func:`topk_attention`) never select a key after the
            query's absolute position: query row ``i`` sits at ``q_offset + i``, by default
            ``Sk - Sq + i`` (queries aligned to the end of the keys, as everywhere), so row
            ``i`` sees keys ``0 .. Sk - Sq + i`` and an early row with fewer than ``k`` of them
            is ``-1`` padded. ``False``: every key of the row is eligible (non-causal
            attention, or scores already masked).
        q_offset: absolute position of score row 0 (default ``Sk - Sq``: queries aligned to
            the end), for scoring a chunk of queries at a time; used only with ``causal``.

    Returns:
        ``TopKLayout`` with int32 ``indices [B, Hkv, Sq, k]``.

    Example:
        >>> scores = torch.randn(1, 8, 4096, 4096, device="cuda")
        >>> layout = topk_indices(scores, 512)  # causal: row i picks among keys 0..i
        >>> full = topk_indices(scores, 512, causal=False)  # any key
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"topk_indices: scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 4:
        raise ValueError(
            f"topk_indices: scores must be [B, Hkv, Sq, Sk], got shape {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"topk_indices: scores must be floating point, got {scores.dtype}")
    sq, sk = scores.shape[2], scores.shape[3]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= sk:
        raise ValueError(f"topk_indices: k must be an int in [1, Sk={sk}], got {k!r}")
    if q_offset is None:
        q_offset = sk - sq
    if causal:
        pos = torch.arange(sq, device=scores.device) + q_offset
        future = torch.arange(sk, device=scores.device)[None, :] > pos[:, None]
        scores = scores.masked_fill(future, float("-inf"))
    vals, idx = torch.topk(scores, k, dim=-1, sorted=False)
    idx = idx.to(torch.int32)
    keep = vals > float("-inf")
    idx = torch.where(keep, idx, -1)
    # -1 entries may sit anywhere among the unsorted winners: scatter the kept ones to the
    # front in their order (a prefix sum over the k winners, O(k) per row; no sort)
    dst = torch.where(keep, keep.cumsum(-1) - 1, k)
    out = torch.full((*idx.shape[:-1], k + 1), -1, dtype=torch.int32, device=idx.device)
    out.scatter_(-1, dst, idx)  # dropped entries land in the spare last column
    return TopKLayout(out[..., :k].contiguous())
