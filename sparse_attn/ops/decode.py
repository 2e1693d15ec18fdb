"""Public decode attention: validation, backend choice, and the result tuple."""
from __future__ import annotations

import torch

from ..reference.decode import decode_attention_ref
from ._validate import KERNEL_DTYPES, MAX_HEAD_DIM, check_scale, check_threshold, choose_backend

_OP = "decode_attention"
# key block of block_indices for a contiguous cache when none is given
DEFAULT_BLOCK_SIZE = 64
# most query tokens per step (speculative decoding verifies a few tokens at once)
MAX_QUERY_TOKENS = 64


def _check_tensor(t, name: str, *, rank: int, dtypes, device=None, op: str = _OP) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{op}: {name} must have rank {rank}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but q is on {device}")


def check_decode_inputs(q, k_cache, v_cache, *, block_indices, cache_seqlens, block_table,
                        block_size, op: str = _OP) -> tuple[int, int, int]:
    """Shapes, dtypes and devices (no reads of tensor values).

    Returns ``(block_size, capacity, n_blocks)``: the key block (page size when paged), the keys
    a sequence can hold, and the number of key blocks ``block_indices`` may name.
    """
    _check_tensor(q, "q", rank=4, dtypes=KERNEL_DTYPES, op=op)
    paged = block_table is not None
    layout = "[num_pages, page_size, Hkv, D]" if paged else "[B, Hkv, S_max, D]"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{op}: {name} must have rank 4 {layout}, got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache {tuple(k_cache.shape)} and v_cache "
                         f"{tuple(v_cache.shape)} must have one shape")
    batch, hq, sq, dim = q.shape
    if not 1 <= sq <= MAX_QUERY_TOKENS:
        raise ValueError(
            f"{op}: q must hold 1..{MAX_QUERY_TOKENS} query tokens (dim 2), got {sq}")
    if dim > MAX_HEAD_DIM or dim < 16 or dim % 8:
        raise ValueError(f"{op}: head dim {dim} unsupported; expected a multiple of 8 in "
                         f"[16, {MAX_HEAD_DIM}] (tuned: 64, 128, 256)")
    if k_cache.shape[3] != dim:
        raise ValueError(f"{op}: head dim of q ({dim}) and k_cache ({k_cache.shape[3]}) differ")
    if paged:
        _check_tensor(block_table, "block_table", rank=2, dtypes=(torch.int32,),
                      device=q.device, op=op)
        num_pages, page, hkv = k_cache.shape[:3]
        if block_table.shape[0] != batch:
            raise ValueError(f"{op}: block_table has {block_table.shape[0]} rows but q has "
                             f"batch {batch}")
        if block_table.shape[1] == 0 or num_pages == 0 or page == 0:
            raise ValueError(f"{op}: empty paged cache (block_table {tuple(block_table.shape)},"
                             f" k_cache {tuple(k_cache.shape)})")
        if block_size is not None and block_size != page:
            raise ValueError(f"{op}: block_size ({block_size}) must be None or the page size "
                             f"({page}) with a paged cache")
        block_size = page
        capacity = block_table.shape[1] * page
        n_blocks = block_table.shape[1]
    else:
        if k_cache.shape[0] != batch:
            raise ValueError(f"{op}: k_cache has batch {k_cache.shape[0]} but q has {batch} "
                             f"(a paged cache needs block_table)")
        hkv, capacity = k_cache.shape[1], k_cache.shape[2]
        if capacity == 0:
            raise ValueError(f"{op}: empty cache, k_cache {tuple(k_cache.shape)}")
        if block_size is None:
            block_size = DEFAULT_BLOCK_SIZE
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"{op}: block_size must be a positive int, got {block_size!r}")
        n_blocks = -(-capacity // block_size)
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{op}: query heads ({hq}) must be a multiple of the cache's KV heads "
                         f"({hkv}) (GQA)")
    if cache_seqlens is not None:
        _check_tensor(cache_seqlens, "cache_seqlens", rank=1, dtypes=(torch.int32,),
                      device=q.device, op=op)
        if cache_seqlens.shape[0] != batch:
            raise ValueError(f"{op}: cache_seqlens has {cache_seqlens.shape[0]} entries but q "
                             f"has batch {batch}")
    if block_indices is not None:
        _check_tensor(block_indices, "block_indices", rank=3, dtypes=(torch.int32,),
                      device=q.device, op=op)
        if tuple(block_indices.shape[:2]) != (batch, hkv):
            raise ValueError(f"{op}: block_indices must be [B={batch}, Hkv={hkv}, NSEL], got "
                             f"{tuple(block_indices.shape)}")
        if block_indices.shape[2] == 0:
            raise ValueError(f"{op}: block_indices selects nothing (NSEL = 0)")
    return block_size, capacity, n_blocks


