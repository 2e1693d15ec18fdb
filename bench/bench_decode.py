"""decode_attention (flash-decoding, dense / top-k pages / paged) against dense decode baselines.

One query token per sequence, 32 query / 8 KV heads, d=128, bf16, batch 1 and 8, 128k cache.
Sections, most important first (a spent --budget-s skips the rest, results still written):

- copy: device-to-device copy bandwidth of a large tensor (torch ``copy_``), the yardstick;
- dense: ours (contiguous and paged) vs SDPA with every backend that takes the shape (native
  GQA, else K/V expanded), FlexAttention decode (compiled), flash-attn's
  ``flash_attn_with_kvcache`` if importable; ms, achieved bandwidth (K/V bytes read / time) and
  its share of the copy bandwidth, speedup vs the best baseline, max |ours - SDPA|;
- topk: ours on selected pages (1/8, 1/16, 1/32 of the pages; contiguous and paged) vs ours
  dense; target: 1/16 >= 8x faster;
- quest: QuestSelector build (after prefill), update (one token), select at 1/16, and
  select + sparse decode as one step;
- sweep: splits and (BLOCK_N, warps, stages) for dense decode (defaults in kernels/decode.py).

Times are ``triton.testing.do_bench`` medians (eager: a launch-bound call shows its host time,
``host_ms``) and CUDA-graph replays with the L2 cache flushed before every call
(``graph_ms``: the GPU time a decode loop under CUDA graphs sees). Speedups use graph_ms.

    python bench/bench_decode.py --out bench/out --budget-s 270      # H100
    python bench/bench_decode.py --quick --out bench/out             # small sizes
Without a GPU it runs the same code at toy sizes on the CPU (Triton interpreter): a smoke test.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _common import (DTYPES, Budget, env_info, env_line, exit_on_sigterm, free_cuda,  # noqa: E402
                     guarded, parse_list, print_table, run_meta, time_provider, write_results)

import sparse_attn  # noqa: E402
from sparse_attn.estimators import QuestSelector  # noqa: E402

STEM = "bench_decode"
SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
COLUMNS = [("section", "section", None), ("batch", "B", None), ("seqlen", "S", None),
           ("provider", "provider", None), ("fraction", "frac", ".4g"), ("ms", "ms", ".4g"),
           ("graph_ms", "graph ms", ".4g"), ("host_ms", "host ms", ".3g"),
           ("gbps", "GB/s", ".0f"), ("bw_frac", "of copy", ".2f"),
           ("speedup", "speedup", ".2f"), ("note", "note", None)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--seqlen", default="128k")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--page", type=int, default=64, help="page / block size")
    ap.add_argument("--fractions", default="0.125,0.0625,0.03125")
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.cuda = torch.cuda.is_available()
    args.device = "cuda" if args.cuda else "cpu"
    args.batches = parse_list(args.batches, int)
    args.seqlen = parse_list(args.seqlen, int)[0]
    args.fractions = parse_list(args.fractions, float)
    if args.quick:
        args.seqlen = min(args.seqlen, 16384)
        args.warmup, args.rep = 10, 30
    if not args.cuda:  # CPU smoke run through the interpreter
        args.seqlen, args.heads, args.kv_heads, args.head_dim = 512, 4, 2, 64
        args.batches, args.dtype, args.page = [1, 2], "fp32", 32
        args.warmup, args.rep = 1, 1
    return args


# ------------------------------------------------------------------------------- timing
def graph_ms(fn, calls: int = 20, flush_bytes: int = 256 * 2**20) -> float | None:
    """GPU ms per call of ``fn`` replayed in a CUDA graph, the L2 flushed before each call:
    (graph of [flush, fn] x calls - graph of [flush] x calls) / calls."""
    if not torch.cuda.is_available():
        return None
    buf = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as graph capture wants
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graphs = []
    for with_fn in (True, False):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                buf.zero_()
                if with_fn:
                    fn()
        graphs.append(g)

    def replay_ms(g):
        g.replay()
        times = []
        for _ in range(5):
            start, stop = torch.cuda.Event(True), torch.cuda.Event(True)
            start.record()
            g.replay()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        return sorted(times)[2]

    both, flush = (replay_ms(g) for g in graphs)
    del graphs, buf
    return max(0.0, (both - flush) / calls)


def timed(fn, args, *, graph: bool = True) -> dict:
    res = time_provider(fn, warmup=args.warmup, rep=args.rep)
    if res["available"] and graph and args.cuda:
        g, note = guarded(graph_ms, fn)
        res["graph_ms"] = g
        if note:
            res["note"] = f"no graph: {note}"
    return res


def copy_bandwidth(args) -> dict:
    """GB/s of ``dst.copy_(src)`` (read + write bytes) on a large tensor."""
    n = (2 * 2**30 if not args.quick else 256 * 2**20) if args.cuda else 2**22
    src = torch.empty(n, dtype=torch.uint8, device=args.device)
    dst = torch.empty_like(src)
    res = time_provider(lambda: dst.copy_(src), warmup=args.warmup, rep=args.rep)
    gbps = 2 * n / (res["ms"] * 1e-3) / 1e9 if res["ms"] else None
    del src, dst
    free_cuda()
    return {"section": "copy", "provider": "torch copy_", "bytes": n, **res, "gbps": gbps}


# ------------------------------------------------------------------------------ providers
def make_inputs(args, batch):
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=args.device).manual_seed(args.seed + batch)
    s, d = args.seqlen, args.head_dim

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=args.device, dtype=dtype)

    q = rand(batch, args.heads, 1, d)
    k, v = rand(batch, args.kv_heads, s, d), rand(batch, args.kv_heads, s, d)
    lens = torch.full((batch,), s, dtype=torch.int32, device=args.device)
    return q, k, v, lens


def to_paged(k, page):
    """[B, Hkv, S, D] -> pages [B * S / page, page, Hkv, D] in a shuffled order, block table."""
    b, hkv, s, d = k.shape
    n = s // page
    pages = k.reshape(b, hkv, n, page, d).permute(0, 2, 3, 1, 4).reshape(b * n, page, hkv, d)
    gen = torch.Generator(device=k.device).manual_seed(1)
    perm = torch.randperm(b * n, generator=gen, device=k.device)
    pool = torch.empty_like(pages)
    pool[perm] = pages
    return pool, perm.view(b, n).to(torch.int32)


def sdpa_fn(backend, q, k, v, gqa_mode):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    if gqa_mode == "expand" and group > 1:
        k, v = (t.repeat_interleave(group, 1) for t in (k, v))
    be = getattr(SDPBackend, backend)

    def fn():
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa_mode == "native")
    return fn


_FLEX = None


def flex_fn(q, k, v):
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return lambda: _FLEX(q, k, v, enable_gqa=q.shape[1] != k.shape[1])


def flash_attn_fn(q, k, v, lens):
    from flash_attn import flash_attn_with_kvcache  # optional

    qt = q.transpose(1, 2).contiguous()
    kt, vt = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    return lambda: flash_attn_with_kvcache(qt, kt, vt, cache_seqlens=lens)


def ours_fn(q, k, v, **kw):
    return lambda: sparse_attn.decode_attention(q, k, v, check_indices=False, **kw)


def kv_bytes(args, batch, keys_per_seq) -> float:
    return 2.0 * batch * args.kv_heads * keys_per_seq * args.head_dim * DTYPES[args.dtype].itemsize


def add_bw(row, args, copy_gbps, nbytes):
    ms = row.get("graph_ms") or row.get("ms")
    if ms:
        row["gbps"] = nbytes / (ms * 1e-3) / 1e9
        if copy_gbps:
            row["bw_frac"] = row["gbps"] / copy_gbps
    return row


def random_selection(args, batch, fraction, gen_seed=0):
    """Sorted random pages [B, Hkv, n/16], the last page always in."""
    n_pages = args.seqlen // args.page
    nsel = max(1, round(n_pages * fraction))
    gen = torch.Generator(device=args.device).manual_seed(gen_seed)
    scores = torch.rand(batch, args.kv_heads, n_pages, generator=gen, device=args.device)
    scores[..., -1] = 2.0
    return scores.topk(nsel, -1).indices.sort(-1).values.to(torch.int32)


# ------------------------------------------------------------------------------- sections
def dense_section(args, batch, copy_gbps, budget):
    q, k, v, lens = make_inputs(args, batch)
    base = {"section": "dense", "batch": batch, "seqlen": args.seqlen, "fraction": 1.0}
    nbytes = kv_bytes(args, batch, args.seqlen)
    rows, ref = [], None
    for backend in SDPA_BACKENDS:
        if budget.spent():
            break
        row, notes = {**base, "provider": f"sdpa_{backend.lower()}"}, []
        for mode in ("native", "expand"):  # GQA in the kernel, else K/V expanded beforehand
            fn, note = guarded(sdpa_fn, backend, q, k, v, mode)
            res = timed(fn, args) if fn else {"available": False, "note": note}
            if res["available"]:
                row.update(res, gqa=mode, note="; ".join(notes))
                if ref is None:
                    ref, _ = guarded(fn)
                break
            notes.append(f"{mode}: {res['note']}")
            row.update(res, note="; ".join(notes))
            del fn
            free_cuda()
        fn = None  # drop expanded K/V before the next backend
        free_cuda()
        rows.append(add_bw(row, args, copy_gbps, nbytes))
    if not budget.spent():
        fn, note = guarded(flex_fn, q, k, v)
        res = timed(fn, args) if fn else {"available": False, "note": note}
        rows.append(add_bw({**base, "provider": "flex", **res}, args, copy_gbps, nbytes))
    fn, note = guarded(flash_attn_fn, q, k, v, lens)
    res = timed(fn, args) if fn else {"available": False, "note": note}
    rows.append(add_bw({**base, "provider": "flash_attn", **res}, args, copy_gbps, nbytes))
    del fn
    free_cuda()

    out, note = guarded(sparse_attn.decode_attention, q, k, v, cache_seqlens=lens)
    ours = {**base, "provider": "ours", **timed(ours_fn(q, k, v, cache_seqlens=lens), args)}
    if out is not None and ref is not None:
        ours["maxdiff_vs_sdpa"] = float((out.float() - ref.float()).abs().max())
        ours["note"] = f"max|ours-sdpa| {ours['maxdiff_vs_sdpa']:.2e}"
    rows.append(add_bw(ours, args, copy_gbps, nbytes))
    kp, table = to_paged(k, args.page)
    vp, _ = to_paged(v, args.page)
    del out, ref
    free_cuda()
    paged = {**base, "provider": f"ours_paged{args.page}",
             **timed(ours_fn(q, kp, vp, cache_seqlens=lens, block_table=table), args)}
    rows.append(add_bw(paged, args, copy_gbps, nbytes))
    key = lambda r: r.get("graph_ms") or r.get("ms")  # noqa: E731
    baselines = [r for r in rows if not r["provider"].startswith("ours") and key(r)]
    if baselines:
        best = min(baselines, key=key)
        for r in rows:
            if r["provider"].startswith("ours") and key(r):
                r["speedup"] = key(best) / key(r)
                r["vs"] = best["provider"]
    return rows, (q, k, v, lens, kp, vp, table)


def topk_section(args, batch, tensors, dense_ms, copy_gbps):
    q, k, v, lens, kp, vp, table = tensors
    rows = []
    for frac in args.fractions:
        idx = random_selection(args, batch, frac, gen_seed=batch)
        nsel = idx.shape[-1]
        nbytes = kv_bytes(args, batch, nsel * args.page)
        for name, fn in (
                ("ours_topk", ours_fn(q, k, v, cache_seqlens=lens, block_indices=idx,
                                      block_size=args.page)),
                (f"ours_topk_paged{args.page}",
                 ours_fn(q, kp, vp, cache_seqlens=lens, block_indices=idx, block_table=table))):
            row = {"section": "topk", "batch": batch, "seqlen": args.seqlen, "provider": name,
                   "fraction": nsel / (args.seqlen // args.page), "pages": nsel, **timed(fn, args)}
            ms = row.get("graph_ms") or row.get("ms")
            if ms and dense_ms:
                row["speedup"] = dense_ms / ms
                row["vs"] = "ours dense"
            rows.append(add_bw(row, args, copy_gbps, nbytes))
    return rows


def quest_section(args, batch, tensors, dense_ms):
    q, k, v, lens, *_ = tensors
    n_pages = args.seqlen // args.page
    quest = QuestSelector(page_size=args.page, density=1 / 16)
    base = {"section": "quest", "batch": batch, "seqlen": args.seqlen, "fraction": 1 / 16}
    rows = []
    meta, note = guarded(quest.build, k, cache_seqlens=lens)
    if meta is None:
        return [{**base, "provider": "quest_build", "available": False, "note": note}]
    rows.append({**base, "provider": "quest_build",
                 **timed(lambda: quest.build(k, cache_seqlens=lens, out=meta), args,
                         graph=False)})  # once per prefill: its temporaries stay out of graphs
    # update with the last key again (lens unchanged): the same work as after an append
    rows.append({**base, "provider": "quest_update",
                 **timed(lambda: quest.update(meta, k, cache_seqlens=lens), args)})
    rows.append({**base, "provider": "quest_select",
                 **timed(lambda: quest.select(q, meta, cache_seqlens=lens), args)})

    def step():
        idx = quest.select(q, meta, cache_seqlens=lens)
        return sparse_attn.decode_attention(q, k, v, cache_seqlens=lens, block_indices=idx,
                                            block_size=args.page, check_indices=False)
    row = {**base, "provider": "quest_select+decode", **timed(step, args)}
    ms = row.get("graph_ms") or row.get("ms")
    if ms and dense_ms:
        row["speedup"] = dense_ms / ms
        row["vs"] = "ours dense"
    rows.append(row)
    for r in rows:
        r["pages"] = quest.num_selected(n_pages)
    return rows


def sweep_section(args, batch, tensors, copy_gbps, budget):
    from sparse_attn.kernels.decode import decode_fwd

    q, k, v, lens, *_ = tensors
    scale = args.head_dim ** -0.5
    nbytes = kv_bytes(args, batch, args.seqlen)
    configs = [None, (64, 4, 2), (64, 4, 4), (32, 4, 4), (128, 4, 2), (64, 8, 3)]
    splits = [None, 8, 16, 24, 32, 48, 64, 128]
    rows = []
    for cfg in configs:
        for ns in splits if cfg is None else [None]:
            if budget.spent():
                return rows
            fn = lambda ns=ns, cfg=cfg: decode_fwd(  # noqa: E731
                q, k, v, block_indices=None, cache_seqlens=lens, block_table=None,
                block_size=args.page, scale=scale, softmax_threshold=None, return_lse=False,
                num_splits=ns, config=cfg)
            row = {"section": "sweep", "batch": batch, "seqlen": args.seqlen,
                   "provider": f"ours splits={ns or 'auto'} cfg={cfg or 'default'}",
                   "fraction": 1.0, **timed(fn, args)}
            rows.append(add_bw(row, args, copy_gbps, nbytes))
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    dense = [r for r in rows if r["section"] == "dense" and (r.get("graph_ms") or r.get("ms"))]
    labels = [f"B{r['batch']} {r['provider']}" for r in dense]
    axes[0].barh(labels, [r.get("graph_ms") or r["ms"] for r in dense])
    axes[0].set_xlabel("ms (CUDA graph, L2 flushed; eager where no graph)")
    axes[0].set_xscale("log")
    axes[0].set_title("dense decode")
    for batch in sorted({r["batch"] for r in rows if r["section"] == "topk"}):
        for prov in sorted({r["provider"] for r in rows if r["section"] == "topk"}):
            pts = sorted((r["fraction"], r["speedup"]) for r in rows
                         if r["section"] == "topk" and r["batch"] == batch
                         and r["provider"] == prov and r.get("speedup"))
            if pts:
                axes[1].plot(*zip(*pts), marker="o", label=f"B{batch} {prov}")
    axes[1].axhline(8, ls="--", c="grey", lw=0.8)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("fraction of pages")
    axes[1].set_ylabel("speedup vs ours dense")
    axes[1].legend(fontsize=7)
    axes[1].set_title("top-k page decode")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    exit_on_sigterm()
    budget = Budget(args.budget_s)
    info = env_info()
    print(f"{STEM}: {env_line(info)}", flush=True)
    rows, sections = [], {}
    try:
        copy = copy_bandwidth(args)
        rows.append(copy)
        copy_gbps = copy.get("gbps")
        print(f"copy bandwidth {copy_gbps and round(copy_gbps)} GB/s", flush=True)
        state = {}
        for batch in args.batches:  # dense first for every batch: the headline numbers
            if budget.spent():
                rows.append({"section": "dense", "batch": batch, "note": "skipped: budget"})
                continue
            dense, tensors = dense_section(args, batch, copy_gbps, budget)
            rows.extend(dense)
            ours = next(r for r in dense if r["provider"] == "ours")
            state[batch] = (tensors, ours.get("graph_ms") or ours.get("ms"))
            print_table(dense, COLUMNS, title=f"dense decode, batch {batch}")
            if len(args.batches) > 1:  # keep at most one batch's caches alive
                state[batch] = (None, state[batch][1])
                del tensors
                free_cuda()
        for batch in args.batches:
            if batch not in state or budget.spent():
                continue
            tensors = state[batch][0]
            if tensors is None:
                q, k, v, lens = make_inputs(args, batch)
                kp, table = to_paged(k, args.page)
                vp, _ = to_paged(v, args.page)
                tensors = (q, k, v, lens, kp, vp, table)
            dense_ms = state[batch][1]
            for name, work in (("topk", lambda: topk_section(args, batch, tensors, dense_ms,
                                                             copy_gbps)),
                               ("quest", lambda: quest_section(args, batch, tensors, dense_ms)),
                               ("sweep", lambda: sweep_section(args, batch, tensors, copy_gbps,
                                                               budget))):
                if budget.spent():
                    rows.append({"section": name, "batch": batch, "note": "skipped: budget"})
                    continue
                part, note = guarded(work)
                part = part or [{"section": name, "batch": batch, "available": False,
                                 "note": note}]
                rows.extend(part)
                print_table(part, COLUMNS, title=f"{name}, batch {batch}")
            del tensors
            free_cuda()
    finally:
        meta = run_meta(info)
        meta.update(seqlen=args.seqlen, heads=args.heads, kv_heads=args.kv_heads,
                    head_dim=args.head_dim, dtype=args.dtype, page=args.page,
                    budget_s=args.budget_s, elapsed_s=round(budget.elapsed(), 1))
        paths = write_results(rows, args.out, STEM, meta=meta)
        _, note = guarded(plot, rows, f"{args.out}/{STEM}.png")
        if note:
            print(f"no plot: {note}")
        print("wrote", ", ".join(str(p) for p in paths), flush=True)


if __name__ == "__main__":
    sys.exit(main())
