"""``lowbit`` estimator (SALE): int8 quantization and int8 block-score kernels against torch,
relative-attention-score ranking on planted attention. GPU: bf16, big shapes, graph capture."""
import pytest
import torch

from sparse_attn import estimators
from sparse_attn.estimators import proxy as proxy_mod
from sparse_attn.estimators.metrics import attention_recall
from sparse_attn.kernels.estimate import block_scores, quantize_int8
from sparse_attn.reference.estimate import block_scores_ref, quantize_int8_ref, sample_rows
from test_proxy import _planted, check_against_oracle, check_sync_free_and_capturable


@pytest.mark.parametrize("shape,block,dtype", [
    ((2, 3, 200, 64), 64, torch.float32), ((1, 2, 130, 128), 128, torch.float16),
    ((1, 1, 64, 80), 16, torch.float16),
], ids=["B2-H3-T200-D64-fp32", "B1-H2-T130-D128-fp16", "T64-D80-block16-fp16"])
def test_quantize_int8_matches_reference(shape, block, dtype):
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    x[0, 0, :block] = 0  # an all-zero block: scale 1, zeros
    yq, ys = quantize_int8(x, block)
    rq, rs = quantize_int8_ref(x, block)
    assert torch.equal(ys, rs) and ys[0, 0, 0] == 1.0
    assert (yq.int() - rq.int()).abs().max() <= 1  # a rounding tie may differ by one step
    deq = yq.float() * ys.repeat_interleave(block, dim=2)[:, :, :shape[2], None]
    assert ((deq - x.float()).abs() <= ys.repeat_interleave(block, 2)[:, :, :shape[2], None]
            * 0.5 + 1e-6).all()


@pytest.mark.parametrize("hs,hkv,sq,sk,rows,block,causal,window", [
    (4, 2, 200, 300, 8, 64, True, (1, 1)),
    (4, 1, 256, 256, 16, 64, True, (0, 2)),
    (2, 2, 130, 130, 16, 128, False, (1, 1)),
    (2, 2, 192, 192, 16, 64, True, None),
], ids=["gqa2-chunk", "gqa4-nosink", "b128-noncausal", "fullnorm"])
def test_int8_block_scores_kernel_matches_reference(hs, hkv, sq, sk, rows, block, causal,
                                                    window):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, hs, sq, 64, generator=g)
    k = torch.randn(2, hkv, sk, 64, generator=g)
    pos = sample_rows(sq, block, rows)
    qq, qs = quantize_int8_ref(q.index_select(2, pos.long()), rows)
    kq, ks = quantize_int8_ref(k, block)
    kw = dict(rows=rows, block_n=block, seqlen_q=sq, causal=causal, scale=0.125,
              q_scale=qs, k_scale=ks, window=window)
    got = block_scores(qq, kq, pos, rows_per_program=32, **kw)
    ref = block_scores_ref(qq, kq, pos, **kw)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)  # exact int32 dot, fp32 rescale


def test_relative_score_is_relative_to_the_window():
    # keys equal to the query: every key scores alike, so a block's relative score is its
    # number of visible keys over the window's
    q = torch.ones(1, 1, 256, 16)
    k = torch.ones(1, 1, 256, 16)
    pos = sample_rows(256, 64, 1)  # the last row of each block
    got = block_scores_ref(q.index_select(2, pos.long()), k, pos, rows=1, block_n=64,
                           seqlen_q=256, causal=True, scale=1.0, window=(1, 1))
    # last query block: window = sink block + own block = 128 keys; each block 64 keys -> 0.5
    torch.testing.assert_close(got[0, 0, 3], torch.full((4,), 0.5))


def test_lowbit_finds_planted_blocks_and_recall():
    q, k = _planted(2, 8, 2, 512)
    layout = estimators.get("lowbit", top_k=4, block_m=64, block_n=64).estimate(q, k)
    assert layout.num_heads == 2
    mask = layout.to_mask()
    for qb in range(5, 8):
        assert mask[:, :, qb, 2].all() and mask[:, :, qb, 4].all()
    mass = estimators.get("lowbit", mass=0.9, block_m=64, block_n=64).estimate(q, k)
    assert attention_recall(q, k, mass).mean() > 0.85
    assert mass.density(512, 512) < 0.8


def test_lowbit_beats_pooled_blocks_on_a_diluted_token():
    # one hot key per planted block: pooling dilutes it, token-level int8 scores find it
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 1024, 64, generator=g)
    k = torch.randn(1, 2, 1024, 64, generator=g)
    u = torch.randn(1, 2, 1, 64, generator=g)
    u = u / u.norm(dim=-1, keepdim=True) * 8
    for kb in (2, 6, 9):
        k[:, :, kb * 64 + 17] += 2 * u[:, :, 0]
    q += 0.5 * u.repeat_interleave(2, dim=1)
    cfg = dict(top_k=5, block_m=64, block_n=64)
    low = estimators.get("lowbit", **cfg).estimate(q, k)
    pooled = estimators.get("block_topk", **cfg).estimate(q, k)
    r_low, r_pool = attention_recall(q, k, low).mean(), attention_recall(q, k, pooled).mean()
    assert r_low > r_pool + 0.05, (float(r_low), float(r_pool))


