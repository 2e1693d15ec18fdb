"""Sweep the block-sparse kernel's tile configs per head dim; print the best as _HOPPER_CONFIGS.

Times ``block_sparse_fwd(..., config=(BLOCK_M, BLOCK_N, num_warps, num_stages))`` at 32k, bf16,
32/8 heads, causal, on a dense layout and on a random per-KV-head layout of density 0.1, and
ranks configs by the geometric mean of their time relative to the fastest at each density.
Configs that cannot fit shared memory are pruned up front; those that fail to compile or run
are skipped. Compilation runs first in --jobs worker processes (Triton's on-disk cache hands
the binaries to this process), so the sweep fits in a few minutes.

    python bench/tune_block_sparse.py --out bench/out   # H100: ~70 s
    python bench/tune_block_sparse.py --dry-run          # the grid and the output, no GPU
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import sys
import time

import torch

from _common import (DTYPES, Budget, add_shape_args, bench_ms, env_info, env_line,
                     exit_on_sigterm, free_cuda, guarded, parse_list, print_table, random_layout,
                     random_qkv, require_cuda, run_meta, write_results)
from sparse_attn import BlockLayout

STEM = "tune_block_sparse"
SMEM_BYTES = 232448  # Hopper: 227 KiB of shared memory per block
TOLERANCE = 2e-2     # max |out - out(default config)|: a wrong config is not a fast one


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", default="32k")
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--densities", default="1,0.1")
    add_shape_args(ap)
    ap.add_argument("--block-m", default="64,128")
    ap.add_argument("--block-n", default="32,64,128")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--full-grid", action="store_true",
                    help="no pruning (BLOCK_N=32 at d<=128, shared-memory estimate)")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="worker processes that compile ahead (0: compile inline)")
    ap.add_argument("--warmup", type=int, default=5, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=50, help="do_bench repetitions (ms)")
    ap.add_argument("--budget-s", type=float, default=220.0,
                    help="stop timing new configs after this many seconds")
    ap.add_argument("--quick", action="store_true", help="one head dim, small grid, 8k")
    ap.add_argument("--dry-run", action="store_true",
                    help="no CUDA: print the pruned grid and fake the timings")
    args = ap.parse_args(argv)
    if args.quick:
        args.seqlen, args.head_dims, args.stages, args.warps = "8k", "128", "2,3", "4"
    args.seqlen = parse_list(args.seqlen, int)[0]
    for name in ("head_dims", "block_m", "block_n", "warps", "stages"):
        setattr(args, name, parse_list(getattr(args, name), int))
    args.densities = parse_list(args.densities)
    return args


def smem_estimate(config, head_dim, elt=2) -> int:
    """The Q tile plus max(2, stages - 1) K and V tiles: it separates the configs that ran from
    those Triton 3.6 refused for shared memory in an H100 sweep."""
    bm, bn, _, stages = config
    bd = max(16, 1 << (head_dim - 1).bit_length())
    return elt * (bm * bd + max(2, stages - 1) * 2 * bn * bd)


def grid(args, head_dim) -> tuple[list[tuple], list[dict]]:
    """(configs to try, pruned ones with the reason); the current default first."""
    from sparse_attn.kernels.block_sparse import _HOPPER_CONFIGS

    elt = DTYPES[args.dtype].itemsize
    keep, pruned = [], []
    for cfg in itertools.product(args.block_m, args.block_n, args.warps, args.stages):
        why = None
        if not args.full_grid:
            if cfg[1] == 32 and head_dim <= 128:
                why = "BLOCK_N=32 at d<=128"
            elif smem_estimate(cfg, head_dim, elt) > SMEM_BYTES:
                why = f"shared memory >= {smem_estimate(cfg, head_dim, elt) // 1024} KiB"
        if why:
            pruned.append({"head_dim": head_dim, "config": cfg, "note": f"pruned: {why}"})
        else:
            keep.append(cfg)
    current = _HOPPER_CONFIGS.get(head_dim)
    if current in keep:
        keep.remove(current)
        keep.insert(0, current)
    return keep, pruned


def make_layouts(args, device="cuda") -> dict[float, BlockLayout]:
    return {d: (BlockLayout.dense(args.batch, args.kv_heads, args.seqlen, causal=True,
                                  block_m=args.block, block_n=args.block, device=device)
                if d >= 1.0 else
                random_layout(args.batch, args.kv_heads, args.seqlen, d, block=args.block,
                              seed=args.seed, device=device))
            for d in args.densities}


def launch(q, k, v, layout, config):
    from sparse_attn.kernels.block_sparse import block_sparse_fwd

    return block_sparse_fwd(q, k, v, layout.counts, layout.indices, layout.block_m,
                            layout.block_n, causal=True, scale=q.shape[-1] ** -0.5,
                            softmax_threshold=None, return_lse=False, config=config)[0]


def _compile_worker(args, head_dim, configs):
    """In a worker process: launch each config once at the sweep's shapes, which leaves its
    binary in Triton's on-disk cache. Returns {config: None or the error note}."""
    q, k, v = random_qkv(args, args.seqlen, head_dim, "cuda", args.seed)
    layout = make_layouts(args)[max(args.densities)]
    notes = {}
    for cfg in configs:
        _, notes[cfg] = guarded(launch, q, k, v, layout, cfg)
    torch.cuda.synchronize()
    return notes


