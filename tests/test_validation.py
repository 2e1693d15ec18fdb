"""Bad input: a clear ValueError/TypeError naming the argument, raised before any launch."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_attn as sa
from sparse_attn.kernels import block_sparse as kernel_module
from sparse_attn.layout import BlockLayout


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    """Any launch in these tests is a failure: validation must stop bad input first."""
    def boom(*args, **kwargs):
        raise AssertionError("kernel launched with bad input")
    monkeypatch.setattr(kernel_module, "block_sparse_fwd", boom)


def _ok(b=1, hq=4, hkv=2, sq=128, sk=128, d=64, dtype=torch.float16):
    q = torch.randn(b, hq, sq, d, dtype=dtype)
    k = torch.randn(b, hkv, sk, d, dtype=dtype)
    v = torch.randn(b, hkv, sk, d, dtype=dtype)
    layout = BlockLayout.dense(b, hkv, sq, sk, block_m=64, block_n=64)
    return q, k, v, layout


def _call(q, k, v, layout, **kw):
    kw.setdefault("backend", "triton")
    return sa.block_sparse_attention(q, k, v, layout, **kw)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda q, k, v, l: (q[0], k, v, l), ValueError, "q must have rank 4"),
    (lambda q, k, v, l: (q, k[:1].expand(2, -1, -1, -1), v, l), ValueError, "k .* and v"),
    (lambda q, k, v, l: (torch.cat([q, q]), torch.cat([k, k]), torch.cat([v, v]), l),
     ValueError, "layout batch"),
    (lambda q, k, v, l: (q[..., :32], k, v, l), ValueError, "head dim of q"),
    (lambda q, k, v, l: (q[:, :3], k, v, l), ValueError, "multiple of key/value heads"),
    (lambda q, k, v, l: (q.int(), k, v, l), TypeError, "q has dtype"),
    (lambda q, k, v, l: (q.double(), k.double(), v.double(), l), TypeError, "dtype"),
    (lambda q, k, v, l: (q, k.float(), v, l), TypeError, "share a dtype"),
    (lambda q, k, v, l: (q, k.to("meta"), v, l), ValueError, "one device"),
    (lambda q, k, v, l: (q, k, v, "dense"), TypeError, "layout must be a BlockLayout"),
    (lambda q, k, v, l: (q, k, v, BlockLayout.dense(1, 3, 128, block_m=64, block_n=64)),
     ValueError, "layout has 3 heads"),
    (lambda q, k, v, l: (q, k, v, BlockLayout.dense(1, 2, 256, block_m=64, block_n=64)),
     ValueError, "another sequence length"),
    (lambda q, k, v, l: ("q", k, v, l), TypeError, "q must be a torch.Tensor"),
])
def test_bad_tensors(mutate, exc, match):
    with pytest.raises(exc, match=match):
        _call(*mutate(*_ok()))


@pytest.mark.parametrize("d", [300, 12, 4])
def test_bad_head_dim(d):
    q, k, v, layout = _ok(d=d)
    with pytest.raises(ValueError, match="head dim"):
        _call(q, k, v, layout)


@pytest.mark.parametrize("edit,match", [
    (lambda l: l.indices.__setitem__((0, 0, 1, 1), 7), "out of range"),
    (lambda l: l.indices.__setitem__((0, 0, 1, slice(0, 2)), torch.tensor([1, 0])),
     "strictly increasing"),
    (lambda l: l.indices.__setitem__((0, 1, 0, 0), -1), "out of range"),
])
def test_bad_indices_never_launch(edit, match):
    q, k, v, layout = _ok()
    edit(layout)
    with pytest.raises(ValueError, match=match):
        _call(q, k, v, layout)


@pytest.mark.parametrize("kw,exc,match", [
    ({"scale": 0.0}, ValueError, "scale"),
    ({"scale": -1.0}, ValueError, "scale"),
    ({"scale": float("nan")}, ValueError, "scale"),
    ({"scale": "x"}, TypeError, "scale"),
    ({"softmax_threshold": -0.1}, ValueError, "softmax_threshold"),
    ({"softmax_threshold": 1.0}, ValueError, "softmax_threshold"),
    ({"softmax_threshold": "x"}, TypeError, "softmax_threshold"),
    ({"backend": "cuda"}, ValueError, "backend"),
])
def test_bad_options(kw, exc, match):
    with pytest.raises(exc, match=match):
        _call(*_ok(), **kw)


DTYPES = [torch.float16, torch.float32, torch.float64, torch.int32, torch.bfloat16]


@settings(max_examples=60, deadline=None)
@given(b=st.integers(0, 2), hq=st.integers(1, 5), hkv=st.integers(1, 3),
       sq=st.integers(0, 150), sk=st.integers(0, 150), d=st.sampled_from([8, 12, 32, 64, 300]),
       dtype=st.sampled_from(DTYPES), lb=st.integers(1, 2), lh=st.integers(1, 5),
       lsq=st.integers(1, 150))
def test_fuzz_only_clear_errors(b, hq, hkv, sq, sk, d, dtype, lb, lh, lsq):
    """Any shape combination either runs (all valid) or raises ValueError/TypeError."""
    def make(*shape):
        return torch.randn(*shape).to(dtype) if dtype.is_floating_point else \
            torch.zeros(*shape, dtype=dtype)
    q, k, v = make(b, hq, sq, d), make(b, hkv, sk, d), make(b, hkv, sk, d)
    layout = BlockLayout.dense(lb, lh, lsq, max(sk, 1), block_m=64, block_n=64)
    try:
        out = sa.block_sparse_attention(q, k, v, layout, backend="torch")
    except (ValueError, TypeError):
        return
    assert out.shape == q.shape and not torch.isnan(out).any()
