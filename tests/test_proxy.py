"""``proxy`` estimator (ProxyAttn) and the sampled block-score kernel of kernels/estimate.py.

CPU: the Triton kernel under the interpreter against the torch reference (fp16/fp32, <= 512
tokens); estimator behaviour on planted / structured attention. GPU (`pytest -m gpu`): bf16, big
shapes, no host sync, CUDA-graph capture.
"""
import math

import pytest
import torch
from conftest import assert_sync_free_and_capturable

from sparse_attn import estimators, sparse_attention
from sparse_attn.estimators import proxy as proxy_mod
from sparse_attn.estimators.metrics import attention_recall
from sparse_attn.kernels.estimate import block_scores
from sparse_attn.layout import causal_pair_counts
from sparse_attn.reference.estimate import block_scores_ref, sample_rows


def _planted(b, hq, hkv, sq, sk=None, d=64, block=64, hot=(2, 4), sharp=None, seed=0):
    """Random q/k plus, per KV head, key blocks ``hot`` aligned with a direction every query of
    the group shares: those blocks carry most of the mass. ``sharp`` scales each query head's
    share of the direction (a [hq] list: large = sparse head, 0 = diffuse head)."""
    g = torch.Generator().manual_seed(seed)
    sk = sq if sk is None else sk
    q = torch.randn(b, hq, sq, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g)
    u = torch.randn(b, hkv, 1, d, generator=g)
    u = u / u.norm(dim=-1, keepdim=True) * math.sqrt(d)
    for kb in hot:
        k[:, :, kb * block:(kb + 1) * block] += 1.5 * u
    w = torch.ones(hq) if sharp is None else torch.tensor(sharp, dtype=torch.float32)
    q = q + w[None, :, None, None] * u.repeat_interleave(hq // hkv, dim=1)
    return q, k


def _rows(q, block_m, rows):
    pos = sample_rows(q.shape[2], block_m, rows, q.device)
    return q.index_select(2, pos).contiguous(), pos


# ------------------------------------------------------------------------- kernel vs torch
@pytest.mark.parametrize("hs,hkv,sq,sk,rows,block,dtype,causal,window", [
    (4, 2, 200, 300, 8, 64, torch.float32, True, None),
    (4, 2, 200, 300, 8, 64, torch.float16, True, (1, 2)),
    (2, 2, 256, 256, 16, 64, torch.float32, False, None),
    (8, 1, 130, 130, 4, 64, torch.float16, True, None),
    (2, 1, 100, 400, 16, 128, torch.float32, True, (0, 1)),
    (4, 4, 257, 257, 32, 128, torch.float16, False, (2, 1)),
], ids=["gqa2-chunk-fp32", "gqa2-chunk-fp16-window", "mha-noncausal", "gqa8-odd-fp16",
        "b128-chunk-nosink", "b128-noncausal-window"])
def test_block_scores_kernel_matches_reference(hs, hkv, sq, sk, rows, block, dtype, causal,
                                               window):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, hs, sq, 64, generator=g).to(dtype)
    k = torch.randn(2, hkv, sk, 64, generator=g).to(dtype)
    q_rows, pos = _rows(q, block, rows)
    kw = dict(rows=rows, block_n=block, seqlen_q=sq, causal=causal, scale=0.125, window=window)
    got = block_scores(q_rows, k, pos, rows_per_program=32, **kw)
    ref = block_scores_ref(q_rows.float(), k.float(), pos, **kw)
    low = block_scores_ref(q_rows, k, pos, **kw)  # same math, inputs rounded to dtype
    assert not torch.isnan(got).any()
    tol = 2 * (low - ref).abs().max().item() + (1e-3 if dtype != torch.float32 else 1e-5)
    assert (got - ref).abs().max().item() <= tol
    pairs = causal_pair_counts(sq, sk, block, block, causal, "cpu")
    assert (got[:, :, pairs == 0] == 0).all()  # unreachable blocks get nothing
    if window is None:  # a full softmax: each query block's row sums to 1
        torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-4,
                                   rtol=0)


