"""Hugging Face transformers: sparse prefill through the model's own attention extension point.

``patch(model)`` registers one attention function (and the sdpa mask function) under the name
``"sparse_attn"`` in transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` and
switches the model to it with ``model.set_attn_implementation``; model classes are never
rewritten. Each attention module gets a small per-layer plan (``module.layer_idx`` picks it);
the registered function runs that layer's :class:`~sparse_attn.SparseAttention` or hands the
call, unchanged, to the model's original implementation:

- layers not selected, and sliding-window layers (Gemma-2/3, Qwen, Mistral with a window):
  their window is kept exactly as the original implementation computes it;
- calls with an attention mask (a padded batch, a static cache being filled, a custom mask):
  dense with that mask, after one INFO log line;
- calls the layer's policy runs dense (decode ``q_len == 1``, keys shorter than ``min_seqlen``).

transformers is imported lazily: importing sparse_attn never imports it.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..module import MODULE_OPTIONS, SparseAttention
from ..ops._validate import log_once, logger

__all__ = ["ATTN_NAME", "LayerPlan", "PatchHandle", "patch", "unpatch"]

# the name registered in AttentionInterface / AttentionMaskInterface
ATTN_NAME = "sparse_attn"
_PLAN_ATTR = "_sparse_attn_plan"
_HANDLE_ATTR = "_sparse_attn_handle"
# original implementations the fallback calls as they are; any other one falls back to sdpa
_FALLBACKS = ("sdpa", "eager")


# ------------------------------------------------------------------------------ fallbacks
def _sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _eager_forward(module, query, key, value, attention_mask, **kwargs):
    """The modeling file's own ``eager_attention_forward``, fed the additive mask it expects.

    The registered mask function is sdpa's (bool, True = attend, or None where sdpa relies
    on ``is_causal``), so turn it into what ``eager_mask`` would have built.
    """
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        log_once(f"hf-eager-{type(module).__name__}",
                 f"sparse_attn: {type(module).__module__} has no eager_attention_forward; "
                 f"dense layers run through sdpa")
        return _sdpa_forward(module, query, key, value, attention_mask, **kwargs)
    sq, sk = query.shape[2], key.shape[2]
    if attention_mask is None and sq > 1 and getattr(module, "is_causal", True):
        # sdpa's is_causal is top-left aligned: equal lengths, or a static cache being filled
        rows = torch.arange(sq, device=query.device)[:, None]
        attention_mask = (torch.arange(sk, device=query.device)[None, :] <= rows)[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.where(
            attention_mask, torch.zeros((), dtype=query.dtype, device=query.device),
            torch.tensor(torch.finfo(query.dtype).min, dtype=query.dtype, device=query.device))
    return eager(module, query, key, value, attention_mask, **kwargs)


# --------------------------------------------------------------------------------- plans
@dataclass
class LayerPlan:
    """What one layer does under the patch.

    ``attn`` is the layer's SparseAttention, or None when every call goes to the original
    implementation (``status`` says why).
    """

    layer_idx: int
    status: str
    attn: SparseAttention | None = None
    fallback: Callable = _sdpa_forward
    original: str = "sdpa"

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 **kwargs):
        def original():
            return self.fallback(module, query, key, value, attention_mask, dropout=dropout,
                                 scaling=scaling, **kwargs)

        attn = self.attn
        if attn is None or kwargs.get("sliding_window") is not None:
            return original()
        if attention_mask is not None:
            log_once("hf-mask", "sparse_attn: an attention mask is present (padded batch, static "
                                "cache being filled or a custom mask): those calls run dense "
                                "attention with the mask")
            return original()
        if dropout and dropout > 0.0:
            log_once("hf-dropout", "sparse_attn: attention dropout is on (training mode): "
                                   "those calls run the original implementation")
            return original()
        if kwargs.get("output_attentions"):
            return original()
        if kwargs.get("softcap") is not None and self.original == "eager":
            log_once("hf-softcap", "sparse_attn: attention logit soft-capping has no sparse "
                                   "kernel: those layers run the original eager implementation")
            return original()
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        sq = query.shape[2]
        # no mask and more keys than queries: a static cache being filled, whose slots past
        # the queries are empty (sdpa's integration crops them the same way)
        crop = is_causal and 1 < sq < key.shape[2]
        k, v = (key[:, :, :sq], value[:, :, :sq]) if crop else (key, value)
        reason = attn.dense_reason(sq, k.shape[2])
        if reason is not None:
            attn.record("dense", sq, k.shape[2], 1.0, reason)
            return original()
        out, _ = attn.sparse(query, k, v, causal=is_causal, scale=scaling)
        return out.transpose(1, 2).contiguous(), None


def _attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The function registered as ``"sparse_attn"``: the layer's plan, or plain sdpa."""
    plan = getattr(module, _PLAN_ATTR, None)
    if plan is None:  # switched to our name without patch(): behave as sdpa
        return _sdpa_forward(module, query, key, value, attention_mask, **kwargs)
    return plan(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


# -------------------------------------------------------------------------------- handle
@dataclass
class PatchHandle:
    """What ``patch`` did; ``print(handle)`` lists every layer with its method and budget."""

    model: Any = field(repr=False)
    model_class: str
    original: str
    plans: dict[int, LayerPlan]
    active: bool = True

    @property
    def modules(self) -> dict[int, SparseAttention]:
        """The SparseAttention of every sparsified layer, by layer index."""
        return {i: p.attn for i, p in self.plans.items() if p.attn is not None}

    @property
    def sparse_layers(self) -> list[int]:
        return sorted(self.modules)

    def record_stats(self, on: bool = True) -> None:
        """Start (or stop) recording per-call stats on every sparsified layer."""
        for attn in self.modules.values():
            attn.record_stats = on

    def stats(self) -> dict[int, list[dict]]:
        """Per-call stats recorded so far (see ``record_stats``), by layer index."""
        return {i: list(attn.stats) for i, attn in self.modules.items()}

    def reset_stats(self) -> None:
        for attn in self.modules.values():
            attn.reset_stats()

    def unpatch(self) -> bool:
        return unpatch(self.model)

    def __str__(self) -> str:
        state = "" if self.active else " (unpatched)"
        lines = [f"sparse_attn patch on {self.model_class}{state}: attention "
                 f"{self.original!r} -> {ATTN_NAME!r}, {len(self.sparse_layers)}/"
                 f"{len(self.plans)} layers sparse"]
        rows = [("layer", "attention", "method", "config (budget)")]
        for i, p in sorted(self.plans.items()):
            if p.attn is None:
                rows.append((str(i), p.status, "-", "-"))
            else:
                est = p.attn.estimator
                cfg = ", ".join(f"{k}={getattr(est, k)!r}" for k in _fields(est))
                thr = ("" if p.attn.softmax_threshold is None
                       else f", softmax_threshold={p.attn.softmax_threshold}")
                rows.append((str(i), p.status, p.attn.method,
                             f"{cfg}; min_seqlen={p.attn.min_seqlen}, "
                             f"decode={p.attn.decode}{thr}".lstrip("; ")))
        widths = [max(len(r[c]) for r in rows) for c in range(3)]
        for r in rows:
            lines.append("  " + "  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3])
        return "\n".join(lines)

    __repr__ = __str__


def _fields(obj) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []


# ---------------------------------------------------------------------------- patching
def _check_model(model) -> None:
    try:
        from transformers import PreTrainedModel
    except ImportError as exc:  # pragma: no cover - transformers is an extra
        raise ImportError("sparse_attn.patch needs transformers: pip install 'sparse_attn[hf]'") \
            from exc
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"sparse_attn.patch: {name} is not a transformers PreTrainedModel; patch() switches "
            f"a Hugging Face model's attention implementation. For your own module call "
            f"sparse_attn.SparseAttention / sparse_attention directly.")
    if not (getattr(model, "_supports_attention_backend", False)
            and model._can_set_attn_implementation()):
        raise TypeError(
            f"sparse_attn.patch: {name} does not route its attention through transformers' "
            f"AttentionInterface (_supports_attention_backend="
            f"{getattr(model, '_supports_attention_backend', False)}, set_attn_implementation "
            f"{'supported' if model._can_set_attn_implementation() else 'unsupported'}); its "
            f"attention cannot be replaced without rewriting the model class, which "
            f"sparse_attn does not do.")


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _attention_modules(model) -> dict[int, list[torch.nn.Module]]:
    """The language model's attention modules by ``layer_idx`` (a vision tower's are left out:
    their config is not the text config)."""
    text = _text_config(model)
    found: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if (isinstance(idx, int) and type(module).__name__.endswith("Attention")
                and getattr(module, "config", text) is text):
            found.setdefault(idx, []).append(module)
    return found


def _sliding_window(model, module, layer_idx: int) -> int | None:
    """The layer's window, or None for a full-attention layer (mirrors the modeling files)."""
    window = getattr(module, "sliding_window", None)
    if window is not None:
        return window
    if hasattr(module, "sliding_window"):  # the module decided per layer: full attention
        return None
    cfg = _text_config(model)
    types = getattr(cfg, "layer_types", None)
    if types is not None and layer_idx < len(types):
        return getattr(cfg, "sliding_window", None) if types[layer_idx] == "sliding_attention" \
            else None
    return getattr(cfg, "sliding_window", None)


def _load_per_layer(per_layer, num_layers: int) -> dict[int, dict | None]:
    if per_layer is None:
        return {}
    if isinstance(per_layer, (str, os.PathLike)):
        with open(per_layer) as f:
            per_layer = json.load(f)
    if not isinstance(per_layer, Mapping):
        raise TypeError(
            f"sparse_attn.patch: per_layer must be a dict {{layer_idx: config dict or None}} or "
            f"the path of a JSON file holding one, got {type(per_layer).__name__}")
    out = {}
    for key, cfg in per_layer.items():
        idx = _layer_index(key, num_layers, "per_layer")
        if cfg is not None and not isinstance(cfg, Mapping):
            raise TypeError(
                f"sparse_attn.patch: per_layer[{key!r}] must be a config dict (optionally with "
                f"'method') or None (keep the original attention), got {type(cfg).__name__}")
        out[idx] = None if cfg is None else dict(cfg)
    return out


def _layer_index(key, num_layers: int, what: str) -> int:
    try:
        idx = int(key)
        if isinstance(key, (bool, float)) or (isinstance(key, str) and str(idx) != key.strip()):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"sparse_attn.patch: {what} has {key!r}, not a layer index; accepted: "
                         f"integers in [-{num_layers}, {num_layers})") from None
    if not -num_layers <= idx < num_layers:
        raise ValueError(f"sparse_attn.patch: {what} has layer {idx}, but the model has "
                         f"{num_layers} attention layers; accepted: [-{num_layers}, {num_layers})")
    return idx % num_layers


