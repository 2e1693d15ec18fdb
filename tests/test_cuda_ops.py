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
    with pytest.raises(RuntimeError, match="select_blocks"):
        ext.select_blocks(torch.rand(4, 8, device="cuda", dtype=torch.float64), None, None, None,
                          0.5)
    with pytest.raises(RuntimeError, match="select_blocks"):
        ext.select_blocks(torch.rand(4, 8, device="cuda"), torch.ones(3, 8, device="cuda",
                          dtype=torch.bool), None, None, 0.5)
