"""Block selection (csrc/select.cu radix select) against torch on the same block scores.

The scores an estimator hands to ``select_blocks``: ``[1, H, NQB, NKB]`` fp32 block
probabilities of a causal problem (skewed random values, the sink and diagonal blocks forced),
H = 8 KV heads (a GQA-reduced layout) and 32 query heads, blocks of 64 and 128. Budgets: the
cumulative mass 0.95 and a fixed count (10% of the key blocks). Providers:

- ``cuda``: ``select_blocks(..., backend="cuda")`` (radix select, no sort);
- ``torch sort+cumsum``: ``select_blocks(..., backend="torch")`` (the reference: one sort, a
  cumsum and a scatter);
- ``torch.topk+cumsum``: for a count, ``torch.topk`` + scatter; for a mass, ``torch.sort`` +
  ``cumsum`` + scatter written out (what a user would write without our kernel);
- dense attention baselines of the same run at the same sequence length (32/8 heads, d=128,
  bf16, causal: SDPA flash and cuDNN), so the selection time reads as a share of attention.

    python bench/bench_select.py --out bench/out --budget-s 120      # H100
    python bench/bench_select.py --quick --out bench/out             # small sizes
Without a GPU only the torch providers run (a smoke test of the script).
"""
from __future__ import annotations

import argparse
import sys

import torch

from _common import (Budget, dense_sdpa_rows, env_info, env_line, exit_on_sigterm,  # noqa: E402
                     finish, free_cuda, guarded, parse_list, print_table, run_meta,
                     time_provider)

from sparse_attn import _cuda  # noqa: E402
from sparse_attn.estimators.select import select_blocks  # noqa: E402
from sparse_attn.layout import causal_pair_counts  # noqa: E402

