"""Loads the CUDA extension (csrc/) lazily: built ahead of time, or compiled on first use.

Order of attempts, once per process (``functools.cache``):

1. ``sparse_attn._C``, built by ``SPARSE_ATTN_BUILD_CUDA=1 pip install .`` (setup.py) with a CUDA
   torch and toolkit;
2. a JIT build with ``torch.utils.cpp_extension.load`` and ninja, cached on disk under
   ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); it honours ``MAX_JOBS``
   and ``TORCH_CUDA_ARCH_LIST`` and rebuilds only when a source changes. ``SPARSE_ATTN_JIT=0``
   turns it off, ``SPARSE_ATTN_CUDA=0`` turns the extension off altogether.

Without CUDA (or when both fail) one INFO line says why, and every op runs through its Triton
kernel or torch reference. The ops are ``torch.ops.sparse_attn.*`` with fake implementations
registered here, so they trace under ``torch.compile``. Never import the extension at module
top: call :func:`ops` (or :func:`available`) where it is needed.
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
SOURCES = ("bindings.cpp", "select.cu")
EXTENSION_NAME = "sparse_attn_C"
# key blocks per row the selection kernel keeps in shared memory (csrc/sparse_attn.h)
SELECT_MAX_BLOCKS = 32768

_state = {"state": "not loaded", "detail": ""}


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
    @torch.library.register_fake("sparse_attn::select_blocks")
    def _(probs, valid, keep, count, mass):
        rows, nkb = probs.shape
        return (probs.new_empty((rows, nkb), dtype=torch.bool),
                probs.new_empty((rows, nkb), dtype=torch.int32),
                probs.new_empty((rows,), dtype=torch.int32))


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
            first = str(exc).strip().splitlines()
            _set("failed", f"{type(exc).__name__}: {first[-1] if first else ''}"[:300])
            loaded = False
        if loaded:
            _register_fakes()
            logger.debug("sparse_attn CUDA extension: %s (%s)", _state["state"], _state["detail"])
            return torch.ops.sparse_attn
    logger.info("sparse_attn: CUDA extension %s (%s); using the Triton kernels and torch "
                "references instead", _state["state"], _state["detail"])
    return None


def available() -> bool:
    """Whether the CUDA extension is loaded (loads it on first call)."""
    return ops() is not None


def status() -> dict:
    """``{"state": ..., "detail": ...}`` without loading: state is ``"not loaded"``, ``"aot"``,
    ``"jit"``, ``"unavailable"``, ``"disabled"`` or ``"failed"``."""
    return dict(_state)