def test_sample_rows_spread_and_clamped():
    pos = sample_rows(200, 64, 4)
    assert pos.tolist() == [15, 31, 47, 63, 79, 95, 111, 127, 143, 159, 175, 191,
                            199, 199, 199, 199]


# ---------------------------------------------------------------------------- estimator
def test_proxy_finds_planted_blocks():
    q, k = _planted(2, 8, 2, 512)
    est = estimators.get("proxy", top_k=4, block_m=64, block_n=64)
    layout = est.estimate(q, k)
    assert layout.num_heads == 8  # per query head by default
    mask = layout.to_mask()
    for qb in range(5, 8):  # query blocks that can see both planted blocks
        assert mask[:, :, qb, 2].all() and mask[:, :, qb, 4].all()


def test_proxy_per_head_budgets_follow_head_sparsity():
    # heads 0/2 are sharp (most mass on the planted blocks), heads 1/3 diffuse
    q, k = _planted(1, 4, 2, 512, sharp=[2.0, 0.0, 2.0, 0.0])
    for budget in ("head", "max"):
        layout = estimators.get("proxy", mass=0.9, block_m=64, block_n=64,
                                budget=budget).estimate(q, k)
        dens = layout.density(512, 512, per_head=True)[0]
        assert dens[0] < dens[1] and dens[2] < dens[3], (budget, dens)
        assert attention_recall(q, k, layout).mean() > 0.8
    # "proxy": one count per proxy head (shared by its query heads)
    layout = estimators.get("proxy", mass=0.9, block_m=64, block_n=64,
                            budget="proxy").estimate(q, k)
    assert torch.equal(layout.counts[:, 0], layout.counts[:, 1])
    assert torch.equal(layout.counts[:, 2], layout.counts[:, 3])


def test_proxy_density_budget_and_gqa_reduce():
    q, k = _planted(2, 8, 2, 512)
    per_q = estimators.get("proxy", density=0.3, block_m=64, block_n=64).estimate(q, k)
    per_kv = estimators.get("proxy", density=0.3, gqa_reduce="max", block_m=64,
                            block_n=64).estimate(q, k)
    assert per_kv.num_heads == 2
    assert abs(per_q.density(512, 512) - 0.3) < 0.1
    # one proxy per group: every head of a group ranks alike, so the union is the same layout
    assert torch.equal(per_kv.to_mask(), per_q.to_mask()[:, ::4])


def test_proxy_chunked_prefill_and_batch():
    q, k = _planted(2, 4, 2, 192, sk=448)
    est = estimators.get("proxy", mass=0.95, block_m=64, block_n=64, proxy_heads=2)
    layout = est.estimate(q, k)
    layout.validate(192, 448)
    assert layout.counts.shape == (2, 4, 3)
    # end-aligned causal: the last query block reaches every key block
    assert layout.to_mask()[:, :, -1, 6].all()


def test_proxy_triton_path_matches_torch_path(monkeypatch):
    q, k = _planted(1, 4, 2, 320, seed=3)
    est = estimators.get("proxy", density=0.4, block_m=64, block_n=64, rows=16)
    ref = est.estimate(q, k)
    monkeypatch.setattr(proxy_mod, "_use_triton", lambda x: True)
    got = est.estimate(q, k)
    assert torch.equal(got.to_mask(), ref.to_mask())


def test_proxy_with_softmax_threshold_keyword():
    q, k = _planted(1, 4, 2, 256)
    v = torch.randn_like(k)
    out, layout = sparse_attention(q, k, v, "proxy", min_seqlen=0, softmax_threshold=1e-3,
                                   return_layout=True, block_m=64, block_n=64)
    assert out.shape == q.shape and layout.num_heads == 4 and not torch.isnan(out).any()


