"""CPU smoke of bench/accuracy.py's core: capture on a tiny random Llama, layout evaluation
against direct computations, summaries and the plot."""
import math

import pytest
import torch
from conftest import load_bench_module

from sparse_attn import estimators
from sparse_attn.estimators.metrics import attention_recall
from sparse_attn.layout import BlockLayout, StripeLayout


@pytest.fixture(scope="module")
def acc():
    yield from load_bench_module("accuracy")


def _qkv(hq=4, hkv=2, s=300, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, hq, s, d, generator=g), torch.randn(1, hkv, s, d, generator=g),
            torch.randn(1, hkv, s, d, generator=g))


def _direct(q, k, v, token_mask):
    """Recall and rel L2 of a [B, Hq, S, S] token mask, computed in one piece."""
    hq, hkv, s = q.shape[1], k.shape[1], q.shape[2]
    kk, vv = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    sc = q @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    p = sc.masked_fill(~causal, float("-inf")).softmax(-1)
    ref = p @ vv
    m = token_mask & causal
    kept = p * m
    recall = kept.sum(-1).mean(-1)
    out = (kept @ vv) / kept.sum(-1, keepdim=True)
    err = ((out - ref).square().sum((-1, -2)) / ref.square().sum((-1, -2))).sqrt()
    dens = m.sum((-1, -2)).float() / causal.sum()
    return recall, err, dens


def test_evaluate_layouts_matches_direct(acc, monkeypatch):
    monkeypatch.setattr(acc, "ROW_CHUNK_BYTES", 4 * 2 * 300 * 4 * 7)  # several row chunks
    q, k, v = _qkv()
    dense = BlockLayout.dense(1, 2, 300, block_m=64, block_n=64)
    stream = BlockLayout.streaming(1, 2, 300, sink_blocks=1, local_blocks=1, block_m=64,
                                   block_n=64)
    stripe = estimators.get("anchor", theta=3.0, local_blocks=1, gqa_reduce="none").estimate(
        q * 3, k)
    assert isinstance(stripe, StripeLayout)
    res = acc.evaluate_layouts(q, k, v, {"dense": dense, "stream": stream, "stripe": stripe})
    torch.testing.assert_close(res["dense"]["recall"], torch.ones(1, 4))
    assert res["dense"]["rel_l2"].max() < 1e-5
    torch.testing.assert_close(res["dense"]["density"], torch.ones(1, 4))
    torch.testing.assert_close(res["stream"]["recall"], attention_recall(q, k, stream),
                               atol=1e-5, rtol=1e-5)
    for name, lay in (("stream", stream.repeat_heads(4)), ("stripe", stripe)):
        tok = lay.to_token_mask(300, 300)
        recall, err, dens = _direct(q, k, v, tok)
        torch.testing.assert_close(res[name]["recall"], recall, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res[name]["rel_l2"], err, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res[name]["density"], dens, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res["stripe"]["density"][0],
                               stripe.density(300, 300, per_head=True)[0].float(),
                               atol=1e-5, rtol=1e-5)


def test_run_layer_summaries_and_plot(acc, tmp_path):
    q, k, v = _qkv(s=512, d=64, seed=1)
    notes = {}
    methods = ["dense", "streaming", "block_topk", "oracle", "anchor", "vertical_slash"]
    rows = acc.run_layer(q, k, v, methods, 0, notes)
    assert "streaming|local_blocks=16" in notes  # 16 blocks of 64 do not fit 512 keys
    assert {r["method"] for r in rows} == set(methods)
    summary = acc.summarize(rows)
    by = {(s["method"], s["budget"]): s for s in summary}
    assert by[("dense", "-")]["recall"] == pytest.approx(1.0)
    oracle = [by[("oracle", f"mass={m}")]["recall"] for m in acc.MASSES]
    assert all(r >= m - 1e-4 for r, m in zip(oracle, acc.MASSES))  # oracle recall >= mass
    at_mass, equal = acc.comparisons(summary)
    assert {r["method"] for r in at_mass} >= {"oracle", "anchor", "vertical_slash"}
    assert next(r for r in at_mass if r["method"] == "oracle")["x_oracle"] == pytest.approx(1)
    assert {r["method"] for r in equal} >= {"anchor", "anchor[theta]", "streaming"}
    acc.draw(summary, tmp_path / "a.png", "test")
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_recall_at_density(acc):
    pts = [{"density": 0.1, "recall": 0.5}, {"density": 0.3, "recall": 0.9}]
    assert acc.recall_at_density(pts, 0.2) == pytest.approx(0.7)
    assert acc.recall_at_density(pts, 0.5) is None


def test_threshold_rows(acc):
    q, k, v = _qkv(s=256, d=64, seed=2)
    rows = acc.run_threshold(q, k, v, {"threshold": 0.5}, 3)
    assert len(rows) == 4 and all(r["recall"] is None for r in rows)
    assert all(0 <= r["density"] <= 1 for r in rows)


def test_capture_on_tiny_llama(acc):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        ref = model(ids).logits
    got = acc.capture_qkv(model, ids, [1])
    assert set(got) == {1}
    q, k, v = got[1]
    assert q.shape == (1, 4, 40, 16) and k.shape == v.shape == (1, 2, 40, 16)
    assert model.config._attn_implementation == "sdpa"  # restored
    with torch.no_grad():
        again = model(ids).logits
    torch.testing.assert_close(again, ref)
    # the recorded attention reproduces the model's output of that layer's attention
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                           enable_gqa=True)
    assert torch.isfinite(out).all()


def test_anchor_stride_variants(acc, monkeypatch):
    """anchor~sN rows: mass points only, CONFIG restored afterwards, stride 1 = plain anchor."""
    from sparse_attn.kernels import stripe_estimate as se

    before = dict(se.CONFIG)
    monkeypatch.setattr(acc, "LONG_KEYS", 128)
    q, k, v = _qkv(s=384, d=64, seed=4)
    rows = acc.run_layer(q, k, v, ["anchor", "anchor~s1", "anchor~s4"], 0, {})
    assert se.CONFIG == before
    got = {(r["method"], r["budget"], r["head"]): r for r in rows}
    assert {b for m, b, _ in got if m == "anchor~s4"} == {f"mass={m}" for m in acc.MASSES}
    for h in range(4):
        assert got[("anchor~s1", "mass=0.95", h)]["density"] == pytest.approx(
            got[("anchor", "mass=0.95", h)]["density"])
    assert any(got[("anchor~s4", "mass=0.95", h)]["density"]
               != got[("anchor", "mass=0.95", h)]["density"] for h in range(4))
    with pytest.raises(SystemExit, match="anchor~sN"):
        acc._variant("block_topk~s4")