def test_lowbit_triton_path_matches_torch_path(monkeypatch):
    q, k = _planted(1, 4, 2, 320, seed=4)
    est = estimators.get("lowbit", density=0.4, block_m=64, block_n=64, rows=16)
    ref = est.estimate(q, k)
    monkeypatch.setattr(proxy_mod, "_use_triton", lambda x: True)
    assert torch.equal(est.estimate(q, k).to_mask(), ref.to_mask())


def test_lowbit_chunked_prefill():
    q, k = _planted(2, 4, 2, 128, sk=384)
    layout = estimators.get("lowbit", mass=0.95, block_m=64, block_n=64).estimate(q, k)
    layout.validate(128, 384)
    assert layout.counts.shape == (2, 2, 2)


@pytest.mark.parametrize("config,match", [
    (dict(bits=4), "bits must be one of"), (dict(rows=5), "rows must be one of"),
    (dict(density=0.0), "density must be"), (dict(top_k=2, mass=0.5), "give one budget"),
])
def test_lowbit_bad_config(config, match):
    with pytest.raises(ValueError, match=match):
        estimators.get("lowbit", **config)


def test_lowbit_backend_dispatch(monkeypatch):
    from types import SimpleNamespace

    from sparse_attn.estimators import lowbit as lowbit_mod

    with pytest.raises(ValueError, match="backend must be one of"):
        estimators.get("lowbit", backend="cutlass")
    qq = SimpleNamespace(is_cuda=True, shape=(1, 4, 32, 64))  # only what the dispatch reads
    for supported in (False, True):
        monkeypatch.setattr(lowbit_mod._cuda, "lowbit_supported",
                            lambda *a, supported=supported, **kw: supported)
        for block in (64, 128):
            def use(backend):
                return estimators.get("lowbit", backend=backend, block_m=block,
                                      block_n=block)._use_cuda(qq, qq)
            assert use("triton") is False
            assert use("auto") is (supported and block in lowbit_mod.CUDA_BLOCK_N)
            if supported:
                assert use("cuda") is True
            else:
                with pytest.raises(RuntimeError, match="backend='cuda' needs"):
                    use("cuda")
    # CPU inputs: the torch reference whatever the backend
    q, k = _planted(1, 4, 2, 256)
    est = estimators.get("lowbit", backend="cuda", density=0.5, block_m=64, block_n=64)
    assert est.estimate(q, k).num_heads == 2


# ----------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_int8_block_scores_big():
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 8192, 128, device="cuda", generator=g).bfloat16()
    k = torch.randn(2, 2, 8192, 128, device="cuda", generator=g).bfloat16()
    pos = sample_rows(8192, 128, 16, "cuda")
    qq, qs = quantize_int8(q.index_select(2, pos).contiguous(), 16)
    kq, ks = quantize_int8(k, 128)
    rq, rs = quantize_int8_ref(k, 128)
    assert torch.equal(ks, rs) and (kq.int() - rq.int()).abs().max() <= 1
    kw = dict(rows=16, block_n=128, seqlen_q=8192, causal=True, scale=128 ** -0.5, q_scale=qs,
              k_scale=ks, window=(1, 1))
    torch.testing.assert_close(block_scores(qq, kq, pos, **kw),
                               block_scores_ref(qq, kq, pos, **kw), atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
def test_gpu_lowbit_cuda_and_triton_backends_agree():
    from sparse_attn import _cuda

    if not _cuda.available():
        pytest.skip(f"CUDA extension {_cuda.status()}")
    q, k = _planted(1, 8, 2, 4096, d=128, block=128)
    q, k = q.cuda().bfloat16(), k.cuda().bfloat16()
    lay = {b: estimators.get("lowbit", backend=b, mass=0.9).estimate(q, k)
           for b in ("cuda", "triton")}
    # same scores up to float rounding: the layouts differ at most on near ties
    diff = (lay["cuda"].to_mask() != lay["triton"].to_mask()).float().mean().item()
    assert diff < 0.01, diff


@pytest.mark.gpu
@pytest.mark.parametrize("config", [dict(mass=0.9), dict(density=0.25)], ids=["mass", "density"])
def test_gpu_lowbit_no_sync_graph_capture(config):
    # density 0.25: the planted blocks fit the budget next to the forced blocks (see test_proxy)
    q, k = _planted(2, 8, 2, 4096, d=128, block=128)
    q, k = q.cuda().bfloat16(), k.cuda().bfloat16()
    est = estimators.get("lowbit", **config)
    ref = check_sync_free_and_capturable(est, q, k)
    check_against_oracle(est, ref, q, k)
