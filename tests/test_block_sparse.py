"""Triton block-sparse kernel against the pure-torch reference on random inputs."""
import math

import pytest
import torch

import sparse_attn as sa
from sparse_attn.layout import BlockLayout

from conftest import DEVICE, assert_matches_reference


def _qkv(b, hq, hkv, sq, sk, d, dtype, device, *, layout_bshd=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if layout_bshd:  # non-contiguous SDPA views of [B, S, H, D] storage
        q = torch.randn(b, sq, hq, d, generator=g).to(device, dtype).transpose(1, 2)
        k = torch.randn(b, sk, hkv, d, generator=g).to(device, dtype).transpose(1, 2)
        v = torch.randn(b, sk, hkv, d, generator=g).to(device, dtype).transpose(1, 2)
        return q, k, v
    q = torch.randn(b, hq, sq, d, generator=g).to(device, dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(device, dtype)
    v = torch.randn(b, hkv, sk, d, generator=g).to(device, dtype)
    return q, k, v


def _random_layout(b, h, sq, sk, bm, bn, density, device, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    nqb, nkb = math.ceil(sq / bm), math.ceil(sk / bn)
    mask = torch.rand(b, h, nqb, nkb, generator=g) < density
    return BlockLayout.from_mask(mask.to(device), bm, bn)


def _check(q, k, v, layout, causal, *, scale=None, threshold=None):
    """Kernel vs fp32 reference, with FlashAttention's rule: error <= 2x the error of the same
    reference computed in the input dtype, plus a small epsilon."""
    out, lse = sa.block_sparse_attention(q, k, v, layout, causal=causal, scale=scale,
                                         softmax_threshold=threshold, return_lse=True,
                                         backend="triton")
    ref, ref_lse = sa.block_sparse_attention_ref(q, k, v, layout, causal=causal, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    low = None
    if q.dtype != torch.float32:
        low, _ = sa.block_sparse_attention_ref(q, k, v, layout, causal=causal, scale=scale,
                                               upcast=False)
    assert_matches_reference(out, lse, ref, ref_lse, low)
    return out


CASES = [
    # b, hq, hkv, sq, sk, d, bm, bn, density, per_kv, causal
    (1, 2, 1, 200, 200, 64, 64, 64, 0.5, False, True),
    (1, 4, 2, 130, 257, 64, 64, 128, 0.6, True, True),
    (2, 8, 2, 100, 100, 32, 128, 64, 0.7, True, False),
    (1, 4, 1, 77, 300, 128, 64, 64, 0.5, True, True),
    (1, 3, 1, 77, 300, 40, 64, 64, 0.5, True, True),      # G=3 (not packed), D not pow2
    (1, 6, 2, 257, 257, 96, 128, 128, 0.5, True, True),    # G=3, D=96
    (1, 8, 1, 129, 129, 64, 64, 64, 0.8, True, True),      # G=8 packed
    (1, 2, 2, 64, 64, 256, 64, 64, 1.0, False, True),      # D=256, dense
    (2, 4, 4, 1, 200, 64, 64, 64, 0.7, False, True),       # single query row (decode shape)
    (1, 4, 1, 190, 190, 64, 128, 128, 1.0, True, False),
]


def _id(c):
    b, hq, hkv, sq, sk, d, bm, bn, dens, per_kv, causal = c
    return (f"B{b}-H{hq}-KV{hkv}-Sq{sq}-Sk{sk}-D{d}-bm{bm}-bn{bn}-p{dens}-"
            f"{'perkv' if per_kv else 'perq'}-{'causal' if causal else 'full'}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kernel_matches_reference(case, dtype):
    b, hq, hkv, sq, sk, d, bm, bn, dens, per_kv, causal = case
    q, k, v = _qkv(b, hq, hkv, sq, sk, d, dtype, DEVICE)
    layout = _random_layout(b, hkv if per_kv else hq, sq, sk, bm, bn, dens, DEVICE)
    _check(q, k, v, layout, causal)


@pytest.mark.parametrize("density", [0.0, 1.0], ids=["density0", "density1"])
def test_density_extremes(density):
    q, k, v = _qkv(1, 4, 2, 150, 150, 64, torch.float16, DEVICE)
    layout = _random_layout(1, 2, 150, 150, 64, 64, density, DEVICE)
    out = _check(q, k, v, layout, True)
    if density == 0.0:
        assert out.abs().max().item() == 0.0


def test_empty_rows_and_batch_layouts():
    q, k, v = _qkv(2, 4, 4, 200, 200, 64, torch.float16, DEVICE)
    mask = torch.rand(2, 4, 4, 4, generator=torch.Generator().manual_seed(3)) < 0.6
    mask[0, 1, 2] = False  # an empty query block
    mask[1, :, 0] = False
    _check(q, k, v, BlockLayout.from_mask(mask.to(DEVICE), 64, 64), True)


def test_non_contiguous_inputs_and_scale():
    q, k, v = _qkv(1, 8, 2, 160, 160, 64, torch.float16, DEVICE, layout_bshd=True)
    assert not q.is_contiguous()
    layout = _random_layout(1, 2, 160, 160, 64, 64, 0.6, DEVICE)
    _check(q, k, v, layout, True, scale=0.3)
    # a query slice (strided sequence dim) against the tail of the keys
    qs = q[:, :, 1::2]
    layout = _random_layout(1, 2, qs.shape[2], 160, 64, 64, 0.6, DEVICE)
    _check(qs, k, v, layout, True)


def test_dense_layout_equals_dense_reference():
    q, k, v = _qkv(1, 4, 2, 190, 190, 64, torch.float16, DEVICE)
    layout = BlockLayout.dense(1, 2, 190, block_m=64, block_n=128, device=DEVICE)
    out = sa.block_sparse_attention(q, k, v, layout, backend="triton")
    ref, _ = sa.dense_attention_ref(q, k, v)
    assert (out.float() - ref).abs().max().item() < 2e-3


def test_threshold_zero_equals_no_threshold():
    q, k, v = _qkv(1, 4, 2, 200, 200, 64, torch.float16, DEVICE)
    layout = _random_layout(1, 2, 200, 200, 64, 64, 0.7, DEVICE)
    a = sa.block_sparse_attention(q, k, v, layout, backend="triton")
    b, skipped = sa.block_sparse_attention(q, k, v, layout, softmax_threshold=0.0,
                                           return_skipped=True, backend="triton")
    assert torch.equal(a, b)
    assert float(skipped) == 0.0


def _peaked(seqlen, d, dtype, device, seed=0):
    """Queries that all align with a few 'heavy' keys (attention sinks / heavy hitters):
    most key tiles carry negligible mass, as in real LLM attention."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, seqlen, d, generator=g)
    k = torch.randn(1, 2, seqlen, d, generator=g) * 0.3
    direction = torch.randn(d, generator=g)
    direction /= direction.norm()
    q += 8.0 * direction
    k[:, :, :8] += 10.0 * direction  # the first keys dominate every row (logit gap ~10)
    v = torch.randn(1, 2, seqlen, d, generator=g)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


@pytest.mark.parametrize("lam", [1e-3, 1e-2])
def test_threshold_skips_and_error_is_bounded(lam):
    q, k, v = _peaked(512, 64, torch.float16, DEVICE)
    layout = BlockLayout.dense(1, 2, 512, block_m=64, block_n=64, device=DEVICE)
    out, skipped = sa.block_sparse_attention(q, k, v, layout, softmax_threshold=lam,
                                             return_skipped=True, backend="triton")
    _, none_skipped = sa.block_sparse_attention(q, k, v, layout, return_skipped=True,
                                                backend="triton")
    ref, _ = sa.dense_attention_ref(q, k, v)
    frac = float(skipped)
    assert 0.0 < frac <= 1.0 and float(none_skipped) == 0.0
    # every skipped tile holds < lam * block_n of the row's largest term, and the row's sum is
    # >= 1 in those units, so the dropped probability per row is < lam * block_n * tiles; the
    # output error is that mass times |v| (bounded by max |v|)
    n_tiles = 512 // 64
    bound = lam * 64 * n_tiles * v.abs().max().item()
    err = (out.float() - ref).abs().max().item()
    assert err < min(bound, 0.5), (err, bound)


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen", [8192, 32768])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_large(seqlen, d, dtype):
    if seqlen == 32768 and d != 128:
        pytest.skip("32k only at d=128 to keep the GPU suite short")
    q, k, v = _qkv(1, 8, 2, seqlen, seqlen, d, dtype, "cuda")
    layout = _random_layout(1, 2, seqlen, seqlen, 128, 128, 0.3, "cuda")
    _check(q, k, v, layout, True)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4, 8])
def test_gpu_gqa_chunked_prefill(group):
    q, k, v = _qkv(2, 8, 8 // group, 3000, 9000, 128, torch.bfloat16, "cuda")
    layout = _random_layout(2, 8 // group, 3000, 9000, 64, 128, 0.4, "cuda")
    _check(q, k, v, layout, True)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    q, k, v = _qkv(1, 8, 2, 4096, 4096, 128, torch.bfloat16, "cuda")
    layout = _random_layout(1, 2, 4096, 4096, 128, 128, 0.3, "cuda")
    sa.block_sparse_attention(q, k, v, layout)  # validates the layout once, compiles
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            sa.block_sparse_attention(q, k, v, layout, check_indices=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = sa.block_sparse_attention(q, k, v, layout, softmax_threshold=1e-4)
    q2, k2, v2 = _qkv(1, 8, 2, 4096, 4096, 128, torch.bfloat16, "cuda", seed=7)
    q.copy_(q2), k.copy_(k2), v.copy_(v2)
    graph.replay()
    torch.cuda.synchronize()
    eager = sa.block_sparse_attention(q2, k2, v2, layout, softmax_threshold=1e-4)
    assert torch.equal(static_out, eager)
