"""BlockLayout: construction, round trips, token masks, density, validation, FlexAttention."""
import math

import pytest
import torch

from sparse_attn.layout import BlockLayout


def _mask(b, h, nqb, nkb, p, seed=0):
    return torch.rand(b, h, nqb, nkb, generator=torch.Generator().manual_seed(seed)) < p


def _brute_token_mask(block, bm, bn, sq, sk, causal):
    rows, cols = torch.arange(sq), torch.arange(sk)
    tok = block[:, :, rows // bm][..., cols // bn]
    if causal:
        tok = tok & (cols[None, :] <= rows[:, None] + sk - sq)
    return tok


@pytest.mark.parametrize("bm,bn", [(64, 64), (64, 128), (128, 64), (128, 128)])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_from_mask_round_trip(bm, bn, p):
    mask = _mask(2, 3, 5, 7, p)
    layout = BlockLayout.from_mask(mask, bm, bn)
    assert layout.counts.dtype == torch.int32 and layout.indices.dtype == torch.int32
    assert torch.equal(layout.to_mask(), mask)
    layout.validate(5 * bm - 3, 7 * bn - 1)
    # used indices are sorted, padding is -1
    for b, h, m in [(0, 0, 0), (1, 2, 4)]:
        c = int(layout.counts[b, h, m])
        used = layout.indices[b, h, m, :c]
        assert torch.all(used[1:] > used[:-1])
        assert torch.all(layout.indices[b, h, m, c:] == -1)


@pytest.mark.parametrize("sq,sk", [(200, 200), (77, 300), (130, 257)])
@pytest.mark.parametrize("causal", [True, False])
def test_token_mask_and_density(sq, sk, causal):
    bm, bn = 64, 128
    mask = _mask(1, 2, math.ceil(sq / bm), math.ceil(sk / bn), 0.6, seed=1)
    layout = BlockLayout.from_mask(mask, bm, bn)
    tok = layout.to_token_mask(sq, sk, causal=causal)
    assert torch.equal(tok, _brute_token_mask(mask, bm, bn, sq, sk, causal))
    area = _brute_token_mask(torch.ones_like(mask), bm, bn, sq, sk, causal).sum((-1, -2))
    expect = (tok.sum((-1, -2)).double() / area.double())
    assert torch.allclose(layout.density(sq, sk, causal=causal, per_head=True), expect)
    assert abs(layout.density(sq, sk, causal=causal) - float(expect.mean())) < 1e-9
    part = layout.to_token_mask(sq, sk, causal=causal, q_range=(10, 50))
    assert torch.equal(part, tok[:, :, 10:50])


def test_dense_and_streaming_helpers():
    sq, sk = 300, 500
    dense = BlockLayout.dense(1, 2, sq, sk, block_m=64, block_n=64)
    tok = dense.to_token_mask(sq, sk, causal=True)
    brute = _brute_token_mask(torch.ones(1, 2, 5, 8, dtype=torch.bool), 64, 64, sq, sk, True)
    assert torch.equal(tok, brute)
    assert abs(dense.density(sq, sk) - 1.0) < 1e-12
    st = BlockLayout.streaming(1, 2, sq, sk, sink_blocks=1, local_blocks=2, block_m=64,
                               block_n=64)
    m = st.to_mask()
    off = sk - sq
    for qb in range(5):
        diag = (min(qb * 64 + 63, sq - 1) + off) // 64
        expect = {0} | {diag, diag - 1}
        assert set(torch.nonzero(m[0, 0, qb]).flatten().tolist()) == expect
    assert 0 < st.density(sq, sk) < 1


@pytest.mark.parametrize("bad,match", [
    ("seqlen", "another sequence length"),
    ("range", "out of range"),
    ("unsorted", "strictly increasing"),
    ("neg", "out of range"),
    ("counts", "counts must lie"),
])
def test_validate_errors(bad, match):
    layout = BlockLayout.from_mask(_mask(1, 1, 3, 3, 1.0), 64, 64)
    sq = sk = 192
    if bad == "seqlen":
        sq = 400
    elif bad == "range":
        layout.indices[0, 0, 1, 2] = 3
    elif bad == "unsorted":
        layout.indices[0, 0, 1, :2] = torch.tensor([1, 0], dtype=torch.int32)
    elif bad == "neg":
        layout.indices[0, 0, 2, 1] = -1
    elif bad == "counts":
        layout.counts[0, 0, 0] = 4
    with pytest.raises(ValueError, match=match):
        layout.validate(sq, sk)


def test_constructor_errors():
    with pytest.raises(ValueError, match="counts"):
        BlockLayout(torch.zeros(2, 2, dtype=torch.int32), torch.zeros(1, 1, 1, 1))
    with pytest.raises(ValueError, match="block_m"):
        BlockLayout.from_mask(_mask(1, 1, 2, 2, 1.0), 100, 64)
    with pytest.raises(TypeError, match="bool"):
        BlockLayout.from_mask(torch.ones(1, 1, 2, 2), 64, 64)
    with pytest.raises(ValueError, match="local_blocks"):
        BlockLayout.streaming(1, 1, 128, local_blocks=0)


@pytest.mark.parametrize("causal", [True, False])
def test_to_block_mask_matches(causal):
    pytest.importorskip("torch.nn.attention.flex_attention")
    sq = sk = 320
    mask = _mask(1, 2, 3, 3, 0.6, seed=2)
    mask |= torch.eye(3, dtype=torch.bool)  # keep the diagonal so causal rows see something
    layout = BlockLayout.from_mask(mask, 128, 128)
    bm = layout.to_block_mask(sq, sk, causal=causal)
    total = bm.kv_num_blocks + (bm.full_kv_num_blocks if bm.full_kv_num_blocks is not None
                                else 0)
    reach = mask if not causal else mask & torch.tril(torch.ones(3, 3, dtype=torch.bool))
    assert torch.equal(total.cpu(), reach.sum(-1, dtype=torch.int32))
    dense = bm.to_dense().bool().cpu()
    assert torch.equal(dense[..., :3, :3], reach)


def test_to_block_mask_repeats_kv_layout_for_query_heads():
    pytest.importorskip("torch.nn.attention.flex_attention")
    mask = _mask(1, 2, 2, 2, 0.7, seed=4)
    layout = BlockLayout.from_mask(mask, 128, 128)
    bm = layout.to_block_mask(256, 256, causal=False, num_q_heads=8)
    dense = bm.to_dense().bool().cpu()
    assert dense.shape[1] == 8
    assert torch.equal(dense, mask.repeat_interleave(4, dim=1))


def test_to_block_mask_compact_indices():
    """A layout whose index width is below the key-block count (max_blocks) still converts:
    FlexAttention takes the number of key blocks from the index tensor's width."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    mask = _mask(1, 2, 6, 6, 0.3, seed=5) | torch.eye(6, dtype=torch.bool)
    layout = BlockLayout.from_mask(mask, 64, 64, max_blocks=int(mask.sum(-1).max()))
    assert layout.max_blocks < 6
    for causal in (False, True):
        dense = layout.to_block_mask(384, 384, causal=causal).to_dense().bool().cpu()
        reach = mask if not causal else mask & torch.tril(torch.ones(6, 6, dtype=torch.bool))
        assert torch.equal(dense, reach)
