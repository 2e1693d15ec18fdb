"""Pattern estimators: decide where attention is computed, as a Layout.

Every estimator is configured by a small dataclass and called as
``estimator.estimate(q, k, *, causal=True) -> Layout``. Get one by name::

    est = sparse_attn.estimators.get("streaming", local_blocks=8)
    layout = est.estimate(q, k)

``available()`` lists the registered names.
"""
from .base import Estimator, available, get, register

__all__ = ["Estimator", "available", "get", "register"]
