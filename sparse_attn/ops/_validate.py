"""Input checks shared by every public op: each raises naming the argument and what was expected."""
from __future__ import annotations

import logging
import math
import os

import torch

logger = logging.getLogger("sparse_attn")

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

_logged: set[str] = set()


def log_once(key: str, message: str) -> None:
    """INFO line the first time ``key`` is seen (slow-path notices)."""
    if key not in _logged:
        _logged.add(key)
        logger.info(message)


def check_qkv(q, k, v, *, op: str) -> None:
    """Shapes, dtypes and devices of SDPA-layout q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Sk, D]``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{op}: {name} must have rank 4 [B, H, S, D], got shape {tuple(t.shape)}")
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype}; expected one of "
                f"{[str(d) for d in KERNEL_DTYPES]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{op}: batch of q ({q.shape[0]}) and k ({k.shape[0]}) differ")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{op}: head dim of q ({q.shape[3]}) and k ({k.shape[3]}) differ")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"{op}: query heads ({hq}) must be a multiple of key/value heads ({hkv}) (GQA)")
    d = q.shape[3]
    if d > MAX_HEAD_DIM or d < 8 or d % 8 != 0:
        raise ValueError(
            f"{op}: head dim {d} unsupported; expected a multiple of 8 in [8, {MAX_HEAD_DIM}] "
            f"(tuned: 64, 128, 256)")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"{op}: empty sequence (q {tuple(q.shape)}, k {tuple(k.shape)})")


def check_scale(scale, head_dim: int, *, op: str) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{op}: scale must be a positive finite float, got {scale}")
    return float(scale)


def check_threshold(softmax_threshold, *, op: str) -> float | None:
    if softmax_threshold is None:
        return None
    if isinstance(softmax_threshold, bool) or not isinstance(softmax_threshold, (int, float)):
        raise TypeError(
            f"{op}: softmax_threshold must be a float in [0, 1) or None, got "
            f"{type(softmax_threshold).__name__}")
    if not 0.0 <= softmax_threshold < 1.0:
        raise ValueError(
            f"{op}: softmax_threshold must lie in [0, 1) (a probability ratio), got "
            f"{softmax_threshold}")
    return float(softmax_threshold)


def choose_backend(backend: str, device: torch.device, *, op: str,
                   softmax_threshold: float | None = None) -> str:
    """'triton' on CUDA (or on CPU under TRITON_INTERPRET=1), else 'torch' (the reference).

    The torch reference computes exact attention: a ``softmax_threshold`` is logged (once) as
    ignored there rather than silently dropped."""
    accepted = ("auto", "triton", "torch")
    if backend not in accepted:
        raise ValueError(f"{op}: backend must be one of {accepted}, got {backend!r}")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "triton" and device.type != "cuda" and not interpret:
        raise ValueError(
            f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), "
            f"got tensors on {device}")
    chosen = backend if backend != "auto" else (
        "triton" if device.type == "cuda" or interpret else "torch")
    if chosen == "torch" and backend == "auto":
        log_once(f"{op}-cpu", f"{op}: tensors on {device}; running the pure-torch reference")
    if chosen == "torch" and softmax_threshold:
        log_once(f"{op}-threshold", f"{op}: the torch reference computes exact attention; "
                 f"softmax_threshold={softmax_threshold} is ignored on this path")
    return chosen
