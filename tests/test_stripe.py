"""Stripe attention: StripeLayout, the torch reference, the Triton kernel (interpreter on the CPU,
bf16 and big shapes on the GPU), validation."""
import math

import pytest
import torch

import sparse_attn as sa
from sparse_attn.kernels import stripe as kernel_module
from sparse_attn.layout import BlockLayout, StripeLayout

from conftest import DEVICE, assert_matches_reference


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


def test_builders_chunked_like_unchunked(monkeypatch):
    import sparse_attn.layout as layout_module

    g = torch.Generator().manual_seed(4)
    v = torch.randint(-1, 150, (2, 2, 9), generator=g)
    s = torch.randint(0, 150, (2, 2, 4), generator=g)
    whole = StripeLayout.from_vertical_slash(v, s, 130, 150, block_m=32, block_n=16)
    masks = whole.to_mask(150)
    monkeypatch.setattr(layout_module, "_rows_per_chunk", lambda row_elems: 1)
    chunked = StripeLayout.from_vertical_slash(v, s, 130, 150, block_m=32, block_n=16)
    again = StripeLayout.from_mask(*masks, 32, 16)
    for lay in (chunked, again):
        assert torch.equal(lay.to_token_mask(130, 150), whole.to_token_mask(130, 150))


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


def _manual_layout(counts, indices, sk=64, bm=16, bn=16):
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
    lay = _manual_layout(counts, indices)
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


