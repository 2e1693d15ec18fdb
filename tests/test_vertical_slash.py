"""The ``vertical_slash`` estimator (MInference): scores against brute force, planted lines,
budgets, GQA, chunked prefill, bad configs."""
import math

import pytest
import torch

from sparse_attn import estimators
from sparse_attn.estimators.vertical_slash import vertical_slash_scores
from sparse_attn.layout import StripeLayout


def _qk(b, hq, hkv, sq, sk, d=64, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g)
    return q.to(device, dtype), k.to(device, dtype)


def _est(**cfg):
    base = dict(block_m=64, block_n=64, sink_blocks=1, local_blocks=1, last_q=64)
    base.update(cfg)
    return estimators.get("vertical_slash", **base)


def _brute(q, k, n, causal, forced_keys=0, forced_offsets=0):
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(hq // hkv, 1).float()
    s = q[:, :, sq - n:].float() @ kk.transpose(-1, -2) / math.sqrt(d)
    pos = torch.arange(sq - n, sq) + sk - sq
    keys = torch.arange(sk)
    if causal:
        s = s.masked_fill(keys > pos[:, None], float("-inf"))
    p = s.softmax(-1)
    vert = torch.zeros(b, hq, sk)
    slash = torch.zeros(b, hq, sk)
    cov = torch.zeros(b, hq)
    for i in range(n):
        for j in range(sk):
            o = int(pos[i]) - j
            if j < forced_keys or 0 <= o < forced_offsets:
                cov += p[:, :, i, j]
                continue
            vert[:, :, j] += p[:, :, i, j]
            if o >= 0:
                slash[:, :, o] += p[:, :, i, j]
    return vert / n, slash / n, cov / n


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [(1, 4, 2, 40, 40), (2, 2, 1, 20, 57)],
                         ids=["B1-H4-KV2-T40", "B2-H2-KV1-Q20-K57"])
