"""bench/niah.py's method options (shared with bench/ppl.py): --methods/--config parsing and
the --attn mask emulation of the sparse ops (CPU, no model)."""

import pytest
import torch
from conftest import load_bench_module

import sparse_attn
from sparse_attn import module


@pytest.fixture(scope="module")
def niah():
    yield from load_bench_module("niah")


def test_default_methods_skip_dense_and_oracle(niah):
    names = niah.default_methods()
    assert "dense" not in names and "oracle" not in names
    assert set(names) == set(sparse_attn.estimators.available()) - {"dense", "oracle"}


def test_configs_text_json_and_shorthands(niah):
    plans = niah.method_plans(
        "proxy,proxy@m98,streaming",
        ["proxy:mass=0.9,block_size=64", "proxy@m98:mass=0.98,dense_layers=0+1",
         '{"streaming": {"local_blocks": 3}}'])
    by = {p["label"]: p for p in plans}
    assert by["proxy"]["config"] == {"mass": 0.9, "block_m": 64, "block_n": 64}
    assert by["proxy"]["per_layer"] is None
    # a tagged variant starts from its method's config
    assert by["proxy@m98"]["method"] == "proxy"
    assert by["proxy@m98"]["config"] == {"mass": 0.98, "block_m": 64, "block_n": 64}
    assert by["proxy@m98"]["per_layer"] == {0: None, 1: None}
    assert by["streaming"]["config"] == {"local_blocks": 3}


@pytest.mark.parametrize("methods,configs,match", [
    ("nope", [], "nope"),
    ("proxy", ["proxy:bogus=1"], "bogus"),
    ("proxy", ["streaming:local_blocks=2"], "--methods"),
    ("proxy", ["proxy"], "SPEC:key=value"),
    ("proxy", ["proxy:mass"], "key=value"),
])
def test_bad_options_fail_before_loading(niah, methods, configs, match):
    with pytest.raises(ValueError, match=match):
        niah.method_plans(methods, configs)


@pytest.mark.parametrize("method,config", [
    ("block_topk", {"block_m": 64, "block_n": 64, "mass": 0.8}),
    ("proxy", {"block_m": 64, "block_n": 64, "mass": 0.8}),  # per-query-head layout
    ("anchor", {}),  # a StripeLayout
])
def test_mask_attention_matches_the_op(niah, method, config, monkeypatch):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 300, 32), torch.randn(1, 2, 300, 32), torch.randn(1, 2, 300, 32)
    monkeypatch.setattr(niah, "_MASK_CHUNK", 128)  # several query chunks, the last one short
    attn = sparse_attn.SparseAttention(method, min_seqlen=0, backend="torch", **config)
    want = attn(q, k, v)
    saved = dict(module._LAYOUT_OPS)
    try:
        niah.use_mask_attention()
        got = attn(q, k, v)
    finally:
        module._LAYOUT_OPS.clear()
        module._LAYOUT_OPS.update(saved)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_cells_without_seeds_keep_the_old_passkeys(niah):
    # the i-th cell draws from seed * 1000 + i, as the earlier runs recorded (8k: 60494, 27611)
    cells = niah.plan_cells([8192], [0.5, 1.0])
    assert [(c["depth"], c["seed"], c["passkey"]) for c in cells] == [
        (0.5, None, "60494"), (1.0, None, "27611")]
    assert niah.plan_cells([], [], "4096:0.5", seed=3)[0]["passkey"] == \
        str(__import__("random").Random(3000).randrange(10000, 100000))


def test_seeded_cells_reproduce_in_any_subset(niah):
    grid = niah.plan_cells([8192], [0.1, 0.3], seeds="1,2")
    assert [(c["depth"], c["seed"]) for c in grid] == [(0.1, 1), (0.1, 2), (0.3, 1), (0.3, 2)]
    assert {c["passkey"] for c in grid if c["seed"] == 1} == {niah.seed_passkey(1)}
    assert niah.seed_passkey(1) != niah.seed_passkey(2)
    # a later run of one cell, by its seed, gets the same prompt key; repeats run once
    again = niah.plan_cells([], [], "8192:0.3:2,8192:0.3:2")
    assert again == [c for c in grid if (c["depth"], c["seed"]) == (0.3, 2)]
    # a length:depth cell with --seeds is repeated per seed
    assert len(niah.plan_cells([], [], "8k:0.5", seeds="0,1")) == 2
    with pytest.raises(ValueError, match="length:depth"):
        niah.plan_cells([], [], "8192")


def test_methods_none_is_dense_alone(niah):
    assert niah.method_plans("none", None) == []
