"""Token-level top-k attention: TopKLayout, topk_indices, the Triton kernel against the
pure-torch reference on random inputs, bad input."""
import pytest
import torch

import sparse_attn as sa
from sparse_attn.kernels.topk import merge_token_lists, merge_token_lists_torch
from sparse_attn.layout import TopKLayout
from sparse_attn.reference.dense import attention_ref

from conftest import DEVICE, assert_matches_reference


def _qkv(b, hq, hkv, sq, sk, d, dtype, device, *, bshd=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if bshd:  # non-contiguous SDPA views of [B, S, H, D] storage
        q = torch.randn(b, sq, hq, d, generator=g).to(device, dtype).transpose(1, 2)
        k = torch.randn(b, sk, hkv, d, generator=g).to(device, dtype).transpose(1, 2)
        v = torch.randn(b, sk, hkv, d, generator=g).to(device, dtype).transpose(1, 2)
        return q, k, v
    q = torch.randn(b, hq, sq, d, generator=g).to(device, dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(device, dtype)
    v = torch.randn(b, hkv, sk, d, generator=g).to(device, dtype)
    return q, k, v


def _random_layout(b, hkv, sq, sk, topk, device, *, causal=True, local=0, seed=1):
    """Random scores -> top-k (optionally boosting a local window so neighbours overlap);
    rows with fewer visible keys than k get -1 padding."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.randn(b, hkv, sq, sk, generator=g)
    if local:
        pos = torch.arange(sq)[:, None] + (sk - sq)
        cols = torch.arange(sk)[None, :]
        scores += 4.0 * ((cols <= pos) & (cols > pos - local))
    return sa.topk_indices(scores.to(device), min(topk, sk), causal=causal)


def _check(q, k, v, layout, causal, **kw):
    """Kernel vs fp32 reference with FlashAttention's rule (2x the same-dtype torch error)."""
    out, lse = sa.topk_attention(q, k, v, layout, causal=causal, return_lse=True,
                                 backend="triton", **kw)
    ref, ref_lse = sa.topk_attention_ref(q, k, v, layout, causal=causal)
    assert out.dtype == q.dtype and out.shape == q.shape
    low = None
    if q.dtype != torch.float32:
        low, _ = sa.topk_attention_ref(q, k, v, layout, causal=causal, upcast=False)
    assert_matches_reference(out, lse, ref, ref_lse, low)
    return out


CASES = [
    # b, hq, hkv, sq, sk, d, topk, causal, bshd
    (1, 4, 1, 77, 77, 64, 24, True, False),       # G=4, odd length
    (2, 8, 2, 50, 130, 64, 40, True, False),      # batch 2, Sq < Sk
    (1, 8, 1, 33, 33, 128, 16, True, True),       # G=8, strided views
    (1, 2, 2, 40, 90, 256, 32, False, False),     # MHA, D=256, non-causal
    (1, 6, 2, 45, 61, 96, 20, True, False),       # G=3 (padded to 4 rows), D=96
    (1, 4, 4, 1, 120, 64, 64, True, False),       # single query row
]


def _id(c):
    b, hq, hkv, sq, sk, d, topk, causal, bshd = c
    return (f"B{b}-H{hq}-KV{hkv}-Sq{sq}-Sk{sk}-D{d}-K{topk}-{'causal' if causal else 'full'}"
            f"{'-bshd' if bshd else ''}")


@pytest.mark.parametrize("merge", [False, True], ids=["perToken", "merged"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kernel_matches_reference(case, dtype, merge):
    b, hq, hkv, sq, sk, d, topk, causal, bshd = case
    q, k, v = _qkv(b, hq, hkv, sq, sk, d, dtype, DEVICE, bshd=bshd)
    layout = _random_layout(b, hkv, sq, sk, topk, DEVICE, causal=causal, local=8)
    _check(q, k, v, layout, causal, merge=merge)


@pytest.mark.parametrize("tokens", [1, 4, 16])
@pytest.mark.parametrize("merge", [False, True], ids=["perToken", "merged"])
def test_tokens_per_tile(tokens, merge):
    q, k, v = _qkv(1, 4, 1, 70, 70, 64, torch.float16, DEVICE)
    layout = _random_layout(1, 1, 70, 70, 24, DEVICE)
    _check(q, k, v, layout, True, merge=merge, tokens=tokens)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_merged_tokens_sharing_their_lists(causal):
    """Every token of a 32-token query block lists the same keys, in its own order: most merged
    chunks are owned by every token of the tile (the kernel skips their owner mask), the
    diagonal's and the padding's are not."""
    q, k, v = _qkv(1, 4, 1, 100, 100, 64, torch.float16, DEVICE, seed=5)
    g = torch.Generator(device="cpu").manual_seed(6)
    rows = []
    for qb in range(4):
        keys = torch.randperm(100, generator=g)[:40]
        if causal:
            keys = keys[keys < (qb + 1) * 32]
        for _ in range(32):
            row = torch.full((40,), -1, dtype=torch.int32)
            row[:len(keys)] = keys[torch.randperm(len(keys), generator=g)].int()
            rows.append(row)
    layout = TopKLayout(torch.stack(rows[:100]).view(1, 1, 100, 40).to(DEVICE))
    _check(q, k, v, layout, causal, merge=True, tokens=32)


def test_unsorted_and_empty_rows_and_non_causal_future_keys():
    """Hand-built lists: unsorted, rows of only -1 (zero output, lse -inf), and future keys that
    causality masks (a row whose only key is in its future is empty too)."""
    sq = sk = 20
    idx = torch.full((1, 1, sq, 6), -1, dtype=torch.int32)
    gen = torch.Generator().manual_seed(3)
    for t in range(sq):
        if t % 5 == 2:
            continue  # an empty row
        n = 1 + t % 6
        idx[0, 0, t, :n] = torch.randperm(sk, generator=gen)[:n].to(torch.int32)
    idx[0, 0, 3, :2] = torch.tensor([19, 18], dtype=torch.int32)  # only future keys
    layout = TopKLayout(idx.to(DEVICE))
    q, k, v = _qkv(1, 2, 1, sq, sk, 64, torch.float16, DEVICE)
    for causal in (True, False):
        for merge in (False, True):
            _check(q, k, v, layout, causal, merge=merge)


def test_reference_equals_dense_masked_reference():
    q, k, v = _qkv(2, 4, 2, 45, 80, 32, torch.float32, "cpu")
    layout = _random_layout(2, 2, 45, 80, 17, "cpu")
    ref, lse = sa.topk_attention_ref(q, k, v, layout, causal=True, chunk_size=7)
    mask = layout.to_mask(45, 80).repeat_interleave(2, 1)
    dense, dense_lse = attention_ref(q, k, v, causal=True, mask_fn=lambda a, b: mask[:, :, a:b])
    torch.testing.assert_close(ref, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, dense_lse)


def test_cpu_auto_backend_runs_reference():
    q, k, v = _qkv(1, 4, 2, 30, 30, 32, torch.float32, "cpu")
    layout = _random_layout(1, 2, 30, 30, 8, "cpu")
    out = sa.topk_attention(q, k, v, layout, backend="torch")
    ref, _ = sa.topk_attention_ref(q, k, v, layout)
    torch.testing.assert_close(out, ref)


# ------------------------------------------------------------------------------- layout
def test_layout_mask_roundtrip_and_props():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 3, 17, 29, generator=g) < 0.3
    layout = TopKLayout.from_mask(mask)
    assert layout.batch == 2 and layout.num_heads == 3 and layout.seqlen_q == 17
    assert layout.k == int(mask.sum(-1).max())
    assert torch.equal(layout.to_mask(17, 29), mask)
    assert torch.equal(layout.to_token_mask(17, 29, causal=True),
                       mask & (torch.arange(29)[None, :] <= torch.arange(17)[:, None] + 12))
    layout.validate(17, 29)
    wide = TopKLayout.from_mask(mask, k=40)
    assert wide.k == 40 and torch.equal(wide.to_mask(17, 29), mask)
    with pytest.raises(ValueError, match="more than k"):
        TopKLayout.from_mask(mask, k=1)
    assert layout.to("cpu").indices.dtype == torch.int32
    assert "TopKLayout(B=2" in repr(layout)


def test_layout_density():
    sq = sk = 16
    full = torch.ones(1, 1, sq, sk, dtype=torch.bool).tril()
    assert TopKLayout.from_mask(full).density(sq, sk, causal=True) == pytest.approx(1.0)
    assert TopKLayout.from_mask(full).density(sq, sk, causal=False) == pytest.approx(
        (sq * (sq + 1) / 2) / (sq * sk))
    # one key per row, the diagonal: sq pairs of the causal area
    diag = torch.eye(sq, dtype=torch.bool)[None, None]
    assert TopKLayout.from_mask(diag).density(sq, sk) == pytest.approx(sq / (sq * (sq + 1) / 2))
    # future keys do not count under causality
    upper = torch.ones(1, 1, sq, sk, dtype=torch.bool).triu(1)
    assert TopKLayout.from_mask(upper).density(sq, sk) == 0.0
    per_head = TopKLayout.from_mask(full.expand(2, 3, sq, sk)).density(sq, sk, per_head=True)
    assert per_head.shape == (2, 3)


def test_layout_validation_errors():
    good = torch.tensor([[[[0, 1, -1], [2, 0, -1]]]], dtype=torch.int32)
    TopKLayout(good).validate(2, 3)
    with pytest.raises(TypeError, match="int32"):
        TopKLayout(good.float())
    with pytest.raises(ValueError, match=r"\[B, Hkv, Sq, K\]"):
        TopKLayout(good[0])
    with pytest.raises(ValueError, match="out of range"):
        TopKLayout(good).validate(2, 2)  # key 2 with seqlen_k=2
    with pytest.raises(ValueError, match="out of range"):
        TopKLayout(torch.tensor([[[[0, -2]]]], dtype=torch.int32)).validate(1, 3)
    with pytest.raises(ValueError, match="trailing"):
        TopKLayout(torch.tensor([[[[0, -1, 1]]]], dtype=torch.int32)).validate(1, 3)
    with pytest.raises(ValueError, match="repeat"):
        TopKLayout(torch.tensor([[[[1, 0, 1]]]], dtype=torch.int32)).validate(1, 3)
    with pytest.raises(ValueError, match="seqlen_q"):
        TopKLayout(good).validate(3, 3)
    TopKLayout(good.long())  # other integer types are converted


def test_op_rejects_bad_input_before_launch():
    q, k, v = _qkv(1, 4, 2, 10, 12, 32, torch.float16, "cpu")
    idx = torch.zeros(1, 2, 10, 3, dtype=torch.int32)
    idx[..., 1] = 1
    idx[..., 2] = 2
    sa.topk_attention(q, k, v, TopKLayout(idx), backend="torch")
    with pytest.raises(TypeError, match="TopKLayout"):
        sa.topk_attention(q, k, v, idx)
    with pytest.raises(ValueError, match="KV heads"):
        sa.topk_attention(q, k, v, TopKLayout(idx.repeat(1, 2, 1, 1)))
    with pytest.raises(ValueError, match="batch"):
        sa.topk_attention(q, k, v, TopKLayout(idx.repeat(2, 1, 1, 1)))
    with pytest.raises(ValueError, match="seqlen_q"):
        sa.topk_attention(q, k, v, TopKLayout(idx[:, :, :5]))
    bad = idx.clone()
    bad[0, 1, 4, 2] = 12
    with pytest.raises(ValueError, match="out of range"):
        sa.topk_attention(q, k, v, TopKLayout(bad))
    bad = idx.clone()
    bad[0, 0, 0, 1] = -1
    with pytest.raises(ValueError, match="trailing"):
        sa.topk_attention(q, k, v, TopKLayout(bad))
    with pytest.raises(ValueError, match="tokens"):
        sa.topk_attention(q, k, v, TopKLayout(idx), tokens=0)
    q8, k1, v1 = _qkv(1, 8, 1, 10, 12, 32, torch.float16, "cpu")
    with pytest.raises(ValueError, match="tile rows"):
        sa.topk_attention(q8, k1, v1, TopKLayout(idx[:, :1]), tokens=32, backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        sa.topk_attention(q.long(), k, v, TopKLayout(idx))


# ------------------------------------------------------------------------------- selection
def test_topk_indices_selects_the_top_keys():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 21, 40, generator=g)
    layout = sa.topk_indices(scores, 7, causal=False)
    assert layout.indices.dtype == torch.int32 and layout.indices.shape == (2, 3, 21, 7)
    expect = torch.topk(scores, 7, dim=-1).indices.sort(-1).values
    assert torch.equal(layout.indices.long().sort(-1).values, expect)
    layout.validate(21, 40)


def test_topk_indices_causal_pads_at_the_end():
    g = torch.Generator().manual_seed(1)
    sq, sk, kk = 12, 20, 10
    scores = torch.randn(1, 2, sq, sk, generator=g)
    layout = sa.topk_indices(scores, kk)  # causal by default
    assert torch.equal(layout.indices, sa.topk_indices(scores, kk, causal=True).indices)
    layout.validate(sq, sk)  # trailing -1, no repeats
    pos = torch.arange(sq) + sk - sq
    idx = layout.indices.long()
    assert bool(((idx <= pos[:, None]) | (idx < 0)).all())
    visible = scores.masked_fill(torch.arange(sk)[None, :] > pos[:, None], float("-inf"))
    n_vis = torch.minimum(pos + 1, torch.tensor(kk))
    assert torch.equal((idx >= 0).sum(-1), n_vis.expand(1, 2, sq))
    for t in range(sq):
        want = torch.topk(visible[0, 0, t], int(n_vis[t])).indices.sort().values
        assert torch.equal(idx[0, 0, t, : int(n_vis[t])].sort().values, want)
    # a chunk of query rows at an explicit offset
    part = sa.topk_indices(scores[:, :, 2:5], kk, causal=True, q_offset=2 + sk - sq)
    assert torch.equal(part.to_mask(3, sk), layout.to_mask(sq, sk)[:, :, 2:5])


def test_topk_indices_bad_input():
    with pytest.raises(ValueError, match="k must"):
        sa.topk_indices(torch.randn(1, 1, 4, 4), 5)
    with pytest.raises(ValueError, match="Sk"):
        sa.topk_indices(torch.randn(1, 4, 4), 2)
    with pytest.raises(TypeError, match="floating"):
        sa.topk_indices(torch.ones(1, 1, 4, 4, dtype=torch.int32), 2)


def _check_merge(indices, tokens, seqlen_k, causal_offset, got):
    """A merge's (union, owners, counts) against brute force: per tile the distinct keys its
    tokens list (and may see), each once, with bit t set exactly when token t lists it."""
    union, owners, counts = (x.cpu() for x in got)
    idx = indices.cpu().long()
    batch, heads, sq, _ = idx.shape
    nt = -(-sq // tokens)
    assert union.shape == owners.shape == (batch, heads, nt, tokens * idx.shape[-1])
    assert counts.shape == (batch, heads, nt)
    for b in range(batch):
        for h in range(heads):
            for tile in range(nt):
                rows = range(tile * tokens, min(sq, tile * tokens + tokens))
                lists = []
                for t in rows:
                    keys = idx[b, h, t]
                    ok = (keys >= 0) & (keys < seqlen_k)
                    if causal_offset is not None:
                        ok &= keys <= t + causal_offset
                    lists.append(keys[ok])
                want = torch.cat(lists).unique()  # sorted
                n = int(counts[b, h, tile])
                keys, order = union[b, h, tile, :n].long().sort()
                assert torch.equal(keys, want), (b, h, tile)
                bits = owners[b, h, tile, :n][order].long() & 0xFFFFFFFF
                expect = torch.zeros_like(want)
                for r, listed in enumerate(lists):
                    expect |= torch.isin(want, listed).long() << r
                assert torch.equal(bits, expect), (b, h, tile)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_merge_token_lists(causal):
    """Triton union (unsorted, owner bits, causal filter) and the torch segmented-sort one
    against brute force."""
    sq, sk, kk, tokens = 11, 30, 6, 4
    layout = _random_layout(1, 2, sq, sk, kk, "cpu", local=4, causal=False)
    offset = sk - sq if causal else None
    got = merge_token_lists(layout.indices.to(DEVICE), tokens, seqlen_k=sk, causal_offset=offset,
                            backend="triton")
    _check_merge(layout.indices, tokens, sk, offset, got)
    if not causal:
        t_union, t_owners, t_counts = merge_token_lists_torch(layout.indices, tokens,
                                                              chunk_elems=64)
        _check_merge(layout.indices, tokens, sk, None, (t_union, t_owners, t_counts))
        past = torch.arange(t_union.shape[-1]) >= t_counts[..., None]
        assert bool((t_union[past] == -1).all())  # the torch merge pads with -1


def test_merge_backend_argument():
    idx = torch.zeros(1, 1, 4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="backend"):
        merge_token_lists(idx, 2, seqlen_k=4, backend="torch")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            merge_token_lists(idx, 2, seqlen_k=4, backend="cuda")


# ------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("merge", [False, True], ids=["perToken", "merged"])
@pytest.mark.parametrize("case", [
    (1, 32, 8, 4096, 4096, 128, 512),
    (2, 8, 1, 1000, 3000, 64, 256),
    (1, 16, 16, 777, 777, 256, 128),
    (1, 32, 4, 2048, 2048, 128, 1024),
], ids=["llama-4k-K512-bf16", "G8-Sq<Sk-bf16", "MHA-D256-fp16", "G8-K1024-bf16"])
def test_gpu_bf16_large(case, merge):
    b, hq, hkv, sq, sk, d, topk = case
    dtype = torch.float16 if d == 256 else torch.bfloat16
    q, k, v = _qkv(b, hq, hkv, sq, sk, d, dtype, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.randn(b, hkv, sq, sk, device="cuda", generator=g)
    pos = torch.arange(sq, device="cuda")[:, None] + sk - sq
    cols = torch.arange(sk, device="cuda")[None, :]
    scores += 3.0 * ((cols <= pos) & (cols > pos - 128))  # a local window: neighbours overlap
    layout = sa.topk_indices(scores, topk, causal=True)
    _check(q, k, v, layout, True, merge=merge)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    # b, h, sq, sk, k, tokens, causal_offset, pattern
    (2, 3, 77, 130, 24, 32, 53, "local"),        # odd lengths, last tile short, causal
    (1, 2, 64, 5000, 300, 7, None, "random"),    # T not a power of two, non-causal
    (1, 1, 64, 100_000, 400, 32, None, "random"),  # table overflow: second pass, on chip
    (1, 1, 64, 200_000, 1024, 32, None, "random"),  # union > on-chip owner words: global ORs
    (1, 2, 40, 600_000, 256, 16, 599_960, "random"),  # keys past one shared-memory window
    (1, 1, 33, 33, 33, 1, 0, "padded"),          # one token per tile, -1 padding in rows
    (2, 2, 70, 3000, 256, 32, None, "shared"),   # the tile's tokens share their keys
    (1, 2, 70, 3000, 256, 32, 2930, "shared"),   # the same, causal
], ids=["local-causal", "T7", "owners-on-chip", "owners-global", "windows", "T1-padded",
        "shared", "shared-causal"])
def test_gpu_cuda_merge_matches_brute_force(case):
    """csrc/topk_merge.cu against brute force, and the Triton merge on the same lists."""
    from sparse_attn import _cuda

    assert _cuda.available(), _cuda.status()
    b, h, sq, sk, kk, tokens, offset, pattern = case
    g = torch.Generator(device="cpu").manual_seed(sq + sk)
    if pattern == "local":
        layout = _random_layout(b, h, sq, sk, kk, "cpu", local=16, causal=False)
        idx = layout.indices
    elif pattern == "shared":  # the tile's tokens list the same keys, each in its own order
        sets = torch.stack([torch.randperm(sk, generator=g)[:kk] for _ in range(b * h)])
        idx = torch.stack([s[torch.randperm(kk, generator=g)] for s in sets
                           for _ in range(sq)]).view(b, h, sq, kk).int()
    else:  # distinct random keys per row (disjoint neighbours: the large-union case)
        idx = torch.stack([torch.randperm(sk, generator=g)[:kk] for _ in range(b * h * sq)])
        idx = idx.view(b, h, sq, kk).int()
        if pattern == "padded":
            idx[torch.rand(idx.shape, generator=g) < 0.3] = -1
    idx = idx.cuda()
    if pattern == "random" and sq > 50:
        idx = idx.transpose(2, 3).contiguous().transpose(2, 3)  # strided rows
    got = merge_token_lists(idx, tokens, seqlen_k=sk, causal_offset=offset, backend="cuda")
    _check_merge(idx, tokens, sk, offset, got)
    if sk <= 5000:
        _check_merge(idx, tokens, sk, offset,
                     merge_token_lists(idx, tokens, seqlen_k=sk, causal_offset=offset,
                                       backend="triton"))


@pytest.mark.gpu
@pytest.mark.parametrize("merge", [False, True], ids=["perToken", "merged"])
def test_gpu_cuda_graph_capture(merge):
    q, k, v = _qkv(1, 32, 8, 2048, 2048, 128, torch.bfloat16, "cuda")
    scores = torch.randn(1, 8, 2048, 2048, device="cuda")
    layout = sa.topk_indices(scores, 256, causal=True)
    ref = sa.topk_attention(q, k, v, layout, merge=merge)  # checks indices, warms up, merges
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sa.topk_attention(q, k, v, layout, merge=merge)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    # the selection captures too (no host sync)
    graph2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph2):
        lay2 = sa.topk_indices(scores, 256, causal=True)
    graph2.replay()
    torch.cuda.synchronize()
    assert torch.equal(lay2.to_mask(2048, 2048), layout.to_mask(2048, 2048))


def test_merged_lists_cached_and_refreshed_on_change():
    q, k, v = _qkv(1, 4, 1, 40, 40, 32, torch.float16, DEVICE)
    layout = _random_layout(1, 1, 40, 40, 12, DEVICE)
    sa.topk_attention(q, k, v, layout, merge=True, tokens=4, backend="triton")
    first = layout._merged[(4, 40, 0)][1][0]
    sa.topk_attention(q, k, v, layout, merge=True, tokens=4, backend="triton")
    assert layout._merged[(4, 40, 0)][1][0] is first  # reused
    layout.indices[0, 0, 5:] = torch.flip(layout.indices[0, 0, 5:], (0,))  # in place
    _check(q, k, v, layout, True, merge=True, tokens=4)
    assert layout._merged[(4, 40, 0)][1][0] is not first
    with torch.inference_mode():
        inf_layout = TopKLayout(layout.indices.clone())
        sa.topk_attention(q, k, v, inf_layout, merge=True, tokens=4, backend="triton")