# ----------------------------------------------------------------------------- the kernel
def _qkv(b, hq, hkv, sq, sk, d, dtype, device, *, layout_bshd=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape_q, shape_k = (b, sq, hq, d) if layout_bshd else (b, hq, sq, d), (
        (b, sk, hkv, d) if layout_bshd else (b, hkv, sk, d))
    q, k, v = (torch.randn(s, generator=g).to(device, dtype) for s in (shape_q, shape_k, shape_k))
    if layout_bshd:  # non-contiguous SDPA views of [B, S, H, D] storage
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return q, k, v


def _layout(b, h, sq, sk, bm, bn, device, *, p_block=0.3, p_col=0.15, seed=1):
    g = torch.Generator().manual_seed(seed)
    return random_stripe_layout(b, h, sq, sk, bm, bn, p_block=p_block, p_col=p_col,
                                generator=g).to(device)


def _check(q, k, v, layout, causal, *, scale=None, threshold=None, config=None):
    """Kernel vs fp32 reference (FlashAttention's rule, conftest.assert_matches_reference),
    outputs NaN-poisoned first."""
    if config is None:
        out, lse = sa.stripe_attention(q, k, v, layout, causal=causal, scale=scale,
                                       softmax_threshold=threshold, return_lse=True,
                                       backend="triton")
    else:
        layout.validate(q.shape[2], k.shape[2])
        out, lse, _ = kernel_module.stripe_fwd(
            q, k, v, layout, causal=causal, scale=scale or 1 / math.sqrt(q.shape[-1]),
            softmax_threshold=threshold, return_lse=True, config=config)
    ref, ref_lse = sa.stripe_attention_ref(q, k, v, layout, causal=causal, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    low = None
    if q.dtype != torch.float32:
        low, _ = sa.stripe_attention_ref(q, k, v, layout, causal=causal, scale=scale,
                                         upcast=False)
    assert_matches_reference(out, lse, ref, ref_lse, low)
    return out


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """torch.empty in the launch helpers returns NaN-filled memory: unwritten outputs fail."""
    from sparse_attn.kernels import block_sparse as bs

    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t
    monkeypatch.setattr(bs.torch, "empty", empty)
    yield
    monkeypatch.setattr(bs.torch, "empty", real)


CASES = [
    # b, hq, hkv, sq, sk, d, bm, bn, per_kv, causal
    (1, 2, 1, 130, 130, 64, 64, 64, False, True),
    (1, 4, 2, 77, 201, 64, 32, 64, True, True),       # Sq < Sk, odd lengths, packed G=2
    (2, 4, 2, 100, 100, 32, 64, 32, True, False),     # batch 2, not causal
    (1, 3, 1, 90, 150, 40, 64, 64, True, True),       # G=3 (not packed), D not a power of 2
    (1, 8, 1, 65, 65, 64, 64, 64, True, True),        # G=8 packed
    (1, 2, 2, 64, 64, 256, 64, 64, False, True),      # D=256
    (2, 4, 4, 1, 120, 64, 64, 64, False, True),       # single query row
]


def _id(c):
    b, hq, hkv, sq, sk, d, bm, bn, per_kv, causal = c
    return (f"B{b}-H{hq}-KV{hkv}-Sq{sq}-Sk{sk}-D{d}-bm{bm}-bn{bn}-"
            f"{'perkv' if per_kv else 'perq'}-{'causal' if causal else 'full'}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kernel_matches_reference(case, dtype):
    b, hq, hkv, sq, sk, d, bm, bn, per_kv, causal = case
    q, k, v = _qkv(b, hq, hkv, sq, sk, d, dtype, DEVICE)
    _check(q, k, v, _layout(b, hkv if per_kv else hq, sq, sk, bm, bn, DEVICE), causal)


@pytest.mark.parametrize("config", [(32, 32, 16, 4, 1, 1), (64, 16, 64, 4, 1, 1)],
                         ids=["many-chunks", "wide-gather"])
def test_kernel_tile_configs(config):
    # BLOCK_NS 16 (several gathered tiles per query block), dense blocks split into sub-tiles
    q, k, v = _qkv(1, 4, 2, 96, 160, 32, torch.float16, DEVICE)
    _check(q, k, v, _layout(1, 2, 96, 160, 32, 32, DEVICE, p_col=0.4), True, config=config)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_unmasked_prefix_and_masked_tail(causal):
    # many stripes per query block, Sq < Sk: full tiles before the tile's first row take the
    # unmasked (index-prefetching) loop; padding, stripes past a row and tiles wholly after
    # the tile's last row take the masked tail
    q, k, v = _qkv(1, 4, 2, 77, 201, 32, torch.float16, DEVICE)
    lay = _layout(1, 2, 77, 201, 32, 32, DEVICE, p_block=0.1, p_col=0.6, seed=3)
    _check(q, k, v, lay, causal, config=(32, 32, 16, 4, 1, 3))


def test_vertical_slash_layout():
    sq = sk = 192
    g = torch.Generator().manual_seed(5)
    vert = torch.randint(0, sk, (1, 2, 24), generator=g)
    slash = torch.cat([torch.arange(4).expand(1, 2, 4),
                       torch.randint(0, sk, (1, 2, 3), generator=g)], -1)
    layout = StripeLayout.from_vertical_slash(vert, slash, sq, sk, block_m=32, block_n=32)
    q, k, v = _qkv(1, 4, 2, sq, sk, 64, torch.float16, DEVICE)
    _check(q, k, v, layout.to(DEVICE), True)


def test_stripes_only_empty_rows_and_batch_layouts():
    q, k, v = _qkv(2, 2, 2, 128, 128, 32, torch.float16, DEVICE)
    bm = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    cm = torch.rand(2, 2, 4, 128, generator=torch.Generator().manual_seed(2)) < 0.2
    cm[0, 1, 2] = False  # a query block with nothing at all: zeros, lse = -inf
    cm[1, 0, 0] = False
    cm[1, 0, 0, 5] = True  # rows 0..4 of block 0 see nothing (causal), rows 5.. see key 5
    lay = StripeLayout.from_mask(bm, cm, 32, 32).to(DEVICE)
    _check(q, k, v, lay, True)
    empty = StripeLayout.from_mask(bm, torch.zeros_like(cm), 32, 32).to(DEVICE)
    out = _check(q, k, v, empty, True)
    assert out.abs().max().item() == 0.0


def test_non_contiguous_inputs_and_scale():
    q, k, v = _qkv(1, 8, 2, 96, 96, 64, torch.float16, DEVICE, layout_bshd=True)
    assert not q.is_contiguous()
    _check(q, k, v, _layout(1, 2, 96, 96, 32, 32, DEVICE), True, scale=0.3)
    qs = q[:, :, 1::2]  # strided sequence dim, aligned to the end of the keys
    _check(qs, k, v, _layout(1, 2, qs.shape[2], 96, 32, 32, DEVICE), True)
    # a layout whose tensors are non-contiguous views
    lay = _layout(1, 4, 96, 96, 32, 32, DEVICE, seed=3)
    blocks = BlockLayout(lay.blocks.counts[:, ::2], lay.blocks.indices[:, ::2], 32, 32,
                         lay.num_k_blocks)
    sliced = StripeLayout(blocks, lay.col_counts[:, ::2], lay.col_indices[:, ::2])
    assert not sliced.col_indices.is_contiguous()
    _check(q, k, v, sliced, True)


def test_torch_backend_and_threshold_zero():
    q, k, v = _qkv(1, 4, 2, 96, 96, 32, torch.float16, DEVICE)
    lay = _layout(1, 2, 96, 96, 32, 32, DEVICE)
    a = sa.stripe_attention(q, k, v, lay, backend="triton")
    b, skipped = sa.stripe_attention(q, k, v, lay, softmax_threshold=0.0, return_skipped=True,
                                     backend="triton")
    assert torch.equal(a, b) and float(skipped) == 0.0
    ref = sa.stripe_attention(q, k, v, lay, backend="torch")
    assert ref.dtype == q.dtype and (ref.float() - a.float()).abs().max().item() < 2e-3


def test_threshold_skips_gathered_tiles():
    # keys 0..7 dominate every row: with stripes only, most gathered tiles carry no mass
    g = torch.Generator().manual_seed(0)
    sq = 256
    q = torch.randn(1, 2, sq, 32, generator=g)
    k = torch.randn(1, 2, sq, 32, generator=g) * 0.3
    direction = torch.randn(32, generator=g)
    direction /= direction.norm()
    q += 8.0 * direction
    k[:, :, :8] += 10.0 * direction
    v = torch.randn(1, 2, sq, 32, generator=g)
    q, k, v = (t.to(DEVICE, torch.float16) for t in (q, k, v))
    nqb = sq // 32
    bm = torch.zeros(1, 2, nqb, nqb, dtype=torch.bool)
    cm = torch.ones(1, 2, nqb, sq, dtype=torch.bool)  # every key as a stripe
    lay = StripeLayout.from_mask(bm, cm, 32, 32).to(DEVICE)
    lam = 1e-3
    out, skipped = sa.stripe_attention(q, k, v, lay, softmax_threshold=lam,
                                       return_skipped=True, backend="triton")
    ref, _ = sa.dense_attention_ref(q, k, v)
    assert 0.0 < float(skipped) <= 1.0
    n_tiles = sq // 32  # CPU config gathers 32 positions at a time
    bound = lam * 32 * n_tiles * v.abs().max().item()
    assert (out.float() - ref).abs().max().item() < min(bound, 0.5)


# ----------------------------------------------------------------------------- bad input
def _ok(hq=4, hkv=2, sq=64, sk=64, d=32):
    q = torch.randn(1, hq, sq, d, dtype=torch.float16)
    k = torch.randn(1, hkv, sk, d, dtype=torch.float16)
    return q, k, torch.randn_like(k), _layout(1, hkv, sq, sk, 32, 32, "cpu")


def _with_cols(lay, counts, indices):
    return StripeLayout(lay.blocks, counts, indices)


@pytest.mark.parametrize("make,exc,match", [
    (lambda q, k, v, l: (q, k, v, l.blocks), TypeError, "must be a StripeLayout"),
    (lambda q, k, v, l: (q, k, v, l.repeat_heads(8)), ValueError, "layout has 8 heads"),
    (lambda q, k, v, l: (q[:, :, :20], k, v, l), ValueError, "query blocks"),
    (lambda q, k, v, l: (q, k[:, :, :30], v[:, :, :30], l), ValueError, "key blocks"),
    (lambda q, k, v, l: (q[:, :, :60], k[:, :, :60], v[:, :, :60], _with_cols(
        l, torch.ones_like(l.col_counts), torch.full((*l.col_counts.shape, 1), 63).int())),
     ValueError, "not in"),
    (lambda q, k, v, l: (q, k, v, _with_cols(
        l, torch.full_like(l.col_counts, 2),
        torch.tensor([40, 30]).expand(*l.col_counts.shape, 2).int())),
     ValueError, "strictly increasing"),
    (lambda q, k, v, l: (q, k, v, _with_cols(
        l, torch.full_like(l.col_counts, 2),
        torch.tensor([-1, 30]).expand(*l.col_counts.shape, 2).int())), ValueError, "-1 padding"),
    (lambda q, k, v, l: (q, k, v, _with_cols(
        l, torch.full_like(l.col_counts, 3), l.col_indices[..., :2])), ValueError, "col_counts"),
    (lambda q, k, v, l: (q.int(), k, v, l), TypeError, "q has dtype"),
])
def test_bad_input_raises_before_launch(monkeypatch, make, exc, match):
    def boom(*args, **kwargs):
        raise AssertionError("kernel launched with bad input")
    monkeypatch.setattr(kernel_module, "stripe_fwd", boom)
    q, k, v, lay = _ok()
    q, k, v, lay = make(q, k, v, lay)
    with pytest.raises(exc, match=match):
        sa.stripe_attention(q, k, v, lay, backend="triton")


def test_bad_scale_and_threshold():
    q, k, v, lay = _ok()
    with pytest.raises(ValueError, match="softmax_threshold"):
        sa.stripe_attention(q, k, v, lay, softmax_threshold=1.5)
    with pytest.raises(ValueError, match="scale"):
        sa.stripe_attention(q, k, v, lay, scale=-1.0)


# ------------------------------------------------------------------------------------ GPU
def _gpu_layout(b, h, seqlen, *, cols=256, bm=64, bn=64, seed=0):
    """Sink + local window dense, ``cols`` random vertical lines per head as stripes."""
    g = torch.Generator().manual_seed(seed)
    vert = torch.randint(0, seqlen, (b, h, cols), generator=g)
    slash = torch.arange(2 * bn).expand(b, h, -1)  # local diagonals: a band of dense blocks
    nqb, nkb = -(-seqlen // bm), -(-seqlen // bn)
    lay = StripeLayout.from_vertical_slash(vert.cuda(), slash.cuda(), seqlen, seqlen,
                                           block_m=bm, block_n=bn)
    sink = torch.zeros(b, h, nqb, nkb, dtype=torch.bool, device="cuda")
    sink[..., 0] = True
    blk, col = lay.to_mask(seqlen)
    return StripeLayout.from_mask(blk | sink, col, bm, bn, max_columns=cols)


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen", [4096, 16384])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_large(seqlen, d, dtype):
    if seqlen == 16384 and d != 128:
        pytest.skip("16k only at d=128 to keep the GPU suite short")
    q, k, v = _qkv(1, 8, 2, seqlen, seqlen, d, dtype, "cuda")
    _check(q, k, v, _gpu_layout(1, 2, seqlen), True)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4, 8])
def test_gpu_gqa_chunked_prefill_strided(group):
    q, k, v = _qkv(2, 8, 8 // group, 9000, 9000, 128, torch.bfloat16, "cuda", layout_bshd=True)
    q = q[:, :, -3000:]  # the last 3000 queries against 9000 keys
    lay = _gpu_layout(2, 8 // group, 9000)
    lay = StripeLayout(*(_crop_q(lay, 3000)))
    _check(q, k, v, lay, True)
    _check(q, k, v, lay, True, threshold=1e-6)


def _crop_q(lay, sq):
    """The rows of the last ``sq`` queries of a square layout, re-tiled so that query blocks
    start at the first kept row (only exact when the crop is a multiple of block_m)."""
    bm = lay.block_m
    nqb = -(-sq // bm)
    assert lay.num_q_blocks * bm - sq >= 0
    start = lay.num_q_blocks - nqb
    blk = BlockLayout(lay.blocks.counts[:, :, start:].contiguous(),
                      lay.blocks.indices[:, :, start:].contiguous(), bm, lay.block_n,
                      lay.num_k_blocks)
    return blk, lay.col_counts[:, :, start:].contiguous(), lay.col_indices[:, :, start:]


HOPPER_CONFIGS = [  # the d=128 candidates of bench_stripe.py --tune-configs
    (128, 64, 64, 8, 2, 3), (128, 64, 64, 8, 2, 4), (128, 64, 32, 8, 2, 5), (64, 64, 64, 4, 2, 3),
    (64, 64, 64, 4, 2, 4), (128, 64, 128, 8, 2, 2), (128, 64, 128, 8, 2, 3),
    (128, 64, 32, 4, 2, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("config", HOPPER_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_gpu_hopper_configs(config):
    q, k, v = _qkv(1, 8, 2, 4096, 4096, 128, torch.bfloat16, "cuda")
    _check(q, k, v, _gpu_layout(1, 2, 4096, cols=512), True, config=config)
    # random stripes anywhere (also after the rows: masked tail, tiles out of reach)
    lay = _layout(1, 2, 4096, 4096, 64, 64, "cuda", p_block=0.02, p_col=0.08)
    _check(q, k, v, lay, True, config=config)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    q, k, v = _qkv(1, 8, 2, 8192, 8192, 128, torch.bfloat16, "cuda")
    lay = _gpu_layout(1, 2, 8192)
    sa.stripe_attention(q, k, v, lay)  # validates the layout once, compiles
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            sa.stripe_attention(q, k, v, lay, softmax_threshold=1e-4, check_indices=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = sa.stripe_attention(q, k, v, lay, softmax_threshold=1e-4)
    q2, k2, v2 = _qkv(1, 8, 2, 8192, 8192, 128, torch.bfloat16, "cuda", seed=7)
    q.copy_(q2), k.copy_(k2), v.copy_(v2)
    graph.replay()
    torch.cuda.synchronize()
    eager = sa.stripe_attention(q2, k2, v2, lay, softmax_threshold=1e-4)
    assert torch.equal(static_out, eager)


@pytest.mark.gpu
def test_gpu_stripes_match_block_sparse_on_whole_blocks():
    # stripes covering whole key blocks give the block-sparse kernel's result
    b, h, s, bn = 1, 2, 4096, 64
    q, k, v = _qkv(b, 8, h, s, s, 128, torch.bfloat16, "cuda")
    g = torch.Generator().manual_seed(1)
    nb = s // bn
    blocks = torch.rand(b, h, nb, nb, generator=g) < 0.2
    blocks |= torch.eye(nb, dtype=torch.bool)
    blocks = blocks.cuda()
    cols = blocks.repeat_interleave(bn, -1) & ~torch.eye(nb, dtype=torch.bool, device="cuda"
                                                          ).repeat_interleave(bn, -1)
    diag = torch.eye(nb, dtype=torch.bool, device="cuda").expand(b, h, nb, nb).contiguous()
    lay = StripeLayout.from_mask(diag, cols, bn, bn)
    out = sa.stripe_attention(q, k, v, lay)
    want = sa.block_sparse_attention(q, k, v, BlockLayout.from_mask(blocks, bn, bn))
    assert (out.float() - want.float()).abs().max().item() < 2e-2
