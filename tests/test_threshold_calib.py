"""``bench/calibrate_threshold.py`` (the BLASST default's calibration on SmolLM2): its pieces on
a small synthetic sample (no model load), and the default it chose."""
import pytest
from conftest import load_bench_module

from sparse_attn import estimators
from sparse_attn.estimators import calibrate_threshold
from sparse_attn.estimators.threshold import DEFAULT_THRESHOLD_SCALE, sink_sample

TILES = {"block_m": 64, "block_n": 64}


@pytest.fixture(scope="module")
def cal():
    yield from load_bench_module("calibrate_threshold")


def test_candidates_descend_from_the_estimator_cap(cal):
    cands = cal.candidates(3)
    assert cands[0] == 0.5 and cands == sorted(cands, reverse=True)
    assert min(cands) == pytest.approx(1e-8) and all(0 < c < 1 for c in cands)


def test_calibrate_layer_matches_calibrate_threshold_per_target(cal):
    # the larger target's lambda is read off the smaller target's error curve: it must be what
    # calibrate_threshold returns for that target directly
    q, k, v = sink_sample(512)
    cands = cal.candidates(3)
    rows, fits = cal.calibrate_layer(q, k, v, 7, [256, 512], [1e-3, 1e-2], cands, TILES)
    assert len(rows) == 4 and len(fits) == 2
    for r in rows:
        n = r["length"]
        direct = calibrate_threshold(q[:, :, :n], k[:, :, :n], v[:, :, :n],
                                     target_error=r["target"], candidates=cands,
                                     backend="torch", **TILES)
        assert r["lambda"] == direct.threshold and r["error"] <= r["target"]
        assert r["lambda_L"] == pytest.approx(direct.threshold_scale)
    by = {(r["length"], r["target"]): r["lambda"] for r in rows}
    assert by[(512, 1e-2)] >= by[(512, 1e-3)]


def test_scale_rows_and_summary(cal):
    q, k, v = sink_sample(512)
    rows = cal.scale_rows(q, k, v, 3, [256, 512], [0.01, 100.0], TILES)
    assert [(r["length"], r["scale"]) for r in rows] == [(256, 0.01), (256, 100.0),
                                                         (512, 0.01), (512, 100.0)]
    big = {r["length"]: r for r in rows if r["scale"] == 100.0}
    small = {r["length"]: r for r in rows if r["scale"] == 0.01}
    for n in (256, 512):
        assert big[n]["lambda"] == min(0.5, 100.0 / n) and big[n]["skipped"] > 0
        assert big[n]["error"] > small[n]["error"]
    _, sc = cal.summarize([], [], rows, [1e-2], [256, 512], [0.01, 100.0])
    assert len(sc) == 4 and all(s["worst_layer"] == 3 for s in sc)


def test_default_scale_is_the_calibrated_one():
    est = estimators.get("threshold")
    assert est.threshold_scale == DEFAULT_THRESHOLD_SCALE
    assert est.softmax_threshold_for(8192) == DEFAULT_THRESHOLD_SCALE / 8192
    assert est.softmax_threshold_for(1) == 0.5  # clamped to 0.5
