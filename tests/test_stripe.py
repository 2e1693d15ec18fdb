"""Stripe attention: StripeLayout, the torch reference, the Triton kernel (interpreter on the CPU,
bf16 and big shapes on the GPU), validation."""
import pytest
import torch

from sparse_attn.layout import BlockLayout, StripeLayout


# ---------------------------------------------------------------------------------- helpers
def _brute_vertical_slash(v, s, sq, sk):
    """Token mask of vertical lines and slash diagonals, causal (queries aligned to the end)."""
    b, h = v.shape[:2]
    rows = torch.arange(sq)[:, None] + sk - sq
    cols = torch.arange(sk)[None]
    out = torch.zeros(b, h, sq, sk, dtype=torch.bool)
    for i in range(b):
        for j in range(h):
            for x in v[i, j].tolist():
                if 0 <= x < sk:
                    out[i, j, :, x] = True
            for o in s[i, j].tolist():
                if o >= 0:
                    out[i, j] |= rows - cols == o
    return out & (cols <= rows)


def random_stripe_layout(b, h, sq, sk, block_m, block_n, *, p_block=0.3, p_col=0.1,
                         generator=None, max_columns=None):
    """Random dense blocks (always the diagonal one) plus random stripe columns."""
    nqb, nkb = -(-sq // block_m), -(-sk // block_n)
    bm = torch.rand(b, h, nqb, nkb, generator=generator) < p_block
    cm = torch.rand(b, h, nqb, sk, generator=generator) < p_col
    return StripeLayout.from_mask(bm, cm, block_m, block_n, max_columns=max_columns)


# ----------------------------------------------------------------------------- the layout
def test_from_mask_drops_columns_in_dense_blocks():
    bm = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    bm[..., 0, 0] = bm[..., 1, 1] = True
    cm = torch.zeros(1, 1, 2, 32, dtype=torch.bool)
    cm[..., 0, [3, 17, 20]] = True   # 3 is inside block (0, 0)
    cm[..., 1, [3, 17]] = True       # 17 is inside block (1, 1)
    lay = StripeLayout.from_mask(bm, cm, block_m=16, block_n=16)
    assert lay.col_counts.tolist() == [[[2, 1]]]
    assert lay.col_indices[0, 0, 0, :2].tolist() == [17, 20]
    assert lay.col_indices[0, 0, 1, :1].tolist() == [3]
    assert (lay.col_indices[0, 0, 0, 2:] == -1).all()
    assert lay.col_indices.dtype == torch.int32 and lay.max_columns == 32
    lay.validate(32, 32)
    blk, col = lay.to_mask()
    assert torch.equal(blk, bm)
    assert torch.equal(col, cm & ~bm.repeat_interleave(16, -1))
    assert "StripeLayout(B=1, H=1, NQB=2" in repr(lay)
    assert (lay.batch, lay.num_heads, lay.num_q_blocks, lay.block_m, lay.block_n) == (
        1, 1, 2, 16, 16)
    assert lay.to("cpu").device.type == "cpu"


def test_from_mask_max_columns_caps():
    cm = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    bm = torch.zeros(1, 1, 1, 3, dtype=torch.bool)
    lay = StripeLayout.from_mask(bm, cm, 16, 16, max_columns=8)
    assert lay.col_counts.item() == 8 and lay.col_indices[0, 0, 0].tolist() == list(range(8))


@pytest.mark.parametrize("sq,sk,bm,bn", [(100, 100, 16, 32), (37, 90, 32, 16),
                                         (64, 64, 16, 16), (200, 333, 64, 64)])
def test_from_vertical_slash_covers_lines(sq, sk, bm, bn):
    g = torch.Generator().manual_seed(sq + sk)
    v = torch.randint(-1, sk, (2, 3, 7), generator=g)
    s = torch.randint(-1, sk + 3, (2, 3, 5), generator=g)
    lay = StripeLayout.from_vertical_slash(v, s, sq, sk, block_m=bm, block_n=bn)
    lay.validate(sq, sk)
    tok = lay.to_token_mask(sq, sk, causal=True)
    want = _brute_vertical_slash(v, s, sq, sk)
    assert not (want & ~tok).any(), "a line is missing"
    # only whole slash blocks may add pairs: the stripes are exact
    _, col = lay.to_mask(sk)
    rows = torch.arange(sq)
    stripes = col[:, :, rows // bm] & (torch.arange(sk)[None] <= rows[:, None] + sk - sq)
    assert not (stripes & ~want).any()
    causal_area = (torch.arange(sk)[None] <= rows[:, None] + sk - sq).sum()
    want_density = float(tok.sum((-1, -2)).double().mean() / causal_area)
    assert lay.density(sq, sk) == pytest.approx(want_density, rel=1e-9)
    # round trip through the masks
    blk, col = lay.to_mask(sk)
    again = StripeLayout.from_mask(blk, col, bm, bn)
    assert torch.equal(again.to_token_mask(sq, sk, causal=True), tok)


def test_from_vertical_slash_static_width_and_dedup():
    v = torch.tensor([[[5, 5, 40, -1, 3]]])
    s = torch.tensor([[[0, 0]]])
    lay = StripeLayout.from_vertical_slash(v, s, 64, 64, block_m=16, block_n=16, max_columns=5)
    assert lay.max_columns == 5
    assert lay.col_counts.tolist() == [[[0, 2, 2, 3]]]  # the diagonal block holds 3, 5 or 40
    assert lay.col_indices[0, 0, 3].tolist() == [3, 5, 40, -1, -1]
    trimmed = StripeLayout.from_vertical_slash(v, s, 64, 64, block_m=16, block_n=16)
    assert trimmed.max_columns == 3


def test_density_non_causal_and_per_head():
    bm = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    cm = torch.zeros(1, 2, 2, 32, dtype=torch.bool)
    cm[0, 0, :, 0] = True
    lay = StripeLayout.from_mask(bm, cm, 16, 16)
    d = lay.density(32, 32, causal=False, per_head=True)
    assert d.shape == (1, 2)
    assert d[0, 0].item() == pytest.approx(32 / 1024) and d[0, 1].item() == 0
    assert lay.density(32, 32, causal=True) == pytest.approx(32 / 528 / 2)


def test_repeat_heads():
    lay = random_stripe_layout(1, 2, 64, 64, 16, 16, generator=torch.Generator().manual_seed(0))
    rep = lay.repeat_heads(6)
    assert rep.num_heads == 6
    assert torch.equal(rep.col_indices[:, 2], lay.col_indices[:, 0])
    assert torch.equal(rep.col_indices[:, 5], lay.col_indices[:, 1])
    with pytest.raises(ValueError, match="multiple"):
        lay.repeat_heads(5)


def _layout(counts, indices, sk=64, bm=16, bn=16):
    nqb = len(counts[0][0])
    blocks = BlockLayout.from_mask(torch.zeros(1, 1, nqb, -(-sk // bn), dtype=torch.bool),
                                   bm, bn)
    return StripeLayout(blocks, torch.tensor(counts, dtype=torch.int32),
                        torch.tensor(indices, dtype=torch.int32))


@pytest.mark.parametrize("counts,indices,match", [
    ([[[2]]], [[[[5, 5, -1]]]], "strictly increasing"),
    ([[[2]]], [[[[7, 5, -1]]]], "strictly increasing"),
    ([[[2]]], [[[[-1, 5, -1]]]], "-1 padding"),
    ([[[2]]], [[[[5, 64, -1]]]], "not in"),
    ([[[4]]], [[[[5, 6, -1]]]], "col_counts must lie"),
])
def test_validate_rejects(counts, indices, match):
    lay = _layout(counts, indices)
    with pytest.raises(ValueError, match=match):
        lay.validate(16, 64)


def test_validate_rejects_column_in_dense_block_and_bad_construction():
    blocks = BlockLayout.from_mask(torch.ones(1, 1, 1, 4, dtype=torch.bool), 16, 16)
    lay = StripeLayout(blocks, torch.tensor([[[1]]]), torch.tensor([[[[5]]]]))
    with pytest.raises(ValueError, match="inside"):
        lay.validate(16, 64)
    with pytest.raises(ValueError, match="query blocks"):
        lay.validate(40, 64)
    with pytest.raises(ValueError, match="col_counts"):
        StripeLayout(blocks, torch.zeros(1, 2, 1, dtype=torch.int32),
                     torch.zeros(1, 2, 1, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match="int32"):
        StripeLayout(blocks, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match="BlockLayout"):
        StripeLayout(None, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1, 1))
    with pytest.raises(ValueError, match="column_mask"):
        StripeLayout.from_mask(torch.zeros(1, 1, 1, 4, dtype=torch.bool),
                               torch.zeros(1, 1, 1, 70, dtype=torch.bool), 16, 16)
    with pytest.raises(TypeError, match="column_mask"):
        StripeLayout.from_mask(torch.zeros(1, 1, 1, 4, dtype=torch.bool),
                               torch.zeros(1, 1, 1, 64), 16, 16)
    with pytest.raises(TypeError, match="slash_offsets"):
        StripeLayout.from_vertical_slash(torch.zeros(1, 1, 2, dtype=torch.long),
                                         torch.zeros(1, 1, 2), 16, 16)
    with pytest.raises(ValueError, match="seqlen_q"):
        StripeLayout.from_vertical_slash(torch.zeros(1, 1, 2, dtype=torch.long),
                                         torch.zeros(1, 1, 2, dtype=torch.long), 32, 16)
