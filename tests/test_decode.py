"""Decode kernel (flash-decoding, contiguous and paged caches, selected blocks) vs the reference."""
import pytest
import torch

import sparse_attn as sa
from sparse_attn.kernels import decode as decode_mod
from sparse_attn.reference.decode import decode_attention_ref

from conftest import DEVICE, assert_matches_reference


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every kernel output starts as NaN, so an unwritten element fails the comparison."""
    def empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(decode_mod, "_empty", empty)


def _rand(shape, gen, dtype, device):
    return torch.randn(*shape, generator=gen).to(device, dtype)


def _inputs(b, hq, hkv, sq, s_max, d, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = _rand((b, hq, sq, d), g, dtype, device)
    k = _rand((b, hkv, s_max, d), g, dtype, device)
    v = _rand((b, hkv, s_max, d), g, dtype, device)
    return q, k, v


def _to_paged(k, page, seed=0):
    """A contiguous cache [B, Hkv, S, D] as a paged one [pages, page, Hkv, D] with shuffled
    pages (plus a spare page of NaNs nobody should read) and its block table."""
    b, hkv, s, d = k.shape
    n = -(-s // page)
    padded = torch.nn.functional.pad(k, (0, 0, 0, n * page - s), value=float("nan"))
    pages = padded.reshape(b, hkv, n, page, d).permute(0, 2, 3, 1, 4).reshape(b * n, page, hkv, d)
    perm = torch.randperm(b * n, generator=torch.Generator().manual_seed(seed))
    pool = torch.full((b * n + 1, page, hkv, d), float("nan"), dtype=k.dtype, device=k.device)
    pool[perm.to(k.device)] = pages
    table = perm.view(b, n).to(torch.int32).to(k.device)
    return pool, table


def _sorted_selection(b, hkv, n_blocks, nsel, seed=0, pad=0, device=DEVICE):
    """Random strictly increasing block indices [B, Hkv, nsel], the last `pad` set to -1."""
    g = torch.Generator().manual_seed(seed)
    keep = nsel - pad
    rows = [torch.randperm(n_blocks, generator=g)[:keep].sort().values for _ in range(b * hkv)]
    idx = torch.stack(rows).view(b, hkv, keep)
    idx = torch.cat([idx, torch.full((b, hkv, pad), -1, dtype=idx.dtype)], dim=2)
    return idx.to(torch.int32).to(device)


def _check(q, k, v, *, ref_kv=None, threshold=None, **kw):
    """Kernel vs fp32 reference: error <= 2x the same reference computed in the input dtype +
    eps (FlashAttention's rule); lse equal; rows with nothing visible exactly 0 / -inf."""
    out, lse = sa.decode_attention(q, k, v, return_lse=True, backend="triton",
                                   softmax_threshold=threshold, **kw)
    rk, rv = ref_kv if ref_kv is not None else (k, v)
    ref_kw = {n: x for n, x in kw.items() if n not in ("num_splits", "check_indices")}
    if kw.get("block_table") is not None and ref_kv is not None:
        ref_kw.pop("block_table")
        ref_kw["block_size"] = k.shape[1]
    ref, ref_lse = decode_attention_ref(q, rk, rv, **ref_kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    low = None
    if q.dtype != torch.float32:
        low, _ = decode_attention_ref(q, rk, rv, upcast=False, **ref_kw)
    assert_matches_reference(out, lse, ref, ref_lse, low)
    return out


DENSE = [
    # b, hq, hkv, sq, s_max, d, lens (None = full)
    (1, 4, 1, 1, 300, 64, None),
    (2, 8, 2, 1, 257, 128, [257, 33]),
    (3, 4, 4, 2, 190, 64, [190, 0, 1]),     # G=1, an empty sequence, one shorter than Sq
    (2, 8, 1, 4, 130, 64, [130, 65]),       # G=8 x 4 tokens = 32 rows
    (1, 6, 2, 3, 100, 96, None),            # G=3 (not a power of two), D=96
    (1, 2, 1, 1, 70, 256, None),            # D=256
    (2, 32, 8, 1, 200, 128, [200, 99]),     # Llama-8B heads
    (1, 16, 1, 8, 96, 64, [80]),            # 128 rows: cut into head tiles
]


def _id(c):
    b, hq, hkv, sq, s, d, lens = c
    return f"B{b}-H{hq}-KV{hkv}-Sq{sq}-S{s}-D{d}-{'full' if lens is None else 'lens'}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("case", DENSE, ids=[_id(c) for c in DENSE])
def test_dense_contiguous(case, dtype):
    b, hq, hkv, sq, s, d, lens = case
    q, k, v = _inputs(b, hq, hkv, sq, s, d, dtype)
    seqlens = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    _check(q, k, v, cache_seqlens=seqlens)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 64])
