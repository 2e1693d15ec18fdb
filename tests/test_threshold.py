"""``threshold`` (BLASST): the dense layout + the kernel's softmax-threshold skip, the torch
emulation of the skip, and the calibration helper (lambda for a target error, lambda vs length).
"""

import pytest
import torch

from sparse_attn import estimators, sparse_attention
from sparse_attn.estimators import calibrate_threshold, threshold_vs_length
from sparse_attn.estimators.threshold import blasst_attention_ref, sink_sample
from sparse_attn.layout import BlockLayout
from sparse_attn.reference.dense import attention_ref


def _dense(q, k, v, causal=True):
    out = attention_ref(q, k, v, causal=causal)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("hq,hkv,sq,sk,causal", [(4, 2, 200, 200, True), (2, 2, 130, 300, True),
                                                  (4, 1, 128, 128, False)],
                         ids=["gqa2", "chunk", "noncausal"])
def test_blasst_ref_without_threshold_is_dense(hq, hkv, sq, sk, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, hq, sq, 32, generator=g)
    k, v = torch.randn(2, 1, hkv, sk, 32, generator=g)
    out, skipped = blasst_attention_ref(q, k, v, softmax_threshold=0.0, causal=causal,
                                        block_m=64, block_n=64)
    torch.testing.assert_close(out, _dense(q, k, v, causal), atol=1e-5, rtol=1e-5)
    assert skipped == 0


def test_blasst_ref_error_and_skips_grow_with_lambda():
    q, k, v = sink_sample(512)
    ref = _dense(q, k, v)
    errs, skips = [], []
    for lam in (1e-6, 1e-4, 1e-2):
        out, sk = blasst_attention_ref(q, k, v, softmax_threshold=lam, block_m=64, block_n=64)
        errs.append(float((out - ref).norm() / ref.norm()))
        skips.append(float(sk))
    assert errs == sorted(errs) and skips == sorted(skips)
    assert skips[-1] > 0.3 and errs[0] < 1e-4


def test_calibrate_picks_largest_lambda_within_target():
    q, k, v = sink_sample(512)
    cal = calibrate_threshold(q, k, v, target_error=0.01, block_m=64, block_n=64)
    i = cal.candidates.index(cal.threshold)
    assert cal.errors[i] <= 0.01
    assert all(e > 0.01 for e in cal.errors[:i])  # every larger lambda missed the target
    assert cal.threshold_scale == pytest.approx(cal.threshold * 512)
    assert cal.skipped[i] > 0


def test_threshold_inverse_relation_with_length():
    q, k, v = sink_sample(2048)
    cands = [10.0 ** (-e / 4) for e in range(12, 29)]  # 1e-3 .. 1e-7
    fit = threshold_vs_length(q, k, v, [512, 1024, 2048], target_error=1e-3, candidates=cands,
                              block_m=64, block_n=64)
    lam = fit["thresholds"]
    assert lam[0] >= lam[1] >= lam[2] and lam[0] > lam[2], lam
    assert 0.5 < fit["beta"] < 2.0, fit["beta"]  # BLASST: lambda ~ 1 / L


def test_threshold_estimator_dense_layout_and_lambda():
    q, k = torch.randn(1, 4, 256, 32), torch.randn(1, 2, 256, 32)
    est = estimators.get("threshold", block_m=64, block_n=64, threshold_scale=2.0)
    layout = est.estimate(q, k)
    assert layout.num_heads == 2 and layout.density(256, 256) == 1.0
    assert torch.equal(layout.to_mask(), BlockLayout.dense(1, 2, 256, 256, block_m=64,
                                                           block_n=64).to_mask())
    assert est.softmax_threshold_for(1024) == 2.0 / 1024
    assert estimators.get("threshold", threshold=1e-3).softmax_threshold_for(10) == 1e-3


def test_threshold_through_sparse_attention_triton():
    # the kernel (interpreter) skips with the estimator's lambda; error stays small
    q, k, v = sink_sample(256, heads=2, dim=32)
    ref = _dense(q, k, v)
    out = sparse_attention(q, k, v, "threshold", min_seqlen=0, backend="triton",
                           block_m=64, block_n=64, threshold=1e-3)
    emu, _ = blasst_attention_ref(q, k, v, softmax_threshold=1e-3, block_m=64, block_n=64)
    assert float((out - ref).norm() / ref.norm()) < 0.05
    assert (out - emu).abs().max() < 1e-3  # MHA: the kernel's tiles are the emulation's


@pytest.mark.parametrize("kwargs,match", [
    (dict(threshold=1.0), "threshold must be"), (dict(threshold=0), "threshold must be"),
    (dict(threshold_scale=-1.0), "threshold_scale"), (dict(block_n=96), "block_n"),
])
def test_threshold_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimators.get("threshold", **kwargs)


def test_calibrate_bad_args():
    q = k = v = torch.randn(1, 1, 128, 16)
    with pytest.raises(ValueError, match="target_error"):
        calibrate_threshold(q, k, v, target_error=0)
    with pytest.raises(ValueError, match="candidates"):
        calibrate_threshold(q, k, v, candidates=[2.0])
    with pytest.raises(ValueError, match="backend"):
        calibrate_threshold(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="lengths"):
        threshold_vs_length(q, k, v, [64])


# ----------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_calibration_kernel_vs_emulation():
    q, k, v = (t.cuda() for t in sink_sample(4096, heads=4, dim=128, block=128))
    cal_gpu = calibrate_threshold(q.bfloat16(), k.bfloat16(), v.bfloat16(), target_error=0.02)
    cal_cpu = calibrate_threshold(q, k, v, target_error=0.02, backend="torch")
    i, j = (c.candidates.index(c.threshold) for c in (cal_gpu, cal_cpu))
    assert abs(i - j) <= 2, (cal_gpu.threshold, cal_cpu.threshold)
    assert cal_gpu.skipped[i] > 0.2


@pytest.mark.gpu
def test_gpu_threshold_vs_length():
    q, k, v = (t.cuda().bfloat16() for t in sink_sample(16384, heads=4, dim=128, block=128))
    fit = threshold_vs_length(q, k, v, [2048, 4096, 8192, 16384], target_error=0.01)
    assert 0.5 < fit["beta"] < 2.0, fit