def test_scores_match_brute_force(shape, causal):
    b, hq, hkv, sq, sk = shape
    q, k = _qk(b, hq, hkv, sq, sk)
    for fk, fo in ((0, 0), (3, 5)):
        v, s, c = vertical_slash_scores(q, k, 16, causal=causal, forced_keys=fk,
                                        forced_offsets=fo)
        rv, rs, rc = _brute(q, k, 16, causal, fk, fo)
        torch.testing.assert_close(v, rv, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s, rs, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(c, rc, atol=1e-5, rtol=1e-4)
    v, s, _ = vertical_slash_scores(q, k, 16, causal=causal)
    torch.testing.assert_close(v.sum(-1), torch.ones(b, hq))
    if causal:
        torch.testing.assert_close(s.sum(-1), torch.ones(b, hq))


def _planted_lines(s=512, d=64, verticals=(130, 300), offset=200, seed=0):
    """Queries that attend strongly to a few key columns and to the key ``offset`` back."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, s, d, generator=g) * 0.2
    k = torch.randn(1, 1, s, d, generator=g) * 0.2
    a = torch.randn(d, generator=g)
    a = 3 * a / a.norm()
    q[:, 0] += a  # head 0: vertical lines
    for c in verticals:
        k[:, :, c] += 3 * a
    # head 1: a slash: query i matches key i - offset (random codes per position)
    codes = torch.randn(s, d, generator=g)
    codes = 4 * codes / codes.norm(dim=-1, keepdim=True)
    q[0, 1, offset:] += codes[: s - offset]
    k[0, 0, : s - offset] += codes[: s - offset]
    return q, k


def test_planted_lines_found():
    q, k = _planted_lines()
    est = _est(top_k=8, gqa_reduce="none")
    vertical, slash = est.lines(q, k)
    assert vertical[0, 0, 130] and vertical[0, 0, 300]
    assert slash[0, 1, 200]
    layout = est.estimate(q, k)
    assert isinstance(layout, StripeLayout)
    layout.validate(512, 512)
    block, column = layout.to_mask(512)
    # the vertical line at 300 is computed by every later query block (stripe or dense block)
    covered = column | block.repeat_interleave(64, -1)
    for m in range(5, 8):
        assert covered[0, 0, m, 300] and covered[0, 0, m, 130]
    # the slash at offset 200 makes the band blocks dense: query block 7 (rows 448..511)
    assert block[0, 1, 7, (448 - 200) // 64] and block[0, 1, 7, (511 - 200) // 64]


@pytest.mark.parametrize("cfg", [dict(mass=0.9), dict(density=0.2), dict(top_k=30)],
                         ids=["mass", "density", "topk"])
@pytest.mark.parametrize("shape", [(2, 4, 2, 384, 384), (1, 4, 1, 200, 455)],
                         ids=["B2-H4-KV2-T384", "B1-H4-KV1-Q200-K455"])
def test_layout_valid(shape, cfg):
    b, hq, hkv, sq, sk = shape
    q, k = _qk(b, hq, hkv, sq, sk, seed=2)
    for red in ("max", "none"):
        layout = _est(gqa_reduce=red, **cfg).estimate(q, k)
        layout.validate(sq, sk)
        assert layout.num_heads == (hkv if red == "max" else hq)
        d = layout.density(sq, sk)
        assert 0 < d <= 1


def test_budgets():
    q, k = _planted_lines(s=1024)
    dens = [_est(mass=m, gqa_reduce="none").estimate(q, k).density(1024, 1024)
            for m in (0.5, 0.8, 0.95)]
    assert dens[0] <= dens[1] <= dens[2]
    v, s = _est(top_k=10).lines(q, k)
    assert int(v.sum() + s.sum()) == 10 + 64 + 64


@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_density_budget_is_layout_density(density):
    """The density budget counts the layout's computed pairs (slash bands as whole blocks,
    verticals by the rows that see them), not lines: within 30% of the request once the request
    exceeds the sink + local share."""
    q, k = _qk(1, 4, 2, 4096, 4096, seed=1)
    got = _est(density=density).estimate(q, k).density(4096, 4096)
    assert abs(got - density) <= 0.3 * density, got


def test_mass_budget_stays_sparse_on_flat_attention():
    """Random inputs attend almost uniformly: a mass target then needs about that share of the
    keys, not every block (scattered slashes each opening a band made it 1.0 at 128k)."""
    q, k = _qk(1, 4, 2, 4096, 4096, seed=1)
    got = [_est(mass=m).estimate(q, k).density(4096, 4096) for m in (0.5, 0.9)]
    assert got[0] < 0.8 and got[1] < 0.98 and got[0] < got[1]


def test_chunked_prefill_uses_the_last_rows():
    q, k = _qk(1, 2, 1, 512, 512, seed=4)
    full = _est(top_k=20).lines(q, k)
    part = _est(top_k=20).lines(q[:, :, 256:], k)
    assert torch.equal(full[0], part[0]) and torch.equal(full[1], part[1])
    _est(top_k=20).estimate(q[:, :, 256:], k).validate(256, 512)


@pytest.mark.parametrize("cfg, match", [
    (dict(last_q=0), "last_q"), (dict(mass=0.9, top_k=3), "one budget"),
    (dict(density=1.5), "density"), (dict(gqa_reduce="mean"), "gqa_reduce"),
    (dict(max_columns=-1), "max_columns"),
])
def test_bad_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        estimators.get("vertical_slash", **cfg)


def test_window_larger_than_sequence():
    q, k = _qk(1, 2, 1, 100, 100)
    with pytest.raises(ValueError, match="local_blocks"):
        _est(local_blocks=3).estimate(q, k)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [dict(mass=0.95), dict(top_k=500), dict(density=0.05)],
                         ids=["mass", "topk", "density"])
def test_gpu_no_sync_graph_capture(cfg):
    from test_anchor import check_stripe_sync_free_and_capturable

    q, k = _qk(1, 8, 2, 8192, 8192, d=128, dtype=torch.bfloat16, device="cuda")
    check_stripe_sync_free_and_capturable(_est(**cfg), q, k)
