"""Baseline estimators (dense, streaming, block_topk, oracle), block selection and recall.

CPU shapes stay <= 1024 tokens; the sync-free check runs on a GPU (`pytest -m gpu`).
"""
import math

import pytest
import torch
from conftest import assert_sync_free_and_capturable

from sparse_attn import estimators
from sparse_attn.estimators.metrics import attention_recall, block_attention_mass
from sparse_attn.estimators.select import select_blocks
from sparse_attn.layout import BlockLayout, causal_pair_counts

BASELINES = ("dense", "streaming", "block_topk", "oracle")


def _qk(b, hq, hkv, sq, sk=None, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sk = sq if sk is None else sk
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    return q, k


def _structured(b, hq, hkv, s, d=64, hot=3, block=64, seed=0):
    """Keys with a few hot blocks along one direction per KV head that every query shares."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    u = torch.randn(b, hkv, 1, d, generator=g)
    u = u / u.norm(dim=-1, keepdim=True) * math.sqrt(d)
    nkb = -(-s // block)
    for bi in range(b):
        for h in range(hkv):
            for kb in torch.randperm(nkb, generator=g)[:hot].tolist():
                k[bi, h, kb * block:(kb + 1) * block] += u[bi, h]
    q += u.repeat_interleave(hq // hkv, dim=1)
    return q, k


def _dense_recall(q, k, layout, causal=True):
    """Recall from the full softmax matrix, independent of metrics.py."""
    sq, sk = q.shape[2], k.shape[2]
    kx = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q @ kx.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq).logical_not(),
                          float("-inf"))
    p = s.softmax(-1)
    tok = layout.to_token_mask(sq, sk)
    if layout.num_heads != q.shape[1]:
        tok = tok.repeat_interleave(q.shape[1] // layout.num_heads, dim=1)
    return (p * tok).sum(-1).mean(-1)


def _forced(layout, est, sq, sk, causal=True):
    return BlockLayout.streaming(
        1, 1, sq, sk, sink_blocks=est.sink_blocks, local_blocks=est.local_blocks, causal=causal,
        block_m=layout.block_m, block_n=layout.block_n).to_mask()


# ------------------------------------------------------------------------------------ registry
def test_registry_lists_and_rejects():
    assert set(BASELINES) <= set(estimators.available())
    with pytest.raises(ValueError, match="available: .*block_topk"):
        estimators.get("nope")
    with pytest.raises(ValueError, match=r"no config \['massive'\]; accepted: .*mass"):
        estimators.get("block_topk", massive=0.9)
    for name in BASELINES:
        assert estimators.get(name).name == name


BAD_CONFIGS = [
    ("block_topk", dict(mass=0.0), r"mass must be a number in \(0, 1\]"),
    ("block_topk", dict(mass=1.5), r"mass must be a number in \(0, 1\]"),
    ("oracle", dict(mass=float("nan")), r"mass must be a number in \(0, 1\]"),
    ("block_topk", dict(density=0.0), r"density must be a number in \(0, 1\]"),
    ("oracle", dict(density=1.2), r"density must be a number in \(0, 1\]"),
    ("block_topk", dict(mass=0.9, density=0.1), r"give one budget.*accepted: mass"),
    ("oracle", dict(density=0.1, top_k=4), r"give one budget"),
    ("block_topk", dict(top_k=0), "top_k must be an int >= 1"),
    ("block_topk", dict(sink_blocks=-1), "sink_blocks must be an int >= 0"),
    ("streaming", dict(local_blocks=0), "local_blocks must be an int >= 1"),
    ("oracle", dict(local_blocks=-2), "local_blocks must be an int >= 1"),
    ("dense", dict(block_m=32), r"block_m must be one of \(64, 128\)"),
    ("streaming", dict(block_n=100), r"block_n must be one of \(64, 128\)"),
    ("block_topk", dict(gqa_reduce="sum"), r"gqa_reduce must be one of \('max', 'mean', 'none'\)"),
    ("block_topk", dict(pool="median"), r"pool must be one of \('mean', 'max'\)"),
]


@pytest.mark.parametrize("name,config,match", BAD_CONFIGS, ids=[
    "-".join([name] + [f"{key}={value}" for key, value in config.items()])
    for name, config, _ in BAD_CONFIGS])
def test_bad_config(name, config, match):
    with pytest.raises(ValueError, match=match):
        estimators.get(name, **config)


def test_default_budget_is_mass():
    assert estimators.get("block_topk").mass == 0.95
    est = estimators.get("oracle", density=0.2)
    assert est.mass is None and est.density == 0.2


@pytest.mark.parametrize("name", ["streaming", "block_topk", "oracle"])
def test_window_larger_than_sequence(name):
    q, k = _qk(1, 2, 2, 300)
    est = estimators.get(name, block_m=64, block_n=64, local_blocks=8)
    with pytest.raises(ValueError, match=r"local_blocks=8 .*64 keys.*5 key blocks of seqlen_k=300"):
        est.estimate(q, k)


@pytest.mark.parametrize("name", BASELINES)
def test_bad_shapes(name):
    est = estimators.get(name, block_m=64, block_n=64)
    q, k = _qk(1, 4, 2, 200, 100)
    with pytest.raises(ValueError, match="seqlen_q <= seqlen_k"):
        est.estimate(q, k)
    q, k = _qk(1, 4, 3, 200)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        est.estimate(q, k)


# ---------------------------------------------------------------------------- layout validity
CONFIGS = [
    pytest.param("dense", {}, id="dense"),
    pytest.param("streaming", dict(sink_blocks=1, local_blocks=2), id="streaming"),
    pytest.param("block_topk", dict(mass=0.9), id="topk-mass"),
    pytest.param("block_topk", dict(density=0.3, gqa_reduce="mean"), id="topk-density-mean"),
    pytest.param("block_topk", dict(top_k=3, pool="max", gqa_reduce="none"), id="topk-k3-maxpool"),
    pytest.param("oracle", dict(mass=0.9), id="oracle-mass"),
    pytest.param("oracle", dict(density=0.3, gqa_reduce="max"), id="oracle-density-max"),
]
SHAPES = [
    pytest.param(1, 4, 4, 256, 256, 64, 64, True, torch.float32, id="B1-H4-KV4-T256-b64"),
    pytest.param(2, 3, 1, 333, 333, 64, 128, True, torch.float16, id="B2-H3-KV1-T333-b64x128-fp16"),
    pytest.param(1, 6, 2, 300, 300, 128, 64, True, torch.float32, id="B1-H6-KV2-T300-b128x64"),
    pytest.param(2, 8, 2, 100, 451, 64, 64, True, torch.float32, id="B2-H8-KV2-Tq100-Tk451"),
    pytest.param(1, 4, 1, 130, 130, 64, 64, False, torch.float32, id="B1-H4-KV1-T130-noncausal"),
]


@pytest.mark.parametrize("name,config", CONFIGS)
@pytest.mark.parametrize("b,hq,hkv,sq,sk,bm,bn,causal,dtype", SHAPES)
def test_layout_valid(name, config, b, hq, hkv, sq, sk, bm, bn, causal, dtype):
    q, k = _qk(b, hq, hkv, sq, sk, dtype=dtype)
    est = estimators.get(name, block_m=bm, block_n=bn, **config)
    layout = est.estimate(q, k, causal=causal)
    assert isinstance(layout, BlockLayout)
    layout.validate(sq, sk)
    per_query_head = config.get("gqa_reduce", "none" if name == "oracle" else "max") == "none"
    heads = hq if per_query_head and name in ("block_topk", "oracle") else hkv
    assert (layout.batch, layout.num_heads) == (b, heads)
    assert (layout.block_m, layout.block_n) == (bm, bn)
    mask = layout.to_mask()
    reach = causal_pair_counts(sq, sk, bm, bn, causal) > 0
    assert not (mask & ~reach).any(), "a block no query of its block can see"
    assert (layout.counts >= 1).all()
    if name != "dense":  # sink and diagonal blocks are always there
        assert (mask >= _forced(layout, est, sq, sk, causal)).all()


# --------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("name", ["block_topk", "oracle"])
def test_mass_monotone_and_per_head(name):
    q, k = _structured(2, 4, 4, 512)
    q[:, 0] = 0.0  # head 0 attends uniformly: it needs far more blocks than the others
    prev = None
    for mass in (0.3, 0.6, 0.9, 0.99, 1.0):
        est = estimators.get(name, mass=mass, block_m=64, block_n=64, gqa_reduce="none")
        mask = est.estimate(q, k).to_mask()
        if prev is not None:
            assert (mask >= prev).all(), f"mass {mass} dropped blocks kept at a lower mass"
        prev = mask
        if mass == 0.9:
            counts = mask.sum((-1, -2))
            assert (counts[:, 0] > counts[:, 1:].max(-1).values).all(), counts


@pytest.mark.parametrize("name", ["block_topk", "oracle"])
@pytest.mark.parametrize("density", [0.25, 0.5])
def test_density_budget(name, density):
    q, k = _qk(1, 4, 2, 1024)
    layout = estimators.get(name, density=density, block_m=64, block_n=64).estimate(q, k)
    got = layout.density(1024, 1024)
    assert abs(got - density) < 0.05, got
    nvalid = (causal_pair_counts(1024, 1024, 64, 64, True) > 0).sum(-1)
    want = (density * nvalid).round().clamp(min=2)  # sink + diagonal forced
    want[0] = 1  # the first query block sees only its diagonal (= sink) block
    assert (layout.counts == want.int()).all()


def test_top_k_budget():
    q, k = _qk(2, 4, 2, 700)
    layout = estimators.get("block_topk", top_k=4, block_m=64, block_n=64).estimate(q, k)
    nvalid = (causal_pair_counts(700, 700, 64, 64, True) > 0).sum(-1)
    assert (layout.counts == nvalid.clamp(max=4).int()).all()


def test_select_blocks():
    p = torch.tensor([[[[0.1, 0.5, 0.2, 0.15, 0.05, 0.0]]]])
    valid = torch.tensor([True, True, True, True, True, False])
    keep = torch.tensor([True, False, False, False, False, False])
    take = lambda **kw: select_blocks(p, valid=valid, keep=keep, **kw)[0, 0, 0].tolist()  # noqa
    assert take(mass=0.5) == [True, True, False, False, False, False]
    assert take(mass=0.8) == [True, True, True, False, False, False]
    assert take(mass=1.0) == [True, True, True, True, True, False]
    assert take(count=3) == [True, True, True, False, False, False]
    assert take(count=9) == [True, True, True, True, True, False]  # capped by valid
    assert take(count=0) == [True, False, False, False, False, False]  # forced stay
    with pytest.raises(ValueError, match="exactly one budget"):
        select_blocks(p, mass=0.5, count=2)
    with pytest.raises(ValueError, match=r"mass must lie in \(0, 1\]"):
        select_blocks(p, mass=2.0)


# --------------------------------------------------------------------------- oracle / recall
def test_block_attention_mass_and_recall_match_dense():
    q, k = _qk(2, 6, 2, 200, 333)
    mass = block_attention_mass(q, k, 64, 128)
    torch.testing.assert_close(mass.sum(-1), torch.ones(2, 6, 4))
    g = torch.Generator().manual_seed(1)
    for heads in (2, 6):  # per KV head and per query head
        layout = BlockLayout.from_mask(torch.rand(2, heads, 4, 3, generator=g) < 0.5, 64, 128)
        torch.testing.assert_close(attention_recall(q, k, layout), _dense_recall(q, k, layout))


def test_oracle_mass_one_keeps_every_block_with_mass():
    q, k = _qk(1, 4, 2, 384)
    q = q.abs() + 1
    k[:, :, 64:128] = -100.0  # every score there is about -1400: exactly zero mass
    est = estimators.get("oracle", mass=1.0, block_m=64, block_n=64, sink_blocks=0)
    layout = est.estimate(q, k)
    mask = layout.to_mask()
    true = block_attention_mass(q, k, 64, 64) > 0
    assert not true[:, :, :, 1].any()
    assert not mask[:, :, 2:, 1].any()  # kept only where it is the diagonal (forced) block
    assert torch.equal(mask, true | _forced(layout, est, 384, 384))
    torch.testing.assert_close(attention_recall(q, k, layout), torch.ones(1, 4))


@pytest.mark.parametrize("mass", [0.5, 0.8, 0.95])
@pytest.mark.parametrize("sq,sk", [(512, 512), (200, 700)], ids=["T512", "Tq200-Tk700"])
def test_oracle_recall_reaches_mass(mass, sq, sk):
    q, k = _structured(2, 8, 2, sk)
    q = q[:, :, -sq:]
    layout = estimators.get("oracle", mass=mass, block_m=64, block_n=64).estimate(q, k)
    recall = _dense_recall(q, k, layout)
    assert (recall >= mass - 1e-5).all(), recall
    assert layout.density(sq, sk) < 1.0


@pytest.mark.parametrize("name", ["block_topk", "oracle"])
def test_chunked_prefill_matches_full(name):
    # a query chunk aligned to a block boundary gets the full sequence's last query blocks
    q, k = _structured(1, 4, 2, 640)
    est = estimators.get(name, top_k=4, block_m=64, block_n=64)
    full = est.estimate(q, k).to_mask()
    tail = est.estimate(q[:, :, -192:], k).to_mask()
    assert torch.equal(tail, full[:, :, -3:])


def test_block_topk_recall_beats_random():
    q, k = _structured(2, 8, 2, 1024, hot=3)
    est = estimators.get("block_topk", mass=0.9, block_m=64, block_n=64)
    layout = est.estimate(q, k)
    # a random layout with the same forced blocks and the same count per query block
    g = torch.Generator().manual_seed(0)
    rand = select_blocks(
        torch.rand(layout.counts.shape + (layout.num_k_blocks,), generator=g),
        valid=causal_pair_counts(1024, 1024, 64, 64, True) > 0,
        keep=_forced(layout, est, 1024, 1024), count=layout.counts)
    rand = BlockLayout.from_mask(rand, 64, 64)
    assert torch.equal(rand.counts, layout.counts)
    got, base = attention_recall(q, k, layout).mean(), attention_recall(q, k, rand).mean()
    assert layout.density(1024, 1024) < 0.5
    assert got > 0.85 and got > base + 0.25, (float(got), float(base))


# ----------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name,config", [
    ("dense", {}), ("streaming", dict(local_blocks=4)), ("block_topk", dict(mass=0.9)),
    ("block_topk", dict(density=0.1)), ("block_topk", dict(top_k=8, gqa_reduce="none")),
    ("oracle", dict(mass=0.9)),
], ids=["dense", "streaming", "topk-mass", "topk-density", "topk-k8", "oracle"])
def test_no_host_sync_and_graph_capture(name, config):
    q, k = (t.cuda() for t in _qk(2, 8, 2, 4096, dtype=torch.bfloat16))
    est = estimators.get(name, **config)
    # oracle is chunked over queries with host-side slicing: sync-free, capture not needed
    assert_sync_free_and_capturable(lambda: est.estimate(q, k), capture=name != "oracle")
