"""Eager against lazy online-softmax rescaling (``kernels.block_sparse.LAZY_RESCALE``), side by
side in one run, with the dense baselines (SDPA cuDNN and flash, FlexAttention with the same
blocks) of that run.

Lazy rescaling moves a tile's running max (and multiplies the [rows, D] accumulator) only when
some row's max grows by more than 2**8; the other key tiles skip that multiply. The same
layouts and inputs are timed in both modes, alternating, twice each (the better median kept):

  block-sparse  dense and random layouts (``--densities``) at each ``--seqlens``
  stripe        one vertical-line layout at 128k (--stripe-keys gathered keys per query block)
  top-k         the merged kernel on cached lists (block pattern, K = --topk) at 128k, and
                the block-sparse kernel at the same keys

    python bench/ablate_rescale.py --out DIR [--budget-s 240] [--seqlens 32k,128k]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (add_shape_args, attention_tflop, causal_pairs, env_info, finish, free_cuda,  # noqa: E402
                     guarded, parse_list, print_table, random_qkv, require_cuda, run_meta, time_provider,
                     tflops)
from bench_block_sparse import Providers, make_layout  # noqa: E402
from bench_stripe import vertical_layouts  # noqa: E402
from bench_topk import block_layout, topk_from_blocks  # noqa: E402

from sparse_attn import block_sparse_attention, stripe_attention  # noqa: E402
from sparse_attn.kernels import block_sparse as bs  # noqa: E402
from sparse_attn.kernels.topk import merge_token_lists, topk_fwd  # noqa: E402

COLUMNS = [("section", "section", None), ("seqlen", "S", None), ("density", "density", ".3f"),
           ("provider", "provider", None), ("ms", "ms", ".3f"), ("tflops", "TFLOP/s", ".0f"),
           ("vs_eager", "eager/this", ".3f"), ("note", "note", None)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--seqlens", default="32k,128k")
    ap.add_argument("--densities", default="1.0,0.1")
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--stripe-keys", type=int, default=4096)
    ap.add_argument("--sections", default="block_sparse,stripe,topk")
    ap.add_argument("--flex", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--head-dim", type=int, default=128)
    add_shape_args(ap)
    args = ap.parse_args(argv)
    args.seqlens = parse_list(args.seqlens, int)
    args.densities = parse_list(args.densities, float)
    args.sections = args.sections.split(",")
    args.per_query_head = False
    args.sdpa_gqa = "native"
    args.device = "cuda"
    return args


def time_both(args, fn) -> dict:
    """{mode: timing} for eager and lazy, alternating; the lower of two medians each."""
    best = {}
    for _ in range(2):
        for lazy in (False, True):
            bs.LAZY_RESCALE = lazy
            t = time_provider(fn, warmup=args.warmup, rep=args.rep)
            key = "lazy" if lazy else "eager"
            if key not in best or (t["ms"] or math.inf) < (best[key]["ms"] or math.inf):
                best[key] = t
    bs.LAZY_RESCALE = True
    return best


def mode_rows(base, timings, tflop, outputs=None):
    rows = []
    eager = timings["eager"]["ms"]
    for mode, t in timings.items():
        row = {**base, "provider": f"ours_{mode}", **t,
               "tflops": tflops(tflop, t["ms"]) if tflop else None}
        if eager and t["ms"]:
            row["vs_eager"] = eager / t["ms"]
        rows.append(row)
    if outputs is not None:
        rows[-1]["note"] = f"max|lazy-eager| {outputs:.2e}"
    return rows


def diff_modes(fn) -> float:
    outs = []
    for lazy in (False, True):
        bs.LAZY_RESCALE = lazy
        outs.append(fn())
    bs.LAZY_RESCALE = True
    return float((outs[0].float() - outs[1].float()).abs().max())


def block_sparse_rows(args, prov, q, k, v, seqlen, head_dim):
    rows = []
    for name in ("sdpa_cudnn", "sdpa_flash"):
        fn, note = guarded(prov.sdpa, name, q, k, v, "native")
        t = time_provider(fn, warmup=args.warmup, rep=args.rep) if fn else {"ms": None,
                                                                            "note": note}
        tflop = attention_tflop(args.batch, args.heads, head_dim, causal_pairs(seqlen))
        rows.append({"section": "block_sparse", "seqlen": seqlen, "density": 1.0,
                     "provider": name, **t, "tflops": tflops(tflop, t.get("ms"))})
        free_cuda()
    for density in args.densities:
        layout = make_layout(args, seqlen, density, q.device, seed=args.seed + seqlen)
        actual = layout.density(seqlen, seqlen, causal=True)
        tflop = attention_tflop(args.batch, args.heads, head_dim, actual * causal_pairs(seqlen))
        base = {"section": "block_sparse", "seqlen": seqlen, "density": actual}
        fn = prov.ours(q, k, v, layout)
        rows += mode_rows(base, time_both(args, fn), tflop, diff_modes(fn))
        if args.flex and density < 1.0:
            mask, note = guarded(lambda: layout.to_block_mask(seqlen, seqlen, causal=True,
                                                              num_q_heads=args.heads))
            ffn = prov.flex(q, k, v, mask) if mask is not None else None
            t = (time_provider(ffn, warmup=args.warmup, rep=args.rep) if ffn
                 else {"ms": None, "note": note})
            rows.append({**base, "provider": "flex", **t, "tflops": tflops(tflop, t.get("ms"))})
            del ffn, mask
        del layout
        free_cuda()
    return rows


def stripe_rows(args, q, k, v, seqlen):
    stripe, _, _, _ = vertical_layouts(args.batch, args.kv_heads, seqlen, args.stripe_keys,
                                      1024, 64, q.device, args.seed)
    base = {"section": "stripe", "seqlen": seqlen,
            "density": stripe.density(seqlen, seqlen, causal=True)}
    fn = lambda: stripe_attention(q, k, v, stripe, causal=True)  # noqa: E731
    return mode_rows(base, time_both(args, fn), None, diff_modes(fn))


def topk_rows(args, q, k, v, seqlen):
    blocks = block_layout(args.batch, args.kv_heads, seqlen, args.topk, 64, args.seed, q.device)
    layout = topk_from_blocks(blocks, seqlen, args.seed)
    scale = q.shape[-1] ** -0.5
    tokens = 32
    t0 = time.perf_counter()
    merged = merge_token_lists(layout.indices, tokens, seqlen_k=seqlen, causal_offset=0)
    torch.cuda.synchronize()
    base = {"section": "topk", "seqlen": seqlen,
            "density": blocks.density(seqlen, seqlen, causal=True)}
    fn = lambda: topk_fwd(q, k, v, layout.indices, causal=True, scale=scale,  # noqa: E731
                          return_lse=False, tokens=tokens, merged=True, merged_lists=merged)[0]
    rows = mode_rows(base, time_both(args, fn), None, diff_modes(fn))
    bfn = lambda: block_sparse_attention(q, k, v, blocks, causal=True,  # noqa: E731
                                         check_indices=False)
    rows += [{**r, "provider": r["provider"].replace("ours", "block_sparse_same_keys")}
             for r in mode_rows(base, time_both(args, bfn), None)]
    rows[0]["note"] = (rows[0].get("note", "") + f"; merge built once in "
                       f"{(time.perf_counter() - t0) * 1e3:.0f} ms (incl. first call)")
    return rows


def main(argv=None):
    args = parse_args(argv)
    require_cuda(__file__)
    info = env_info()
    prov = Providers(args)
    start, rows = time.monotonic(), []
    for seqlen in args.seqlens:
        if time.monotonic() - start > args.budget_s:
            print(f"budget spent: skipping S={seqlen}", flush=True)
            break
        q, k, v = random_qkv(args, seqlen, args.head_dim, args.device, args.seed)
        if "block_sparse" in args.sections:
            rows += block_sparse_rows(args, prov, q, k, v, seqlen, args.head_dim)
        if seqlen >= 128 * 1024:
            if "stripe" in args.sections:
                rows += stripe_rows(args, q, k, v, seqlen)
            if "topk" in args.sections:
                rows += topk_rows(args, q, k, v, seqlen)
        del q, k, v
        free_cuda()
        print(f"S={seqlen} done at {time.monotonic() - start:.0f} s", flush=True)
    print_table(rows, COLUMNS, title="eager vs lazy rescaling")
    finish(rows, args.out, "ablate_rescale", run_meta(info), None)


if __name__ == "__main__":
    main()