def test_num_splits(num_splits):
    q, k, v = _inputs(2, 4, 2, 2, 300, 64, torch.float16)
    lens = torch.tensor([300, 111], dtype=torch.int32, device=DEVICE)
    _check(q, k, v, cache_seqlens=lens, num_splits=num_splits)


@pytest.mark.parametrize("block_size", [16, 64, 100])
@pytest.mark.parametrize("pad", [0, 2])
def test_sparse_contiguous(block_size, pad):
    b, hq, hkv, s = 2, 8, 2, 400
    q, k, v = _inputs(b, hq, hkv, 2, s, 64, torch.float16, seed=block_size)
    n_blocks = -(-s // block_size)
    idx = _sorted_selection(b, hkv, n_blocks, 4, seed=pad, pad=pad)
    # the second sequence is short: some selected blocks lie past its end
    lens = torch.tensor([400, 150], dtype=torch.int32, device=DEVICE)
    _check(q, k, v, cache_seqlens=lens, block_indices=idx, block_size=block_size)


def test_sparse_all_blocks_equals_dense():
    q, k, v = _inputs(1, 4, 1, 1, 256, 64, torch.float32)
    idx = torch.arange(4, dtype=torch.int32, device=DEVICE).view(1, 1, 4)
    dense = sa.decode_attention(q, k, v, backend="triton")
    sparse = sa.decode_attention(q, k, v, block_indices=idx, backend="triton")
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)


def test_sparse_all_padding_gives_zero():
    q, k, v = _inputs(1, 4, 2, 1, 128, 64, torch.float16)
    idx = torch.full((1, 2, 3), -1, dtype=torch.int32, device=DEVICE)
    out, lse = sa.decode_attention(q, k, v, block_indices=idx, return_lse=True, backend="triton")
    assert out.abs().max().item() == 0 and torch.isinf(lse).all()


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_paged_matches_contiguous(page, sparse):
    b, hq, hkv, sq, s, d = 2, 8, 2, 2, 320, 64
    q, k, v = _inputs(b, hq, hkv, sq, s, d, torch.float16, seed=page)
    kp, table = _to_paged(k, page, seed=1)
    vp, _ = _to_paged(v, page, seed=1)
    lens = torch.tensor([320, 97], dtype=torch.int32, device=DEVICE)
    idx = _sorted_selection(b, hkv, table.shape[1], 3, pad=1) if sparse else None
    out = _check(q, kp, vp, block_table=table, cache_seqlens=lens, block_indices=idx,
                 ref_kv=(k, v))
    # the reference on the paged cache agrees with the contiguous one
    ref_p, _ = decode_attention_ref(q, kp, vp, block_table=table, cache_seqlens=lens,
                                    block_indices=idx)
    ref_c, _ = decode_attention_ref(q, k, v, cache_seqlens=lens, block_indices=idx,
                                    block_size=page)
    torch.testing.assert_close(ref_p, ref_c)
    assert not torch.isnan(out).any()


def test_strided_inputs():
    """q and the cache as SDPA views of [B, S, H, D] storage (non-contiguous)."""
    g = torch.Generator().manual_seed(3)
    q = _rand((2, 1, 8, 64), g, torch.float16, DEVICE).transpose(1, 2)
    k = _rand((2, 200, 2, 64), g, torch.float16, DEVICE).transpose(1, 2)
    v = _rand((2, 200, 2, 64), g, torch.float16, DEVICE).transpose(1, 2)
    lens = torch.tensor([200, 51], dtype=torch.int32, device=DEVICE)
    _check(q, k, v, cache_seqlens=lens)


