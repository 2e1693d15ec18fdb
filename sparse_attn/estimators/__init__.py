"""Pattern estimators: decide where attention is computed, as a Layout.

Every estimator is configured by a small dataclass and called as
``estimator.estimate(q, k, *, causal=True) -> Layout``. Get one by name::

    est = sparse_attn.estimators.get("streaming", local_blocks=8)
    layout = est.estimate(q, k)

``available()`` lists the registered names.

For decode, :class:`QuestSelector` picks KV-cache pages (Quest) for
``sparse_attn.decode_attention(..., block_indices=...)``; it keeps per-page metadata beside the
cache instead of mapping ``q, k`` to a layout, so it is a class of its own, not a registered name.
"""
from .base import Estimator, available, get, register
from .quest import QuestMetadata, QuestSelector
from .threshold import ThresholdCalibration, calibrate_threshold, threshold_vs_length

__all__ = ["Estimator", "QuestMetadata", "QuestSelector", "ThresholdCalibration", "available",
           "calibrate_threshold", "get", "register", "threshold_vs_length"]
