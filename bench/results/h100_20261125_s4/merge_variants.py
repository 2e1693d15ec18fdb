"""Merge kernel variants (SPARSE_ATTN_MERGE_VARIANT, experiment) at 128k, K=2048, T=32: merge
time, merged-kernel time on each variant's output, correctness vs variant 0; block + window +
random (overflow fallback) patterns. Usage: python3 .scratch/s4/merge_variants.py OUTFILE

Provenance: SPARSE_ATTN_MERGE_VARIANT was a temporary switch in csrc/topk_merge.cu's launcher
(never committed): 0 = the bitmap + table kernel of 4765d35; 1/2/3 = the table-only kernel
with (loads in flight, CTAs per SM) = (4, 1 bound: 2 by registers), (2, 3), (4, 3). Variant 2
is what f331d52 ships. Kept as the record of merge_variants.json, not runnable on later code.
The setup lines repeat skip_ab.py's on purpose: each script is the exact one that ran."""
import json, os, sys, torch, triton
sys.path.insert(0, "bench")
from bench_topk import block_layout, topk_from_blocks, topk_window, topk_random
from sparse_attn import block_sparse_attention
from sparse_attn.kernels.topk import merge_token_lists, topk_fwd
S, K, HKV, H, D, T = 131072, 2048, 8, 32, 128, 32
q = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, HKV, S, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
t = lambda f: triton.testing.do_bench(f, warmup=25, rep=150, return_mode="median")
res = {}
def canon(m):
    u, o, c = m
    return u, o, c
def same(m0, m1, tiles=64):
    u0, o0, c0 = m0; u1, o1, c1 = m1
    if not torch.equal(c0, c1):
        return f"counts differ ({int((c0 != c1).sum())} tiles)"
    nt = c0.shape[-1]
    for tile in list(range(0, nt, max(1, nt // tiles))) + [nt - 1]:
        for h in (0, HKV - 1):
            n = int(c0[0, h, tile])
            a, ia = u0[0, h, tile, :n].sort(); b, ib = u1[0, h, tile, :n].sort()
            if not torch.equal(a, b) or not torch.equal(o0[0, h, tile, :n][ia], o1[0, h, tile, :n][ib]):
                return f"tile {tile} head {h} differs"
    return "same"
pats = {}
bl = block_layout(1, HKV, S, K, 128, 0, "cuda")
pats["block"] = topk_from_blocks(bl, S, 0)
res["block_sparse_ms"] = t(lambda: block_sparse_attention(q, k, v, bl, check_indices=False))
print("block_sparse", res["block_sparse_ms"], flush=True)
pats["window"] = topk_window(1, HKV, S, K, 128, 0, "cuda")
for name, lay in pats.items():
    ref = None
    for var in ("0", "1", "2", "3"):
        os.environ["SPARSE_ATTN_MERGE_VARIANT"] = var
        m = merge_token_lists(lay.indices, T, seqlen_k=S, causal_offset=0)
        ok = "ref" if ref is None else same(ref, m)
        if ref is None:
            ref = m
        mt = t(lambda: merge_token_lists(lay.indices, T, seqlen_k=S, causal_offset=0))
        kt = t(lambda: topk_fwd(q, k, v, lay.indices, causal=True, scale=D**-0.5, return_lse=False,
                                tokens=T, merged=True, merged_lists=m))
        res[f"{name}_v{var}"] = dict(merge_ms=mt, kernel_ms=kt, total_ms=mt + kt, check=ok)
        print(name, var, res[f"{name}_v{var}"], flush=True)
        if var != "0":
            del m
    del ref
    torch.cuda.empty_cache()
# random: overflow fallback path correctness + time (smaller: 32k)
S2 = 32768
lay = topk_random(1, HKV, S2, K, 0, "cuda")
ref = None
for var in ("0", "2"):
    os.environ["SPARSE_ATTN_MERGE_VARIANT"] = var
    m = merge_token_lists(lay.indices, T, seqlen_k=S2, causal_offset=0)
    ok = "ref" if ref is None else same(ref, m)
    ref = ref or m
    mt = t(lambda: merge_token_lists(lay.indices, T, seqlen_k=S2, causal_offset=0))
    res[f"random32k_v{var}"] = dict(merge_ms=mt, check=ok)
    print("random32k", var, res[f"random32k_v{var}"], flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
