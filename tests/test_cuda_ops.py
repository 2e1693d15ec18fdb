"""The CUDA extension's ops against their torch references (GPU: `pytest -m gpu`), and the
fallbacks and argument checks that run without one."""
import zlib

import pytest
import torch

from sparse_attn import _cuda
from sparse_attn.estimators.select import select_blocks
from sparse_attn.layout import BlockLayout, causal_pair_counts

gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def ext():
    """The loaded extension; on a GPU machine a failed build is an error, not a skip."""
    ops = _cuda.ops()
    assert ops is not None, f"CUDA extension not loaded: {_cuda.status()}"
    return ops


# ---- CPU: argument checks and fallbacks ---------------------------------------------------

def test_select_backend_argument():
    p = torch.rand(1, 1, 2, 4)
    with pytest.raises(ValueError, match="backend"):
        select_blocks(p, mass=0.5, backend="triton")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda'"):
            select_blocks(p, mass=0.5, backend="cuda")


# ---- GPU: selection kernel ------------------------------------------------------------------

def _window(nqb, nkb, device):
    """Causal reach and forced sink + diagonal blocks of a square problem: [NQB, NKB]."""
    valid = causal_pair_counts(nqb * 64, nkb * 64, 64, 64, True, device) > 0
    idx = torch.arange(nkb, device=device)
    keep = (idx[None, :] == 0) | (idx[None, :] == torch.arange(nqb, device=device)[:, None])
    return valid, keep & valid


