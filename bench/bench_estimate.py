"""Estimation cost of every pattern estimator, against dense attention in the same run.

For each sequence length (batch 1, 32 query / 8 KV heads, d=128, bf16, causal by default):

1. dense baselines: SDPA flash, SDPA cuDNN and our block-sparse kernel on a dense layout; the
   fastest is the yardstick ``dense_ms``;
2. per estimator (``proxy``, ``lowbit`` int8, ``block_topk``, ``streaming``, plus ``anchor`` and
   ``vertical_slash`` when registered, ``estimators.available()``) at a --density budget
   (10%): estimation ms and its share of ``dense_ms`` (targets: <= 5% proxy/anchor, <= 10%
   lowbit), the op on the estimated layout, estimate + attend and its speedup over ``dense_ms``
   (target >= 7x at 128k), the layout's density; then the ``mass`` budget's estimation time;
3. ``threshold`` (BLASST): the dense kernel with the default lambda, and calibrated lambda
   against the context length on a synthetic sink-dominated sample (BLASST's inverse relation;
   fit ``lambda = a * L^-beta``).

Random inputs: timings only (estimation cost does not depend on the values; the accuracy of the
methods is bench/accuracy.py's job). Writes <out>/bench_estimate.{json,csv,png} and
<out>/bench_estimate_threshold.csv.

    python bench/bench_estimate.py --out bench/out --budget-s 600     # H100: 128k
    python bench/bench_estimate.py --quick --out bench/out            # smoke run (small sizes)
"""
from __future__ import annotations

import argparse
import sys

import torch

from _common import (Budget, add_shape_args, dense_sdpa_rows, env_info, env_line,
                     exit_on_sigterm, finish, free_cuda, guarded, parse_list,
                     parse_method_spec, print_table, random_qkv, run_meta, time_provider,
                     write_results)
from sparse_attn import BlockLayout, block_sparse_attention, estimators
from sparse_attn.module import _LAYOUT_OPS

STEM = "bench_estimate"
# name[key=value;...]: an estimator with extra config (proxy's per-KV-head layout: the faster
# GQA-packed kernel path; proxy with 16 sampled rows, the default before 2026-11-25; lowbit on
# the CUDA int8 kernel instead of the Triton one)
ORDER = ("proxy", "proxy[rows=16]", "proxy[gqa_reduce=max]", "lowbit", "lowbit[backend=cuda]",
         "block_topk", "streaming", "anchor", "vertical_slash")
TARGET_PCT = {"proxy": 5.0, "anchor": 5.0, "lowbit": 10.0}
TARGET_SPEEDUP = 7.0

COLUMNS = [
    ("seqlen", "S", None), ("method", "method", None), ("budget", "budget", None),
    ("density", "density", ".3f"), ("est_ms", "estimate ms", ".4g"),
    ("est_pct", "% dense", ".2f"), ("target_pct", "target %", None),
    ("attend_ms", "attend ms", ".4g"), ("total_ms", "est+attend ms", ".4g"),
    ("speedup", "x dense", ".2f"), ("note", "note", None),
]
DENSE_COLUMNS = [("seqlen", "S", None), ("provider", "provider", None), ("ms", "ms", ".4g"),
                 ("p20", "p20", ".4g"), ("p80", "p80", ".4g"), ("note", "note", None)]
THRESHOLD_COLUMNS = [("seqlen", "S", None), ("threshold", "lambda", ".2e"),
                     ("threshold_scale", "lambda*L", ".3g"), ("skipped", "skipped", ".3f"),
                     ("rel_l2", "rel L2 err", ".2e"), ("ms", "ms", ".4g"), ("note", "note", None)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="128k", help="sequence lengths (a k suffix: x1024)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--density", type=float, default=0.1, help="the fixed-density budget")
    ap.add_argument("--mass", type=float, default=0.95, help="the cumulative-mass budget")
    ap.add_argument("--methods", default=",".join(ORDER),
                    help="estimators to time (those not registered are dropped with a note)")
    ap.add_argument("--threshold-lengths", default="4k,8k,16k,32k",
                    help="lengths of the lambda-vs-length calibration")
    ap.add_argument("--target-error", type=float, default=1e-3,
                    help="relative L2 output error the calibration aims at")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (s)")
    ap.add_argument("--quick", action="store_true", help="small sizes, short timings")
    add_shape_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.seqlens = "4k" if torch.cuda.is_available() else "1k"
        args.threshold_lengths = "1k,2k,4k" if torch.cuda.is_available() else "512,1k"
        if not torch.cuda.is_available():
            args.heads, args.kv_heads, args.head_dim = 4, 2, 64
    return args


