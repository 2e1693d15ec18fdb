"""Loads the CUDA extension (csrc/) lazily: built ahead of time, or compiled on first use.

Order of attempts, once per process (``functools.cache``):

1. ``sparse_attn._C``, built by ``SPARSE_ATTN_BUILD_CUDA=1 pip install .`` (setup.py) with a CUDA
   torch and toolkit;
2. a JIT build with ``torch.utils.cpp_extension.load`` and ninja, cached on disk under
   ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); it honours ``MAX_JOBS``
   and ``TORCH_CUDA_ARCH_LIST`` and rebuilds only when a source changes. ``SPARSE_ATTN_JIT=0``
   turns it off, ``SPARSE_ATTN_CUDA=0`` turns the extension off altogether.

Without CUDA one INFO line says why (a WARNING when a build or load fails), and every op runs
through its Triton kernel or torch reference. The ops are ``torch.ops.sparse_attn.*`` with fake
implementations registered here, so they trace under ``torch.compile``. Never import the
extension at module top: call :func:`ops` (or :func:`available`) where it is needed.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger("sparse_attn")

# translation units of the extension (csrc/); kernels are torch-free, bindings.cpp is not
SOURCES = ("bindings.cpp", "lowbit_qk.cu", "select.cu", "topk_merge.cu")
EXTENSION_NAME = "sparse_attn_C"
# key blocks per row the selection kernel keeps in shared memory (csrc/sparse_attn.h)
SELECT_MAX_BLOCKS = 32768

_state = {"state": "not loaded", "detail": ""}  # + "fakes" once the fake kernels exist


def csrc_dir() -> Path | None:
    """The CUDA sources: ``sparse_attn/csrc`` in an installed wheel, ``csrc/`` in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if all((cand / s).is_file() for s in SOURCES):
            return cand
    return None


def _set(state: str, detail: str) -> None:
    _state.update(state=state, detail=detail)


def _load_aot() -> bool:
    spec = importlib.util.find_spec("sparse_attn._C")
    if spec is None or spec.origin is None:
        return False
    torch.ops.load_library(spec.origin)
    _set("aot", spec.origin)
    return True


def _load_jit() -> bool:
    from torch.utils import cpp_extension

    src = csrc_dir()
    if src is None:
        _set("unavailable", "CUDA sources (csrc/) not found for a JIT build")
        return False
    if cpp_extension.CUDA_HOME is None:
        _set("unavailable", "no CUDA toolkit (CUDA_HOME / nvcc) for a JIT build")
        return False
    if not cpp_extension.is_ninja_available():
        _set("unavailable", "ninja is missing for a JIT build (pip install ninja)")
        return False
    path = cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(src / s) for s in SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        is_python_module=False,
        verbose=os.environ.get("SPARSE_ATTN_JIT_VERBOSE") == "1",
    )
    _set("jit", str(path) if path else "built and cached under $TORCH_EXTENSIONS_DIR")
    return True