def _assert_masks_close(got, ref, probs, what):
    """Equal masks, except rows where float rounding of the cumulative mass moves the cut by
    one block (rare: at most 0.2% of rows)."""
    diff = (got != ref).flatten(0, -2).any(-1)
    n_diff = int(diff.sum())
    assert n_diff <= max(1, diff.numel() // 500), f"{what}: {n_diff}/{diff.numel()} rows differ"
    if n_diff:
        gap = (got.sum(-1) - ref.sum(-1)).flatten()[diff].abs()
        assert int(gap.max()) <= 1, f"{what}: a row's count moved by {int(gap.max())}"


SHAPES = [(1, 1, 1, 1), (1, 2, 7, 7), (2, 3, 33, 64), (1, 8, 255, 255), (1, 4, 64, 2048),
          (1, 2, 16, 5000)]


@gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("budget", ["mass0.5", "mass0.9", "mass0.95", "mass1.0", "count1",
                                    "count3", "count17", "countvec"])
@pytest.mark.parametrize("masks", ["causal", "none"])
def test_select_matches_torch(ext, shape, budget, masks):
    torch.manual_seed(zlib.crc32(repr((shape, budget, masks)).encode()))
    b, h, nqb, nkb = shape
    probs = torch.rand(shape, device="cuda") ** 4  # skewed, like attention mass
    probs[..., ::5] = 0.0  # zero blocks are never chosen by mass
    valid = keep = None
    if masks == "causal":
        valid, keep = _window(nqb, nkb, "cuda")
    kw = {}
    if budget.startswith("mass"):
        kw["mass"] = float(budget[4:])
    elif budget == "countvec":
        kw["count"] = torch.randint(0, nkb + 2, (nqb,), device="cuda")
    else:
        kw["count"] = int(budget[5:])
    got = select_blocks(probs, valid=valid, keep=keep, backend="cuda", **kw)
    ref = select_blocks(probs, valid=valid, keep=keep, backend="torch", **kw)
    assert got.dtype == torch.bool and got.shape == ref.shape
    if "count" in kw:  # distinct random values: no ties among positive candidates
        nz = probs > 0
        assert torch.equal(got & nz, ref & nz)
        assert torch.equal(got.sum(-1), ref.sum(-1))
    else:
        _assert_masks_close(got, ref, probs, budget)


@gpu
def test_select_indices_counts_and_ties(ext):
    torch.manual_seed(0)
    nqb = nkb = 300
    probs = (torch.rand(2, 4, nqb, nkb, device="cuda") * 4).floor() / 4  # many ties
    valid, keep = _window(nqb, nkb, "cuda")
    rows = probs.reshape(-1, nkb).contiguous()
    count = torch.full((1,), 9, dtype=torch.int32, device="cuda")
    mask, idx, counts = ext.select_blocks(rows, valid.contiguous(), keep.contiguous(), count, 1.0)
    ref = select_blocks(probs, valid=valid, keep=keep, count=9, backend="torch")
    assert torch.equal(mask.reshape(ref.shape).sum(-1), ref.sum(-1))
    # lowest index first among ties: the kernel's pick is a valid top-k
    kept = torch.where(mask & ~keep.repeat(8, 1), rows, float("inf")).amin(-1)
    dropped = torch.where(~mask & valid.repeat(8, 1) & ~keep.repeat(8, 1), rows, -1.0).amax(-1)
    assert bool((dropped <= kept).all())
    layout = BlockLayout.from_mask(mask.reshape(ref.shape))
    assert torch.equal(counts.reshape(layout.counts.shape), layout.counts)
    assert torch.equal(idx.reshape(layout.indices.shape), layout.indices)


@gpu
def test_select_mass_with_ties(ext):
    torch.manual_seed(1)
    probs = (torch.rand(2, 4, 200, 200, device="cuda") * 8).floor() / 8
    valid, keep = _window(200, 200, "cuda")
    for mass in (0.3, 0.7, 0.95):
        got = select_blocks(probs, valid=valid, keep=keep, mass=mass, backend="cuda")
        ref = select_blocks(probs, valid=valid, keep=keep, mass=mass, backend="torch")
        gap = (got.sum(-1) - ref.sum(-1)).abs()
        assert int(gap.max()) <= 1 and float((gap > 0).float().mean()) < 0.002, mass


@gpu
def test_select_edge_rows(ext):
    """All-zero rows, rows with nothing valid, a forced set above the mass target."""
    probs = torch.zeros(4, 64, device="cuda")
    probs[2] = torch.rand(64, device="cuda")
    probs[3, 0] = 10.0
    probs[3, 1:] = torch.linspace(0.001, 0.01, 63, device="cuda")
    keep = torch.zeros(4, 64, dtype=torch.bool, device="cuda")
    keep[:, 0] = True
    valid = torch.ones(4, 64, dtype=torch.bool, device="cuda")
    valid[1] = False
    for kw in ({"mass": 0.5}, {"mass": 1.0}, {"count": 4}):
        got = select_blocks(probs, valid=valid, keep=keep, backend="cuda", **kw)
        ref = select_blocks(probs, valid=valid, keep=keep, backend="torch", **kw)
        exact = [1, 3] if "count" in kw else [0, 1, 3]  # count ranks zero blocks too: ties
        assert torch.equal(got[exact], ref[exact]), kw
        assert torch.equal(got.sum(-1), ref.sum(-1)), kw


@gpu
def test_select_graph_capture_and_opcheck(ext):
    probs = torch.rand(1, 4, 128, 128, device="cuda")
    valid, keep = _window(128, 128, "cuda")
    fn = lambda: select_blocks(probs, valid=valid, keep=keep, mass=0.9)  # noqa: E731
    eager = fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    rows = probs.reshape(-1, 128)
    torch.library.opcheck(ext.select_blocks.default,
                          (rows, valid.contiguous(), keep.contiguous(), None, 0.9))


@gpu
def test_select_bad_input_names_kernel(ext):
    """Every bad input raises a RuntimeError naming the op (messages with numbers included: the
    binding once segfaulted formatting them)."""
    probs = torch.rand(4, 8, device="cuda")
    table = lambda *s: torch.ones(*s, device="cuda", dtype=torch.bool)  # noqa: E731
    count = lambda *s: torch.ones(*s, device="cuda", dtype=torch.int32)  # noqa: E731
    bad = [
        ((probs.double(), None, None, None, 0.5), "float32"),
        ((probs[None], None, None, None, 0.5), r"\[rows, nkb\], got \[1, 4, 8\]"),
        ((probs.t(), None, None, None, 0.5), "contiguous"),
        ((probs, table(3, 8), None, None, 0.5), r"valid rows \(3\) must divide .* \(4\)"),
        ((probs, table(4, 7), None, None, 0.5), r"nkb = 8, got \[4, 7\]"),
        ((probs, table(0, 8), None, None, 0.5), "valid rows"),
        ((probs, table(8, 4).t(), None, None, 0.5), "valid must be contiguous"),
        ((probs, table(4, 8).int(), None, None, 0.5), "bool or uint8, got Int"),
        ((probs, table(4, 8).cpu(), None, None, 0.5), "valid must be on cuda"),
        ((probs, None, table(3, 8), None, 0.5), r"keep rows \(3\)"),
        ((probs, None, None, count(3), 1.0), r"count rows \(3\)"),
        ((probs, None, None, count(4).long(), 1.0), "int32, got Long"),
        ((probs, None, None, count(4, 1), 1.0), "1-d"),
        ((probs, None, None, None, 0.0), "mass must lie in"),
        ((probs, None, None, None, 1.5), "mass must lie in"),
        ((probs, None, None, None, float("nan")), "mass must lie in"),
        ((torch.rand(2, 40000, device="cuda"), None, None, None, 0.5), "at most 32768"),
    ]
    for args, match in bad:
        with pytest.raises(RuntimeError, match="select_blocks: .*" + match):
            ext.select_blocks(*args)


# ---- int8 low-bit block scores -------------------------------------------------------------

def _lowbit_inputs(batch, hq, hkv, seqlen_q, seqlen_k, dim, block_m, block_n, rows, device):
    from sparse_attn.reference.estimate import quantize_int8_ref, sample_rows

    q = torch.randn(batch, hq, seqlen_q, dim, device=device)
    k = torch.randn(batch, hkv, seqlen_k, dim, device=device)
    k[:, :, :16] += 2.0  # a sink-like key block gets more mass
    pos = sample_rows(seqlen_q, block_m, rows, device)
    qq, qs = quantize_int8_ref(q.index_select(2, pos).contiguous(), rows)
    kq, ks = quantize_int8_ref(k, block_n)
    return qq, kq, pos, qs, ks


def test_lowbit_validation():
    qq = torch.zeros(1, 2, 32, 64, dtype=torch.int8)
    kq = torch.zeros(1, 1, 100, 64, dtype=torch.int8)
    kw = dict(rows=16, block_n=64, seqlen_q=100, causal=True, scale=0.125,
              q_scale=torch.ones(1, 2, 2), k_scale=torch.ones(1, 1, 2))
    pos = torch.arange(32, dtype=torch.int32)
    with pytest.raises(TypeError, match="q_rows"):
        _cuda.lowbit_block_scores(qq.float(), kq, pos, **kw)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            _cuda.lowbit_block_scores(qq, kq, pos, **kw)
        assert not _cuda.lowbit_supported(qq, kq, rows=16, block_n=64)
        return
    qq, kq, pos = qq.cuda(), kq.cuda(), pos.cuda()
    kw["q_scale"], kw["k_scale"] = kw["q_scale"].cuda(), kw["k_scale"].cuda()
    for bad, err in (({"block_n": 32}, "block_n"), ({"rows": 3}, "rows"),
                     ({"q_scale": torch.ones(1, 2, 3, device="cuda")}, "q_scale"),
                     ({"window": (0, 0)}, "window")):
        with pytest.raises(ValueError, match=err):
            _cuda.lowbit_block_scores(qq, kq, pos, **{**kw, **bad})
    with pytest.raises(ValueError, match="head dim"):
        _cuda.lowbit_block_scores(qq[..., :32].contiguous(), kq[..., :32].contiguous(), pos, **kw)


LOWBIT_CASES = [
    # B, Hq, Hkv, Sq, Sk, D, block_m, block_n, rows, window, causal
    (1, 4, 1, 1000, 1000, 128, 64, 64, 16, (1, 1), True),
    (2, 8, 2, 777, 1500, 128, 128, 128, 16, (1, 2), True),
    (1, 8, 8, 1024, 1024, 64, 64, 128, 8, (2, 1), True),
    (1, 4, 2, 513, 513, 64, 128, 64, 32, (0, 3), True),
    (1, 2, 1, 300, 300, 128, 64, 64, 4, (1, 1), True),
    (1, 4, 1, 1000, 1000, 128, 64, 64, 16, None, True),
    (1, 4, 2, 640, 900, 128, 128, 128, 64, None, False),
    (1, 32, 8, 8192, 8192, 128, 128, 128, 16, (1, 1), True),
    # GQA packing: group 6 -> 2 heads per CTA, group 16 -> 8 heads per CTA
    (1, 12, 2, 600, 600, 128, 64, 64, 16, (1, 1), True),
    (2, 16, 1, 500, 700, 64, 64, 128, 32, (1, 1), True),
]


def _lowbit_id(c):
    return "B{}-H{}-KV{}-Q{}-K{}-D{}-m{}-n{}-r{}-w{}-{}".format(
        *c[:9], "x".join(map(str, c[9])) if c[9] else "none", "causal" if c[10] else "full")


@gpu
@pytest.mark.parametrize("case", LOWBIT_CASES, ids=_lowbit_id)
def test_lowbit_matches_reference(ext, case):
    from sparse_attn.reference.estimate import block_scores_ref

    batch, hq, hkv, sq, sk, dim, block_m, block_n, rows, window, causal = case
    torch.manual_seed(zlib.crc32(repr(case).encode()))
    qq, kq, pos, qs, ks = _lowbit_inputs(batch, hq, hkv, sq, sk, dim, block_m, block_n, rows,
                                         "cuda")
    kw = dict(rows=rows, block_n=block_n, seqlen_q=sq, causal=causal, scale=dim ** -0.5,
              q_scale=qs, k_scale=ks, window=window)
    got = _cuda.lowbit_block_scores(qq, kq, pos, **kw)
    ref = block_scores_ref(qq, kq, pos, **kw)
    assert got.shape == ref.shape and not torch.isnan(got).any()
    # int8 dots are exact in both: only exp2 approximation and summation order differ
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=1e-5 * float(ref.abs().max()))
    if causal and sq == sk:  # unreachable blocks are exactly zero
        nkb = ref.shape[-1]
        qb_last = (pos.view(-1, rows).amax(1) // block_n)[:, None]
        beyond = torch.arange(nkb, device="cuda")[None, :] > qb_last  # [NQB, NKB]
        assert not got[..., beyond].any()


@gpu
def test_lowbit_matches_triton_and_graphs(ext):
    """Same numbers as the Triton int8 path; CUDA-graph capture; opcheck (fake kernel)."""
    from sparse_attn.kernels.estimate import block_scores

    qq, kq, pos, qs, ks = _lowbit_inputs(1, 8, 2, 4096, 4096, 128, 64, 64, 16, "cuda")
    kw = dict(rows=16, block_n=64, seqlen_q=4096, causal=True, scale=128 ** -0.5, q_scale=qs,
              k_scale=ks, window=(1, 1))
    got = _cuda.lowbit_block_scores(qq, kq, pos, **kw)
    tri = block_scores(qq, kq, pos, **kw)
    torch.testing.assert_close(got, tri, rtol=2e-3, atol=1e-5 * float(tri.abs().max()))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _cuda.lowbit_block_scores(qq, kq, pos, **kw)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, got, rtol=1e-5, atol=1e-6 * float(got.abs().max()))
    torch.library.opcheck(ext.lowbit_block_scores.default,
                          (qq, kq, qs, ks, pos, 16, 64, 4096, True, 128 ** -0.5, 1, 1, True))


@gpu
def test_lowbit_bad_input_names_kernel(ext):
    qq = torch.zeros(1, 2, 32, 64, dtype=torch.int8, device="cuda")
    with pytest.raises(RuntimeError, match="lowbit_block_scores"):
        ext.lowbit_block_scores(qq, qq, torch.ones(1, 2, 2, device="cuda"),
                                torch.ones(1, 2, 1, device="cuda"),
                                torch.arange(32, device="cuda"), 16, 64, 32, True, 0.125, 1, 1,
                                True)  # row_pos int64: rejected by the binding
    with pytest.raises(RuntimeError, match="lowbit_block_scores: head dim 64 or 128, got 32"):
        q32 = qq[..., :32].contiguous()
        ext.lowbit_block_scores(q32, q32, torch.ones(1, 2, 2, device="cuda"),
                                torch.ones(1, 2, 1, device="cuda"),
                                torch.arange(32, device="cuda", dtype=torch.int32), 16, 64, 32,
                                True, 0.125, 1, 1, True)
