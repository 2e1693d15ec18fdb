"""``sparse_attn.info()``: versions, GPU and the CUDA extension's state (`sparse-attn info`)."""
from __future__ import annotations

import os


def info() -> dict:
    """Versions, the GPU, the kernel backend and the state of the CUDA extension.

    Loads the CUDA extension when a GPU is present (the first call may JIT-compile it).

    Returns:
        dict of str -> str: ``sparse_attn``, ``torch``, ``triton``, ``cuda`` versions,
        ``device`` (GPU name or ``cpu``), ``capability``, ``kernel backend`` and ``cuda
        extension`` (``aot``/``jit`` with its path, or why it is unavailable).

    Example:
        >>> import sparse_attn
        >>> sorted(sparse_attn.info())[:3]
        ['cuda', 'cuda extension', 'device']
    """
    import torch
    import triton

    from . import _cuda

    out = {
        "sparse_attn": __import__("sparse_attn").__version__,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "kernel backend": "triton" if torch.cuda.is_available() else
        ("triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "torch reference"),
    }
    if torch.cuda.is_available():
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    _cuda.available()
    state = _cuda.status()
    out["cuda extension"] = f"{state['state']} ({state['detail']})"
    return out