STEM = "bench_select"
COLUMNS = [("section", "section", None), ("seqlen", "S", None), ("heads", "H", None),
           ("block", "block", None), ("nkb", "NKB", None), ("budget", "budget", None),
           ("provider", "provider", None), ("ms", "ms", ".4g"), ("speedup", "speedup", ".2f"),
           ("of_dense", "of dense", ".4f"), ("note", "note", None)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--seqlens", default=None, help="default 32k,128k (quick: 4k)")
    ap.add_argument("--heads", default="8,32", help="rows of scores per query block")
    ap.add_argument("--blocks", default="64,128")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    default = "4k" if args.quick or not cuda else "32k,128k"
    args.seqlens = parse_list(args.seqlens or default, int)
    args.heads = parse_list(args.heads, int)
    args.blocks = parse_list(args.blocks, int)
    return args


def make_scores(seqlen, heads, block, device):
    nb = -(-seqlen // block)
    gen = torch.Generator(device=device).manual_seed(0)
    valid = causal_pair_counts(seqlen, seqlen, block, block, True, device) > 0
    probs = torch.rand(1, heads, nb, nb, generator=gen, device=device) ** 8 * valid
    probs = probs / probs.sum(-1, keepdim=True)
    kb = torch.arange(nb, device=device)
    keep = valid & ((kb[None, :] == 0) | (kb[None, :] == kb[:, None]))
    return probs, valid, keep


def topk_cumsum(probs, valid, keep, mass, count):
    """The plain-torch selection: topk (count) or sort + cumsum (mass), then a scatter."""
    key = torch.where(valid & ~keep, probs, -1.0)
    if count is not None:
        top = torch.topk(key, count, dim=-1)
        take = top.values >= 0
        return torch.zeros_like(valid).expand_as(probs).scatter(-1, top.indices, take) | keep
    sorted_key, order = key.sort(dim=-1, descending=True)
    total = torch.where(valid, probs, 0.0).sum(-1, keepdim=True)
    forced = torch.where(keep, probs, 0.0).sum(-1, keepdim=True)
    p = sorted_key.clamp(min=0)
    take = (sorted_key > 0) & (forced + p.cumsum(-1) - p < mass * total)
    return torch.zeros_like(valid).expand_as(probs).scatter(-1, order, take) | keep


def dense_section(seqlen, device):
    if device != "cuda":
        return [], None
    q = torch.randn(1, 32, seqlen, 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, 8, seqlen, 128, device=device, dtype=torch.bfloat16)
    rows, best = dense_sdpa_rows(q, k, torch.randn_like(k),
                                 {"section": "dense", "seqlen": seqlen, "heads": 32})
    del q, k
    free_cuda()
    return rows, best


def select_section(args, seqlen, heads, block, dense_ms, device):
    probs, valid, keep = make_scores(seqlen, heads, block, device)
    nkb = probs.shape[-1]
    count = max(1, nkb // 10)
    has_cuda = _cuda.available() and device == "cuda"
    out = []
    for budget, kw in (("mass 0.95", {"mass": 0.95}), (f"count {count}", {"count": count})):
        provs = {}
        if has_cuda:
            provs["cuda"] = lambda kw=kw: select_blocks(probs, valid=valid, keep=keep,
                                                        backend="cuda", **kw)
        provs["torch sort+cumsum"] = lambda kw=kw: select_blocks(
            probs, valid=valid, keep=keep, backend="torch", **kw)
        provs["torch.topk+cumsum"] = lambda kw=kw: topk_cumsum(
            probs, valid, keep, kw.get("mass"), kw.get("count"))
        rows = []
        for name, fn in provs.items():
            res = time_provider(fn)
            rows.append({"section": "select", "seqlen": seqlen, "heads": heads, "block": block,
                         "nkb": nkb, "budget": budget, "provider": name, **res})
        if not has_cuda:
            rows.append({"section": "select", "seqlen": seqlen, "heads": heads, "block": block,
                         "nkb": nkb, "budget": budget, "provider": "cuda", "available": False,
                         "note": f"extension {_cuda.status()['state']}: "
                                 f"{_cuda.status()['detail']}"})
        base = min((r["ms"] for r in rows if r.get("ms") and r["provider"] != "cuda"),
                   default=None)
        for r in rows:
            if r.get("ms"):
                r["speedup"] = base / r["ms"] if base else None
                r["of_dense"] = r["ms"] / dense_ms if dense_ms else None
        if has_cuda:  # same choice as the reference (up to float rounding at the cut)
            got = provs["cuda"]()
            ref = provs["torch sort+cumsum"]()
            rows[0]["rows_differ"] = float((got != ref).any(-1).float().mean())
        out.extend(rows)
    del probs, valid, keep
    free_cuda()
    return out


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r.get("section") == "select" and r.get("ms")]
    fig, ax = plt.subplots(figsize=(11, 0.28 * max(len(sel), 8) + 1))
    labels = [f"S{r['seqlen']} H{r['heads']} b{r['block']} {r['budget']} {r['provider']}"
              for r in sel]
    ax.barh(labels, [r["ms"] for r in sel])
    ax.set_xscale("log")
    ax.set_xlabel("ms (do_bench median)")
    ax.tick_params(axis="y", labelsize=6)
    ax.set_title("block selection: radix-select kernel vs torch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    exit_on_sigterm()
    budget = Budget(args.budget_s)
    info = env_info()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{STEM}: {env_line(info)}", flush=True)
    rows = []
    try:
        for seqlen in args.seqlens:
            if budget.spent():
                rows.append({"section": "select", "seqlen": seqlen, "note": "skipped: budget"})
                continue
            dense, note = guarded(dense_section, seqlen, device)
            dense_rows, dense_ms = dense or ([{"section": "dense", "seqlen": seqlen,
                                               "available": False, "note": note}], None)
            rows.extend(dense_rows)
            for heads in args.heads:
                for block in args.blocks:
                    if budget.spent():
                        rows.append({"section": "select", "seqlen": seqlen, "heads": heads,
                                     "block": block, "note": "skipped: budget"})
                        continue
                    part, note = guarded(select_section, args, seqlen, heads, block, dense_ms,
                                         device)
                    part = part or [{"section": "select", "seqlen": seqlen, "heads": heads,
                                     "block": block, "available": False, "note": note}]
                    rows.extend(part)
            print_table([r for r in rows if r.get("seqlen") == seqlen], COLUMNS,
                        title=f"selection at S={seqlen}")
    finally:
        meta = run_meta(info)
        meta.update(seqlens=args.seqlens, heads=args.heads, blocks=args.blocks,
                    budget_s=args.budget_s, elapsed_s=round(budget.elapsed(), 1),
                    extension=_cuda.status())
        finish(rows, args.out, STEM, meta, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
