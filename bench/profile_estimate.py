"""Profile the stripe estimators (``anchor``, ``vertical_slash``) at one long length.

For each estimator and budget (``density``, ``mass``): the estimate time (median of CUDA-event
timings, ``bench/_common.time_provider``) and its share of the fastest dense SDPA of the same
run (flash, cuDNN), the layout's density, the stripe attention time on that layout (density
budget only), and a ``torch.profiler`` table of the 10 most expensive GPU kernels of one
estimate. ``--sweep`` also times the launch configs of ``kernels/stripe_estimate.CONFIG``
(anchor's search/selection passes) that might beat the default.

    python bench/profile_estimate.py --out DIR [--seqlen 131072] [--budget-s 180] [--sweep]
    python bench/profile_estimate.py --out DIR --quick   # CPU or GPU smoke run, small shapes

Writes ``profile_estimate.json/.csv`` (rows) and ``profile_estimate.txt`` (the profiler
tables) into DIR.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Budget, DTYPES, dense_sdpa_rows, env_info, env_line, exit_on_sigterm,  # noqa: E402
                     free_cuda, guarded, print_table, random_qkv, run_meta, time_provider,
                     write_results)

from sparse_attn import estimators  # noqa: E402
from sparse_attn.ops import stripe_attention  # noqa: E402

STEM = "profile_estimate"
METHODS = ("anchor", "vertical_slash")
COLUMNS = [("method", "method", None), ("budget", "budget", None), ("config", "config", None),
           ("est_ms", "estimate ms", ".2f"), ("est_pct", "% dense", ".2f"),
           ("density", "density", ".3f"), ("attend_ms", "attend ms", ".1f"),
           ("note", "note", None)]
# anchor launch configs tried by --sweep (kernels/stripe_estimate.CONFIG overrides)
SWEEP = (
    {"select_splits": 4},
    {"select_splits": 8},
    {"select_splits": 8, "search_splits": 4},
    {"search_rows": 64},
    {"long_stride": 16},
    {"select_rows": 128, "select_warps": 8},
    {"select_rows": 32, "select_splits": 8},
    {"search_rows": 64, "search_block_k": 64},
    {"search_rows": 64, "search_splits": 4, "long_stride": 16, "select_splits": 8},
    {"long_stride": 16, "search_splits": 4, "select_splits": 8},
    {"long_stride": 32},
    {"long_stride": 32, "search_splits": 4, "select_splits": 8},
)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--block", type=int, default=128, help="layout tile (bench_estimate's)")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--mass", type=float, default=0.95)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sweep", action="store_true", help="time anchor's CONFIG variants")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args(argv)
    if args.quick:
        args.seqlen = 4096 if torch.cuda.is_available() else 512
        if not torch.cuda.is_available():
            args.heads, args.kv_heads, args.head_dim, args.dtype = 4, 2, 64, "fp32"
            args.block = 64
    return args


def kernel_table(fn, rows: int = 10) -> str:
    """The ``rows`` GPU kernels (or CPU ops without a GPU) with the most total time in one
    call of ``fn`` (after a warm call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    key = "cuda_time_total" if cuda else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


@contextlib.contextmanager
def anchor_config(overrides: dict):
    """Temporarily override ``kernels/stripe_estimate.CONFIG``."""
    from sparse_attn.kernels import stripe_estimate as se

    saved = dict(se.CONFIG)
    se.CONFIG.update(overrides)
    try:
        yield
    finally:
        se.CONFIG.clear()
        se.CONFIG.update(saved)


def main(argv=None):
    args = parse_args(argv)
    exit_on_sigterm()
    budget = Budget(args.budget_s)
    info = env_info()
    print(env_line(info), flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    warm, rep = (3, 20) if device == "cuda" else (1, 2)
    q, k, v = random_qkv(args, args.seqlen, args.head_dim, device, args.seed)
    base = {"seqlen": args.seqlen, "batch": args.batch, "heads": args.heads,
            "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": args.dtype,
            "block": args.block}
    rows, best = [], None
    if device == "cuda":
        dense, best = dense_sdpa_rows(q, k, v, {**base, "section": "dense"}, warmup=1, rep=5)
        rows += dense
        print_table(dense, [("provider", "provider", None), ("ms", "ms", ".1f")], title="dense")
    tables = []
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        for name in methods:
            for bname, bval in (("density", args.density), ("mass", args.mass)):
                if budget.spent():
                    rows.append({**base, "method": name, "budget": f"{bname}={bval}",
                                 "note": "skipped: time budget spent"})
                    continue
                est = estimators.get(name, block_m=args.block, block_n=args.block,
                                     **{bname: bval})
                row = {**base, "section": "estimate", "method": name,
                       "budget": f"{bname}={bval}", "config": "default", "dense_ms": best}
                rows.append(row)
                t = time_provider(lambda: est.estimate(q, k), warmup=warm, rep=rep)
                row.update(est_ms=t["ms"], note=t["note"])
                if not t["available"]:
                    continue
                if best:
                    row["est_pct"] = 100 * t["ms"] / best
                lay, err = guarded(est.estimate, q, k)
                if err:
                    row["note"] = err
                    continue
                row["density"] = float(lay.density(args.seqlen, args.seqlen))
                row["max_columns"] = lay.max_columns
                if bname == "density":
                    a = time_provider(lambda: stripe_attention(q, k, v, lay, causal=True,
                                                               check_indices=False),
                                      warmup=1, rep=5)
                    row["attend_ms"] = a["ms"]
                    table, err = guarded(kernel_table, lambda: est.estimate(q, k))
                    tables.append(f"== {name} {bname}={bval}: top kernels of one estimate "
                                  f"({row['est_ms']:.2f} ms, density {row['density']:.3f})\n"
                                  f"{table if table else err}")
                    print(tables[-1], flush=True)
                del lay
                free_cuda()
        if args.sweep and "anchor" in methods:
            for over in SWEEP:
                for bname, bval in (("density", args.density), ("mass", args.mass)):
                    if budget.spent():
                        break
                    est = estimators.get("anchor", block_m=args.block, block_n=args.block,
                                         **{bname: bval})
                    label = ",".join(f"{a}={b}" for a, b in over.items())
                    row = {**base, "section": "sweep", "method": "anchor",
                           "budget": f"{bname}={bval}", "config": label, "dense_ms": best}
                    rows.append(row)
                    with anchor_config(over):
                        t = time_provider(lambda: est.estimate(q, k), warmup=warm, rep=rep)
                        row.update(est_ms=t["ms"], note=t["note"])
                        if t["available"]:
                            lay = est.estimate(q, k)
                            row["density"] = float(lay.density(args.seqlen, args.seqlen))
                            del lay
                    if best and t["ms"]:
                        row["est_pct"] = 100 * t["ms"] / best
                    free_cuda()
    finally:
        est_rows = [r for r in rows if r.get("section") in ("estimate", "sweep")]
        print_table(est_rows, COLUMNS, title=f"\nestimators, S={args.seqlen} "
                                            f"(fastest dense {best} ms)")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{STEM}.txt").write_text(env_line(info) + "\n\n" + "\n\n".join(tables) + "\n")
        paths = write_results(rows, out, STEM, meta=run_meta(info))
        print("wrote", ", ".join(str(p) for p in paths), out / f"{STEM}.txt", flush=True)


if __name__ == "__main__":
    main()
