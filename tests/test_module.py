"""SparseAttention / sparse_attention: dense-vs-sparse policy, correctness against the torch
references, stats, and errors. CPU tensors run the torch reference backend."""
import dataclasses
import inspect

import pytest
import torch

import sparse_attn as sa
from sparse_attn import estimators, module as sa_module
from sparse_attn.layout import BlockLayout
from sparse_attn.reference import block_sparse_attention_ref, dense_attention_ref


# estimators local to the tests (tests/test_transformers.py imports them), so that they do not
# depend on the built-in ones
DENSE, STREAM = "_test_dense", "_test_stream"


@estimators.register(DENSE)
@dataclasses.dataclass
class _Dense(estimators.Estimator):
    block_size: int = 64

    def estimate(self, q, k, *, causal=True):
        return BlockLayout.dense(q.shape[0], k.shape[1], q.shape[2], k.shape[2], causal=causal,
                                 block_m=self.block_size, block_n=self.block_size,
                                 device=q.device)


@estimators.register(STREAM)
@dataclasses.dataclass
class _Stream(estimators.Estimator):
    block_size: int = 64
    local_blocks: int = 1

    def estimate(self, q, k, *, causal=True):
        return BlockLayout.streaming(q.shape[0], k.shape[1], q.shape[2], k.shape[2],
                                     local_blocks=self.local_blocks, causal=causal,
                                     block_m=self.block_size, block_n=self.block_size,
                                     device=q.device)