def _layer_attention(method: str, config: dict, layer_cfg: dict | None, idx: int):
    cfg = dict(config)
    if layer_cfg:
        layer_cfg = dict(layer_cfg)
        layer_method = layer_cfg.pop("method", method)
        if layer_method != method:
            # another method: only the module options carry over, not the estimator's config
            cfg = {k: v for k, v in cfg.items() if k in MODULE_OPTIONS}
            method = layer_method
        cfg.update(layer_cfg)
    try:
        return SparseAttention(method, **cfg)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"sparse_attn.patch: layer {idx}: {exc}") from None


def patch(model, method: str = "streaming", layers=None, per_layer=None, **config) -> PatchHandle:
    """Make a transformers model's prefill sparse, through its attention-implementation switch.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through
            ``AttentionInterface`` (Llama, Qwen2/3, Mistral, Phi-3, Gemma-2/3, ...).
        method: estimator name (``sparse_attn.estimators.available()``).
        layers: layer indices to sparsify (negative counts from the end); default all.
            Sliding-window layers always keep their window (original implementation).
        per_layer: ``{layer_idx: config}`` or a JSON file of it (keys as strings there): the
            layer's config on top of ``config``; ``"method"`` switches that layer's method (then
            only the module options of ``config`` carry over); ``None`` leaves that layer to
            the original implementation. A layer listed here is sparsified even when
            ``layers`` omits it.
        **config: the estimator's config and SparseAttention's options (``min_seqlen``,
            ``decode``, ``softmax_threshold``, ``backend``, ``record_stats``).

    Returns:
        A :class:`PatchHandle`; ``print(handle)`` lists the layers, methods and budgets.
        Patching a patched model replaces the previous patch (and says so).

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
        >>> handle = sparse_attn.patch(model, "streaming", per_layer={0: None, 1: None})
        >>> print(handle)
        >>> out = model.generate(input_ids, max_new_tokens=20)
    """
    _check_model(model)
    found = _attention_modules(model)
    name = type(model).__name__
    if not found:
        raise TypeError(f"sparse_attn.patch: found no attention modules with a layer_idx in "
                        f"{name}; nothing to patch")
    num_layers = max(found) + 1
    if layers is None:
        selected = set(found)
    else:
        if isinstance(layers, int):
            layers = [layers]
        selected = {_layer_index(i, num_layers, "layers") for i in layers}
    per_layer = _load_per_layer(per_layer, num_layers)
    # build every layer's attention before touching the model: a bad config changes nothing
    attns = {}
    for idx in sorted(set(found)):
        if idx in per_layer:
            if per_layer[idx] is not None:
                attns[idx] = _layer_attention(method, config, per_layer[idx], idx)
        elif idx in selected:
            attns[idx] = _layer_attention(method, config, None, idx)

    previous = getattr(model, _HANDLE_ATTR, None)
    if previous is not None and previous.active:
        logger.warning("sparse_attn.patch: %s is already patched; replacing the previous patch",
                       name)
        unpatch(model)
    _register()
    original = model.config._attn_implementation
    fallback = {"sdpa": _sdpa_forward, "eager": _eager_forward}.get(original, _sdpa_forward)
    if original not in _FALLBACKS:
        logger.warning("sparse_attn.patch: %s used attention %r; layers and calls left dense run "
                       "through 'sdpa' while patched", name, original)
    plans = {}
    for idx, modules in found.items():
        window = _sliding_window(model, modules[0], idx)
        if window is not None:
            plan = LayerPlan(idx, f"original (sliding window {window})")
        elif idx in attns:
            plan = LayerPlan(idx, "sparse", attns[idx])
        elif idx in per_layer:
            plan = LayerPlan(idx, "original (per_layer)")
        else:
            plan = LayerPlan(idx, "original (not selected)")
        plan.fallback, plan.original = fallback, original
        plans[idx] = plan
        for module in modules:
            setattr(module, _PLAN_ATTR, plan)
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:  # set_attn_implementation only warns
        _strip(model)
        raise TypeError(f"sparse_attn.patch: {name} refused the attention implementation switch "
                        f"(it stays {model.config._attn_implementation!r})")
    handle = PatchHandle(model, name, original, dict(sorted(plans.items())))
    setattr(model, _HANDLE_ATTR, handle)
    logger.info("%s", handle)
    return handle


def _strip(model) -> None:
    for module in model.modules():
        if _PLAN_ATTR in module.__dict__:
            delattr(module, _PLAN_ATTR)


def unpatch(model) -> bool:
    """Restore the attention implementation ``patch`` replaced.

    Returns True if the model was patched; unpatching an unpatched model changes nothing and
    says so (a warning) and returns False.
    """
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is None or not handle.active:
        logger.warning("sparse_attn.unpatch: %s is not patched; nothing to undo",
                       type(model).__name__)
        return False
    model.set_attn_implementation(handle.original)
    _strip(model)
    handle.active = False
    delattr(model, _HANDLE_ATTR)
    return True
