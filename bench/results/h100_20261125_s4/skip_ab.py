"""A/B: merged top-k kernel with/without skipping the owner mask on fully owned chunks; the
new CUDA merge; block-sparse at the same keys. 128k, K=2048, T=32. Usage: ... OUTFILE

Provenance: kernels/topk.py's SKIP_FULL_OWNER_CHUNKS was a temporary module flag (never
committed; f331d52 makes the skip unconditional), and the merge it timed still had the
early-exit check that f331d52 removed (hence 7.87 ms here against 5.8 without it). Kept as the
record of skip_ab.json, not runnable on later code."""
import json, sys, torch, triton
sys.path.insert(0, "bench")
from bench_topk import block_layout, topk_from_blocks, topk_window
from sparse_attn import block_sparse_attention, topk_attention
import sparse_attn.kernels.topk as tk
S, K, HKV, H, D, T = 131072, 2048, 8, 32, 128, 32
q = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, HKV, S, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
t = lambda f: triton.testing.do_bench(f, warmup=25, rep=150, return_mode="median")
res = {}
bl = block_layout(1, HKV, S, K, 128, 0, "cuda")
pats = {"block": topk_from_blocks(bl, S, 0), "window": topk_window(1, HKV, S, K, 128, 0, "cuda")}
res["block_sparse_ms"] = t(lambda: block_sparse_attention(q, k, v, bl, check_indices=False))
print("block_sparse", res["block_sparse_ms"], flush=True)
for name, lay in pats.items():
    m = tk.merge_token_lists(lay.indices, T, seqlen_k=S, causal_offset=0)
    res[f"{name}_merge_ms"] = t(lambda: tk.merge_token_lists(lay.indices, T, seqlen_k=S, causal_offset=0))
    outs = {}
    for rep in range(2):
        for skip in (False, True):
            tk.SKIP_FULL_OWNER_CHUNKS = skip
            f = lambda: tk.topk_fwd(q, k, v, lay.indices, causal=True, scale=D**-0.5, return_lse=False,
                                    tokens=T, merged=True, merged_lists=m)[0]
            ms = t(f)
            key = f"{name}_kernel_skip{int(skip)}_ms"
            res[key] = min(res.get(key, 1e9), ms)
            outs[skip] = f()
    res[f"{name}_maxdiff_skip"] = float((outs[True].float() - outs[False].float()).abs().max())
    tk.SKIP_FULL_OWNER_CHUNKS = True
    def e2e():
        lay._merged.clear()
        return topk_attention(q, k, v, lay, merge=True, tokens=T, check_indices=False)
    res[f"{name}_e2e_ms"] = t(e2e)
    print(name, {kk: vv for kk, vv in res.items() if kk.startswith(name)}, flush=True)
    del m
json.dump(res, open(sys.argv[1], "w"), indent=1)
