"""Integrations with model libraries; each imports its library lazily."""
from .transformers import PatchHandle, patch, unpatch

__all__ = ["PatchHandle", "patch", "unpatch"]
