"""Item 2 follow-up: anchor's sampled budget search with forced (sink + local) keys summed
exactly and the strided candidate sample scaled by the stride (an unbiased mass estimate),
against the current rule (every stride-th key, forced ones included). Torch path, 8k, real
SmolLM2 attention. Writes JSON to argv[1]."""
import json, math, sys, time
from pathlib import Path
import torch
sys.path.insert(0, "bench")
import accuracy as acc
from niah import load_model
from sparse_attn import estimators
from sparse_attn.estimators import anchor as A
from sparse_attn.estimators._stripe import last_rows
from sparse_attn.layout import StripeLayout

def column_mask_unbiased(self, q, k, *, causal=True, dense=None, stride=1):
    batch, hq, sq, dim = q.shape
    sk = k.shape[2]
    scale = 1.0 / math.sqrt(dim)
    dense = A.dense_block_mask(sq, sk, self.block_m, self.block_n, self.sink_blocks,
                               self.local_blocks, causal, q.device)
    qbar, abar = A.anchor_pool(q, k, block_m=self.block_m, block_n=self.block_n,
                               sink_blocks=self.sink_blocks, local_blocks=self.local_blocks,
                               causal=causal, scale=scale)
    heads = self._out_heads(q, k)
    nqb = qbar.shape[2]
    last = last_rows(sq, sk, self.block_m, q.device)
    keys = torch.arange(sk)
    smp = keys % stride == 0
    out = torch.zeros(batch, heads, nqb, sk, dtype=torch.bool)
    step = 16
    for m0 in range(0, nqb, step):
        m1 = min(nqb, m0 + step)
        diff = A.anchor_diff(qbar, abar, k, m0, m1, scale=scale, gqa_reduce=self.gqa_reduce)
        forced = dense[m0:m1].repeat_interleave(self.block_n, dim=-1)[:, :sk]
        reach = keys[None, :] <= last[m0:m1, None]
        cand = reach & ~forced
        w = torch.exp((diff.masked_fill(~reach, float("-inf"))).clamp(max=30.0))
        F = torch.where(forced & reach, w, 0.0).sum(-1, keepdim=True)  # exact
        cs = torch.where(cand & smp, w, 0.0)
        C = stride * cs.sum(-1, keepdim=True)
        target = self.mass * (F + C) - F
        p, _ = cs.sort(-1, descending=True)
        before = stride * (p.cumsum(-1) - p)
        take = (p > 0) & (before < target)
        thr = torch.where(take, p, float("inf")).amin(-1, keepdim=True)
        out[:, :, m0:m1] = cand & (w >= thr)
    return out

def main(out_path):
    model, tok, dev, dtype = load_model("cpu")
    ids = acc.text_ids(tok, 8192)
    layers = [5, 17, 29]
    rec = acc.capture_qkv(model, ids, layers)
    rows = []
    for L in layers:
        q, k, v = (t.float() for t in rec.pop(L))
        layouts = {}
        for stride in (1, 8, 32):
            for mass in (0.9, 0.95, 0.98):
                est = estimators.get("anchor", mass=mass, backend="torch")
                dmask = A.dense_block_mask(q.shape[2], k.shape[2], 64, 64, 1, 2, True, q.device)
                col = column_mask_unbiased(est, q, k, stride=stride)
                blocks = dmask.expand(1, est._out_heads(q, k), *dmask.shape).contiguous()
                layouts[f"unbiased~s{stride}|mass={mass}"] = StripeLayout.from_mask(
                    blocks, col, block_m=64, block_n=64, max_columns=est._column_width(k.shape[2]))
        t0 = time.perf_counter()
        res = acc.evaluate_layouts(q, k, v, layouts)
        for key, r in res.items():
            m, b = key.split("|")
            for h in range(q.shape[1]):
                rows.append({"layer": L, "head": h, "method": m, "budget": b,
                             "curve": m, "mass_budget": float(b.split("=")[1]),
                             "recall": float(r["recall"][0, h]), "rel_l2": float(r["rel_l2"][0, h]),
                             "density": float(r["density"][0, h]), "estimate_s": 0.0})
        print(f"layer {L}: {time.perf_counter() - t0:.0f} s", flush=True)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps({"meta": {"command": " ".join(sys.argv), "seqlen": 8192,
        "layers": layers, "device": "cpu", "note": "anchor mass search: forced keys exact, "
        "candidates sampled every stride-th key and scaled by the stride"}, "rows": rows}, indent=1))
    for s in acc.summarize(rows):
        print(s["method"], s["budget"], "dens %.3f rec %.4f min %.3f l2 %.4f" % (
            s["density"], s["recall"], s["min_recall"], s["rel_l2"]))

if __name__ == "__main__":
    main(sys.argv[1])
