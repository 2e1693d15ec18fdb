"""Estimator base class and the name registry."""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, ClassVar

import torch

_REGISTRY: dict[str, type["Estimator"]] = {}
# modules that register estimators when imported (one file per method)
_BUILTIN_MODULES: tuple[str, ...] = ("dense", "streaming", "block_topk", "oracle", "proxy",
                                      "lowbit", "threshold", "anchor", "vertical_slash")


@dataclasses.dataclass
class Estimator:
    """Base: subclasses are dataclasses whose fields are the method's config.

    ``estimate(q, k, *, causal=True)`` takes SDPA-layout ``q [B, Hq, Sq, D]`` and
    ``k [B, Hkv, Sk, D]`` (GQA not expanded; ``Sq <= Sk`` for chunked prefill, queries aligned
    to the end) and returns a layout for those lengths.
    """

    name = "base"
    # True when every layout comes from BlockLayout.from_mask / a built-in constructor, so its
    # indices are in range and sorted by construction: the op then skips its index check,
    # which reads the layout back to the host (a sync on every layer)
    layouts_valid_by_construction: ClassVar[bool] = False

    def estimate(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True):
        raise NotImplementedError


def register(name: str) -> Callable[[type[Estimator]], type[Estimator]]:
    """Class decorator adding an estimator under ``name``."""

    def wrap(cls: type[Estimator]) -> type[Estimator]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"estimator {name!r} is already registered to {_REGISTRY[name]}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{module}")


def available() -> list[str]:
    """Names of the registered estimators, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str, **config) -> Estimator:
    """An estimator by name, configured with keyword arguments.

    Raises ``ValueError`` for an unknown name or config key, listing what is accepted.
    """
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; available: {available()}")
    cls = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(
            f"estimator {name!r} has no config {unknown}; accepted: {sorted(fields)}")
    return cls(**config)