def _register_fakes() -> None:
    if _state.get("fakes"):
        return
    _state["fakes"] = "registered"

    @torch.library.register_fake("sparse_attn::select_blocks")
    def _(probs, valid, keep, count, mass):
        rows, nkb = probs.shape
        return (probs.new_empty((rows, nkb), dtype=torch.bool),
                probs.new_empty((rows, nkb), dtype=torch.int32),
                probs.new_empty((rows,), dtype=torch.int32))

    @torch.library.register_fake("sparse_attn::lowbit_block_scores")
    def _(q, k, q_scale, k_scale, row_pos, rows, block_n, seqlen_q, causal, scale, sink_blocks,
          local_blocks, window):
        nkb = -(-k.shape[2] // block_n)
        return q.new_empty((q.shape[0], q.shape[1], q.shape[2] // rows, nkb),
                           dtype=torch.float32)

    @torch.library.register_fake("sparse_attn::merge_token_lists")
    def _(indices, tokens, seqlen_k, causal_offset):
        batch, heads, sq, topk = indices.shape
        shape = (batch, heads, -(-sq // tokens), tokens * topk)
        return (indices.new_empty(shape), indices.new_empty(shape),
                indices.new_empty(shape[:3]))


@functools.cache
def ops():
    """``torch.ops.sparse_attn`` once the extension is loaded, else ``None`` (reason logged once
    at INFO; see :func:`status`)."""
    if os.environ.get("SPARSE_ATTN_CUDA") == "0":
        _set("disabled", "SPARSE_ATTN_CUDA=0")
    elif torch.version.cuda is None:
        _set("unavailable", f"torch {torch.__version__} is a CPU build")
    elif not torch.cuda.is_available():
        _set("unavailable", "no CUDA device")
    else:
        try:
            loaded = _load_aot()
            if not loaded and os.environ.get("SPARSE_ATTN_JIT", "1") != "0":
                loaded = _load_jit()
            elif not loaded:
                _set("unavailable", "no AOT build (sparse_attn._C) and SPARSE_ATTN_JIT=0")
        except Exception as exc:  # a failed build or load: fall back, never crash the caller
            lines = str(exc).strip().splitlines()  # a compiler's last line names the error
            _set("failed", f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300])
            loaded = False
        if loaded:
            _register_fakes()
            logger.debug("sparse_attn CUDA extension: %s (%s)", _state["state"], _state["detail"])
            return torch.ops.sparse_attn
    # a failed build on a CUDA machine is worth a warning; no CUDA at all is the normal CPU case
    level = logging.WARNING if _state["state"] == "failed" else logging.INFO
    logger.log(level, "sparse_attn: CUDA extension %s (%s); using the Triton kernels and torch "
               "references instead", _state["state"], _state["detail"])
    return None


def available() -> bool:
    """Whether the CUDA extension is loaded (loads it on first call)."""
    return ops() is not None


def status() -> dict:
    """``{"state": ..., "detail": ...}`` without loading: state is ``"not loaded"``, ``"aot"``,
    ``"jit"``, ``"unavailable"``, ``"disabled"`` or ``"failed"``."""
    return {"state": _state["state"], "detail": _state["detail"]}


# ---- op wrappers: validation in Python, before any launch -----------------------------------

LOWBIT_HEAD_DIMS = (64, 128)
LOWBIT_BLOCK_N = (64, 128)


def lowbit_supported(q_rows: torch.Tensor, k: torch.Tensor, *, rows: int, block_n: int) -> bool:
    """Whether :func:`lowbit_block_scores` takes this problem (the estimator's dispatch test:
    int8 CUDA inputs, head dim 64/128, key blocks of 64/128, the extension loaded)."""
    return (q_rows.is_cuda and q_rows.dtype == torch.int8 and k.dtype == torch.int8
            and q_rows.dim() == 4 and q_rows.shape[-1] in LOWBIT_HEAD_DIMS
            and block_n in LOWBIT_BLOCK_N and 1 <= rows <= 128 and rows & (rows - 1) == 0
            and available())


def lowbit_block_scores(q_rows: torch.Tensor, k: torch.Tensor, row_pos: torch.Tensor, *,
                        rows: int, block_n: int, seqlen_q: int, causal: bool, scale: float,
                        q_scale: torch.Tensor, k_scale: torch.Tensor,
                        window: tuple[int, int] | None = None,
                        rows_per_program: int | None = None) -> torch.Tensor:
    """int8 block scores on the tensor cores (csrc/lowbit_qk.cu): the CUDA backend of
    ``kernels/estimate.py: block_scores`` for int8 inputs (same arguments, same result up to
    float rounding; see ``sparse_attn.reference.estimate.block_scores_ref``).

    Args:
        q_rows: int8 ``[B, Hs, NQB * rows, D]``, ``rows`` sampled query rows per query block;
            head ``h`` reads K head ``h // (Hs // Hkv)``. ``D`` in ``(64, 128)``.
        k: int8 ``[B, Hkv, Sk, D]``.
        row_pos: int ``[NQB * rows]``: each sampled row's position in the query sequence
            (queries end-aligned to the keys).
        rows: sampled rows per query block, a power of two <= 128.
        block_n: key block size, 64 or 128 (also K's quantization block).
        seqlen_q: query length (positions are shifted by ``Sk - seqlen_q``).
        causal: mask keys after each row's position.
        scale: softmax scale (``1 / sqrt(D)``).
        q_scale: fp32 ``[B, Hs, NQB]``; k_scale: fp32 ``[B, Hkv, ceil(Sk / block_n)]``.
        window: ``(sink_blocks, local_blocks)``: normalise by the sink + local key blocks
            only (SALE's relative score), or None for the softmax over all reachable keys.
        rows_per_program: accepted for call compatibility with the Triton ``block_scores``
            and ignored (this kernel's tile is fixed: 8 warps x 16 rows).

    Returns:
        fp32 ``[B, Hs, NQB, ceil(Sk / block_n)]`` (0 on unreachable blocks).

    Example:
        >>> out = lowbit_block_scores(qq, kq, pos, rows=16, block_n=128, seqlen_q=S,
        ...                           causal=True, scale=D ** -0.5, q_scale=qs, k_scale=ks,
        ...                           window=(1, 1))  # doctest: +SKIP
    """
    name = "lowbit_block_scores"
    for arg, t, dims in (("q_rows", q_rows, 4), ("k", k, 4)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8 or t.dim() != dims:
            raise TypeError(f"{name}: {arg} must be an int8 [B, H, S, D] tensor, got "
                            f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    if not q_rows.is_cuda or k.device != q_rows.device:
        raise ValueError(f"{name}: q_rows and k must be on one CUDA device, got {q_rows.device} "
                         f"and {k.device}")
    batch, heads, nrows, dim = q_rows.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != dim or kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"{name}: k {tuple(k.shape)} must be [B={batch}, Hkv, Sk, D={dim}] with "
                         f"Hkv dividing Hs={heads}")
    if dim not in LOWBIT_HEAD_DIMS:
        raise ValueError(f"{name}: head dim must be one of {LOWBIT_HEAD_DIMS}, got {dim}")
    if block_n not in LOWBIT_BLOCK_N:
        raise ValueError(f"{name}: block_n must be one of {LOWBIT_BLOCK_N}, got {block_n!r}")
    if not (isinstance(rows, int) and 1 <= rows <= 128 and rows & (rows - 1) == 0
            and nrows % rows == 0):
        raise ValueError(f"{name}: rows must be a power of two <= 128 dividing the {nrows} "
                         f"sampled rows, got {rows!r}")
    nqb, nkb = nrows // rows, -(-seqlen_k // block_n)
    for arg, t, shape in (("q_scale", q_scale, (batch, heads, nqb)),
                          ("k_scale", k_scale, (batch, kv_heads, nkb))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name}: {arg} must be [{', '.join(map(str, shape))}], got "
                             f"{tuple(getattr(t, 'shape', ()))}")
    if not isinstance(row_pos, torch.Tensor) or tuple(row_pos.shape) != (nrows,):
        raise ValueError(f"{name}: row_pos must be [{nrows}], got "
                         f"{tuple(getattr(row_pos, 'shape', ()))}")
    sink, local = window if window is not None else (0, 1)
    if not (isinstance(sink, int) and isinstance(local, int) and sink >= 0 and local >= 1):
        raise ValueError(f"{name}: window must be (sink_blocks >= 0, local_blocks >= 1), got "
                         f"{window!r}")
    if batch * heads >= 65536 or seqlen_k >= 2**31:
        raise ValueError(f"{name}: B * Hs must be < 65536 and Sk < 2**31")
    ext = ops()
    if ext is None:
        raise RuntimeError(f"{name}: the CUDA extension is not available ({_state['state']}: "
                           f"{_state['detail']})")
    dev = q_rows.device
    return ext.lowbit_block_scores(
        q_rows.contiguous(), k.contiguous(), q_scale.to(dev, torch.float32).contiguous(),
        k_scale.to(dev, torch.float32).contiguous(), row_pos.to(dev, torch.int32).contiguous(),
        rows, block_n, int(seqlen_q), bool(causal), float(scale), sink, local,
        window is not None)


def merge_token_lists(indices: torch.Tensor, tokens: int, *, seqlen_k: int,
                      causal_offset: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CUDA backend of ``kernels/topk.py: merge_token_lists`` (csrc/topk_merge.cu): the
    same contract (each tile's union in no particular order: hash-table slot order, or ascending
    for tiles whose union overflowed the table).

    Args:
        indices: int32 CUDA ``[B, H, Sq, K]`` (any strides), -1 padded, keys < ``seqlen_k``.
        tokens: tokens per tile, 1..32.
        seqlen_k: key length.
        causal_offset: token ``i`` keeps only keys ``<= i + causal_offset``, or None.

    Returns:
        ``(union, owners, counts)``: int32 ``[B, H, NT, T*K]`` twice and ``[B, H, NT]``.

    Example:
        >>> union, owners, counts = merge_token_lists(idx, 32, seqlen_k=S,
        ...                                           causal_offset=0)  # doctest: +SKIP
    """
    name = "merge_token_lists"
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int32 or indices.dim() != 4:
        raise TypeError(f"{name}: indices must be an int32 [B, H, Sq, K] tensor, got "
                        f"{getattr(indices, 'dtype', type(indices))} "
                        f"{tuple(getattr(indices, 'shape', ()))}")
    if not indices.is_cuda:
        raise ValueError(f"{name}: indices must be on a CUDA device, got {indices.device}")
    if not (isinstance(tokens, int) and 1 <= tokens <= 32):
        raise ValueError(f"{name}: tokens must lie in [1, 32], got {tokens!r}")
    if not (isinstance(seqlen_k, int) and 0 <= seqlen_k < 2**31):
        raise ValueError(f"{name}: seqlen_k must lie in [0, 2**31), got {seqlen_k!r}")
    batch, heads, sq, topk = indices.shape
    if batch * heads * -(-sq // tokens) >= 2**31 or topk >= 2**24:
        raise ValueError(f"{name}: sizes {tuple(indices.shape)} beyond the kernel's indexing")
    ext = ops()
    if ext is None:
        raise RuntimeError(f"{name}: the CUDA extension is not available ({_state['state']}: "
                           f"{_state['detail']})")
    return ext.merge_token_lists(indices, tokens, seqlen_k,
                                 None if causal_offset is None else int(causal_offset))
