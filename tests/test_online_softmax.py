"""The online softmax shared by the prefill kernels (block-sparse, stripe, top-k) on inputs
whose per-tile score max climbs and falls by tens of log2 units, and on rows that see no key
before keys of very low score, against the pure-torch references. fp32 inputs only on the CPU:
on the GPU fp32 dots run in tf32, whose error on scores of this size exceeds the fp32 rule."""
import pytest
import torch

import sparse_attn as sa
from sparse_attn.layout import BlockLayout, StripeLayout, TopKLayout

from conftest import DEVICE, assert_matches_reference


DTYPES = [torch.float16] + ([] if DEVICE == "cuda" else [torch.float32])


def _wide_range_qkv(hq, hkv, seqlen, d, dtype, seed=0):
    """Keys whose norms swing between 0.2 and 14 along the sequence: with the 1/sqrt(d) scale,
    neighbouring key tiles' score maxima differ by tens of log2 units, up and down."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(1, hq, seqlen, d, generator=g)
    k = torch.randn(1, hkv, seqlen, d, generator=g)
    v = torch.randn(1, hkv, seqlen, d, generator=g)
    pos = torch.arange(seqlen, dtype=torch.float32)
    gain = 0.2 + 13.8 * (0.5 + 0.5 * torch.sin(pos / 23.0)) ** 4
    k = k * gain[:, None]
    return (q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype))


def _assert_close(out, lse, ref_fn, q):
    ref, ref_lse = ref_fn(upcast=True)
    low = None if q.dtype == torch.float32 else ref_fn(upcast=False)[0]
    assert torch.isfinite(out).all()
    assert_matches_reference(out, lse, ref, ref_lse, low)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_sparse_wide_score_range(dtype):
    q, k, v = _wide_range_qkv(4, 2, 300, 64, dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    mask = torch.rand(1, 2, 5, 5, generator=g) < 0.7
    layout = BlockLayout.from_mask(mask.to(DEVICE), 64, 64)
    out, lse = sa.block_sparse_attention(q, k, v, layout, return_lse=True, backend="triton")
    _assert_close(out, lse, lambda upcast: sa.block_sparse_attention_ref(
        q, k, v, layout, upcast=upcast), q)


def test_stripe_wide_score_range():
    q, k, v = _wide_range_qkv(4, 2, 200, 64, torch.float16)
    g = torch.Generator(device="cpu").manual_seed(2)
    nb = 4
    blocks = torch.eye(nb, dtype=torch.bool).expand(1, 2, nb, nb).clone()
    blocks[..., 0] = True
    columns = torch.rand(1, 2, nb, 200, generator=g) < 0.3
    layout = StripeLayout.from_mask(blocks.to(DEVICE), columns.to(DEVICE), block_m=64,
                                    block_n=64)
    out, lse = sa.stripe_attention(q, k, v, layout, return_lse=True, backend="triton")
    _assert_close(out, lse, lambda upcast: sa.stripe_attention_ref(
        q, k, v, layout, upcast=upcast), q)


@pytest.mark.parametrize("merge", [False, True], ids=["perToken", "merged"])
def test_topk_wide_score_range(merge):
    q, k, v = _wide_range_qkv(4, 1, 150, 64, torch.float16)
    g = torch.Generator(device="cpu").manual_seed(3)
    layout = sa.topk_indices(torch.randn(1, 1, 150, 150, generator=g).to(DEVICE), 48,
                             causal=True)
    out, lse = sa.topk_attention(q, k, v, layout, return_lse=True, backend="triton",
                                 merge=merge)
    _assert_close(out, lse, lambda upcast: sa.topk_attention_ref(
        q, k, v, layout, upcast=upcast), q)


@pytest.mark.parametrize("merge", [False, True], ids=["perToken", "merged"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_very_negative_scores_after_an_empty_chunk(merge, dtype):
    """A tile's rows see nothing in its first key chunks (per token: the chunks of the tile's
    earlier tokens; merged: keys other tokens own), then only keys scoring about -300 in log2
    units. The max of such a row must start from its own keys: a max left at 0 by the empty
    chunks would underflow every exp2 to 0."""
    d, seqlen = 64, 64
    direction = torch.randn(d)
    direction = direction / direction.norm()
    q = (-41.0 * direction).expand(1, 4, seqlen, d).clone()
    g = torch.Generator(device="cpu").manual_seed(4)
    k = (41.0 * direction).expand(1, 1, seqlen, d) + 0.01 * torch.randn(1, 1, seqlen, d,
                                                                       generator=g)
    v = torch.randn(1, 1, seqlen, d, generator=g)
    # odd tokens list keys 0..31 (the union's first 32-key chunk), even tokens only keys >= 32
    # up to themselves (causal); tokens < 32 see keys < 32 only
    idx = torch.full((1, 1, seqlen, 32), -1, dtype=torch.int32)
    for t in range(seqlen):
        own = [j for j in range(t + 1) if (j >= 32) == (t % 2 == 0 and t >= 32)][-32:]
        idx[0, 0, t, :len(own)] = torch.tensor(own, dtype=torch.int32)
    layout = TopKLayout(idx.to(DEVICE))
    q, k, v = (x.to(DEVICE, dtype) for x in (q, k, v))
    out, lse = sa.topk_attention(q, k, v, layout, return_lse=True, backend="triton", merge=merge)
    _assert_close(out, lse, lambda upcast: sa.topk_attention_ref(
        q, k, v, layout, upcast=upcast), q)
