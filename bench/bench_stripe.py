"""stripe_attention (gathered key positions) against the block-sparse kernel, dense SDPA (flash,
cuDNN) and FlexAttention.

Batch 1, 32 query / 8 KV heads, d=128, bf16, causal; per-KV-head layouts, 64 x 64 tiles.

(a) ``gather``: each query block computes its sink and diagonal key blocks plus N further key
    positions: scattered (stripe kernel, gathered N at a time by pointer) or as N / 64 whole
    random key blocks (block-sparse kernel). Both attend exactly the same number of (query, key)
    pairs; the ratio stripe / block is the cost of gathering (target <= 1.3 at 128k).
(b) ``vertical``: a synthetic MInference-style pattern: sink block, a local window (slashes
    0..W-1 as dense diagonal blocks) and V random vertical lines per KV head. The stripe kernel
    computes exactly the lines; the block-sparse kernel must cover every line with whole key
    blocks (64 and 128 wide) for equal recall; FlexAttention runs the exact pattern
    (mask_mod over the 128-block cover).

Each (S, D) also times the dense baselines of the same run (SDPA flash and cuDNN, via
bench_block_sparse.dense_rows). Writes <out>/bench_stripe.{json,csv,png}.

(c) ``tune`` (last, if the budget allows): at the first seqlen and each of --tune-counts, the
    block-sparse kernel at (a)'s block layout, the stripe kernel at each of --tune-configs, and
    the stripe kernel on the block layout's own (contiguous) rows: ``ours_contig`` / ``ours``
    separates the memory system's cost of scattered rows from the kernel's own.

    python bench/bench_stripe.py --out bench/out --budget-s 500        # full run (H100)
    python bench/bench_stripe.py --quick --out bench/out               # smoke run
    python bench/bench_stripe.py --dry-run --quick --out /tmp/x        # no GPU: layouts, files
    python bench/bench_stripe.py --tune-only --seqlens 128k --tune-counts 16384,4096,1024 \
        --out bench/out --budget-s 200                                  # config sweep only
"""
from __future__ import annotations

import argparse
import sys

import torch

from _common import (Budget, add_shape_args, attention_tflop, causal_pairs, env_info, env_line,
                     exit_on_sigterm, free_cuda, guarded, parse_list, print_table, random_qkv,
                     require_cuda, run_meta, tflops, time_provider, write_results)
from bench_block_sparse import Providers, base_row, dense_rows, max_abs_diff
from sparse_attn import BlockLayout, StripeLayout, block_sparse_attention, stripe_attention

