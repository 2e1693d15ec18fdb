"""Helpers shared by the benchmarks: environment, timing, guarded providers, layouts, output.

Run as ``python bench/_common.py`` to print the environment as JSON.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from sparse_attn.layout import BlockLayout, causal_pair_counts

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------ environment
def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def env_info() -> dict:
    """GPU, driver, torch/triton/CUDA/cuDNN versions and the repository commit."""
    import triton

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "gpu": None,
        "capability": None,
        "sms": None,
        "gpu_memory_gib": None,
        "driver": None,
        "git_commit": _run(["git", "rev-parse", "--short", "HEAD"]),
        "git_dirty": None,
    }
    if info["git_commit"] is not None:
        info["git_dirty"] = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))
    if torch.backends.cudnn.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    sms=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1))
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info["driver"] = smi.splitlines()[0] if smi else None
    return info


def env_line(info: dict) -> str:
    commit = info["git_commit"] or "n/a"
    return (f"{info['gpu'] or 'no GPU'} (driver {info['driver']}), torch {info['torch']}, "
            f"triton {info['triton']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, "
            f"commit {commit}{'+dirty' if info['git_dirty'] else ''}")


def require_cuda(script: str) -> None:
    """Exit with a message (status 1) on a machine without a CUDA GPU."""
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU (torch {torch.__version__} sees none); "
                 f"--dry-run checks layouts, FLOP counts and the output files on the CPU")


# ----------------------------------------------------------------------------------- timing
def bench_ms(fn: Callable, *, warmup: int = 25, rep: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) in ms from ``triton.testing.do_bench``; warmup and rep are in ms."""
    if not torch.cuda.is_available():  # CPU code-path runs: wall clock, same quantiles
        return _bench_cpu_ms(fn, warmup, rep)
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return float(med), float(p20), float(p80)