def check_decode_values(*, block_indices, cache_seqlens, block_table, capacity: int,
                        n_blocks: int, num_pages: int | None, block_size: int,
                        op: str = _OP) -> None:
    """Value checks (one read back to the host): lengths within the cache, block tables inside
    the page pool, block indices in range, strictly increasing, -1 only as trailing padding."""
    if cache_seqlens is not None:
        lens = cache_seqlens.long()
        if bool((lens < 0).any()) or bool((lens > capacity).any()):
            raise ValueError(f"{op}: cache_seqlens must lie in [0, {capacity}] (the keys the "
                             f"cache holds), got {cache_seqlens.tolist()}")
    if block_table is not None:
        if cache_seqlens is None:
            used = torch.ones_like(block_table, dtype=torch.bool)
        else:
            need = (cache_seqlens.long() + block_size - 1) // block_size
            cols = torch.arange(block_table.shape[1], device=block_table.device)
            used = cols[None, :] < need[:, None]
        bad = used & ((block_table < 0) | (block_table >= num_pages))
        if bool(bad.any()):
            b, j = (int(x) for x in bad.nonzero()[0].tolist())
            raise ValueError(
                f"{op}: block_table[{b}, {j}] = {int(block_table[b, j])} points past the page "
                f"pool (k_cache has {num_pages} pages)")
    if block_indices is not None:
        idx = block_indices
        if bool(((idx < -1) | (idx >= n_blocks)).any()):
            raise ValueError(f"{op}: block_indices must lie in [0, {n_blocks}) (key blocks of "
                             f"size {block_size} in the cache) or be -1 padding")
        pad = idx < 0
        if bool((pad[..., :-1] & ~pad[..., 1:]).any()):
            raise ValueError(f"{op}: block_indices has -1 in the middle; -1 is only trailing "
                             f"padding")
        if bool(((idx[..., 1:] <= idx[..., :-1]) & ~pad[..., 1:]).any()):
            raise ValueError(f"{op}: block_indices must be strictly increasing per (batch, KV "
                             f"head) (sorted, no duplicates)")


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    block_indices: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    block_size: int | None = None,
    softmax_threshold: float | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    check_indices: bool | None = None,
    num_splits: int | None = None,
):
    """Few-token decode attention over a KV cache (flash-decoding), dense or on selected blocks.

    The key length is split over programs and the partial results combined, so one sequence
    fills the GPU; the query heads of a GQA group share each K/V tile load.

    Args:
        q: ``[B, Hq, Sq, D]`` (fp16, bf16 or fp32; ``Sq`` 1..64, e.g. speculative tokens): the
            last ``Sq`` positions of each sequence, causal among themselves.
        k_cache, v_cache: contiguous ``[B, Hkv, S_max, D]`` (SDPA convention), or paged
            ``[num_pages, page_size, Hkv, D]`` (vLLM/FlashInfer layout) with ``block_table``.
            ``Hq % Hkv == 0``.
        block_indices: int32 ``[B, Hkv, NSEL]``: the key blocks each (batch, KV head) attends to,
            strictly increasing, ``-1``-padded at the end (Quest-style top-k pages, shared by the
            group's query heads). A block is ``block_size`` keys (the page size when paged);
            selected blocks past a sequence's length contribute nothing. None: every key.
        cache_seqlens: int32 ``[B]``, keys held per sequence (default: the whole cache).
        block_table: int32 ``[B, max_pages]``, the pages of each sequence (paged cache); entries
            past ``ceil(cache_seqlens / page_size)`` are never read.
        block_size: key block of ``block_indices`` for a contiguous cache (default 64); must be
            None or the page size for a paged cache.
        softmax_threshold: BLASST skipping: a key tile whose every score satisfies
            ``exp(s - running_max) < softmax_threshold`` is skipped. None/0: exact (the torch
            backend is always exact).
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp ``[B, Hq, Sq]`` (float32, natural log; ``-inf``
            for rows with nothing to attend, whose output is 0).
        backend: ``"auto"`` (Triton on CUDA, the torch reference on CPU), ``"triton"``,
            ``"torch"``.
        check_indices: read ``block_indices``, ``block_table`` and ``cache_seqlens`` back to the
            host to check their values (one sync). Default: on, except under CUDA-graph capture;
            pass False in a decode loop whose inputs are valid by construction.
        num_splits: force the number of key splits (default: from the shapes and SM count).

    Returns:
        ``out [B, Hq, Sq, D]`` in q's dtype, or ``(out, lse)`` with ``return_lse``.

    Example:
        >>> q = torch.randn(2, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        >>> k_cache = torch.randn(2, 8, 32768, 128, device="cuda", dtype=torch.bfloat16)
        >>> v_cache = torch.randn_like(k_cache)
        >>> lens = torch.tensor([32768, 1000], dtype=torch.int32, device="cuda")
        >>> out = decode_attention(q, k_cache, v_cache, cache_seqlens=lens)
        >>> sel = torch.tensor([0, 7, 15], dtype=torch.int32, device="cuda").expand(2, 8, 3)
        >>> out = decode_attention(q, k_cache, v_cache, cache_seqlens=lens,
        ...                        block_indices=sel.contiguous())  # blocks of 64 keys
    """
    block_size, capacity, n_blocks = check_decode_inputs(
        q, k_cache, v_cache, block_indices=block_indices, cache_seqlens=cache_seqlens,
        block_table=block_table, block_size=block_size)
    scale = check_scale(scale, q.shape[-1], op=_OP)
    softmax_threshold = check_threshold(softmax_threshold, op=_OP)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"{_OP}: num_splits must be a positive int or None, got {num_splits!r}")
    capturing = q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if check_indices is None:
        check_indices = not capturing
    if check_indices:
        check_decode_values(block_indices=block_indices, cache_seqlens=cache_seqlens,
                            block_table=block_table, capacity=capacity, n_blocks=n_blocks,
                            num_pages=k_cache.shape[0] if block_table is not None else None,
                            block_size=block_size)
    chosen = choose_backend(backend, q.device, op=_OP,
                            softmax_threshold=softmax_threshold)
    if chosen == "torch":
        out, lse = decode_attention_ref(
            q, k_cache, v_cache, block_indices=block_indices, cache_seqlens=cache_seqlens,
            block_table=block_table, block_size=block_size, scale=scale)
        out = out.to(q.dtype)
    else:
        from ..kernels.decode import decode_fwd

        out, lse = decode_fwd(
            q, k_cache, v_cache, block_indices=block_indices, cache_seqlens=cache_seqlens,
            block_table=block_table, block_size=block_size, scale=scale,
            softmax_threshold=softmax_threshold, return_lse=return_lse, num_splits=num_splits)
    return (out, lse) if return_lse else out
