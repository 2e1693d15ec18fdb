"""The public API: explicit __all__, every name importable and documented."""
import inspect

import sparse_attn


def test_all_is_exact_and_importable():
    public = {n for n in dir(sparse_attn) if not n.startswith("_")}
    modules = {n for n in public if inspect.ismodule(getattr(sparse_attn, n))}
    assert set(sparse_attn.__all__) - {"__version__"} == public - modules
    for name in sparse_attn.__all__:
        assert getattr(sparse_attn, name) is not None


def test_public_callables_have_docstrings():
    for name in sparse_attn.__all__:
        obj = getattr(sparse_attn, name)
        if callable(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"
