"""int8 low-bit Q.K block scores (SALE's estimate): the CUDA kernel (csrc/lowbit_qk.cu) against
the Triton int8 path (kernels/estimate.py) on the same quantized inputs, and the whole lowbit
estimate (quantize + scores + selection) beside dense attention of the same run.

Shapes: batch 1, 32 query / 8 KV heads, d=128, bf16 inputs, causal; blocks of 64 and 128 with
16 sampled rows per query block; SALE's window normaliser (1 sink block, 1 local block).
Sections (a spent --budget-s skips the rest, results still written):

- dense: SDPA flash and cuDNN (the yardstick: targets are in % of the faster one);
- scores: ``block_scores`` on int8 inputs, Triton vs CUDA (ms, speedup, max relative diff);
- estimate: gather rows + quantize (Triton) + scores + selection (mass 0.95, per KV head),
  with Triton scores + torch selection vs CUDA scores + CUDA selection; % of dense.
Targets (issue 6): CUDA estimate <= 5% of dense, CUDA >= 2x the Triton int8 path.

    python bench/bench_lowbit_qk.py --out bench/out --budget-s 240      # H100
    python bench/bench_lowbit_qk.py --quick --out bench/out             # 16k only
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from _common import (Budget, dense_sdpa_rows, env_info, env_line, exit_on_sigterm,  # noqa: E402
                     finish, free_cuda, guarded, parse_list, print_table, require_cuda,
                     run_meta, time_provider)

from sparse_attn import _cuda  # noqa: E402

STEM = "bench_lowbit_qk"
COLUMNS = [("section", "section", None), ("seqlen", "S", None), ("block", "block", None),
           ("provider", "provider", None), ("ms", "ms", ".4g"), ("speedup", "speedup", ".2f"),
           ("of_dense", "of dense", ".4f"), ("max_rel_diff", "max rel diff", ".2e"),
           ("note", "note", None)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--quick", action="store_true", help="16k only")
    ap.add_argument("--seqlens", default=None, help="default 32k,128k")
    ap.add_argument("--blocks", default="64,128")
    ap.add_argument("--rows", type=int, default=16)
    args = ap.parse_args(argv)
    args.seqlens = parse_list(args.seqlens or ("16k" if args.quick else "32k,128k"), int)
    args.blocks = parse_list(args.blocks, int)
    return args


def block_sections(args, q, k, seqlen, block, dense_ms):
    from sparse_attn.estimators import get
    from sparse_attn.estimators.select import select_blocks  # noqa: F401  (backend choice)
    from sparse_attn.kernels.estimate import block_scores, quantize_int8
    from sparse_attn.reference.estimate import sample_rows

    rows_per_block, dim = args.rows, q.shape[-1]
    est = get("lowbit", block_m=block, block_n=block, rows=rows_per_block, mass=0.95)
    pos = sample_rows(seqlen, block, rows_per_block, q.device)
    q_rows = q.index_select(2, pos).contiguous()
    qq, qs = quantize_int8(q_rows, rows_per_block)
    kq, ks = quantize_int8(k, block)
    kw = dict(rows=rows_per_block, block_n=block, seqlen_q=seqlen, causal=True,
              scale=1.0 / math.sqrt(dim), q_scale=qs, k_scale=ks,
              window=(est.sink_blocks, est.local_blocks))
    provs = {"triton int8": lambda: block_scores(qq, kq, pos, **kw),
             "cuda int8": lambda: _cuda.lowbit_block_scores(qq, kq, pos, **kw)}
    out = []
    base = {"section": "scores", "seqlen": seqlen, "block": block}
    res = {name: time_provider(fn, warmup=10, rep=50) for name, fn in provs.items()}
    for name, r in res.items():
        out.append({**base, "provider": name, **r})
    t_ms, c_ms = res["triton int8"]["ms"], res["cuda int8"]["ms"]
    if t_ms and c_ms:
        out[-1]["speedup"] = t_ms / c_ms
        a, b = provs["triton int8"](), provs["cuda int8"]()
        out[-1]["max_rel_diff"] = float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
        del a, b
    for r in out:
        if r.get("ms") and dense_ms:
            r["of_dense"] = r["ms"] / dense_ms
    free_cuda()

    def estimate(cuda: bool):
        p = q.index_select(2, pos).contiguous()
        pq, pqs = quantize_int8(p, rows_per_block)
        kq2, ks2 = quantize_int8(k, block)
        kw2 = {**kw, "q_scale": pqs, "k_scale": ks2}
        scores = (_cuda.lowbit_block_scores(pq, kq2, pos, **kw2) if cuda
                  else block_scores(pq, kq2, pos, **kw2))
        return scores, est.select(scores, q, k, True) if cuda else _torch_select(est, scores, q, k)

    base = {"section": "estimate", "seqlen": seqlen, "block": block}
    est_rows = []
    for name, cuda in (("triton scores + torch select", False), ("cuda scores + cuda select",
                                                                   True)):
        r = time_provider(lambda cuda=cuda: estimate(cuda), warmup=10, rep=50)
        est_rows.append({**base, "provider": name, **r})
    t_ms, c_ms = est_rows[0]["ms"], est_rows[1]["ms"]
    if t_ms and c_ms:
        est_rows[1]["speedup"] = t_ms / c_ms
    for r in est_rows:
        if r.get("ms") and dense_ms:
            r["of_dense"] = r["ms"] / dense_ms
    out.extend(est_rows)
    del qq, kq, q_rows
    free_cuda()
    return out


def _torch_select(est, scores, q, k):
    """The estimator's selection with select_blocks forced onto its torch path."""
    from sparse_attn.estimators import select as sel

    orig = sel.select_blocks
    sel.select_blocks = lambda *a, **kw: orig(*a, **{**kw, "backend": "torch"})
    try:
        return est.select(scores, q, k, True)
    finally:
        sel.select_blocks = orig