def _budget_config(name: str, seqlen: int, block: int, density: float, mass: float | None):
    """The estimator config for a budget; ``streaming`` gets the local window of that density."""
    base = {"block_m": block, "block_n": block}
    if name == "streaming":
        nb = -(-seqlen // block)
        # mean reachable blocks of a causal query block ~ (nb + 1) / 2
        local = max(1, round(density * (nb + 1) / 2) - 1)
        return {**base, "sink_blocks": 1, "local_blocks": min(local, nb)}
    return {**base, **({"mass": mass} if mass is not None else {"density": density})}


def _get(name: str, config: dict):
    """The estimator, dropping config keys it does not take (then with its defaults)."""
    try:
        return estimators.get(name, **config), ""
    except ValueError as err:
        if "has no config" not in str(err):
            raise
    keep = {k: v for k, v in config.items() if k in ("block_m", "block_n")}
    try:
        return estimators.get(name, **keep), "its own default budget"
    except ValueError:
        return estimators.get(name), "its own default config"


def _attend(q, k, v, layout, est):
    """The op of the layout's type, as SparseAttention runs it (no index check when valid by
    construction: no host sync)."""
    op = next(fn for cls, fn in _LAYOUT_OPS.items() if isinstance(layout, cls))
    check = False if est.layouts_valid_by_construction else None
    thr = est.softmax_threshold_for(k.shape[2]) if hasattr(est, "softmax_threshold_for") else None
    return op(q, k, v, layout, causal=True, softmax_threshold=thr, check_indices=check)


def bench_length(args, seqlen: int, budget: Budget, warm: int, rep: int):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = random_qkv(args, seqlen, args.head_dim, device, args.seed)
    base = {"seqlen": seqlen, "batch": args.batch, "heads": args.heads,
            "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": args.dtype}
    dense_rows = []
    if device == "cuda":
        dense_rows, best = dense_sdpa_rows(q, k, v, {**base, "section": "dense"}, warmup=warm,
                                           rep=rep)
    else:
        best = None
    layout = BlockLayout.dense(args.batch, args.kv_heads, seqlen, seqlen, block_m=args.block,
                               block_n=args.block, device=device)
    ours = time_provider(lambda: block_sparse_attention(q, k, v, layout, check_indices=False),
                         warmup=warm, rep=rep)
    dense_rows.append({**base, "section": "dense", "provider": "ours dense", **ours})
    if ours["ms"] and (best is None or ours["ms"] < best):
        best = ours["ms"]
    print_table(dense_rows, DENSE_COLUMNS, title=f"\ndense baselines, S={seqlen}")

    rows = []
    available = estimators.available()
    for spec in [m.strip() for m in args.methods.split(",") if m.strip()]:
        name, extra = parse_method_spec(spec)
        for budget_name, mass in (("density", None), ("mass", args.mass)):
            row = {**base, "section": "estimate", "method": spec, "dense_ms": best,
                   "target_pct": TARGET_PCT.get(name),
                   "budget": f"density={args.density}" if mass is None else f"mass={mass}"}
            rows.append(row)
            if name not in available:
                row["note"] = f"not registered (available: {available})"
                break
            if budget.spent():
                row["note"] = "skipped: time budget spent"
                continue
            if name == "streaming" and mass is not None:
                rows.pop()  # a fixed window has no mass budget
                continue
            config = {**_budget_config(name, seqlen, args.block, args.density, mass), **extra}
            (est, note), err = guarded(_get, name, config)
            if err:
                row["note"] = err
                continue
            row["note"] = note
            t = time_provider(lambda: est.estimate(q, k), warmup=warm, rep=rep)
            row["est_ms"] = t["ms"]
            if not t["available"]:
                row["note"] = t["note"]
                continue
            lay, err = guarded(est.estimate, q, k)
            if err:
                row["note"] = err
                continue
            row["density"] = float(lay.density(seqlen, seqlen))
            if best:
                row["est_pct"] = 100.0 * t["ms"] / best
            if mass is None:  # attend timings at the fixed-density budget only
                a = time_provider(lambda: _attend(q, k, v, lay, est), warmup=warm, rep=rep)
                both = time_provider(lambda: _attend(q, k, v, est.estimate(q, k), est),
                                     warmup=warm, rep=rep)
                row.update(attend_ms=a["ms"], total_ms=both["ms"])
                if best and both["ms"]:
                    row["speedup"] = best / both["ms"]
                row["note"] = "; ".join(x for x in (note, a["note"], both["note"]) if x)
            del lay
            free_cuda()
    # BLASST on the dense layout with the estimator's default lambda
    if not budget.spent():
        est = estimators.get("threshold", block_m=args.block, block_n=args.block)
        lam = est.softmax_threshold_for(seqlen)
        t = time_provider(lambda: block_sparse_attention(
            q, k, v, layout, softmax_threshold=lam, check_indices=False), warmup=warm, rep=rep)
        rows.append({**base, "section": "estimate", "method": "threshold",
                     "budget": f"lambda={lam:.2e}", "density": 1.0, "dense_ms": best,
                     "est_ms": 0.0, "est_pct": 0.0, "attend_ms": t["ms"], "total_ms": t["ms"],
                     "speedup": best / t["ms"] if best and t["ms"] else None,
                     "note": "random inputs: few tiles fall under lambda " + t["note"]})
    print_table(rows, COLUMNS, title=f"\nestimation vs dense (fastest {best} ms), S={seqlen}")
    del q, k, v, layout
    free_cuda()
    return dense_rows + rows


def bench_threshold(args, budget: Budget):
    """Calibrated lambda at several lengths (synthetic sink-dominated attention)."""
    from sparse_attn.estimators.threshold import sink_sample, threshold_vs_length

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lengths = parse_list(args.threshold_lengths, int)
    if not lengths:  # --threshold-lengths "": no calibration
        return []
    block = args.block if device == "cuda" else 64
    heads = 4 if device == "cuda" else 1
    q, k, v = (t.to(device=device, dtype=dtype)
               for t in sink_sample(max(lengths), heads, args.head_dim, block))
    if budget.spent():
        return [{"section": "threshold", "note": "skipped: time budget spent"}]
    cands = [10.0 ** (-e / 4) for e in range(4, 37)]  # 1e-1 .. 1e-9
    fit, err = guarded(threshold_vs_length, q, k, v, lengths, target_error=args.target_error,
                       candidates=cands, block_m=block, block_n=block)
    if err:
        return [{"section": "threshold", "note": err}]
    rows = []
    for n, cal in zip(fit["lengths"], fit["calibrations"]):
        i = cal.candidates.index(cal.threshold)
        row = {"section": "threshold", "seqlen": n, "threshold": cal.threshold,
               "threshold_scale": cal.threshold_scale, "skipped": cal.skipped[i],
               "rel_l2": cal.errors[i], "target_error": args.target_error,
               "fit_a": fit["a"], "fit_beta": fit["beta"], "heads": heads, "block": block,
               "note": "synthetic sink-dominated sample"}
        if device == "cuda":
            lay = BlockLayout.dense(1, heads, n, n, block_m=block, block_n=block, device=device)
            qn, kn, vn = q[:, :, :n], k[:, :, :n], v[:, :, :n]
            t = time_provider(lambda: block_sparse_attention(
                qn, kn, vn, lay, softmax_threshold=cal.threshold, check_indices=False))
            t0 = time_provider(lambda: block_sparse_attention(qn, kn, vn, lay,
                                                              check_indices=False))
            row.update(ms=t["ms"], ms_no_threshold=t0["ms"])
        rows.append(row)
    print_table(rows, THRESHOLD_COLUMNS,
                title=f"\nBLASST calibrated lambda vs length (target rel L2 "
                      f"{args.target_error}): lambda = {fit['a']:.3g} * L^-{fit['beta']:.2f}")
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    est = [r for r in rows if r.get("section") == "estimate" and r.get("est_pct") is not None
           and r.get("budget", "").startswith("density")]
    thr = [r for r in rows if r.get("section") == "threshold" and r.get("threshold")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for s in sorted({r["seqlen"] for r in est}):
        sel = [r for r in est if r["seqlen"] == s]
        names = [r["method"] for r in sel]
        axes[0].bar([f"{n}\n{s // 1024}k" for n in names], [r["est_pct"] for r in sel])
        axes[1].bar([f"{n}\n{s // 1024}k" for n in names], [r.get("speedup") or 0 for r in sel])
    axes[0].axhline(5, ls="--", c="g", label="5% (proxy, anchor)")
    axes[0].axhline(10, ls="--", c="r", label="10% (lowbit)")
    axes[0].set_ylabel("estimation time, % of fastest dense")
    axes[0].legend()
    axes[1].axhline(TARGET_SPEEDUP, ls="--", c="g", label=f"{TARGET_SPEEDUP:g}x")
    axes[1].set_ylabel("dense / (estimate + attend), 10% density")
    axes[1].legend()
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelsize=7)
    if thr:
        axes[2].loglog([r["seqlen"] for r in thr], [r["threshold"] for r in thr], "o-",
                       label="calibrated")
        a, b = thr[0]["fit_a"], thr[0]["fit_beta"]
        xs = [r["seqlen"] for r in thr]
        axes[2].loglog(xs, [a * x ** -b for x in xs], "--", label=f"{a:.3g} L^-{b:.2f}")
        axes[2].set_xlabel("context length L")
        axes[2].set_ylabel("lambda for the target error")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    exit_on_sigterm()
    info = env_info()
    print(env_line(info), flush=True)
    budget = Budget(args.budget_s)
    warm, rep = (5, 20) if args.quick else (25, 100)
    rows = []
    try:
        for seqlen in parse_list(args.seqlens, int):
            if budget.spent():
                rows.append({"section": "estimate", "seqlen": seqlen,
                             "note": "skipped: time budget spent"})
                continue
            part, err = guarded(bench_length, args, seqlen, budget, warm, rep)
            rows.extend(part or [{"section": "estimate", "seqlen": seqlen, "note": err}])
        rows.extend(bench_threshold(args, budget))
    finally:
        meta = {**run_meta(info), "args": vars(args), "target_pct": TARGET_PCT,
                "target_speedup": TARGET_SPEEDUP}
        finish([r for r in rows if r.get("section") != "threshold"], args.out, STEM, meta,
               plot=lambda _, path: plot(rows, path))
        write_results([r for r in rows if r.get("section") == "threshold"], args.out,
                      f"{STEM}_threshold", meta=meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
