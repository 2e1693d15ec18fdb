"""Perplexity of SmolLM2-135M dense against patched, on one natural text of about 4k tokens.

The text is a license shipped in ``sparse_attn/data`` (default ``gpl-3.0.txt``), cut to
``--seqlen`` tokens; one teacher-forced forward per method (fp32 on the CPU), the mean token
cross-entropy gives the perplexity. Each method runs with its default config and
``min_seqlen`` 0, and is unpatched afterwards. Reports each method's relative change against
dense and its mean prefill density over the sparsified layers; writes ``ppl.json``.

    python bench/ppl.py --seqlen 4096 --out bench/results/cpu
"""
from __future__ import annotations

import argparse
import importlib.resources
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_on_sigterm, print_table, run_meta, write_results  # noqa: E402
from niah import (add_method_args, load_model, method_plans, patch_plan,  # noqa: E402
                  sparse_density, use_mask_attention)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=4096, help="tokens of text")
    ap.add_argument("--text", default="gpl-3.0.txt", help="a file of sparse_attn/data")
    add_method_args(ap)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args(argv)
    exit_on_sigterm()

    import sparse_attn as sa

    plans = method_plans(args.methods, args.config)  # bad names/keys fail before the load
    if args.attn == "mask":
        use_mask_attention()
    t_start = time.perf_counter()
    model, tokenizer, dev, dtype = load_model(args.device or
                                              ("cuda" if torch.cuda.is_available() else "cpu"))
    text = (importlib.resources.files("sparse_attn") / "data" / args.text).read_text()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < args.seqlen:
        print(f"note: {args.text} has {len(ids)} tokens, fewer than --seqlen {args.seqlen}")
    ids = torch.tensor([ids[:args.seqlen]], device=dev)

    try:
        from _common import env_info
        info = env_info()
    except Exception:  # noqa: BLE001 - no triton: record the rest
        info = {"torch": torch.__version__}
    meta = {**run_meta(info), "model": "SmolLM2-135M-Instruct (gguf Q4_1 -> "
            f"{str(dtype).replace('torch.', '')})", "device": str(dev), "text": args.text,
            "tokens": int(ids.shape[1]), "min_seqlen": 0, "attn": args.attn,
            "configs": {p["label"]: {"method": p["method"], **p["config"],
                                     "dense_layers": p["dense_layers"]} for p in plans}}
    rows: list[dict] = []
    out = Path(args.out)
    try:
        for plan in [None, *plans]:
            method = "dense" if plan is None else plan["label"]
            handle = None
            if plan is not None:
                handle = patch_plan(model, plan)
                meta.setdefault("patch", {})[method] = str(handle)
                handle.reset_stats()
            t0 = time.perf_counter()
            with torch.no_grad():
                logits = model(ids).logits.float()
            seconds = time.perf_counter() - t0
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
            density, n_sparse = sparse_density(handle) if handle else (None, 0)
            if handle is not None:
                sa.unpatch(model)
            rows.append({"method": method, "tokens": int(ids.shape[1]), "nll": nll,
                         "ppl": math.exp(nll), "density": density, "sparse_layers": n_sparse,
                         "forward_s": seconds,
                         "config": None if plan is None else
                         {**plan["config"], "dense_layers": plan["dense_layers"]}})
            dense_ppl = rows[0]["ppl"]
            for r in rows:
                r["rel_change"] = r["ppl"] / dense_ppl - 1.0
                r["within_1pct"] = abs(r["rel_change"]) <= 0.01
            print(f"{method}: ppl {rows[-1]['ppl']:.4f} ({seconds:.1f} s)", flush=True)
            write_results(rows, out, "ppl", meta=meta, csv_files=False)
    finally:
        meta["total_s"] = time.perf_counter() - t_start
        if rows:
            write_results(rows, out, "ppl", meta=meta, csv_files=False)
            print_table(rows, ["method", ("tokens", "tokens", None), ("ppl", "ppl", ".4f"),
                               ("rel_change", "change vs dense", "+.3%"),
                               ("within_1pct", "|change| <= 1%", None),
                               ("density", "density (sparse layers)", ".3f"),
                               ("sparse_layers", "sparse layers", None),
                               ("forward_s", "forward (s)", ".1f")],
                        title=f"\nperplexity, {args.text}, {ids.shape[1]} tokens:")
            print(f"wrote {out / 'ppl.json'} ({meta['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
