import os

import torch

# @triton.jit reads TRITON_INTERPRET when a kernel module is imported: set it before any import
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run with `pytest -m gpu`)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


def assert_matches_reference(out, lse, ref, ref_lse, low=None):
    """A kernel's ``(out, lse)`` against the fp32 reference ``(ref, ref_lse)``, FlashAttention's
    rule: max error <= 2x the error of ``low`` (the same reference computed in the input dtype)
    + 1e-3 (fp32 inputs: a fixed 1e-4, 2e-3 on the GPU for tf32 dots); lse within 1e-2 and -inf
    on the same rows, whose output must be exactly 0. ``out`` must hold no NaN (outputs are
    NaN-poisoned or unwritten otherwise)."""
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    err = (out.float() - ref).abs().max().item()
    if low is None:
        tol = 2e-3 if out.is_cuda else 1e-4
    else:
        tol = 2 * (low.float() - ref).abs().max().item() + 1e-3
    assert err <= tol, f"max err {err:.3e} > tol {tol:.3e}"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    if fin.any():
        assert (lse[fin] - ref_lse[fin]).abs().max().item() < 1e-2
    # rows with nothing to attend: exactly zero output
    empty = torch.isinf(ref_lse)
    if empty.any():
        assert out[empty].abs().max().item() == 0.0