STEM = "bench_stripe"
PROVIDERS = ("sdpa_flash", "sdpa_cudnn", "flex", "ours", "block_sparse")
COLUMNS = [
    ("section", "section", None), ("seqlen", "S", None), ("pattern", "pattern", None),
    ("provider", "provider", None), ("config", "config", None), ("density", "density", ".4f"), ("ms", "ms", ".4g"),
    ("p20", "p20", ".4g"), ("p80", "p80", ".4g"), ("tflops", "TFLOP/s", ".0f"),
    ("vs_block", "ours/this", ".2f"), ("x_block", "ms/block ms", ".2f"), ("vs_flash", "x flash", ".2f"),
    ("vs_cudnn", "x cuDNN", ".2f"), ("maxdiff", "max|ours-flex|", ".2e"),
    ("note", "note", None),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="128k,32k")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--stripe-counts", default="1024,4096,16384",
                    help="(a) gathered positions per query block (multiples of --block)")
    ap.add_argument("--verticals", default="256,1024", help="(b) vertical lines per KV head")
    ap.add_argument("--window", type=int, default=1024, help="(b) local window (slashes)")
    add_shape_args(ap)
    ap.set_defaults(block=64)
    ap.add_argument("--tune-configs",
                    default="128/64/64/8/2/3,128/64/64/8/2/4,128/64/128/8/2/3,64/64/64/4/2/3,"
                            "128/64/32/4/2/4",
                    help="last, if the budget allows: stripe-kernel configs BLOCK_M/BLOCK_N/"
                         "BLOCK_NS/warps/stages/gather stages timed at (a) with each of "
                         "--tune-counts at the first seqlen, next to the block-sparse kernel "
                         "and the stripe kernel on contiguous rows ('' to skip)")
    ap.add_argument("--tune-counts", default=None,
                    help="(a)'s N for the config sweep (default: the largest --stripe-counts)")
    ap.add_argument("--tune-only", action="store_true",
                    help="only the config sweep (no dense, (a) or (b) sections)")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--sdpa-gqa", choices=("auto", "native", "expand"), default="auto")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip what remains (noted in the table) after this many seconds")
    ap.add_argument("--quick", action="store_true", help="small sizes (4k, 16k) for a smoke run")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: build and check the layouts, write the files, no timings")
    args = ap.parse_args(argv)
    if args.quick:
        args.seqlens, args.stripe_counts, args.verticals = "4k,32k", "512,2048", "256"
        args.window = 512
    args.seqlens = parse_list(args.seqlens, int)
    args.stripe_counts = parse_list(args.stripe_counts, int)
    args.verticals = parse_list(args.verticals, int)
    args.providers = parse_list(args.providers, str)
    args.tune_configs = [tuple(int(x) for x in c.split("/"))
                         for c in parse_list(args.tune_configs, str)]
    if any(len(c) != 6 for c in args.tune_configs):
        ap.error("--tune-configs: each config is BLOCK_M/BLOCK_N/BLOCK_NS/warps/stages/"
                 "gather stages (6 numbers)")
    args.tune_counts = (parse_list(args.tune_counts, int) if args.tune_counts
                        else [max(args.stripe_counts)])
    args.per_query_head = False  # base_row / dense_rows read it
    if args.dry_run:
        args.device = "cpu"
    return args


