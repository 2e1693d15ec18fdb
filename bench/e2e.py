"""Prefill of a Llama-3-8B-shaped stack of attention layers: dense SDPA vs SparseAttention.

Each layer: fused QKV projection (4096 -> 32x128 + 2x8x128), attention (32 query / 8 KV heads,
d=128, causal), output projection; random weights, bf16, batch 1. The same random weights and
input go through the dense stack (torch SDPA, fastest of the flash/cuDNN backends) and through
SparseAttention (estimate + block-sparse kernel, min_seqlen=0). Prints ms per prefill, the
speedup, and the crossover: the shortest length from which every measured length is faster
patched than dense. SparseAttention's DEFAULT_MIN_SEQLEN comes from that number.

    python bench/e2e.py --out bench/out                     # H100: ~2 min
    python bench/e2e.py --seqlens 4096,65536 --layers 2      # a subset
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_ms, env_info, print_table  # noqa: E402

from sparse_attn import SparseAttention  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 4096, 32, 8, 128


class AttentionStack(torch.nn.Module):
    """`layers` attention blocks (projections + attention), no MLP, no norm: the part of a
    prefill that sparse attention changes."""

    def __init__(self, layers: int, attention):
        super().__init__()
        qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(HIDDEN, qkv, bias=False)
                                       for _ in range(layers))
        self.o = torch.nn.ModuleList(torch.nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)
                                     for _ in range(layers))
        self.attention = attention

    def forward(self, x):
        b, s, _ = x.shape
        for qkv, o in zip(self.qkv, self.o):
            q, k, v = qkv(x).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM,
                                    KV_HEADS * HEAD_DIM], dim=-1)
            q = q.view(b, s, HEADS, HEAD_DIM).transpose(1, 2)
            k = k.view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
            v = v.view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
            out = self.attention(q, k, v)
            x = x + o(out.transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM))
        return x


def dense_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="2048,4096,8192,16384,32768,65536,131072")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--methods", default="streaming,block_topk",
                    help="estimators: streaming with --local-blocks, every other one with a "
                         "--density budget")
    ap.add_argument("--density", type=float, default=0.1,
                    help="budget of every method but streaming (share of causal blocks)")
    ap.add_argument("--local-blocks", type=int, default=16, help="streaming window (blocks)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/e2e.py times GPU prefill and needs CUDA", file=sys.stderr)
        return 1
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    methods = [m for m in args.methods.split(",") if m]
    configs = {m: dict(sink_blocks=1, local_blocks=args.local_blocks) if m == "streaming"
               else dict(density=args.density) for m in methods}
    rows = []
    for seqlen in (int(s) for s in args.seqlens.split(",")):
        x = torch.randn(1, seqlen, HIDDEN, device="cuda", dtype=torch.bfloat16)
        stack = AttentionStack(args.layers, dense_sdpa).to("cuda", torch.bfloat16)
        row = {"seqlen": seqlen, "layers": args.layers}
        with torch.inference_mode():
            best = None
            for name, be in (("flash", SDPBackend.FLASH_ATTENTION),
                             ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel(be):
                        ms = bench_ms(lambda: stack(x))[0]
                except RuntimeError:
                    continue
                row[f"dense_{name}_ms"] = ms
                best = ms if best is None else min(best, ms)
            row["dense_ms"] = best
            for method in methods:
                stack.attention = SparseAttention(method, min_seqlen=0, **configs[method])
                ms = bench_ms(lambda: stack(x))[0]
                row[f"{method}_ms"] = ms
                row[f"{method}_speedup"] = best / ms
        print(f"S={seqlen}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                          if isinstance(v, float)), flush=True)
        rows.append(row)
        del x, stack
        torch.cuda.empty_cache()
    crossover = {}
    for method in methods:
        # shortest length from which the patched stack is faster at every longer length
        cross = None
        for row in reversed(rows):
            if row[f"{method}_speedup"] > 1.0:
                cross = row["seqlen"]
            else:
                break
        crossover[method] = cross
    cols = ["seqlen", ("dense_ms", "dense ms", ".3f")] + [
        c for m in methods
        for c in ((f"{m}_ms", f"{m} ms", ".3f"), (f"{m}_speedup", f"{m} x", ".2f"))]
    print_table(rows, cols, title=f"\nprefill of {args.layers} Llama-3-8B attention layers "
                                  f"(ms; speedup vs fastest dense SDPA)")
    print(f"crossover (patched faster from this length up): {crossover}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "e2e.json"), "w") as f:
            json.dump({"env": env_info(), "args": vars(args), "rows": rows,
                       "crossover": crossover, "configs": configs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
