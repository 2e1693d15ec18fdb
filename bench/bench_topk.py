"""topk_attention (token-level top-k) against the block-sparse kernel at the same number of
attended keys per query, dense SDPA (flash, cuDNN) and FlexAttention; topk_indices against
torch.topk; a config sweep of the merged kernel at the headline K (block pattern).

Batch 1, 32 query / 8 KV heads (Llama-8B), d=128, bf16, causal. Token patterns (K keys/token):
  block   each token's set = the keys of its query block's key blocks in a BlockLayout (sink,
          3 local blocks, the diagonal, random earlier blocks): exactly what the block-sparse
          kernel attends, so both outputs must agree (max|d| column) -- the <= 2x target;
  window  sink block + a per-token sliding window of K/4 keys + random key blocks shared by the
          query block (neighbours overlap, but no two tokens have the same set);
  random  K keys drawn per token uniformly from its causal prefix (no overlap: worst case).
Variants: topk (per-token lists, row-masked), topk_merged (union of T=16/32 tokens' lists;
kernel time with the union cached), merge (the default merge alone: the CUDA kernel when the
extension loads), merge_triton (the Triton merge alone), topk_merged+merge (merge + kernel, as
topk_attention(merge=True) on a fresh layout), merge_torch (the old sort merge, once),
block_sparse,
flex_block (FlexAttention on the same block mask).

    python bench/bench_topk.py --out bench/out [--budget-s 270]   # H100: 128k, K=2048/1024/512
    python bench/bench_topk.py --quick --out bench/out             # 8k smoke run
    python bench/bench_topk.py --dry-run --out bench/out           # CPU: pattern checks only
"""
from __future__ import annotations

import argparse
import sys

import torch

from _common import (Budget, add_shape_args, attention_tflop, env_info, env_line,
                     exit_on_sigterm, free_cuda, guarded, parse_list, print_table, random_qkv,
                     require_cuda, run_meta, tflops, time_provider, write_results)
from sparse_attn import _cuda
from sparse_attn import (BlockLayout, TopKLayout, block_sparse_attention, topk_attention,
                         topk_indices)