def test_threshold_tiny_is_exact_and_large_is_close():
    q, k, v = _inputs(1, 4, 1, 1, 256, 64, torch.float32)
    exact = sa.decode_attention(q, k, v, backend="triton")
    tiny = sa.decode_attention(q, k, v, softmax_threshold=1e-30, backend="triton")
    torch.testing.assert_close(tiny, exact)
    # a key tile far above the rest makes the others skippable
    k[:, :, 32:64] += 3 * q[:, :1, :1]
    loose = sa.decode_attention(q, k, v, softmax_threshold=1e-3, num_splits=1, backend="triton")
    ref = sa.decode_attention(q, k, v, num_splits=1, backend="triton")
    assert (loose - ref).abs().max().item() < 0.05


def test_torch_backend_matches_reference():
    q, k, v = _inputs(2, 4, 2, 1, 100, 64, torch.float32)
    lens = torch.tensor([100, 40], dtype=torch.int32, device=DEVICE)
    out = sa.decode_attention(q, k, v, cache_seqlens=lens, backend="torch")
    ref, _ = decode_attention_ref(q, k, v, cache_seqlens=lens)
    torch.testing.assert_close(out, ref)


def test_reference_matches_dense_reference():
    q, k, v = _inputs(1, 8, 2, 3, 90, 64, torch.float32)
    out, lse = decode_attention_ref(q, k, v)
    ref, ref_lse = sa.dense_attention_ref(q, k, v, causal=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


# ---- bad input: a clear error naming the argument, before any launch ----

def _bad_cases():
    q, k, v = _inputs(2, 4, 2, 1, 128, 64, torch.float16, device="cpu")
    lens = torch.tensor([128, 5], dtype=torch.int32)
    kp, table = _to_paged(k, 16)
    vp, _ = _to_paged(v, 16)
    idx = torch.tensor([0, 1], dtype=torch.int32).expand(2, 2, 2).contiguous()
    return [
        ("q", dict(q=q[0]), ValueError),
        ("q", dict(q=q.to(torch.int32)), TypeError),
        ("k_cache", dict(k=k.float()), TypeError),
        ("v_cache", dict(v=v[:, :, :64]), ValueError),
        ("query tokens", dict(q=torch.zeros(2, 4, 65, 64, dtype=torch.float16)), ValueError),
        ("multiple", dict(q=torch.zeros(2, 3, 1, 64, dtype=torch.float16)), ValueError),
        ("cache_seqlens", dict(cache_seqlens=lens.long()), TypeError),
        ("cache_seqlens", dict(cache_seqlens=lens[:1]), ValueError),
        ("cache_seqlens", dict(cache_seqlens=torch.tensor([129, 5], dtype=torch.int32)),
         ValueError),
        ("block_indices", dict(block_indices=idx.long()), TypeError),
        ("block_indices", dict(block_indices=idx[:, :1]), ValueError),
        ("block_indices", dict(block_indices=idx + 1), ValueError),  # block 2 of 2
        ("-1 in the middle", dict(block_indices=torch.tensor(
            [0, -1, 1], dtype=torch.int32).expand(2, 2, 3).contiguous()), ValueError),
        ("strictly increasing", dict(block_indices=torch.tensor(
            [1, 0], dtype=torch.int32).expand(2, 2, 2).contiguous()), ValueError),
        ("block_size", dict(block_size=0), ValueError),
        ("block_table", dict(k=kp, v=vp, block_table=table.long()), TypeError),
        ("block_table", dict(k=kp, v=vp, block_table=table[:1]), ValueError),
        ("block_table", dict(k=kp, v=vp, block_table=table + 100), ValueError),
        ("page size", dict(k=kp, v=vp, block_table=table, block_size=64), ValueError),
        ("cache_seqlens", dict(k=kp, v=vp, block_table=table,
                               cache_seqlens=torch.tensor([200, 5], dtype=torch.int32)),
         ValueError),
        ("k_cache", dict(k=kp[:, :, :, :32], v=vp[:, :, :, :32], block_table=table),
         ValueError),
        ("scale", dict(scale=-1.0), ValueError),
        ("softmax_threshold", dict(softmax_threshold=2.0), ValueError),
        ("num_splits", dict(num_splits=0), ValueError),
    ], (q, k, v)


_BAD, _QKV = _bad_cases()


@pytest.mark.parametrize("word,change,exc", _BAD,
                         ids=[f"{i}-{w.replace(' ', '_')}" for i, (w, _, _) in enumerate(_BAD)])
def test_bad_input(word, change, exc, monkeypatch):
    def no_launch(*a, **kw):
        raise AssertionError("launched despite bad input")
    monkeypatch.setattr(decode_mod, "decode_fwd", no_launch)
    q, k, v = _QKV
    change = dict(change)
    q, k, v = change.pop("q", q), change.pop("k", k), change.pop("v", v)
    with pytest.raises(exc, match=word):
        sa.decode_attention(q, k, v, backend="triton", **change)


def test_unused_block_table_entries_are_not_checked():
    """Entries past a sequence's pages are never read (vLLM pads tables with anything)."""
    q, k, v = _inputs(2, 4, 2, 1, 64, 64, torch.float16)
    kp, table = _to_paged(k, 16)
    vp, _ = _to_paged(v, 16)
    lens = torch.tensor([64, 20], dtype=torch.int32, device=DEVICE)
    table = table.clone()
    table[1, 2:] = 10_000
    _check(q, kp, vp, block_table=table, cache_seqlens=lens, ref_kv=(k, v))


# ---- Quest page selection ----

def _quest_brute(q, k, lens, page, k_sel, sink=0):
    """Naive loops: per page elementwise min/max, the bound per query row, max over the group,
    forced last (and sink) pages, top-k as a set per (batch, KV head)."""
    b_, hq, sq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    sets = {}
    for b in range(b_):
        n = -(-int(lens[b]) // page)
        for h in range(hkv):
            scores = []
            for p in range(n):
                keys = k[b, h, p * page:min((p + 1) * page, int(lens[b]))].double()
                lo, hi = keys.min(0).values, keys.max(0).values
                rows = q[b, h * g:(h + 1) * g].reshape(-1, d).double()
                bound = torch.maximum(rows * lo, rows * hi).sum(-1).max().item()
                scores.append(float("inf") if p == n - 1 or p < sink else bound)
            order = sorted(range(n), key=lambda p: -scores[p])[:k_sel]
            sets[b, h] = set(order)
    return sets


def _as_sets(idx):
    return {(b, h): {int(x) for x in idx[b, h] if x >= 0}
            for b in range(idx.shape[0]) for h in range(idx.shape[1])}


@pytest.mark.parametrize("sink", [0, 1])
def test_quest_matches_brute_force(sink):
    from sparse_attn.estimators import QuestSelector

    q, k, _ = _inputs(2, 8, 2, 2, 200, 32, torch.float32, device="cpu", seed=5)
    lens = torch.tensor([200, 70], dtype=torch.int32)
    quest = QuestSelector(page_size=16, top_k=4, sink_pages=sink)
    idx = quest(q, k, cache_seqlens=lens)
    assert idx.dtype == torch.int32 and idx.shape == (2, 2, 4)
    assert _as_sets(idx) == _quest_brute(q, k, lens, 16, 4, sink)
    # a valid decode_attention input: in range, increasing, -1 only trailing
    from sparse_attn.ops.decode import check_decode_values
    check_decode_values(block_indices=idx, cache_seqlens=lens, block_table=None, capacity=200,
                        n_blocks=13, num_pages=None, block_size=16)


def test_quest_bound_holds_and_finds_planted_page():
    from sparse_attn.estimators import QuestSelector

    q, k, _ = _inputs(1, 4, 1, 1, 256, 64, torch.float32, device="cpu", seed=6)
    k[0, 0, 100] = 4 * q[0, 0, 0]  # one key (in page 6) aligned with the first query head
    quest = QuestSelector(page_size=16, top_k=2)
    meta = quest.build(k)
    bound = quest.scores(q, meta)  # [1, 1, 16]
    true = (q[0].reshape(-1, 64) @ k[0, 0].T).amax(0).view(16, 16).amax(1)
    assert (bound[0, 0] >= true - 1e-4).all()
    assert set(quest.select(q, meta)[0, 0].tolist()) == {6, 15}


def test_quest_padding_when_few_pages():
    from sparse_attn.estimators import QuestSelector

    q, k, _ = _inputs(3, 4, 2, 1, 128, 32, torch.float32, device="cpu")
    lens = torch.tensor([128, 20, 0], dtype=torch.int32)
    idx = QuestSelector(page_size=16, top_k=4)(q, k, cache_seqlens=lens)
    assert idx[1].tolist() == [[0, 1, -1, -1]] * 2  # two pages: both kept
    assert (idx[2] == -1).all()
    assert (idx[0, :, -1] == 7).all()  # the last page is always kept


@pytest.mark.parametrize("num_new", [1, 3])
def test_quest_incremental_update_matches_build(num_new):
    from sparse_attn.estimators import QuestSelector

    q, k, _ = _inputs(2, 4, 2, 1, 96, 32, torch.float32, device="cpu", seed=7)
    quest = QuestSelector(page_size=16, density=0.5)
    lens = torch.tensor([40, 1], dtype=torch.int32)
    meta = quest.build(k, cache_seqlens=lens)
    kp, table = _to_paged(k, 16)
    meta_p = quest.build(kp, cache_seqlens=lens, block_table=table)
    for _ in range(4):
        lens += num_new
        quest.update(meta, k, cache_seqlens=lens, num_new=num_new)
        quest.update(meta_p, kp, cache_seqlens=lens, num_new=num_new, block_table=table)
    fresh = quest.build(k, cache_seqlens=lens)
    torch.testing.assert_close(meta.kmin, fresh.kmin)
    torch.testing.assert_close(meta.kmax, fresh.kmax)
    fresh_p = quest.build(kp, cache_seqlens=lens, block_table=table)
    used = table.flatten().long()
    torch.testing.assert_close(meta_p.kmin[used], fresh_p.kmin[used])
    # paged and contiguous metadata select the same pages
    idx = quest.select(q, meta, cache_seqlens=lens)
    idx_p = quest.select(q, meta_p, cache_seqlens=lens, block_table=table)
    assert torch.equal(idx, idx_p)


def test_quest_selection_drives_decode():
    """Selecting every page reproduces dense decode; a 1/4 selection runs and is finite."""
    from sparse_attn.estimators import QuestSelector

    q, k, v = _inputs(2, 8, 2, 1, 256, 64, torch.float16, seed=8)
    lens = torch.tensor([256, 130], dtype=torch.int32, device=DEVICE)
    every = QuestSelector(page_size=32, density=1.0)(q, k, cache_seqlens=lens)
    dense = sa.decode_attention(q, k, v, cache_seqlens=lens, backend="triton")
    sparse = sa.decode_attention(q, k, v, cache_seqlens=lens, block_indices=every,
                                 block_size=32, backend="triton")
    torch.testing.assert_close(sparse, dense, atol=2e-3, rtol=0)
    quarter = QuestSelector(page_size=32, density=0.25)(q, k, cache_seqlens=lens)
    _check(q, k, v, cache_seqlens=lens, block_indices=quarter, block_size=32)


def test_quest_bad_config():
    from sparse_attn.estimators import QuestSelector

    for kw, word in ((dict(top_k=4, density=0.5), "exactly one"), (dict(), "exactly one"),
                     (dict(top_k=0), "top_k"), (dict(density=1.5), "density"),
                     (dict(top_k=2, page_size=0), "page_size"),
                     (dict(top_k=2, sink_pages=-1), "sink_pages")):
        with pytest.raises(ValueError, match=word):
            QuestSelector(**kw)


# ---- GPU: bf16, long caches, CUDA graphs ----

@pytest.mark.gpu
@pytest.mark.parametrize("d,dtype", [(64, torch.bfloat16), (128, torch.bfloat16),
                                     (128, torch.float16), (256, torch.bfloat16)],
                         ids=["D64-bf16", "D128-bf16", "D128-fp16", "D256-bf16"])
def test_gpu_long_cache(d, dtype):
    q, k, v = _inputs(2, 32, 8, 1, 32768, d, dtype)
    lens = torch.tensor([32768, 12345], dtype=torch.int32, device=DEVICE)
    _check(q, k, v, cache_seqlens=lens)
    # BLASST with a negligible threshold: the same result
    _check(q, k, v, cache_seqlens=lens, threshold=1e-30)


@pytest.mark.gpu
@pytest.mark.parametrize("sq,page", [(1, 64), (4, 16), (8, 64)])
def test_gpu_speculative_paged_sparse(sq, page):
    """Pages of 64 (one page number per tile) and 16 (per-row lookups: the deepest pipeline)."""
    b, hq, hkv, s = 3, 32, 8, 16384
    q, k, v = _inputs(b, hq, hkv, sq, s, 128, torch.bfloat16)
    kp, table = _to_paged(k, page)
    vp, _ = _to_paged(v, page)
    lens = torch.tensor([16384, 9000, 77], dtype=torch.int32, device=DEVICE)
    idx = _sorted_selection(b, hkv, table.shape[1], 16, pad=3)
    _check(q, kp, vp, block_table=table, cache_seqlens=lens, ref_kv=(k, v))
    _check(q, kp, vp, block_table=table, cache_seqlens=lens, block_indices=idx, ref_kv=(k, v))
    _check(q, k, v, cache_seqlens=lens, block_indices=idx, block_size=page)


@pytest.mark.gpu
def test_gpu_quest_bf16_finds_planted_pages():
    """bf16 metadata (the default for a bf16 cache) at 32k: a page holding a key aligned with
    the group's queries is selected, for every (batch, KV head)."""
    from sparse_attn.estimators import QuestSelector

    b, hq, hkv, s, d, page = 2, 32, 8, 32768, 128, 64
    q, k, v = _inputs(b, hq, hkv, 1, s, d, torch.bfloat16)
    planted = torch.randint(0, s // page - 1, (b, hkv), generator=torch.Generator().manual_seed(0))
    for bi in range(b):
        for h in range(hkv):
            group_q = q[bi, h * (hq // hkv):(h + 1) * (hq // hkv), 0].float().mean(0)
            k[bi, h, int(planted[bi, h]) * page + 5] = (32 * group_q).to(k.dtype)
    quest = QuestSelector(page_size=page, density=1 / 16)
    meta = quest.build(k)
    assert meta.kmin.dtype == torch.bfloat16
    idx = quest.select(q, meta).cpu()
    for bi in range(b):
        for h in range(hkv):
            assert int(planted[bi, h]) in idx[bi, h].tolist()
            assert idx[bi, h, -1].item() == s // page - 1
    _check(q, k, v, block_indices=idx.to(DEVICE), block_size=page)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """A decode step (Quest selection + sparse decode + dense decode) replays in a CUDA graph
    with new cache lengths and contents and no host sync."""
    from sparse_attn.estimators.quest import QuestSelector

    b, hq, hkv, s, d = 2, 32, 8, 8192, 128
    q, k, v = _inputs(b, hq, hkv, 1, s, d, torch.bfloat16)
    lens = torch.tensor([8192, 3000], dtype=torch.int32, device=DEVICE)
    quest = QuestSelector(page_size=64, top_k=16)
    meta = quest.build(k, cache_seqlens=lens)
    for _ in range(2):  # warm-up compiles outside capture
        idx = quest.select(q, meta, cache_seqlens=lens)
        sa.decode_attention(q, k, v, cache_seqlens=lens, block_indices=idx, check_indices=False)
        sa.decode_attention(q, k, v, cache_seqlens=lens, check_indices=False)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx = quest.select(q, meta, cache_seqlens=lens)
        sparse_out = sa.decode_attention(q, k, v, cache_seqlens=lens, block_indices=idx)
        dense_out = sa.decode_attention(q, k, v, cache_seqlens=lens)
    q.copy_(torch.randn_like(q))
    lens.copy_(torch.tensor([5000, 8000], dtype=torch.int32))
    k.copy_(torch.randn_like(k))
    meta = quest.build(k, cache_seqlens=lens, out=meta)
    graph.replay()
    torch.cuda.synchronize()
    ref, _ = decode_attention_ref(q, k, v, cache_seqlens=lens)
    assert (dense_out.float() - ref).abs().max().item() < 2e-2
    ref_s, _ = decode_attention_ref(q, k, v, cache_seqlens=lens, block_indices=idx)
    assert (sparse_out.float() - ref_s).abs().max().item() < 2e-2
