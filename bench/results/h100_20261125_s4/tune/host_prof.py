"""Host-side cost of block_sparse_attention at 8k (GPU), cProfile of 300 calls."""
import cProfile, pstats, sys, time, torch
sys.path.insert(0, "bench")
from _common import random_layout
import sparse_attn as sa
S = 8192
q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
lay = random_layout(1, 8, S, 0.1, block=128, seed=0, device="cuda")
f = lambda: sa.block_sparse_attention(q, k, v, lay, causal=True, check_indices=False)
for _ in range(20):
    f()
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(300):
    f()
t1 = time.perf_counter()
torch.cuda.synchronize()
t2 = time.perf_counter()
print(f"host per call {1e3*(t1-t0)/300:.3f} ms; with sync {1e3*(t2-t0)/300:.3f} ms", flush=True)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    out = f()
torch.cuda.synchronize()
e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
e0.record()
for _ in range(300):
    g.replay()
e1.record(); torch.cuda.synchronize()
print(f"graph replay per call {e0.elapsed_time(e1)/300:.4f} ms", flush=True)
pr = cProfile.Profile()
pr.enable()
for _ in range(300):
    f()
pr.disable()
torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
