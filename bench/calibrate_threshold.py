"""BLASST threshold calibration on the real attention of SmolLM2-135M (CPU, fp32).

One prefill of ``max(--lengths)`` tokens of natural text (the license texts, as
``bench/accuracy.py`` reads them) records the chosen layers' post-RoPE ``q, k, v``; the model is
causal, so the first ``L`` tokens of that capture are an ``L``-token prefill (up to rounding).
Per layer, :func:`threshold_vs_length` (torch emulation of the kernel's tile skipping, the
``threshold`` estimator's tiles) calibrates ``lambda`` at every length for the smallest target
error; the ``lambda`` of a larger target is the first candidate of the same error curve within
it (what ``calibrate_threshold(target_error=...)`` returns: same candidates, same stopping
rule), and ``lambda = a * L^-beta`` is fitted per layer and target. Then every ``--scales``
value ``lambda * L`` (the ``threshold_scale`` of the estimator) is applied at every layer and
length: its output error and skipped share, so the default can be checked, median and worst
layer.

    python bench/calibrate_threshold.py --out bench/results/cpu_20261125_s4/threshold_calib \\
        --lengths 2k,4k,8k --layers 0,5,11,17,23,29 --targets 1e-3,1e-2  # ~8 min on 2 cores

``--scales-only`` skips the calibration (a finer scale grid); ``--block 64`` other tiles.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_on_sigterm, parse_list, print_table, run_meta, write_results  # noqa: E402

from sparse_attn.estimators.threshold import (  # noqa: E402
    _fit_power, Threshold, blasst_attention_ref, threshold_vs_length)


def candidates(per_decade: int) -> list[float]:
    """``lambda`` candidates 0.5 .. 1e-8, ``per_decade`` per decade (0.5: the estimator's
    clamp; some SmolLM2 layers stay within 1e-2 even there, so the usual 1e-1 cap is too low)."""
    grid = [10.0 ** (-e / per_decade) for e in range(1, 8 * per_decade + 1)]
    return [0.5] + [x for x in grid if x < 0.5]


def calibrate_layer(q, k, v, layer: int, lengths, targets, cands, tiles) -> tuple[list, list]:
    """Calibration rows (layer x length x target) and beta-fit rows (layer x target)."""
    fit = threshold_vs_length(q, k, v, lengths, target_error=min(targets), candidates=cands,
                              backend="torch", **tiles)
    rows, fits = [], []
    for target in targets:
        lams = []
        for n, cal in zip(fit["lengths"], fit["calibrations"]):
            i = next((j for j, e in enumerate(cal.errors) if e <= target), len(cal.errors) - 1)
            lams.append(cal.candidates[i])
            rows.append({"layer": layer, "length": n, "target": target,
                         "lambda": cal.candidates[i], "lambda_L": cal.candidates[i] * n,
                         "error": cal.errors[i], "skipped": cal.skipped[i],
                         # the largest candidate already met the target: a lower bound
                         "at_cap": i == 0})
        a, beta = _fit_power(fit["lengths"], lams)
        fits.append({"layer": layer, "target": target, "a": a, "beta": beta})
    return rows, fits


def scale_rows(q, k, v, layer: int, lengths, scales, tiles) -> list[dict]:
    """Output error and skipped share of each ``threshold_scale`` at each length."""
    rows = []
    for n in lengths:
        qs, ks, vs = q[:, :, :n], k[:, :, :n], v[:, :, :n]
        ref = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                               enable_gqa=True)
        for scale in scales:
            lam = Threshold(threshold_scale=scale, **tiles).softmax_threshold_for(n)
            out, skipped = blasst_attention_ref(qs, ks, vs, softmax_threshold=lam, causal=True,
                                                **tiles)
            rows.append({"layer": layer, "length": n, "scale": scale, "lambda": lam,
                         "error": float((out - ref).norm() / ref.norm()),
                         "skipped": float(skipped)})
    return rows


def summarize(cal_rows, fits, scale_rows_, targets, lengths, scales) -> tuple[list, list]:
    """Per (target, length): lambda*L over layers; per (scale, length): error over layers."""
    cal_sum = []
    for target in targets:
        for n in lengths:
            xs = [r["lambda_L"] for r in cal_rows if r["target"] == target and r["length"] == n]
            if xs:
                cal_sum.append({"target": target, "length": n, "layers": len(xs),
                                "lambda_L_median": statistics.median(xs),
                                "lambda_L_min": min(xs), "lambda_L_max": max(xs)})
        betas = [f["beta"] for f in fits if f["target"] == target]
        if betas:
            cal_sum.append({"target": target, "length": "fit", "layers": len(betas),
                            "beta_median": statistics.median(betas), "beta_min": min(betas),
                            "beta_max": max(betas)})
    sc_sum = []
    for scale in scales:
        for n in lengths:
            rs = [r for r in scale_rows_ if r["scale"] == scale and r["length"] == n]
            if rs:
                errs = [r["error"] for r in rs]
                worst = max(rs, key=lambda r: r["error"])
                sc_sum.append({"scale": scale, "length": n, "layers": len(rs),
                               "error_median": statistics.median(errs),
                               "error_worst": worst["error"], "worst_layer": worst["layer"],
                               "skipped_median": statistics.median(r["skipped"] for r in rs)})
    return cal_sum, sc_sum


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2k,4k,8k", help="prefix lengths (tokens)")
    ap.add_argument("--layers", default="0,5,11,17,23,29", help="layer indices")
    ap.add_argument("--targets", default="1e-3,1e-2", help="relative L2 output errors")
    ap.add_argument("--scales", default="1,10,30,100,200,300,500,1000,2000,4096",
                    help="threshold_scale values (lambda * L) to check at every layer/length")
    ap.add_argument("--per-decade", type=int, default=6, help="lambda candidates per decade")
    ap.add_argument("--block", type=int, default=None,
                    help="tile size (default: the threshold estimator's block_m/block_n)")
    ap.add_argument("--scales-only", action="store_true",
                    help="only apply --scales (no calibration): a finer check of the default")
    ap.add_argument("--out", default="bench/out/threshold_calib")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting layers past this many seconds (results so far kept)")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    from accuracy import capture_qkv, text_ids
    from niah import load_model

    lengths = sorted(parse_list(args.lengths, int))
    layers = parse_list(args.layers, int)
    targets = sorted(parse_list(args.targets, float))
    scales = sorted(parse_list(args.scales, float))
    est = Threshold() if args.block is None else Threshold(block_m=args.block,
                                                           block_n=args.block)
    tiles = {"block_m": est.block_m, "block_n": est.block_n}
    cands = candidates(args.per_decade)
    t_start = time.perf_counter()
    model, tokenizer, dev, dtype = load_model("cpu")
    recorded = capture_qkv(model, text_ids(tokenizer, lengths[-1]), layers)
    del model
    meta = {**run_meta({"torch": torch.__version__}),
            "model": "SmolLM2-135M-Instruct (gguf Q4_1 -> float32), CPU",
            "text": "sparse_attn/data license texts, first tokens (one prefill of the longest "
                    "length; shorter lengths are its causal prefixes)",
            "lengths": lengths, "layers": layers, "targets": targets, "scales": scales,
            "tiles": tiles, "candidates_per_decade": args.per_decade, "backend": "torch "
            "emulation (blasst_attention_ref, per query head)",
            "error": "||o_lambda - o_dense|| / ||o_dense|| over all heads and rows of a layer",
            "prefill_s": time.perf_counter() - t_start}
    cal_rows, fits, sc_rows, done = [], [], [], []
    out = Path(args.out)
    for layer in layers:
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            meta["skipped_layers"] = [x for x in layers if x not in done]
            print(f"budget spent: skipping layers {meta['skipped_layers']}", flush=True)
            break
        q, k, v = (t.float() for t in recorded.pop(layer))
        t0 = time.perf_counter()
        if not args.scales_only:
            rows, fit = calibrate_layer(q, k, v, layer, lengths, targets, cands, tiles)
            cal_rows += rows
            fits += fit
        sc_rows += scale_rows(q, k, v, layer, lengths, scales, tiles)
        done.append(layer)
        print(f"layer {layer}: {time.perf_counter() - t0:.0f} s", flush=True)
        cal_sum, sc_sum = summarize(cal_rows, fits, sc_rows, targets, lengths, scales)
        meta["layers_done"] = done
        meta["total_s"] = time.perf_counter() - t_start
        write_results(cal_rows, out, "threshold_calib", meta=meta,
                      sections={"fits": fits, "scales": sc_rows, "summary": cal_sum,
                                "scale_summary": sc_sum})
    print_table(cal_rows, ["layer", "length", "target", ("lambda", "lambda", ".2e"),
                           ("lambda_L", "lambda_L", ".3g"), ("error", "error", ".2e"),
                           ("skipped", "skipped", ".3f"), "at_cap"],
                title="calibrated lambda (largest candidate within the target)")
    print_table(fits, ["layer", "target", ("a", "a", ".3g"), ("beta", "beta", ".3f")],
                title="lambda = a * L^-beta per layer")
    print_table(sc_sum, ["scale", "length", ("error_median", "error_median", ".2e"),
                         ("error_worst", "error_worst", ".2e"), "worst_layer",
                         ("skipped_median", "skipped_median", ".3f")],
                title=f"threshold_scale (lambda * L) applied, over layers {done}")
    print(f"wrote {out / 'threshold_calib.json'} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
