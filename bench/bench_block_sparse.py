"""block_sparse_attention against dense SDPA (flash, cuDNN) and FlexAttention at the same mask.

Batch 1, 32 query / 8 KV heads, bf16, causal; random per-KV-head layouts that keep each query
block's diagonal and sink blocks. Reports ms (median, p20, p80), host ms per call (under 1 ms:
near ms means host-bound), TFLOP/s on computed blocks, density, speedups, and
max |ours - FlexAttention| (the BlockMask is built with `num_q_heads`); then a softmax-threshold (BLASST)
section on peaked and on random inputs. Writes <out>/bench_block_sparse.{json,csv,png} and
<out>/bench_block_sparse_threshold.csv.

    python bench/bench_block_sparse.py --out bench/out            # full run, H100: ~2 min
    python bench/bench_block_sparse.py --quick --out bench/out    # smoke run
    python bench/bench_block_sparse.py --dry-run --out bench/out  # no GPU: layouts, FLOPs, files
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from _common import (DTYPES, Budget, add_shape_args, attention_tflop, causal_pairs, env_info,
                     env_line, exit_on_sigterm, free_cuda, guarded, parse_list,
                     print_table, random_layout, random_qkv, require_cuda, run_meta, tflops,
                     time_provider, write_results)
from sparse_attn import BlockLayout, block_sparse_attention

STEM = "bench_block_sparse"
DENSE = ("sdpa_flash", "sdpa_cudnn")
PROVIDERS = (*DENSE, "flex", "ours")
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}
# FLOP rates (TFLOP/s) that --dry-run pretends to measure
FAKE_RATE = {"sdpa_flash": 330.0, "sdpa_cudnn": 560.0, "flex": 400.0, "ours": 450.0}

MAIN_COLUMNS = [
    ("seqlen", "S", None), ("head_dim", "D", None), ("density", "density", ".3f"),
    ("provider", "provider", None), ("ms", "ms", ".4g"), ("p20", "p20", ".4g"),
    ("p80", "p80", ".4g"), ("host_ms", "host ms", ".2g"), ("tflops", "TFLOP/s", ".0f"),
    ("vs_flash", "x flash", ".2f"),
    ("vs_cudnn", "x cuDNN", ".2f"), ("vs_flex", "x flex", ".2f"),
    ("maxdiff", "max|d|", ".2e"), ("note", "note", None),
]
THRESHOLD_COLUMNS = [
    ("inputs", "inputs", None), ("seqlen", "S", None), ("head_dim", "D", None),
    ("threshold", "threshold", ".0e"), ("ms", "ms", ".4g"), ("p20", "p20", ".4g"),
    ("p80", "p80", ".4g"), ("skipped", "skipped", ".3f"), ("rel_l2", "rel L2 err", ".2e"),
    ("vs_no_threshold", "x no-thr", ".2f"), ("vs_cudnn", "x cuDNN", ".2f"),
    ("note", "note", None),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="8k,32k,128k", help="main sweep sequence lengths")
    ap.add_argument("--densities", default="1,0.5,0.2,0.1,0.05",
                    help="target densities of the causal area")
    ap.add_argument("--head-dims", default="128,64,256",
                    help="the first runs the main sweep; the others at --extra-seqlens")
    ap.add_argument("--extra-seqlens", default="32k")
    ap.add_argument("--extra-densities", default="1,0.1")
    add_shape_args(ap)
    ap.add_argument("--per-query-head", action="store_true",
                    help="one layout per query head instead of per KV head")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--sdpa-gqa", choices=("auto", "native", "expand"), default="auto",
                    help="SDPA with enable_gqa=True (native), K/V expanded to the query heads, "
                         "or both, keeping the faster (auto)")
    ap.add_argument("--skip-128k-flex", action="store_true",
                    help="no FlexAttention at seqlen >= 128k")
    ap.add_argument("--thresholds", default="0,1e-4,1e-3,1e-2")
    ap.add_argument("--threshold-seqlens", default="32k,128k",
                    help="softmax-threshold section ('' to skip)")
    ap.add_argument("--threshold-inputs", default="peaked,random")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip what remains (noted in the table) after this many seconds")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: exercise the code paths only (the ops' torch reference, "
                         "wall-clock timing; SDPA backends may be unavailable)")
    ap.add_argument("--dry-run", action="store_true",
                    help="no CUDA: real layouts and FLOP counts, fake timings, all outputs")
    args = ap.parse_args(argv)
    if args.quick:
        args.seqlens, args.densities, args.extra_seqlens = "2k,4k", "1,0.3,0.1", "4k"
        args.head_dims, args.extra_densities, args.threshold_seqlens = "128,64", "1,0.1", "4k"
    args.seqlens = parse_list(args.seqlens, int)
    args.densities = parse_list(args.densities)
    args.head_dims = parse_list(args.head_dims, int)
    args.extra_seqlens = parse_list(args.extra_seqlens, int)
    args.extra_densities = parse_list(args.extra_densities)
    args.thresholds = parse_list(args.thresholds)
    args.threshold_seqlens = parse_list(args.threshold_seqlens, int)
    args.threshold_inputs = parse_list(args.threshold_inputs, str)
    args.providers = parse_list(args.providers, str)
    unknown = set(args.providers) - set(PROVIDERS)
    if unknown:
        ap.error(f"unknown providers {sorted(unknown)}; choose from {PROVIDERS}")
    if args.heads % args.kv_heads:
        ap.error("--heads must be a multiple of --kv-heads")
    return args


def plan(args) -> list[tuple]:
    """(section, seqlen, head_dim, densities or input kinds), most important first, so a spent
    budget drops the least important work."""
    main_d = args.head_dims[0]
    work = [("main", s, main_d, args.densities) for s in args.seqlens]
    thr = [("threshold", s, main_d, args.threshold_inputs) for s in args.threshold_seqlens]
    extra = [("head_dim", s, d, args.extra_densities)
             for d in args.head_dims[1:] for s in args.extra_seqlens]
    return work + thr[:1] + extra + thr[1:]


# ------------------------------------------------------------------------------- inputs
# logits (q.k / sqrt(D), in nats) that peaked_qkv plants
SINK_LOGIT = (10.0, 14.0)    # first SINK_TOKENS keys, spread over the KV heads
HEAVY_LOGIT = (2.0, 10.0)    # a HEAVY_SHARE of the other keys, uniform in this range
LOCAL_LOGIT = 6.0            # a RoPE-like recency bump at distance 0
SINK_TOKENS, HEAVY_SHARE = 4, 0.003


def peaked_qkv(args, seqlen, head_dim, device, seed):
    """Inputs whose attention concentrates like a trained LLM's: a few sink keys and heavy
    hitters share one strong direction per KV head that every query of the group follows, plus
    a RoPE-like recency term; the rest is noise (logit std ~1.5)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    b, hq, hkv, s, d = args.batch, args.heads, args.kv_heads, seqlen, head_dim
    group = hq // hkv
    nfreq = max(1, min(16, d // 8))  # the recency term lives in the first 2 * nfreq dims
    wavelength = torch.logspace(math.log10(8.0), math.log10(8192.0), nfreq, device=device)
    angle = torch.arange(s, device=device, dtype=torch.float32)[:, None] * (
        2 * math.pi / wavelength)
    # cos(w i) cos(w j) + sin(w i) sin(w j) = cos(w (i - j)): peaks at i = j
    rot = torch.stack((angle.cos(), angle.sin()), -1).flatten(1)  # [S, 2 nfreq]
    amp = math.sqrt(LOCAL_LOGIT * math.sqrt(d) / nfreq)
    # the strong direction, orthogonal to the recency dims
    u = torch.randn(b, hkv, d, generator=gen, device=device)
    u[..., : 2 * nfreq] = 0
    u = u / u.norm(dim=-1, keepdim=True)
    lo, hi = HEAVY_LOGIT
    strength = torch.where(
        torch.rand(b, hkv, s, generator=gen, device=device) < HEAVY_SHARE,
        lo + (hi - lo) * torch.rand(b, hkv, s, generator=gen, device=device), 0.0)
    strength[..., :SINK_TOKENS] = torch.linspace(*SINK_LOGIT, hkv, device=device)[None, :, None]
    # q carries c u and k carries (sqrt(D) / c) s u, so q.k / sqrt(D) gains s
    c = 0.5 * math.sqrt(d)
    k = torch.randn(b, hkv, s, d, generator=gen, device=device)
    k[..., : 2 * nfreq] += amp * rot
    k += strength[..., None] * (math.sqrt(d) / c) * u[:, :, None, :]
    q = 0.5 * torch.randn(b, hq, s, d, generator=gen, device=device)
    q[..., : 2 * nfreq] += amp * rot
    q += c * u.repeat_interleave(group, 1)[:, :, None, :]
    v = torch.randn(b, hkv, s, d, generator=gen, device=device)
    dtype = DTYPES[args.dtype]
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_layout(args, seqlen, density, device, seed) -> BlockLayout:
    heads = args.heads if args.per_query_head else args.kv_heads
    if density >= 1.0:
        return BlockLayout.dense(args.batch, heads, seqlen, causal=True, block_m=args.block,
                                 block_n=args.block, device=device)
    return random_layout(args.batch, heads, seqlen, density, block=args.block, seed=seed,
                         device=device)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Head by head, so 128k outputs need no fp32 copy of the whole tensor."""
    return max(float((a[:, h].float() - b[:, h].float()).abs().max()) for h in range(a.shape[1]))


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    num = sum(float((a[:, h].float() - ref[:, h].float()).square().sum())
              for h in range(a.shape[1]))
    den = sum(float(ref[:, h].float().square().sum()) for h in range(ref.shape[1]))
    return math.sqrt(num / max(den, 1e-30))


# ----------------------------------------------------------------------------- providers
class Providers:
    """The timed callables; each build may raise (recorded by the caller, never fatal)."""

    def __init__(self, args):
        self.args = args
        self.group = args.heads // args.kv_heads
        self._flex = None

    def sdpa(self, name, q, k, v, mode):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[name])
        native = mode == "native"
        if not native and self.group > 1:
            k, v = (t.repeat_interleave(self.group, 1) for t in (k, v))

        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                      enable_gqa=native)
        return fn

    def flex(self, q, k, v, block_mask):
        if self._flex is None:
            import torch._dynamo
            from torch.nn.attention.flex_attention import flex_attention

            # one compiled graph per (seqlen, head dim); masks are inputs, not recompiles
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, 256)
            self._flex = torch.compile(flex_attention, dynamic=False)
        gqa = q.shape[1] != k.shape[1]
        return lambda: self._flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)

    @staticmethod
    def ours(q, k, v, layout, **kw):
        return lambda: block_sparse_attention(q, k, v, layout, causal=True,
                                              check_indices=False, **kw)


def base_row(args, section, seqlen, head_dim):
    return {"section": section, "seqlen": seqlen, "head_dim": head_dim, "batch": args.batch,
            "heads": args.heads, "kv_heads": args.kv_heads, "dtype": args.dtype,
            "layout_heads": "query" if args.per_query_head else "kv"}


def fake_timing(provider: str, tflop: float, density: float = 1.0) -> dict:
    rate = FAKE_RATE[provider] * (0.8 if density < 0.3 and provider in ("ours", "flex") else 1)
    ms = tflop / rate * 1e3
    return {"available": True, "ms": ms, "p20": 0.98 * ms, "p80": 1.03 * ms,
            "tflops": rate, "note": "dry run: fake timing"}


def dense_rows(args, prov, q, k, v, seqlen, head_dim, section, dry):
    """SDPA flash and cuDNN rows (both GQA modes under --sdpa-gqa auto; the faster is kept),
    and the flash output for the density-1 check."""
    rows, ref = [], None
    tflop = attention_tflop(args.batch, args.heads, head_dim, causal_pairs(seqlen))
    modes = ("native", "expand") if args.sdpa_gqa == "auto" else (args.sdpa_gqa,)
    for name in DENSE:
        if name not in args.providers:
            continue
        row = {**base_row(args, section, seqlen, head_dim), "provider": name,
               "target_density": 1.0, "density": 1.0, "tflop": tflop}
        if dry:
            rows.append({**row, **fake_timing(name, tflop), "gqa_mode": modes[0]})
            continue
        results = {}
        for mode in modes:
            fn, note = guarded(prov.sdpa, name, q, k, v, mode)
            results[mode] = (time_provider(fn, warmup=args.warmup, rep=args.rep)
                             if fn else {"available": False, "ms": None, "note": note})
            del fn
            free_cuda()
        ok = {m: r for m, r in results.items() if r["available"]}
        if ok:
            mode = min(ok, key=lambda m: ok[m]["ms"])
            others = [f"{m}: " + (f"{r['ms']:.4g} ms" if r["available"] else r["note"])
                      for m, r in results.items() if m != mode]
            note = "; ".join([f"gqa={mode}", *others])
        else:
            mode = None
            notes = dict.fromkeys(r["note"] for r in results.values())
            note = f"unavailable ({', '.join(modes)}): " + " / ".join(notes)
        best = results[mode or modes[0]]
        rows.append({**row, **best, "note": note, "gqa_mode": mode,
                     "tflops": tflops(tflop, best["ms"])})
        print(f"  S={seqlen} D={head_dim} {name}: {note}"
              + (f", {best['ms']:.4g} ms" if best["available"] else ""), flush=True)
        if name == "sdpa_flash" and best["available"]:
            ref, _ = guarded(lambda: prov.sdpa(name, q, k, v, mode)())
        free_cuda()
    return rows, ref


def sparse_rows(args, prov, q, k, v, seqlen, head_dim, density, section, dry, flash_ref):
    """Ours and FlexAttention at one random layout, with the spot check."""
    device = "cpu" if dry else args.device
    seed = args.seed + seqlen + int(density * 1e4)
    layout = make_layout(args, seqlen, density, device, seed=seed)
    actual = layout.density(seqlen, seqlen, causal=True)
    tflop = attention_tflop(args.batch, args.heads, head_dim, actual * causal_pairs(seqlen))
    row = {**base_row(args, section, seqlen, head_dim), "target_density": density,
           "density": actual, "tflop": tflop}
    label = f"S={seqlen} D={head_dim} density={density:g} (actual {actual:.4f})"
    if dry:
        return [{**row, "provider": p, **fake_timing(p, tflop, actual)}
                for p in ("flex", "ours") if p in args.providers]

    rows, out_ours, notes = [], None, []
    if "ours" in args.providers:
        # validate the layout once (indices read back), then time without the check
        out_ours, note = guarded(block_sparse_attention, q, k, v, layout, causal=True,
                                 check_indices=True)
        timing = (time_provider(prov.ours(q, k, v, layout), warmup=args.warmup, rep=args.rep)
                  if note is None else {"available": False, "ms": None, "note": note})
        ours = {**row, "provider": "ours", **timing, "tflops": tflops(tflop, timing["ms"])}
        if out_ours is not None and flash_ref is not None and density >= 1.0:
            ours["maxdiff_vs_sdpa"] = max_abs_diff(out_ours, flash_ref)
            notes.append(f"max|ours-sdpa_flash| {ours['maxdiff_vs_sdpa']:.2e}")
        rows.append(ours)
    if "flex" in args.providers:
        flex = {**row, "provider": "flex"}
        if args.skip_128k_flex and seqlen >= 128 * 1024:
            flex.update(available=False, ms=None, note="skipped (--skip-128k-flex)")
        else:
            mask, note = guarded(lambda: layout.to_block_mask(
                seqlen, seqlen, causal=True, num_q_heads=args.heads))
            fn = prov.flex(q, k, v, mask) if mask is not None else None
            timing = (time_provider(fn, warmup=args.warmup, rep=args.rep) if fn
                      else {"available": False, "ms": None, "note": note})
            flex.update(timing, tflops=tflops(tflop, timing["ms"]))
            if fn is not None and out_ours is not None and timing["available"]:
                out_flex, note = guarded(fn)
                if out_flex is not None:
                    rows[0]["maxdiff"] = max_abs_diff(out_ours, out_flex)
                    notes.insert(0, f"max|ours-flex| {rows[0]['maxdiff']:.2e}")
                del out_flex
            del fn, mask
        rows.append(flex)
    for r in rows:
        if r["provider"] == "ours" and notes:
            r["note"] = "; ".join(x for x in (r.get("note"), *notes) if x)
    times = ", ".join(f"{r['provider']} " + (f"{r['ms']:.4g} ms" if r.get("ms") else "n/a")
                      for r in rows)
    print(f"  {label}: {times}; {'; '.join(notes) or 'no spot check'}", flush=True)
    del out_ours, layout
    free_cuda()
    return rows


def threshold_rows(args, seqlen, head_dim, kinds, dry, budget):
    """BLASST on a dense causal layout: time, skipped share, error vs no threshold."""
    rows = []
    for kind in kinds:
        base = {**base_row(args, "threshold", seqlen, head_dim), "inputs": kind,
                "density": 1.0}
        if budget.spent():
            rows.append({**base, "note": "skipped: time budget spent"})
            continue
        if dry:
            if seqlen == args.threshold_seqlens[0]:
                rows.extend(emulated_threshold_rows(args, base, kind))
            continue
        make = peaked_qkv if kind == "peaked" else random_qkv
        qkv, note = guarded(make, args, seqlen, head_dim, args.device, args.seed + 7)
        if note:
            rows.append({**base, "available": False, "note": note})
            continue
        q, k, v = qkv
        layout = make_layout(args, seqlen, 1.0, args.device, seed=0)
        ref, note = guarded(block_sparse_attention, q, k, v, layout, causal=True,
                            check_indices=True)
        base_ms = None
        for thr in args.thresholds:
            row = {**base, "threshold": thr}
            kw = {"softmax_threshold": thr or None}
            res, note = (guarded(block_sparse_attention, q, k, v, layout, causal=True,
                                 check_indices=False, return_skipped=True, **kw)
                         if ref is not None else (None, note))
            if res is None:
                rows.append({**row, "available": False, "note": note})
                continue
            out, skipped = res
            row.update(skipped=float(skipped), rel_l2=rel_l2(out, ref))
            del out, res
            row.update(time_provider(Providers.ours(q, k, v, layout, **kw),
                                     warmup=args.warmup, rep=args.rep))
            if thr == 0:
                base_ms = row["ms"]
            if base_ms and row["ms"]:
                row["vs_no_threshold"] = base_ms / row["ms"]
            rows.append(row)
            print(f"  {kind} S={seqlen} threshold={thr:g}: "
                  f"{row['ms'] and round(row['ms'], 3)} ms, skipped {row['skipped']:.3f}, "
                  f"rel L2 {row['rel_l2']:.2e}", flush=True)
        del q, k, v, qkv, ref, layout
        free_cuda()
    return rows


def emulated_skip_share(q, k, threshold, tokens=32, block_n=64):
    """The kernel's skip rule in torch for one packed KV group ([G, S, D] each, causal): a key
    tile is skipped when, in every row of the (G heads x ``tokens``) query tile, its max
    score sits below the running max by more than -log(threshold)."""
    g, s, d = q.shape
    scores = torch.einsum("gqd,kd->gqk", q.float(), k.float()) / math.sqrt(d)
    pos = torch.arange(s)
    scores.masked_fill_(pos[None, :] > pos[:, None], float("-inf"))
    nm, nn = s // tokens, s // block_n
    tile_max = scores.view(g, nm, tokens, nn, block_n).amax(-1)  # [G, NM, T, NN]
    running = tile_max.cummax(-1).values
    prev = torch.cat([torch.full_like(running[..., :1], float("-inf")), running[..., :-1]], -1)
    gap = torch.where(prev == float("-inf"), float("inf"), tile_max - prev)
    gap = torch.where(tile_max == float("-inf"), float("-inf"), gap)
    visited = (pos.view(nn, block_n)[:, 0][None, :]
               <= (pos.view(nm, tokens)[:, -1])[:, None])  # [NM, NN]
    skip = (gap.amax((0, 2)) < math.log(threshold)) & visited
    mass = scores.softmax(-1)
    top = mass.topk(max(1, s // 100), dim=-1).values.sum(-1).mean()
    return float(skip.sum() / visited.sum()), float(top)


def emulated_threshold_rows(args, base, kind, seqlen=2048):
    """--dry-run: how peaked the generated inputs are, at a CPU-sized length."""
    import types

    small = types.SimpleNamespace(**{**vars(args), "batch": 1, "dtype": "fp32"})
    make = peaked_qkv if kind == "peaked" else random_qkv
    q, k, _ = make(small, seqlen, base["head_dim"], "cpu", args.seed + 7)
    group = args.heads // args.kv_heads
    rows = []
    for thr in args.thresholds:
        per_head = [emulated_skip_share(q[0, h * group:(h + 1) * group], k[0, h], thr)
                    for h in range(args.kv_heads)] if thr > 0 else [(0.0, None)]
        skipped = sum(x for x, _ in per_head) / len(per_head)
        top = per_head[0][1] and sum(t for _, t in per_head) / len(per_head)
        rows.append({**base, "seqlen": seqlen, "threshold": thr, "skipped": skipped,
                     "note": f"dry run: emulated skip rule, S={seqlen}"
                             + ("" if top is None else f"; top-1% keys hold {top:.2f} of mass")})
    return rows


def add_speedups(rows, thr_rows):
    """x flash / x cuDNN (same seqlen and head dim), x flex (same target density)."""
    def key(r):
        return (r["seqlen"], r["head_dim"])
    dense = {(key(r), r["provider"]): r["ms"] for r in rows
             if r["provider"] in DENSE and r.get("ms")}
    flex = {(key(r), r["target_density"]): r["ms"] for r in rows
            if r["provider"] == "flex" and r.get("ms")}
    for r in rows:
        if not r.get("ms"):
            continue
        for name, col in (("sdpa_flash", "vs_flash"), ("sdpa_cudnn", "vs_cudnn")):
            if (key(r), name) in dense and r["provider"] not in DENSE:
                r[col] = dense[(key(r), name)] / r["ms"]
        if r["provider"] == "ours" and (key(r), r["target_density"]) in flex:
            r["vs_flex"] = flex[(key(r), r["target_density"])] / r["ms"]
    for r in thr_rows:
        if r.get("ms") and (key(r), "sdpa_cudnn") in dense:
            r["vs_cudnn"] = dense[(key(r), "sdpa_cudnn")] / r["ms"]


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["head_dim"] != rows[0]["head_dim"], r["head_dim"], r["seqlen"])
                     for r in rows})
    if not groups:
        return
    ncols = min(3, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.2 * nrows), squeeze=False)
    colors = {"sdpa_flash": "tab:gray", "sdpa_cudnn": "tab:green", "flex": "tab:blue",
              "ours": "tab:red"}
    for ax, (_, d, s) in zip(axes.flat, groups):
        sel = [r for r in rows if r["seqlen"] == s and r["head_dim"] == d and r.get("ms")]
        for p in PROVIDERS:
            pts = sorted((r["density"], r["ms"]) for r in sel if r["provider"] == p)
            if not pts:
                continue
            if p in DENSE:
                ax.axhline(pts[0][1], color=colors[p], ls="--", label=f"{p} (dense)")
            else:
                ax.plot(*zip(*pts), marker="o", color=colors[p], label=p)
        ax.set(xscale="log", yscale="log", xlabel="density (causal area)", ylabel="ms",
               title=f"S={s // 1024}k, D={d}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(f"block_sparse_attention vs dense SDPA and FlexAttention "
                 f"(B={rows[0]['batch']}, H={rows[0]['heads']}/{rows[0]['kv_heads']}, "
                 f"{rows[0]['dtype']}, causal)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_dry_layouts(rows, block) -> list[str]:
    """--dry-run checks: density within 2% of the target where whole blocks allow it (the
    diagonal and sink blocks set a floor)."""
    problems = []
    for r in rows:
        if r["provider"] != "ours" or r["target_density"] >= 1.0:
            continue
        s = r["seqlen"]
        floor = random_layout(1, 1, s, 0.0, block=block).density(s, s, causal=True)
        err = abs(r["density"] - max(r["target_density"], floor)) / r["target_density"]
        print(f"  layout check S={s}: target {r['target_density']:g} floor {floor:.4f} "
              f"actual {r['density']:.4f} ({err:.2%} off)")
        if err > 0.02:
            problems.append(f"S={r['seqlen']} D={r['head_dim']}: density {r['density']:.4f} "
                            f"for target {r['target_density']} ({err:.1%} off)")
    return problems


def self_check(block) -> list[str]:
    """--dry-run: the layout generator and the FLOP count against brute force, odd length."""
    s, heads = 1000, 3
    layout = random_layout(1, heads, s, 0.3, block=block, seed=1)
    layout.validate(s, s, check_indices=True)
    mask, problems = layout.to_mask(), []
    diag = torch.arange(mask.shape[2])
    if not (bool(mask[..., 0].all()) and bool(mask[:, :, diag, diag].all())):
        problems.append("random_layout dropped a sink or diagonal block")
    exact = int(layout.to_token_mask(s, s, causal=True).sum())
    counted = layout.density(s, s, causal=True) * causal_pairs(s) * heads
    if abs(exact - counted) > 1e-9 * exact:
        problems.append(f"attended pairs {counted} != brute force {exact}")
    flop = attention_tflop(1, heads, 64, counted / heads) * 1e12
    if abs(flop - 4 * 64 * exact) > 1e-6 * flop:
        problems.append(f"FLOPs {flop} != 4 * D * pairs = {4 * 64 * exact}")
    return problems


def main(argv=None):
    args = parse_args(argv)
    dry = args.dry_run
    if not dry and args.device == "cuda":
        require_cuda("bench_block_sparse.py")
    info = env_info()
    meta = run_meta(info)
    print(env_line(info), flush=True)
    print(meta["command"], flush=True)
    prov = Providers(args)
    budget = Budget(args.budget_s)
    rows, thr_rows = [], []

    exit_on_sigterm()

    def save():
        add_speedups(rows, thr_rows)
        return write_results(rows, args.out, STEM, meta=meta, sections={"threshold": thr_rows})

    try:
        for section, seqlen, head_dim, items in plan(args):
            print(f"[{budget.elapsed():6.0f}s] {section} S={seqlen} D={head_dim}", flush=True)
            if section == "threshold":
                thr_rows.extend(threshold_rows(args, seqlen, head_dim, items, dry, budget))
                save()
                continue
            if budget.spent():
                rows.extend({**base_row(args, section, seqlen, head_dim), "provider": "-",
                             "target_density": d, "density": None,
                             "note": "skipped: time budget spent"} for d in items)
                continue
            qkv = (None,) * 3
            if not dry:
                qkv, note = guarded(random_qkv, args, seqlen, head_dim, args.device, args.seed)
                if note:
                    rows.append({**base_row(args, section, seqlen, head_dim), "provider": "-",
                                 "note": f"inputs: {note}"})
                    continue
            q, k, v = qkv
            new, flash_ref = dense_rows(args, prov, q, k, v, seqlen, head_dim, section, dry)
            rows.extend(new)
            for density in items:
                if budget.spent():
                    rows.append({**base_row(args, section, seqlen, head_dim), "provider": "-",
                                 "target_density": density, "density": None,
                                 "note": "skipped: time budget spent"})
                    continue
                rows.extend(sparse_rows(args, prov, q, k, v, seqlen, head_dim, density, section,
                                        dry, flash_ref))
            del q, k, v, qkv, flash_ref
            free_cuda()
            save()
    finally:
        paths = save()
        try:
            plot([r for r in rows if r.get("provider") in PROVIDERS],
                 f"{args.out}/{STEM}.png")
            paths.append(f"{args.out}/{STEM}.png")
        except Exception as err:  # noqa: BLE001 - a plot failure must not lose the tables
            print(f"plot failed: {err!r}", flush=True)
        print(f"\n{env_line(info)}\n{meta['command']}  ({budget.elapsed():.0f} s)")
        if thr_rows:
            print_table(thr_rows, THRESHOLD_COLUMNS,
                        title="\nsoftmax threshold (BLASST), dense causal layout")
        print_table(rows, MAIN_COLUMNS, title="\nblock-sparse attention (ms; x = speedup)")
        print("wrote " + ", ".join(str(p) for p in paths), flush=True)
    if dry:
        problems = check_dry_layouts(rows, args.block) + self_check(args.block)
        for p in problems:
            print("LAYOUT CHECK FAILED: " + p)
        if problems:
            sys.exit(1)
        print("dry run: layout densities within 2% of their targets; layout generator and "
              "FLOP count match brute force")


if __name__ == "__main__":
    main()