# ------------------------------------------------------------------------------- layouts
def _jittered(count: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, width: int, gen):
    """``count`` strictly increasing random integers in ``[lo, hi)`` per row (a jittered grid:
    one per stride-wide cell), ``-1`` after; ``count <= hi - lo`` and all tensors ``[...]``."""
    slot = torch.arange(width, device=count.device)
    stride = ((hi - lo) // count.clamp(min=1)).clamp(min=1)
    jitter = torch.randint(0, 2**30, (*count.shape, width), generator=gen,
                           device=count.device) % stride[..., None]
    pos = lo[..., None] + slot * stride[..., None] + jitter
    return torch.where(slot < count[..., None], pos, -1).to(torch.int32)


def gather_layouts(batch, heads, seqlen, n_cols, block, device, seed, contiguous=False):
    """(a): sink + diagonal blocks, plus per query block ``n`` extra key positions between the
    sink and the diagonal: scattered (StripeLayout) or as ``n / block`` random whole blocks
    (BlockLayout). ``n = min(n_cols, room)`` rounded down to whole blocks, so both attend the
    same pairs. ``contiguous``: also a StripeLayout whose stripes are the block layout's
    positions (the gather kernel on contiguous rows: separates the kernel's cost from the
    memory system's cost of scattered rows)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    nb = -(-seqlen // block)
    m = torch.arange(nb, device=device)
    room_blocks = (m - 1).clamp(min=0)  # key blocks 1 .. m-1
    n_blocks = torch.minimum(room_blocks, torch.tensor(n_cols // block, device=device))
    shape = (batch, heads, nb)
    n_blocks = n_blocks.expand(shape)
    one = torch.ones(shape, dtype=torch.long, device=device)
    blk = _jittered(n_blocks, one, (m + 0).expand(shape), max(1, n_cols // block), gen)
    dense = torch.zeros(batch, heads, nb, nb + 1, dtype=torch.bool, device=device)
    dense[..., 0] = True
    dense[..., m, m] = True
    sparse = dense.clone()
    sparse.scatter_(-1, torch.where(blk >= 0, blk.long(), nb), True)
    block_layout = BlockLayout.from_mask(sparse[..., :nb].contiguous(), block, block)
    dense_blocks = BlockLayout.from_mask(dense[..., :nb].contiguous(), block, block)
    cols = _jittered(n_blocks * block, one * block, (m * block).expand(shape), n_cols, gen)
    counts = (n_blocks * block).to(torch.int32)
    if contiguous:
        rows = (blk.long()[..., None] * block + torch.arange(block, device=device)).flatten(-2)
        rows = torch.where((blk >= 0)[..., None].expand(*blk.shape, block).flatten(-2), rows, -1)
        return (StripeLayout(dense_blocks, counts, cols), block_layout,
                StripeLayout(dense_blocks, counts, rows.to(torch.int32)))
    return StripeLayout(dense_blocks, counts, cols), block_layout


def vertical_layouts(batch, heads, seqlen, n_vert, window, block, device, seed):
    """(b): sink block + local window (slash offsets 0..window-1) + ``n_vert`` random vertical
    lines per head. Returns the StripeLayout (exact lines), the block layouts that cover every
    line with whole 64 / 128-wide blocks (equal recall), the vertical lines and the stripe
    layout's dense-block mask (for FlexAttention's mask_mod)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    vert = torch.randint(block, seqlen, (batch, heads, n_vert), generator=gen, device=device)
    slash = torch.arange(window, device=device).expand(batch, heads, -1)
    lay = StripeLayout.from_vertical_slash(vert, slash, seqlen, seqlen, block_m=block,
                                           block_n=block, max_columns=n_vert)
    dense = lay.blocks.to_mask()
    dense[..., 0] = True  # the sink block (no vertical line falls in it)
    stripe = StripeLayout(BlockLayout.from_mask(dense, block, block), lay.col_counts,
                          lay.col_indices)
    covers = {}
    for bs in sorted({block, 128}):
        nqb = -(-seqlen // bs)
        m = torch.arange(nqb, device=device)
        # the window and sink at this block size, then every block holding a visible line
        base = StripeLayout.from_vertical_slash(vert[..., :0], slash, seqlen, seqlen,
                                                block_m=bs, block_n=bs, max_columns=1)
        mask = torch.cat([base.blocks.to_mask(),
                          torch.zeros(batch, heads, nqb, 1, dtype=torch.bool, device=device)],
                         -1)
        mask[..., 0] = True
        vb = (vert // bs)[:, :, None, :].expand(batch, heads, nqb, n_vert)
        mask.scatter_(-1, torch.where(vb <= m[:, None], vb, nqb), True)
        covers[bs] = BlockLayout.from_mask(mask[..., :nqb].contiguous(), bs, bs)
    return stripe, covers, vert, dense


def flex_exact(prov, q, k, v, vert, dense, cover128, block, seqlen):
    """FlexAttention at the exact stripe pattern: causal & (dense 64-block | vertical line),
    block-sparse over the 128-block cover (all blocks partial)."""
    from torch.nn.attention.flex_attention import BlockMask

    hq = q.shape[1]
    group = hq // k.shape[1]
    is_vert = torch.zeros(vert.shape[0], vert.shape[1], seqlen, dtype=torch.bool,
                          device=q.device)
    is_vert.scatter_(-1, vert, True)
    is_vert = is_vert.repeat_interleave(group, 1)
    dense_q = dense.repeat_interleave(group, 1)
    cov = cover128.repeat_heads(hq)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (is_vert[b, h, kv_idx]
                                    | dense_q[b, h, q_idx // block, kv_idx // block])
    bm = BlockMask.from_kv_blocks(cov.counts, cov.indices.clamp(min=0).contiguous(),
                                  BLOCK_SIZE=(128, 128), mask_mod=mask_mod,
                                  seq_lengths=(seqlen, seqlen))
    return prov.flex(q, k, v, bm)


# ----------------------------------------------------------------------------------- runs
def _time(args, fn):
    return time_provider(fn, warmup=args.warmup, rep=args.rep)


def run_pair(args, q, k, v, row, stripe, blocks: dict, flex_fn=None):
    """Time the stripe kernel and the block-sparse kernel(s) at their layouts (validated once),
    with the output spot check (max |stripe - block| where both attend the same pairs)."""
    s, d = row["seqlen"], row["head_dim"]
    rows = []
    dens = stripe.density(s, s, causal=True)
    r = {**row, "provider": "ours", "density": dens,
         "tflop": attention_tflop(args.batch, args.heads, d, dens * causal_pairs(s))}
    out_s = None
    if args.dry_run:
        stripe.validate(s, s)  # indices sorted, in range, outside the dense blocks
        rows.append({**r, "note": "dry run"})
    elif "ours" in args.providers:
        out_s, note = guarded(stripe_attention, q, k, v, stripe, check_indices=True)
        t = (_time(args, lambda: stripe_attention(q, k, v, stripe, check_indices=False))
             if note is None else {"available": False, "ms": None, "note": note})
        rows.append({**r, **t, "tflops": tflops(r["tflop"], t["ms"])})
    for name, lay in blocks.items():
        bd = lay.density(s, s, causal=True)
        b = {**row, "provider": name, "density": bd,
             "tflop": attention_tflop(args.batch, args.heads, d, bd * causal_pairs(s))}
        if args.dry_run:
            lay.validate(s, s)
            rows.append({**b, "note": "dry run"})
            continue
        if "block_sparse" not in args.providers:
            continue
        out_b, note = guarded(block_sparse_attention, q, k, v, lay, check_indices=True)
        t = (_time(args, lambda: block_sparse_attention(q, k, v, lay, check_indices=False))
             if note is None else {"available": False, "ms": None, "note": note})
        # different pairs from the stripe layout's (same count in (a), a superset in (b)):
        # no output comparison; tests/test_stripe.py checks the kernels against each other
        b.update(t, tflops=tflops(b["tflop"], t["ms"]))
        rows.append(b)
        del out_b
    if flex_fn is not None and "flex" in args.providers and not args.dry_run:
        fn, note = guarded(flex_fn)
        t = _time(args, fn) if fn else {"available": False, "ms": None, "note": note}
        f = {**row, "provider": "flex", "density": dens, "tflop": r["tflop"], **t,
             "tflops": tflops(r["tflop"], t["ms"])}
        if fn is not None and out_s is not None and t["available"]:
            out_f, _ = guarded(fn)
            if out_f is not None:
                f["maxdiff"] = max_abs_diff(out_s, out_f)
            del out_f
        rows.append(f)
        del fn
    stripe_ms = next((x.get("ms") for x in rows if x["provider"] == "ours"), None)
    for x in rows:
        if x["provider"] != "ours" and x.get("ms") and stripe_ms:
            x["vs_block"] = stripe_ms / x["ms"]
    print("  " + row["pattern"] + ": " + ", ".join(
        f"{x['provider']} {x['ms']:.4g} ms (density {x['density']:.4f})" if x.get("ms")
        else f"{x['provider']} n/a" for x in rows), flush=True)
    del out_s
    free_cuda()
    return rows


def tune_rows(args, budget) -> list[dict]:
    """At the first seqlen and each of --tune-counts: the block-sparse kernel at (a)'s block
    layout, the stripe kernel at each of --tune-configs, and the default config on stripes that
    are the block layout's contiguous rows (``ours_contig``); ``x_block`` = that row's ms /
    block-sparse ms."""
    from sparse_attn.kernels.stripe import default_config, stripe_fwd

    s, d = args.seqlens[0], args.head_dim
    if args.dry_run or not args.tune_configs:
        return []
    qkv, note = guarded(random_qkv, args, s, d, args.device, args.seed)
    if note:
        return [{**base_row(args, "tune", s, d), "provider": "-", "note": f"inputs: {note}"}]
    q, k, v = qkv
    default = default_config(d, q.dtype, q.device)
    rows = []
    for n in args.tune_counts:
        base = {**base_row(args, "tune", s, d), "pattern": f"N={n} positions/qblock"}
        stripe, block, contig = gather_layouts(args.batch, args.kv_heads, s, n, args.block,
                                               args.device, args.seed + n, contiguous=True)
        stripe.validate(s, s)
        contig.validate(s, s)
        dens = stripe.density(s, s, causal=True)
        tflop = attention_tflop(args.batch, args.heads, d, dens * causal_pairs(s))
        runs = [("block_sparse", "-", block, None)]
        runs += [("ours", "/".join(map(str, cfg)), stripe, cfg) for cfg in args.tune_configs]
        runs.append(("ours_contig", "/".join(map(str, default)), contig, default))
        block_ms = None
        for provider, name, lay, cfg in runs:
            row = {**base, "provider": provider, "config": name, "density": dens,
                   "tflop": tflop}
            if budget.spent():
                rows.append({**row, "note": "skipped: time budget spent"})
                continue
            if cfg is None:
                def fn(lay=lay):
                    return block_sparse_attention(q, k, v, lay, check_indices=False)
            else:
                def fn(lay=lay, cfg=cfg):
                    return stripe_fwd(q, k, v, lay, causal=True, scale=d ** -0.5,
                                      softmax_threshold=None, return_lse=False, config=cfg)[0]
            t = _time(args, fn)
            row.update(t, tflops=tflops(tflop, t.get("ms")),
                       note=("default; " if cfg == default else "") + (t.get("note") or ""))
            if provider == "block_sparse":
                block_ms = t.get("ms")
            elif t.get("ms") and block_ms:
                row["x_block"] = t["ms"] / block_ms
            rows.append(row)
            print(f"  tune N={n} {provider} {name}: "
                  + (f"{t['ms']:.4g} ms" + (f" ({row['x_block']:.2f} x block)"
                                             if row.get("x_block") else "")
                     if t.get("ms") else t["note"]), flush=True)
        del stripe, block, contig
    del q, k, v, qkv
    free_cuda()
    return rows


def add_speedups(rows):
    dense = {(r["seqlen"], r["provider"]): r["ms"] for r in rows
             if r["provider"] in ("sdpa_flash", "sdpa_cudnn") and r.get("ms")}
    for r in rows:
        for name, col in (("sdpa_flash", "vs_flash"), ("sdpa_cudnn", "vs_cudnn")):
            if r.get("ms") and (r["seqlen"], name) in dense and r["provider"] != name:
                r[col] = dense[(r["seqlen"], name)] / r["ms"]


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqlens = sorted({r["seqlen"] for r in rows})
    if not seqlens:
        return
    fig, axes = plt.subplots(1, len(seqlens), figsize=(6.5 * len(seqlens), 4.5), squeeze=False)
    colors = {"ours": "tab:red", "block_sparse": "tab:blue", "block_sparse_128": "tab:cyan",
              "flex": "tab:purple", "sdpa_flash": "tab:gray", "sdpa_cudnn": "tab:green"}
    for ax, s in zip(axes.flat, seqlens):
        sel = [r for r in rows if r["seqlen"] == s and r.get("ms")]
        for r in sel:
            if r["provider"].startswith("sdpa"):
                ax.axhline(r["ms"], color=colors[r["provider"]], ls="--", lw=1)
        for sec, marker in (("gather", "o"), ("vertical", "s")):
            for p in ("ours", "block_sparse", "block_sparse_128", "flex"):
                pts = sorted((r["density"], r["ms"]) for r in sel
                             if r["section"] == sec and r["provider"] == p)
                if pts:
                    ax.plot(*zip(*pts), marker=marker, ls="-" if sec == "gather" else ":",
                            color=colors[p], label=f"{p} ({sec})")
        ax.set(xscale="log", yscale="log", xlabel="density (causal area)", ylabel="ms",
               title=f"S={s // 1024}k (dashed: dense SDPA flash / cuDNN)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if not args.dry_run and args.device == "cuda":
        require_cuda("bench_stripe.py")
    info = env_info()
    meta = run_meta(info)
    print(env_line(info), flush=True)
    prov = Providers(args)
    budget = Budget(args.budget_s)
    rows: list[dict] = []
    exit_on_sigterm()
    d, dev, h = args.head_dim, args.device, args.kv_heads
    try:
        for s in ([] if args.tune_only else args.seqlens):
            print(f"[{budget.elapsed():6.0f}s] S={s} D={d}", flush=True)
            base = base_row(args, "dense", s, d)
            if budget.spent():
                rows.append({**base, "provider": "-", "note": "skipped: time budget spent"})
                continue
            q = k = v = None
            if not args.dry_run:
                qkv, note = guarded(random_qkv, args, s, d, dev, args.seed)
                if note:
                    rows.append({**base, "provider": "-", "note": f"inputs: {note}"})
                    continue
                q, k, v = qkv
                new, ref = dense_rows(args, prov, q, k, v, s, d, "dense", False)
                for r in new:
                    r["pattern"] = "dense causal"
                rows.extend(new)
                del ref
            for n in args.stripe_counts:
                row = {**base_row(args, "gather", s, d), "pattern": f"N={n} positions/qblock"}
                if budget.spent():
                    rows.append({**row, "provider": "-", "note": "skipped: time budget spent"})
                    continue
                lays, note = guarded(gather_layouts, args.batch, h, s, n, args.block, dev,
                                     args.seed + n)
                if note:
                    rows.append({**row, "provider": "-", "note": f"layout: {note}"})
                    continue
                stripe, block = lays
                rows.extend(run_pair(args, q, k, v, row, stripe, {"block_sparse": block}))
                del stripe, block, lays
            for nv in args.verticals:
                row = {**base_row(args, "vertical", s, d),
                       "pattern": f"sink+window {args.window}+{nv} verticals"}
                if budget.spent():
                    rows.append({**row, "provider": "-", "note": "skipped: time budget spent"})
                    continue
                lays, note = guarded(vertical_layouts, args.batch, h, s, nv, args.window,
                                     args.block, dev, args.seed + nv)
                if note:
                    rows.append({**row, "provider": "-", "note": f"layout: {note}"})
                    continue
                stripe, covers, vert, dense = lays
                blocks = {("block_sparse" if bs == args.block else f"block_sparse_{bs}"): lay
                          for bs, lay in covers.items()}
                flex_fn = (lambda: flex_exact(prov, q, k, v, vert, dense, covers[128],
                                              args.block, s))
                rows.extend(run_pair(args, q, k, v, row, stripe, blocks, flex_fn))
                del stripe, covers, vert, dense, lays, blocks, flex_fn
            del q, k, v
            free_cuda()
            add_speedups(rows)
            write_results(rows, args.out, STEM, meta=meta)
        rows.extend(tune_rows(args, budget))
    finally:
        add_speedups(rows)
        paths = write_results(rows, args.out, STEM, meta=meta)
        try:
            plot(rows, f"{args.out}/{STEM}.png")
            paths.append(f"{args.out}/{STEM}.png")
        except Exception as err:  # noqa: BLE001 - a plot failure must not lose the tables
            print(f"plot failed: {err!r}", flush=True)
        print(f"\n{env_line(info)}\n{meta['command']}  ({budget.elapsed():.0f} s)")
        print_table(rows, COLUMNS, title="\nstripe attention (ms; ours/this = stripe ms / that "
                                         "row's ms; x = speedup over dense)")
        print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    if args.dry_run:
        bad = [r for r in rows if r["section"] == "gather" and r["provider"] == "block_sparse"
               and abs(r["density"] - next(x["density"] for x in rows if x["section"] == "gather"
                                           and x["provider"] == "ours"
                                           and x["pattern"] == r["pattern"]
                                           and x["seqlen"] == r["seqlen"])) > 1e-9]
        if bad:
            sys.exit(f"LAYOUT CHECK FAILED: stripe and block layouts differ in density: {bad}")
        print("dry run: (a) stripe and block layouts attend the same number of pairs")


if __name__ == "__main__":
    main()