def precompile(args, work: dict[int, list], budget: Budget) -> dict:
    """Compile every (head dim, config) in worker processes; {(d, cfg): note or None}."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, wait

    tasks = [(d, work[d][i::args.jobs]) for d in work for i in range(args.jobs)]
    tasks = [t for t in tasks if t[1]]
    results = {}
    t0 = time.monotonic()
    pool = ProcessPoolExecutor(max_workers=args.jobs,
                               mp_context=multiprocessing.get_context("spawn"))
    futures = {pool.submit(_compile_worker, args, d, cfgs): (d, cfgs) for d, cfgs in tasks}
    remaining = None if args.budget_s is None else max(10.0, args.budget_s - budget.elapsed())
    done, not_done = wait(futures, timeout=remaining)
    for fut in done:
        d, cfgs = futures[fut]
        notes, err = guarded(fut.result)
        if notes is None:  # the worker itself failed: these compile inline later
            print(f"compile worker for d={d} failed ({err}); compiling inline", flush=True)
            continue
        results.update({(d, cfg): notes[cfg] for cfg in cfgs})
    for fut in not_done:
        d, cfgs = futures[fut]
        results.update({(d, cfg): "not compiled within the time budget" for cfg in cfgs})
    if not_done:
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()  # our own workers, stuck compiling: exit must not wait for them
    pool.shutdown(wait=not not_done, cancel_futures=True)
    failed = sum(v is not None for v in results.values())
    print(f"precompiled {len(results)} configs in {time.monotonic() - t0:.0f} s with "
          f"{args.jobs} workers ({failed} failed)", flush=True)
    return results


def sweep_head_dim(args, head_dim, configs, compiled, budget, dry) -> list[dict]:
    rows = []
    if dry:
        rng = random.Random(head_dim)
        for cfg in configs:
            for dens in args.densities:
                ms = head_dim / 128 * (16 if dens >= 1 else 16 * dens * 1.2) * rng.uniform(0.9, 1.4)
                rows.append(_row(head_dim, cfg, dens, ms, "dry run: fake timing"))
        return rows
    q, k, v = random_qkv(args, args.seqlen, head_dim, "cuda", args.seed)
    layouts = make_layouts(args)
    refs = {d: launch(q, k, v, lay, None) for d, lay in layouts.items()}
    for cfg in configs:
        note = compiled.get((head_dim, cfg))
        if budget.spent():
            note = "not run: time budget spent"
        for dens, layout in layouts.items():
            if note is not None:
                rows.append(_row(head_dim, cfg, dens, None, note))
                continue
            out, note = guarded(launch, q, k, v, layout, cfg)
            if out is not None:
                diff = float((out.float() - refs[dens].float()).abs().max())
                del out
                if not diff <= TOLERANCE:
                    note = f"wrong output: max|out - default| = {diff:.3g}"
            if note is None:
                timing, note = guarded(bench_ms, lambda: launch(q, k, v, layout, cfg),
                                       warmup=args.warmup, rep=args.rep)
            rows.append(_row(head_dim, cfg, dens, timing[0] if note is None else None,
                             note or ""))
        if rows[-1]["ms"]:
            print(f"  d={head_dim} {cfg}: " + ", ".join(
                f"{r['density']:g}: {r['ms']:.3f} ms" for r in rows[-len(layouts):]), flush=True)
    del q, k, v, refs, layouts
    free_cuda()
    return rows


def _row(head_dim, cfg, density, ms, note):
    bm, bn, w, s = cfg
    return {"head_dim": head_dim, "config": cfg, "block_m": bm, "block_n": bn, "num_warps": w,
            "num_stages": s, "density": density, "ms": ms, "note": note}


def rank(rows, densities) -> list[dict]:
    """One entry per config that ran at every density: ms per density and the score (geometric
    mean of ms / fastest ms at that density), best first."""
    best = {d: min((r["ms"] for r in rows if r["density"] == d and r["ms"]), default=None)
            for d in densities}
    by_cfg = {}
    for r in rows:
        if r["ms"]:
            by_cfg.setdefault(r["config"], {})[r["density"]] = r["ms"]
    ranked = []
    for cfg, ms in by_cfg.items():
        if len(ms) == len(densities):
            score = math.exp(sum(math.log(ms[d] / best[d]) for d in densities) / len(densities))
            ranked.append({"config": cfg, "ms": ms, "score": score})
    return sorted(ranked, key=lambda e: e["score"])


def report(args, rows, info) -> dict:
    from sparse_attn.kernels.block_sparse import _HOPPER_CONFIGS

    chosen, lines = {}, []
    for d in args.head_dims:
        ranked = rank([r for r in rows if r["head_dim"] == d], args.densities)
        table = [{"config": str(e["config"]), "score": e["score"],
                  **{f"ms@{x:g}": e["ms"][x] for x in args.densities}} for e in ranked[:6]]
        print_table(table, ["config", ("score", "score", ".3f"),
                            *[(f"ms@{x:g}", f"ms @ density {x:g}", ".3f")
                              for x in args.densities]],
                    title=f"\nhead dim {d}: best configs of {len(ranked)} that ran")
        if not ranked:
            lines.append(f"    # {d}: no config ran")
            continue
        top = ranked[0]
        chosen[d] = top["config"]
        current = next((e for e in ranked if e["config"] == _HOPPER_CONFIGS.get(d)), None)
        vs = (f"{current['score'] / top['score']:.2f}x vs current {current['config']}"
              if current else f"current {_HOPPER_CONFIGS.get(d)} did not run")
        times = ", ".join(f"{top['ms'][x]:.3f} ms @ {x:g}" for x in args.densities)
        lines.append(f"    {d}: {tuple(top['config'])},  # {times}; {vs}")
    densities = " and ".join(f"{x:g}" for x in args.densities)
    print(f"\n# {info['gpu']}, {args.dtype}, S={args.seqlen}, {args.heads}/{args.kv_heads} "
          f"heads, causal, densities {densities} (bench/tune_block_sparse.py)")
    print("_HOPPER_CONFIGS = {\n" + "\n".join(lines) + "\n}", flush=True)
    return chosen


def main(argv=None):
    args = parse_args(argv)
    dry = args.dry_run
    if not dry:
        require_cuda("tune_block_sparse.py")
    info = env_info()
    print(env_line(info), flush=True)
    meta = run_meta(info)
    budget = Budget(args.budget_s)
    exit_on_sigterm()
    work, pruned = {}, []
    for d in args.head_dims:
        work[d], p = grid(args, d)
        pruned.extend(p)
        print(f"head dim {d}: {len(work[d])} configs to time, {len(p)} pruned", flush=True)
    compiled = {}
    if not dry and args.jobs > 0:
        compiled = precompile(args, work, budget)
    rows = []
    try:
        for d in args.head_dims:
            print(f"[{budget.elapsed():5.0f}s] head dim {d}", flush=True)
            rows.extend(sweep_head_dim(args, d, work[d], compiled, budget, dry))
    finally:
        chosen = report(args, rows, info)
        meta.update(elapsed_s=round(budget.elapsed(), 1))
        paths = write_results(rows + [{**p, "density": None, "ms": None} for p in pruned],
                              args.out, STEM, meta=meta,
                              sections={"best": [{"head_dim": d, "config": c}
                                                 for d, c in chosen.items()]},
                              csv_files=False)
        print(f"wrote {paths[0]} ({budget.elapsed():.0f} s)", flush=True)
    failed = [r for r in rows if r["note"] and not r["note"].startswith("dry run")]
    if failed:
        print(f"{len(failed)} (config, density) runs skipped; first: "
              f"{failed[0]['config']}: {failed[0]['note']}")
    return 0 if chosen or not rows else 1


if __name__ == "__main__":
    sys.exit(main())