def main(argv=None):
    args = parse_args(argv)
    require_cuda(STEM)
    exit_on_sigterm()
    budget = Budget(args.budget_s)
    info = env_info()
    print(f"{STEM}: {env_line(info)}", flush=True)
    rows = []
    try:
        if not _cuda.available():
            rows.append({"section": "scores", "provider": "cuda int8", "available": False,
                         "note": f"extension {_cuda.status()}"})
        for seqlen in args.seqlens:
            if budget.spent():
                rows.append({"section": "dense", "seqlen": seqlen, "note": "skipped: budget"})
                continue
            gen = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(1, 32, seqlen, 128, device="cuda", dtype=torch.bfloat16,
                            generator=gen)
            k = torch.randn(1, 8, seqlen, 128, device="cuda", dtype=torch.bfloat16,
                            generator=gen)
            v = torch.randn_like(k)
            dense, note = guarded(dense_sdpa_rows, q, k, v,
                                  {"section": "dense", "seqlen": seqlen})
            dense_rows, dense_ms = dense or ([{"section": "dense", "seqlen": seqlen,
                                               "available": False, "note": note}], None)
            rows.extend(dense_rows)
            del v
            for block in args.blocks:
                if budget.spent():
                    rows.append({"section": "scores", "seqlen": seqlen, "block": block,
                                 "note": "skipped: budget"})
                    continue
                part, note = guarded(block_sections, args, q, k, seqlen, block, dense_ms)
                rows.extend(part or [{"section": "scores", "seqlen": seqlen, "block": block,
                                      "available": False, "note": note}])
            print_table([r for r in rows if r.get("seqlen") == seqlen], COLUMNS,
                        title=f"lowbit int8 at S={seqlen} (32/8 heads, d=128)")
            del q, k
            free_cuda()
    finally:
        meta = run_meta(info)
        meta.update(seqlens=args.seqlens, blocks=args.blocks, rows=args.rows,
                    budget_s=args.budget_s, elapsed_s=round(budget.elapsed(), 1),
                    extension=_cuda.status())
        finish(rows, args.out, STEM, meta, plot)
    return 0


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r.get("ms") and r.get("section") in ("scores", "estimate")]
    fig, ax = plt.subplots(figsize=(10, 0.35 * max(len(sel), 6) + 1))
    ax.barh([f"S{r['seqlen']} b{r['block']} {r['section']}: {r['provider']}" for r in sel],
            [r["of_dense"] * 100 if r.get("of_dense") else 0 for r in sel])
    ax.axvline(5, ls="--", c="grey", lw=0.8)
    ax.set_xlabel("% of dense attention time (best SDPA backend, same run)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("lowbit int8 estimation: CUDA vs Triton")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