STEM = "bench_topk"
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}
COLUMNS = [
    ("seqlen", "S", None), ("topk", "K", None), ("pattern", "pattern", None),
    ("provider", "provider", None), ("tokens", "T", None), ("ms", "ms", ".4g"),
    ("p20", "p20", ".4g"), ("p80", "p80", ".4g"), ("tflops", "TFLOP/s", ".0f"),
    ("union", "union/K", ".2f"), ("vs_block", "x block", ".2f"), ("vs_cudnn", "x cuDNN", ".3f"),
    ("maxdiff", "max|d|", ".2e"), ("config", "config", None), ("note", "note", None),
]
TUNE_COLUMNS = [
    ("seqlen", "S", None), ("topk", "K", None), ("pattern", "pattern", None),
    ("merged", "merged", None), ("tokens", "T", None), ("rows", "M", None),
    ("config", "config", None), ("block_n", "BN", None),
    ("warps", "warps", None), ("stages", "stages", None), ("ms", "ms", ".4g"),
    ("note", "note", None),
]
SELECT_COLUMNS = [
    ("seqlen", "Sk", None), ("rows", "rows", None), ("topk", "K", None),
    ("provider", "provider", None), ("ms", "ms", ".4g"), ("p20", "p20", ".4g"),
    ("p80", "p80", ".4g"), ("vs_torch_topk", "x torch.topk", ".2f"), ("note", "note", None),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", default="128k")
    ap.add_argument("--topks", default="2048,1024,512", help="K values, most important first")
    ap.add_argument("--patterns", default="block,window,random")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--no-dense", action="store_true", help="skip SDPA/Flex baselines")
    ap.add_argument("--select-rows", type=int, default=2048,
                    help="query rows of the topk_indices score tensor [1, kv_heads, rows, S]")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget: later work is skipped once spent")
    ap.add_argument("--quick", action="store_true", help="8k, K=512/256: a smoke run")
    ap.add_argument("--device", default="cuda",
                    help="cpu: a code-path run under TRITON_INTERPRET=1 (tiny sizes only)")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: build the patterns at a small size and check them")
    add_shape_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.seqlen, args.topks = "8k", "512,256"
        args.select_rows = 512
    args.seqlen = parse_list(args.seqlen, int)[0]
    args.topks = parse_list(args.topks, int)
    args.patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    unknown = set(args.patterns) - {"block", "window", "random"}
    if unknown:
        ap.error(f"unknown patterns {sorted(unknown)}")
    if args.heads % args.kv_heads:
        ap.error("--heads must be a multiple of --kv-heads")
    return args


# ---------------------------------------------------------------------------- patterns
def block_layout(batch, heads, seqlen, keys, block, seed, device) -> BlockLayout:
    """keys // block key blocks per query block: the sink, the diagonal, 3 local blocks and
    random earlier ones (all causal blocks where fewer exist)."""
    nb = -(-seqlen // block)
    nblk = max(1, min(keys // block, nb))
    gen = torch.Generator(device=device).manual_seed(seed)
    score = torch.rand(batch, heads, nb, nb, generator=gen, device=device)
    qb = torch.arange(nb, device=device)[:, None]
    kb = torch.arange(nb, device=device)[None, :]
    score = score + 10.0 * ((kb == 0) | ((kb <= qb) & (kb > qb - 4)))
    score = score.masked_fill(kb > qb, float("-inf"))
    top = torch.topk(score, nblk, dim=-1)
    mask = torch.zeros(batch, heads, nb, nb, dtype=torch.bool, device=device)
    mask.scatter_(-1, top.indices, top.values > float("-inf"))
    return BlockLayout.from_mask(mask, block, block, max_blocks=nblk)


def _shuffle_rows(idx: torch.Tensor, seed: int) -> torch.Tensor:
    """Random order within each row, -1 padding kept at the end (top-k output is unsorted)."""
    gen = torch.Generator(device=idx.device).manual_seed(seed)
    key = torch.rand(idx.shape, generator=gen, device=idx.device)
    key = key.masked_fill(idx < 0, 2.0)
    return torch.gather(idx, -1, key.argsort(-1))


def _compact(idx: torch.Tensor) -> torch.Tensor:
    """Move -1 entries to the end of each row (stable)."""
    order = torch.argsort((idx < 0).to(torch.uint8), dim=-1, stable=True)
    return torch.gather(idx, -1, order)


def topk_from_blocks(layout: BlockLayout, seqlen: int, seed: int) -> TopKLayout:
    """Every token attends the keys of its query block's listed key blocks (the same set the
    block-sparse kernel computes), listed in random order."""
    bn = layout.block_n
    blocks = layout.indices  # [B, H, NQB, NBLK], -1 padded at the end
    keys = blocks[..., None] * bn + torch.arange(bn, device=blocks.device, dtype=torch.int32)
    keys = torch.where((blocks >= 0)[..., None] & (keys < seqlen), keys, -1)
    keys = _compact(keys.flatten(-2))
    keys = _shuffle_rows(keys, seed)
    idx = keys.repeat_interleave(layout.block_m, dim=2)[:, :, :seqlen]
    return TopKLayout(idx.contiguous())


def topk_window(batch, heads, seqlen, keys, block, seed, device, chunk=8192) -> TopKLayout:
    """Sink block + per-token window of keys // 4 + random key blocks shared by each query
    block, all below the window; -1 padded where the prefix is short."""
    win = keys // 4
    n_rand = max(0, (keys - win - block) // block)
    nb = -(-seqlen // block)
    gen = torch.Generator(device=device).manual_seed(seed)
    # per query block: n_rand blocks from [1, first window block of the query block)
    qb = torch.arange(nb, device=device)
    limit = ((qb * block - win + 1).clamp(min=0) // block)  # blocks < limit are below windows
    score = torch.rand(batch, heads, nb, nb, generator=gen, device=device)
    kb = torch.arange(nb, device=device)[None, :]
    score = score.masked_fill((kb < 1) | (kb >= limit[:, None]), float("-inf"))
    width = min(n_rand, nb) if n_rand else 0
    idx = torch.empty(batch, heads, seqlen, keys, dtype=torch.int32, device=device)
    ar_blk = torch.arange(block, device=device, dtype=torch.int32)
    if width:
        top = torch.topk(score, width, dim=-1)
        rblocks = torch.where(top.values > float("-inf"), top.indices, -1).to(torch.int32)
        rkeys = torch.where((rblocks >= 0)[..., None], rblocks[..., None] * block + ar_blk, -1)
        rkeys = rkeys.flatten(-2)  # [B, H, NQB, n_rand * block]
    for start in range(0, seqlen, chunk):
        stop = min(seqlen, start + chunk)
        t = torch.arange(start, stop, device=device, dtype=torch.int32)[:, None]
        wkeys = t - win + 1 + torch.arange(win, device=device, dtype=torch.int32)
        wkeys = torch.where(wkeys >= 0, wkeys, -1).expand(batch, heads, -1, -1)
        sink = ar_blk.expand(stop - start, -1)
        sink = torch.where(sink < (t - win + 1), sink, -1).expand(batch, heads, -1, -1)
        parts = [wkeys, sink]
        if width:
            parts.append(rkeys[:, :, t.squeeze(1).long() // block])
        row = torch.cat(parts, -1)
        pad = keys - row.shape[-1]
        if pad > 0:
            row = torch.cat([row, row.new_full((*row.shape[:-1], pad), -1)], -1)
        idx[:, :, start:stop] = _shuffle_rows(_compact(row[..., :keys]), seed + start)
    return TopKLayout(idx)


def topk_random(batch, heads, seqlen, keys, seed, device, chunk=8192) -> TopKLayout:
    """K distinct keys per token, one from each of K equal strata of its causal prefix (all of
    the prefix where it is shorter than K)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.empty(batch, heads, seqlen, keys, dtype=torch.int32, device=device)
    j = torch.arange(keys + 1, device=device, dtype=torch.int64)
    for start in range(0, seqlen, chunk):
        stop = min(seqlen, start + chunk)
        n = torch.arange(start, stop, device=device, dtype=torch.int64)[:, None] + 1
        edges = j * n // keys  # [rows, K + 1]; strata [e_j, e_{j+1}) nonempty when n >= K
        lo, width = edges[:, :-1], (edges[:, 1:] - edges[:, :-1])
        u = torch.rand(batch, heads, stop - start, keys, generator=gen, device=device)
        pick = lo + (u * width).long()
        short = torch.where(j[:keys] < n, j[:keys], -1)  # n < K: the whole prefix
        row = torch.where(n >= keys, pick, short)
        idx[:, :, start:stop] = _shuffle_rows(row.to(torch.int32), seed + start)
    return TopKLayout(idx)


def make_pattern(args, name, keys, device):
    seqlen, blk, seed = args.seqlen, args.block, args.seed
    if name == "block":
        bl = block_layout(args.batch, args.kv_heads, seqlen, keys, blk, seed, device)
        return bl, topk_from_blocks(bl, seqlen, seed)
    if name == "window":
        return None, topk_window(args.batch, args.kv_heads, seqlen, keys, blk, seed, device)
    return None, topk_random(args.batch, args.kv_heads, seqlen, keys, seed, device)


def union_ratio(counts: torch.Tensor, layout: TopKLayout) -> float:
    """Mean |union of a tile's T lists| / mean listed keys per token: the merged kernel's
    gathered keys per tile relative to one token's list."""
    per_token = (layout.indices >= 0).sum(-1, dtype=torch.float32).mean()
    return float(counts.float().mean() / per_token.clamp(min=1))


# -------------------------------------------------------------------------------- runs
def base_row(args, section, seqlen, keys, pattern):
    return {"section": section, "seqlen": seqlen, "topk": keys, "pattern": pattern,
            "head_dim": args.head_dim, "batch": args.batch, "heads": args.heads,
            "kv_heads": args.kv_heads, "dtype": args.dtype}


class Flex:
    def __init__(self):
        self._fn = None

    def __call__(self, q, k, v, block_mask):
        if self._fn is None:
            import torch._dynamo
            from torch.nn.attention.flex_attention import flex_attention

            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, 256)
            self._fn = torch.compile(flex_attention, dynamic=False)
        return lambda: self._fn(q, k, v, block_mask=block_mask, enable_gqa=True)


def sdpa_fn(name, q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[name])

    def fn():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return fn


def dense_rows(args, q, k, v, flex, timing):
    rows = []
    s = args.seqlen
    tflop = attention_tflop(args.batch, args.heads, args.head_dim, s * (s + 1) / 2)
    for name in SDPA_BACKENDS:
        r = {**base_row(args, "dense", s, s, "dense"), "provider": name,
             **time_provider(sdpa_fn(name, q, k, v), **timing)}
        r["tflops"] = tflops(tflop, r["ms"])
        rows.append(r)
    dense = BlockLayout.dense(args.batch, args.kv_heads, s, block_m=128, block_n=128,
                              device=q.device)
    mask, note = guarded(dense.to_block_mask, s, s, causal=True, num_q_heads=args.heads)
    r = {**base_row(args, "dense", s, s, "dense"), "provider": "flex"}
    if mask is None:
        r.update(available=False, ms=None, note=f"block mask: {note}")
    else:
        r.update(time_provider(flex(q, k, v, mask), **timing))
        r["tflops"] = tflops(tflop, r["ms"])
    rows.append(r)
    return rows


TUNE_CONFIGS = {  # merged tile rows -> (BLOCK_N, warps, stages) tried at the headline K
    16: [(64, 4, 3), (32, 4, 3), (128, 4, 2), (64, 8, 2)],
    32: [(64, 8, 3), (32, 8, 3), (128, 8, 2), (32, 4, 3)],
}


def pattern_rows(args, q, k, v, keys, pattern, flex, timing, budget, tune=None):
    from sparse_attn.kernels.topk import (default_config, default_tokens, merge_token_lists,
                                          merge_token_lists_torch, topk_fwd)

    s = args.seqlen
    base = base_row(args, "main", s, keys, pattern)
    (bl, layout), note = guarded(make_pattern, args, pattern, keys, q.device)
    if note:
        return [{**base, "provider": "-", "note": f"pattern: {note}"}]
    density = layout.density(s, s, causal=True)
    pairs = density * s * (s + 1) / 2
    tflop = attention_tflop(args.batch, args.heads, args.head_dim, pairs)
    rows, outs = [], {}
    group = args.heads // args.kv_heads
    scale = args.head_dim ** -0.5

    def add(provider, fn, out_key=None, **extra):
        r = {**base, "provider": provider, "density": density, **extra,
             **time_provider(fn, **timing)}
        r["tflops"] = tflops(tflop, r["ms"])
        rows.append(r)
        if r["available"] and out_key is not False:
            out, _ = guarded(fn)
            if out is not None:
                outs[out_key or provider] = out
                r["out_key"] = out_key or provider
        return r

    if bl is not None:
        add("block_sparse", lambda: block_sparse_attention(q, k, v, bl, check_indices=False))
        if flex is not None and not budget.spent():
            mask, note = guarded(bl.to_block_mask, s, s, causal=True, num_q_heads=args.heads)
            if mask is not None:
                add("flex_block", flex(q, k, v, mask))
            del mask
    add("topk", lambda: topk_attention(q, k, v, layout, merge=False, check_indices=False),
        tokens=default_tokens(group, False))
    free_cuda()
    for t_m in (16, 32):
        if budget.spent():
            break
        merged, note = guarded(merge_token_lists, layout.indices, t_m, seqlen_k=s,
                               causal_offset=0)
        if merged is None:
            rows.append({**base, "provider": "merge", "tokens": t_m, "note": note})
            continue
        ratio = union_ratio(merged[2], layout)
        cfg = default_config(args.head_dim, q.dtype, q.device, 4 * t_m)
        add("topk_merged", lambda: topk_fwd(q, k, v, layout.indices, causal=True, scale=scale,
                                            return_lse=False, tokens=t_m, merged=True,
                                            merged_lists=merged)[0],
            out_key=f"topk_merged{t_m}", tokens=t_m, union=ratio, config=str(cfg),
            note="kernel alone (union cached)")
        merge_backend = "cuda" if _cuda.available() else "triton"
        m = add("merge", lambda: merge_token_lists(layout.indices, t_m, seqlen_k=s,
                                                   causal_offset=0),
                out_key=False, tokens=t_m,
                note=f"merge_token_lists alone ({merge_backend}, the default backend)")
        m["tflops"] = None
        if merge_backend == "cuda" and not budget.spent():
            m = add("merge_triton", lambda: merge_token_lists(
                        layout.indices, t_m, seqlen_k=s, causal_offset=0, backend="triton"),
                    out_key=False, tokens=t_m, note="merge_token_lists alone (Triton backend)")
            m["tflops"] = None
        if not budget.spent():
            def e2e(t_m=t_m):
                layout._merged.clear()
                return topk_attention(q, k, v, layout, merge=True, tokens=t_m,
                                      check_indices=False)
            add("topk_merged+merge", e2e, out_key=False, tokens=t_m, union=ratio,
                note="merge + kernel (topk_attention(merge=True), cache cleared)")
            layout._merged.clear()
        if tune is not None and not budget.spent():
            for cfg in TUNE_CONFIGS.get(t_m, []):
                if budget.spent():
                    break
                r = {**base_row(args, "tune", s, keys, pattern), "merged": True, "tokens": t_m,
                     "rows": 4 * t_m, "config": "sweep", "block_n": cfg[0], "warps": cfg[1],
                     "stages": cfg[2]}
                r.update(time_provider(
                    lambda cfg=cfg: topk_fwd(q, k, v, layout.indices, causal=True, scale=scale,
                                             return_lse=False, tokens=t_m, merged=True,
                                             merged_lists=merged, config=cfg), **timing))
                tune.append(r)
        if t_m == 16 and keys == args.topks[0] and pattern == "block" and not budget.spent():
            torch_rows = add("merge_torch", lambda: merge_token_lists_torch(layout.indices, t_m),
                             out_key=False, tokens=t_m,
                             note="torch segmented-sort merge (previous implementation)")
            torch_rows["tflops"] = None
        del merged
        free_cuda()
    # every variant against the block-sparse output (same attended set), else per-token top-k
    ref_name = "block_sparse" if "block_sparse" in outs else "topk"
    ref = outs.get(ref_name)
    for r in rows:
        out = outs.get(r.pop("out_key", None))
        if ref is not None and out is not None and r["provider"] != ref_name:
            r["maxdiff"] = float((out.float() - ref.float()).abs().max())
    del outs, layout, bl
    free_cuda()
    return rows


def select_rows(args, timing):
    """topk_indices vs torch.topk on a score tensor [B, Hkv, rows, S] (bf16)."""
    s, n, keys = args.seqlen, args.select_rows, args.topks[0]
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    scores = torch.randn(args.batch, args.kv_heads, n, s, generator=gen, device=args.device,
                         dtype=torch.bfloat16)
    base = {"section": "select", "seqlen": s, "rows": n, "topk": keys}
    provs = {
        "torch.topk(sorted=False)": lambda: torch.topk(scores, keys, dim=-1, sorted=False),
        "torch.topk(sorted=True)": lambda: torch.topk(scores, keys, dim=-1, sorted=True),
        "topk_indices": lambda: topk_indices(scores, keys, causal=False),
        "topk_indices(causal)": lambda: topk_indices(scores, keys, causal=True),
        "torch.sort (full)": lambda: torch.sort(scores, dim=-1),
    }
    rows = [{**base, "provider": p, **time_provider(fn, **timing)} for p, fn in provs.items()]
    ref = rows[0]["ms"]
    for r in rows:
        r["vs_torch_topk"] = (r["ms"] / ref) if ref and r["ms"] else None
    return rows


def add_ratios(rows):
    """x block: ms / block_sparse ms of the same K (any pattern); x cuDNN: ms / dense cuDNN."""
    block = {r["topk"]: r["ms"] for r in rows
             if r.get("provider") == "block_sparse" and r.get("ms")}
    cudnn = next((r["ms"] for r in rows if r.get("provider") == "sdpa_cudnn" and r.get("ms")), None)
    for r in rows:
        if r.get("ms") and r.get("section") == "main":
            if r["topk"] in block:
                r["vs_block"] = r["ms"] / block[r["topk"]]
            if cudnn:
                r["vs_cudnn"] = r["ms"] / cudnn


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if r.get("section") == "main" and r.get("ms")]
    keys = sorted({r["topk"] for r in main}, reverse=True)
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    dense = {r["provider"]: r["ms"] for r in rows if r.get("section") == "dense" and r.get("ms")}
    for ax, kk in zip(axes.flat, keys):
        sel = [r for r in main if r["topk"] == kk]
        labels = [f"{r['pattern']}\n{r['provider']}"
                  + (f" T={r['tokens']}" if r.get("tokens") else "") for r in sel]
        colors = ["tab:red" if r["provider"].startswith("topk") else
                  "tab:gray" if r["provider"] == "merge" else "tab:blue" for r in sel]
        ax.bar(range(len(sel)), [r["ms"] for r in sel], color=colors)
        ax.set_xticks(range(len(sel)), labels, rotation=70, fontsize=7)
        for (name, ms), ls in zip(dense.items(), ("--", ":", "-.")):
            ax.axhline(ms, ls=ls, color="k", lw=0.8, label=f"{name} dense {ms:.0f} ms")
        ax.set(yscale="log", ylabel="ms", title=f"S={sel[0]['seqlen']}, K={kk}")
        ax.legend(fontsize=7)
    fig.suptitle(f"topk_attention (B={main[0]['batch']}, H={main[0]['heads']}/"
                 f"{main[0]['kv_heads']}, D={main[0]['head_dim']}, {main[0]['dtype']}, causal)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def dry_run(args) -> int:
    """CPU: build each pattern at S=1000 and check validity, keys per token and causality."""
    from sparse_attn.kernels.topk import merge_token_lists

    s, keys, problems = 1000, 256, []
    sub = argparse.Namespace(**{**vars(args), "seqlen": s, "block": 64, "batch": 1,
                                "kv_heads": 2})
    for name in ("block", "window", "random"):
        bl, lay = make_pattern(sub, name, keys, "cpu")
        lay.validate(s, s)
        n = (lay.indices >= 0).sum(-1)
        pos = torch.arange(s)
        future = ((lay.indices.long() > pos[:, None]) & (lay.indices >= 0)).sum()
        print(f"{name}: keys/token min {int(n.min())} max {int(n.max())} late-mean "
              f"{float(n[..., s // 2:].float().mean()):.1f}; future keys {int(future)}; "
              f"union/K (T=16) {union_ratio(merge_token_lists(lay.indices, 16, seqlen_k=s)[2], lay):.2f}")
        if int(n[..., s // 2:].max()) > keys:
            problems.append(f"{name}: more than K keys")
        if name == "random" and future:
            problems.append("random: future keys")
        if bl is not None:
            same = torch.equal(lay.to_mask(s, s, causal=True),
                               bl.to_token_mask(s, s, causal=True))
            if not same:
                problems.append("block: token sets differ from the block layout")
    for p in problems:
        print("PATTERN CHECK FAILED: " + p)
    return 1 if problems else 0


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        sys.exit(dry_run(args))
    if args.device == "cuda":
        require_cuda("bench_topk.py")
    info = env_info()
    meta = run_meta(info)
    print(env_line(info), flush=True)
    print(meta["command"], flush=True)
    budget = Budget(args.budget_s)
    timing = dict(warmup=args.warmup, rep=args.rep)
    rows, tune, select = [], [], []
    exit_on_sigterm()

    def save():
        add_ratios(rows)
        return write_results(rows, args.out, STEM, meta=meta,
                             sections={"tune": tune, "select": select})

    flex = Flex()
    try:
        q, k, v = random_qkv(args, args.seqlen, args.head_dim, args.device, args.seed)
        if args.no_dense:
            flex = None
        else:
            print(f"[{budget.elapsed():5.0f}s] dense baselines S={args.seqlen}", flush=True)
            rows.extend(dense_rows(args, q, k, v, flex, timing))
            save()
        for i, keys in enumerate(args.topks):
            for pattern in args.patterns:
                if budget.spent():
                    rows.append({**base_row(args, "main", args.seqlen, keys, pattern),
                                 "provider": "-", "note": "skipped: time budget spent"})
                    continue
                print(f"[{budget.elapsed():5.0f}s] S={args.seqlen} K={keys} {pattern}",
                      flush=True)
                rows.extend(pattern_rows(args, q, k, v, keys, pattern, flex, timing, budget,
                                         tune if i == 0 and pattern == "block" else None))
                save()
            if i == 0:  # after the headline K: selection and the tile sweep
                del q, k, v
                free_cuda()
                if not budget.spent():
                    print(f"[{budget.elapsed():5.0f}s] topk_indices", flush=True)
                    got, note = guarded(select_rows, args, timing)
                    select.extend(got or [{"provider": "-", "note": note}])
                    free_cuda()
                save()
                q, k, v = random_qkv(args, args.seqlen, args.head_dim, args.device, args.seed)
    finally:
        paths = save()
        try:
            if plot(rows, f"{args.out}/{STEM}.png"):
                paths.append(f"{args.out}/{STEM}.png")
        except Exception as err:  # noqa: BLE001 - a plot failure must not lose the tables
            print(f"plot failed: {err!r}", flush=True)
        print(f"\n{env_line(info)}\n{meta['command']}  ({budget.elapsed():.0f} s)")
        if tune:
            print_table(tune, TUNE_COLUMNS, title="\ntop-k kernel tiles/configs")
        if select:
            print_table(select, SELECT_COLUMNS, title="\ntop-k selection")
        print_table(rows, COLUMNS, title="\ntoken top-k attention (ms; x block = / block-sparse "
                                         "kernel at the same K)")
        print("wrote " + ", ".join(str(p) for p in paths), flush=True)


if __name__ == "__main__":
    main()