def _qkv(b=1, hq=4, hkv=2, sq=256, sk=None, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sk = sq if sk is None else sk
    q = torch.randn(b, hq, sq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, sk, d, generator=g, dtype=dtype)
    return q, k, v


CASES = [
    pytest.param(1, 4, 4, 256, 256, True, id="B1-H4-KV4-T256-causal"),
    pytest.param(2, 4, 1, 200, 200, True, id="B2-H4-KV1-T200-causal"),
    pytest.param(1, 8, 2, 70, 250, True, id="B1-H8-KV2-Tq70-Tk250-causal"),
    pytest.param(1, 4, 2, 130, 130, False, id="B1-H4-KV2-T130-noncausal"),
]


@pytest.mark.parametrize("b,hq,hkv,sq,sk,causal", CASES)
def test_dense_layout_matches_dense(b, hq, hkv, sq, sk, causal):
    q, k, v = _qkv(b, hq, hkv, sq, sk)
    attn = sa.SparseAttention(DENSE, min_seqlen=0, record_stats=True)
    out = attn(q, k, v, causal=causal)
    ref, _ = dense_attention_ref(q, k, v, causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert attn.stats[-1]["path"] == "sparse"
    assert attn.stats[-1]["density"] == pytest.approx(1.0)


@pytest.mark.parametrize("b,hq,hkv,sq,sk,causal", CASES)
def test_below_min_seqlen_runs_dense(b, hq, hkv, sq, sk, causal):
    q, k, v = _qkv(b, hq, hkv, sq, sk)
    attn = sa.SparseAttention(STREAM, min_seqlen=sk + 1, record_stats=True)
    out = attn(q, k, v, causal=causal, scale=0.1)
    ref, _ = dense_attention_ref(q, k, v, causal=causal, scale=0.1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert attn.stats == [{"path": "dense", "reason": "min_seqlen", "seqlen_q": sq,
                           "seqlen_k": sk, "density": 1.0}]


def test_dense_attention_reference_branch(monkeypatch):
    # a short query block against long keys beyond the SDPA-mask budget uses the reference
    q, k, v = _qkv(1, 4, 2, 40, 300)
    monkeypatch.setattr(sa_module, "_MAX_SDPA_MASK", 100)
    out = sa_module.dense_attention(q, k, v, causal=True)
    ref, _ = dense_attention_ref(q, k, v, causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_streaming_layout_matches_reference():
    q, k, v = _qkv(1, 4, 2, 300)
    out, layout = sa.sparse_attention(q, k, v, STREAM, min_seqlen=0, return_layout=True)
    expected = BlockLayout.streaming(1, 2, 300, local_blocks=1, block_m=64, block_n=64)
    assert torch.equal(layout.to_mask(), expected.to_mask())
    ref, _ = block_sparse_attention_ref(q, k, v, expected)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    dense, _ = dense_attention_ref(q, k, v)
    assert torch.isfinite(out).all() and (out - dense).abs().max() > 1e-2


def test_decode_dense_by_default_and_sparse_on_request():
    q, k, v = _qkv(1, 4, 2, 1, 300)
    ref, _ = dense_attention_ref(q, k, v)
    attn = sa.SparseAttention(STREAM, min_seqlen=0, record_stats=True)
    torch.testing.assert_close(attn(q, k, v), ref, atol=1e-5, rtol=1e-5)
    assert attn.stats[-1]["reason"] == "decode"
    sparse = sa.SparseAttention(STREAM, min_seqlen=0, decode="sparse", record_stats=True)
    out = sparse(q, k, v)
    assert sparse.stats[-1]["path"] == "sparse" and sparse.stats[-1]["density"] < 1.0
    expected = BlockLayout.streaming(1, 2, 1, 300, local_blocks=1, block_m=64, block_n=64)
    torch.testing.assert_close(out, block_sparse_attention_ref(q, k, v, expected)[0],
                               atol=1e-5, rtol=1e-5)


def test_functional_returns_no_layout_when_dense():
    q, k, v = _qkv(1, 2, 2, 64)
    out, layout = sa.sparse_attention(q, k, v, STREAM, return_layout=True)
    assert layout is None  # 64 < DEFAULT_MIN_SEQLEN
    torch.testing.assert_close(out, dense_attention_ref(q, k, v)[0], atol=1e-5, rtol=1e-5)


def test_fp16_keeps_dtype():
    q, k, v = _qkv(1, 4, 2, 128, dtype=torch.float16)
    out = sa.SparseAttention(STREAM, min_seqlen=0)(q, k, v)
    assert out.dtype == torch.float16 and out.shape == q.shape
    ref, _ = block_sparse_attention_ref(
        q, k, v, BlockLayout.streaming(1, 2, 128, local_blocks=1, block_m=64, block_n=64))
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


def test_stats_and_observer():
    q, k, v = _qkv(1, 4, 2, 256)
    attn = sa.SparseAttention(STREAM, min_seqlen=0, record_stats=True)
    seen = []
    attn.on_layout = lambda q_, k_, layout, causal: seen.append((q_.shape, layout, causal))
    attn(q, k, v)
    attn(q[:, :, -1:], k, v)  # decode: dense, no layout
    assert [s["path"] for s in attn.stats] == ["sparse", "dense"]
    layout = seen[0][1]
    assert len(seen) == 1 and seen[0][2] is True
    assert attn.stats[0]["density"] == pytest.approx(layout.density(256, 256))
    attn.reset_stats()
    assert attn.stats == []
    silent = sa.SparseAttention(STREAM, min_seqlen=0)
    silent(q, k, v)
    assert silent.stats == []


def test_default_min_seqlen_is_the_measured_crossover():
    default = inspect.signature(sa.SparseAttention.__init__).parameters["min_seqlen"].default
    assert default is None  # per method: default_min_seqlen
    assert sa.SparseAttention(STREAM).min_seqlen == sa_module.DEFAULT_MIN_SEQLEN
    assert sa.SparseAttention("anchor").min_seqlen == sa_module.default_min_seqlen("anchor")
    assert sa_module.default_min_seqlen("anchor") > sa_module.DEFAULT_MIN_SEQLEN
    assert "min_seqlen=16" in repr(sa.SparseAttention(STREAM, min_seqlen=16))


def test_errors():
    with pytest.raises(ValueError, match="available"):
        sa.SparseAttention("no_such_method")
    with pytest.raises(ValueError, match=r"accepted: \['block_size', 'local_blocks'\].*min_seqlen"):
        sa.SparseAttention(STREAM, local_blockz=3)
    with pytest.raises(ValueError, match="decode must be one of"):
        sa.SparseAttention(STREAM, decode="maybe")
    with pytest.raises(ValueError, match="min_seqlen"):
        sa.SparseAttention(STREAM, min_seqlen=-1)
    with pytest.raises(ValueError, match="backend"):
        sa.SparseAttention(STREAM, backend="cuda")
    with pytest.raises(ValueError, match="softmax_threshold"):
        sa.SparseAttention(STREAM, softmax_threshold=1.5)
    attn = sa.SparseAttention(STREAM, min_seqlen=0)
    q, k, v = _qkv(1, 4, 2, 128, 64)
    with pytest.raises(ValueError, match="seqlen_q <= seqlen_k"):
        attn(q, k, v)
    q, k, v = _qkv(1, 3, 2, 64)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attn(q, k, v)
    with pytest.raises(ValueError, match="rank-4"):
        attn(q[0], k, v)


@pytest.mark.skipif("streaming" not in estimators.available(),
                    reason="built-in streaming estimator not there yet")
def test_builtin_streaming_estimator():
    q, k, v = _qkv(1, 4, 2, 256)
    out, layout = sa.sparse_attention(q, k, v, "streaming", min_seqlen=0, return_layout=True)
    ref, _ = block_sparse_attention_ref(q, k, v, layout)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sq,sk,hq,hkv", [(300, 300, 4, 2), (70, 250, 8, 2)],
                         ids=["T300-H4-KV2", "Tq70-Tk250-H8-KV2"])
def test_attention_recall(sq, sk, hq, hkv):
    # recall = kept mass = exp(lse over the layout - lse over everything), row by row
    from sparse_attn.estimators.metrics import attention_recall

    q, k, _ = _qkv(2, hq, hkv, sq, sk)
    k = 2 * k  # peakier softmax
    layout = BlockLayout.streaming(2, hkv, sq, sk, local_blocks=1, block_m=64, block_n=64)
    recall = attention_recall(q, k, layout)
    zeros = torch.zeros_like(k[..., :1])
    _, lse_all = dense_attention_ref(q, k, zeros)
    _, lse_kept = block_sparse_attention_ref(q, k, zeros, layout)
    assert recall.shape == (2, hq)
    torch.testing.assert_close(recall, torch.exp(lse_kept - lse_all).mean(-1), atol=1e-5,
                               rtol=1e-5)
    assert float(recall.max()) < 1.0
    full = BlockLayout.dense(2, hq, sq, sk, block_m=64, block_n=64)
    torch.testing.assert_close(attention_recall(q, k, full), torch.ones(2, hq))
