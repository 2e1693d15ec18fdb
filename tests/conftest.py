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


def _tensor_fields(x, name="result"):
    """(name, tensor) pairs of a tensor, a tuple/list of them, or a layout dataclass (nested
    layouts included), so results of any op or estimator can be compared field by field."""
    import dataclasses

    if isinstance(x, torch.Tensor):
        yield name, x
    elif dataclasses.is_dataclass(x):
        for f in dataclasses.fields(x):
            yield from _tensor_fields(getattr(x, f.name), f"{name}.{f.name}")
    elif isinstance(x, (tuple, list)):
        for i, item in enumerate(x):
            yield from _tensor_fields(item, f"{name}[{i}]")


def assert_same_tensors(a, b):
    """Every tensor field of ``a`` equals the one of ``b`` exactly."""
    fa, fb = dict(_tensor_fields(a)), dict(_tensor_fields(b))
    assert fa.keys() == fb.keys()
    for key in fa:
        assert torch.equal(fa[key], fb[key]), f"{key} differs"


def assert_sync_free_and_capturable(fn, *, capture: bool = True):
    """``fn()`` on CUDA: runs with no host synchronisation (sync debug mode 'error'), and, with
    ``capture``, a CUDA graph of it replays the eager result exactly. Returns the eager result."""
    ref = fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_same_tensors(again, ref)
    if not capture:
        return ref
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up on a side stream (allocator pools, autotuning)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    graph.replay()
    torch.cuda.synchronize()
    assert_same_tensors(captured, ref)
    return ref


def load_bench_module(name: str):
    """A ``bench/<name>.py`` script imported as a module, with ``bench/`` on ``sys.path`` while
    it loads (the scripts import ``_common``); a generator for module-scoped fixtures."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_bench", bench / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(bench))