@pytest.mark.parametrize("config,match", [
    (dict(rows=3), "rows must be one of"),
    (dict(rows=256, block_m=128), "rows must be one of"),
    (dict(proxy_heads=0), "proxy_heads"),
    (dict(mass=0.9, density=0.1), "give one budget"),
    (dict(mass=1.5), "mass must be"),
    (dict(top_k=0), "top_k"),
    (dict(gqa_reduce="sum"), "gqa_reduce"),
    (dict(block_m=32), "block_m"),
    (dict(budget="min"), "budget must be one of"),
])
def test_proxy_bad_config(config, match):
    with pytest.raises(ValueError, match=match):
        estimators.get("proxy", **config)


def test_proxy_bad_shapes():
    q, k = _planted(1, 4, 2, 128)
    with pytest.raises(ValueError, match="proxy_heads=3 must divide"):
        estimators.get("proxy", proxy_heads=3, block_m=64, block_n=64).estimate(q, k)
    with pytest.raises(ValueError, match="local_blocks"):
        estimators.get("proxy", local_blocks=4, block_m=64, block_n=64).estimate(q, k)
    with pytest.raises(ValueError, match="seqlen_q <= seqlen_k"):
        estimators.get("proxy", block_m=64, block_n=64).estimate(q, k[:, :, :64])


# ----------------------------------------------------------------------------------- GPU
def check_sync_free_and_capturable(est, q, k):
    """``est.estimate(q, k)`` on CUDA: no host sync, and a CUDA graph replays the same layout.
    Returns the eager layout."""
    return assert_sync_free_and_capturable(lambda: est.estimate(q, k))


def check_against_oracle(est, layout, q, k, min_recall=0.5, slack=0.02):
    """A layout of ``est`` on planted q/k: recall above ``min_recall``; under a density / top-k
    budget also against the ``oracle`` of the same budget (exact block masses, same GQA
    reduction): exactly the oracle's blocks per row (the forced sink + local blocks count
    towards the budget), and a recall within ``slack`` of the oracle's (the planted blocks
    carry most of the mass, so a wrong pick costs far more than ``slack``)."""
    got = attention_recall(q.float(), k.float(), layout).mean().item()
    assert got > min_recall, got
    if est.mass is not None:  # an estimated mass budget has no exact counterpart
        return
    budget = {"density": est.density} if est.density is not None else {"top_k": est.top_k}
    oracle = estimators.get("oracle", block_m=est.block_m, block_n=est.block_n,
                            sink_blocks=est.sink_blocks, local_blocks=est.local_blocks,
                            gqa_reduce=est.gqa_reduce, **budget).estimate(q, k)
    assert torch.equal(layout.counts, oracle.counts)
    best = attention_recall(q.float(), k.float(), oracle).mean().item()
    assert got >= best - slack, (got, best)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_block_scores_big(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 8192, 128, device="cuda", generator=g).to(dtype)
    k = torch.randn(2, 2, 8192, 128, device="cuda", generator=g).to(dtype)
    q_rows, pos = _rows(q, 128, 16)
    kw = dict(rows=16, block_n=128, seqlen_q=8192, causal=True, scale=128 ** -0.5)
    got = block_scores(q_rows, k, pos, **kw)
    ref = block_scores_ref(q_rows.float(), k.float(), pos, **kw)
    low = block_scores_ref(q_rows, k, pos, **kw)
    tol = 2 * (low - ref).abs().max().item() + 2e-3  # tf32-free: bf16 tiles, fp32 accumulate
    assert (got - ref).abs().max().item() <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("config", [dict(mass=0.9), dict(density=0.25),
                                    dict(top_k=8, gqa_reduce="max")],
                         ids=["mass", "density", "topk-kv"])
def test_gpu_proxy_no_sync_graph_capture(config):
    # density 0.25 of 32 key blocks: the two planted blocks fit most rows' budget next to the
    # forced sink + diagonal (at 0.1 the forced blocks use up the budget of every row below
    # block 25, and even the oracle's recall is 0.22)
    q, k = _planted(2, 8, 2, 4096, d=128, block=128)
    q, k = q.cuda().bfloat16(), k.cuda().bfloat16()
    est = estimators.get("proxy", **config)
    ref = check_sync_free_and_capturable(est, q, k)
    check_against_oracle(est, ref, q, k)