def _bench_cpu_ms(fn: Callable, warmup: int, rep: int) -> tuple[float, float, float]:
    times, start = [], time.perf_counter()
    while not times or (time.perf_counter() - start) * 1e3 < warmup + rep or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times[len(times) // 4:]).quantile(torch.tensor([0.5, 0.2, 0.8]))
    return tuple(float(x) for x in q)


def free_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def error_note(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(err).__name__}: {text[:160]}"


def guarded(fn: Callable, *args, **kwargs):
    """``(fn(...), None)``, or ``(None, note)`` when it raises (out of memory included)."""
    try:
        return fn(*args, **kwargs), None
    except torch.OutOfMemoryError as err:
        note = "out of memory: " + error_note(err)
    except Exception as err:  # noqa: BLE001 - a failing provider is recorded, not fatal
        note = error_note(err)
    # the failed call's frames keep its tensors alive until here
    free_cuda()
    return None, note


def host_ms(fn: Callable, calls: int = 20) -> float:
    """Host time per call (Python and launch, the GPU left to run behind): when it nears the
    measured ms, the timing is host-bound."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) * 1e3 / calls
    torch.cuda.synchronize()
    return elapsed


def time_provider(fn: Callable, *, warmup: int = 25, rep: int = 100) -> dict:
    """Run once (compiles) then time; a provider that raises is recorded as unavailable. Under
    1 ms on a GPU, also the host time per call (``host_ms``)."""
    _, note = guarded(fn)
    if note is None:
        timing, note = guarded(bench_ms, fn, warmup=warmup, rep=rep)
    if note is not None:
        return {"available": False, "ms": None, "p20": None, "p80": None, "note": note}
    med, p20, p80 = timing
    result = {"available": True, "ms": med, "p20": p20, "p80": p80, "note": ""}
    if med < 1.0 and torch.cuda.is_available():
        result["host_ms"], _ = guarded(host_ms, fn)
    return result


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``) into SystemExit, so ``finally`` blocks write the results."""
    def handler(signum, frame):
        raise SystemExit(f"stopped by signal {signum}: writing what was measured")
    signal.signal(signal.SIGTERM, handler)


class Budget:
    """Wall-clock budget: later work is skipped (with a note) once it is spent."""

    def __init__(self, seconds: float | None):
        self.start = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def spent(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds


# --------------------------------------------------------------------------- inputs, layouts
def add_shape_args(ap) -> None:
    """The problem-shape options both benchmarks take."""
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--block", type=int, default=128, help="layout block size (square)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out", help="folder for JSON/CSV/PNG")


def random_qkv(args, seqlen: int, head_dim: int, device, seed: int):
    """Standard-normal q ``[B, heads, S, D]`` and k, v ``[B, kv_heads, S, D]``."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(heads):
        return torch.randn(args.batch, heads, seqlen, head_dim, generator=gen, device=device,
                           dtype=DTYPES[args.dtype])

    return rand(args.heads), rand(args.kv_heads), rand(args.kv_heads)


def random_layout(batch: int, heads: int, seqlen: int, density: float, *, block: int = 128,
                  seed: int = 0, device=None) -> BlockLayout:
    """A causal layout that keeps each query block's diagonal and first (sink) key block and
    samples the other causal blocks uniformly, per (batch, head), so that
    ``layout.density(seqlen, seqlen, causal=True)`` is as close to ``density`` as whole blocks
    allow (it cannot go below the diagonal + sink share)."""
    pairs = causal_pair_counts(seqlen, seqlen, block, block, True, device)  # [NB, NB]
    nb = pairs.shape[0]
    reach = pairs > 0
    kb = torch.arange(nb, device=device)
    last = reach.sum(-1) - 1  # the diagonal block: causal rows reach a prefix of key blocks
    must = reach & ((kb[None, :] == 0) | (kb[None, :] == last[:, None]))
    cand = (reach & ~must).flatten().nonzero().squeeze(1)  # flat [NB*NB] positions
    need = density * float(pairs.sum()) - float(pairs.flatten()[must.flatten()].sum())

    rows = batch * heads
    mask = must.flatten().repeat(rows, 1)
    if cand.numel() == 0:  # one or two blocks: nothing to sample
        return BlockLayout.from_mask(mask.view(batch, heads, nb, nb), block, block)
    gen = torch.Generator(device=device).manual_seed(seed)
    perm = torch.rand(rows, cand.numel(), generator=gen, device=device).argsort(-1)
    csum = pairs.flatten()[cand][perm].cumsum(-1).double()  # [rows, C]
    # the prefix of the permutation whose area is closest to the target
    take = torch.searchsorted(csum, torch.full((rows, 1), max(need, 0.0), device=device,
                                               dtype=torch.float64)).squeeze(1)
    take = take.clamp(max=cand.numel())
    below = torch.where(take > 0, csum.gather(1, (take - 1).clamp(min=0)[:, None]).squeeze(1),
                        torch.zeros_like(take, dtype=torch.float64))
    above = csum.gather(1, take.clamp(max=cand.numel() - 1)[:, None]).squeeze(1)
    take = torch.where((take < cand.numel()) & (above - need < need - below), take + 1, take)
    rank = perm.argsort(-1)
    mask[:, cand] = rank < take[:, None]
    return BlockLayout.from_mask(mask.view(batch, heads, nb, nb), block, block)


def causal_pairs(seqlen: int) -> int:
    """Attendable (query, key) pairs of one causal head: S (S + 1) / 2."""
    return seqlen * (seqlen + 1) // 2


def attention_tflop(batch: int, q_heads: int, head_dim: int, pairs_per_head: float) -> float:
    """Forward FLOPs (QK^T and PV, 2 each per pair and dim) in TFLOP."""
    return 4.0 * batch * q_heads * head_dim * pairs_per_head / 1e12


def tflops(tflop: float, ms: float | None) -> float | None:
    return None if not ms else tflop / (ms / 1e3)


# ----------------------------------------------------------------------------------- output
def _fmt(value, spec: str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def print_table(rows: list[dict], columns: list, *, title: str | None = None,
                max_chars: int = 90) -> str:
    """Print rows with tabulate; a column is a key or ``(key, header, format spec)``; long
    cells are cut to ``max_chars`` (the JSON keeps them whole)."""
    from tabulate import tabulate

    def cut(text: str) -> str:
        return text if len(text) <= max_chars else text[: max_chars - 3] + "..."

    cols = [(c, c, None) if isinstance(c, str) else tuple(c) for c in columns]
    body = [[cut(_fmt(r.get(key), spec)) for key, _, spec in cols] for r in rows]
    text = tabulate(body, headers=[h for _, h, _ in cols], tablefmt="github",
                    disable_numparse=True)
    if title:
        text = f"{title}\n{text}"
    print(text, flush=True)
    return text


def write_results(rows: list[dict], out_dir, stem: str, *, meta: dict | None = None,
                  sections: dict[str, list[dict]] | None = None,
                  csv_files: bool = True) -> list[Path]:
    """``<stem>.json`` with meta, rows and any extra sections; ``<stem>.csv`` (and
    ``<stem>_<section>.csv``) unless ``csv_files`` is False. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = sections or {}
    payload = {"meta": meta or {}, "rows": rows, **sections}
    paths = [out / f"{stem}.json"]
    paths[0].write_text(json.dumps(payload, indent=1, default=str) + "\n")
    if csv_files:
        for name, section in {"rows": rows, **sections}.items():
            path = out / (f"{stem}.csv" if name == "rows" else f"{stem}_{name}.csv")
            keys = list(dict.fromkeys(k for r in section for k in r))
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(section)
            paths.append(path)
    return paths


def parse_list(text: str, kind=float) -> list:
    """'8k,32k,128k' or '0.5,0.1' -> list; a k suffix means x1024."""
    items = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part.endswith("k"):
            items.append(kind(float(part[:-1]) * 1024))
        else:
            items.append(kind(float(part)) if kind is int else kind(part))
    return items


def parse_method_spec(spec: str) -> tuple[str, dict]:
    """A method name with config overrides: ``"proxy[gqa_reduce=max]"`` -> ``("proxy", {"gqa_reduce": "max"})`` (values: int, float
    or str; several separated by ``;``)."""
    if "[" not in spec:
        return spec, {}
    name, rest = spec.split("[", 1)
    extra = {}
    for item in rest.rstrip("]").split(";"):
        key, value = item.split("=", 1)
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                pass
        extra[key.strip()] = value
    return name, extra


def run_meta(info: dict) -> dict:
    return {"env": info, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "cwd": os.getcwd(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


if __name__ == "__main__":
    print(json.dumps(env_info(), indent=1))


def dense_sdpa_rows(q, k, v, base: dict, *, warmup: int = 5, rep: int = 50):
    """Causal GQA SDPA with the flash and cuDNN backends (the dense yardstick of a table):
    ``(rows, best_ms)``, each row ``base`` + ``provider`` + timing; best_ms None when none ran."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows, best = [], None
    for name, be in (("SDPA flash", SDPBackend.FLASH_ATTENTION),
                     ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
        def fn(be=be):
            with sdpa_kernel(be):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=True)
        res = time_provider(fn, warmup=warmup, rep=rep)
        rows.append({**base, "provider": name, **res})
        if res["ms"] and (best is None or res["ms"] < best):
            best = res["ms"]
    return rows, best


def finish(rows: list[dict], out_dir, stem: str, meta: dict, plot: Callable | None = None):
    """Write ``<stem>.json/.csv`` and, when ``plot(rows, path)`` is given, ``<stem>.png`` (a
    failing plot is reported, not raised); print the paths."""
    paths = write_results(rows, out_dir, stem, meta=meta)
    if plot is not None:
        _, note = guarded(plot, rows, f"{out_dir}/{stem}.png")
        if note:
            print(f"no plot: {note}")
    print("wrote", ", ".join(str(p) for p in paths), flush=True)
    return paths
