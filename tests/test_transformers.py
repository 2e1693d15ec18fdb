"""sparse_attn.patch / unpatch on tiny randomly initialised transformers models (no download).

Seven architectures (Llama, Qwen2, Qwen3, Mistral, Phi-3, Gemma-2, Gemma-3; head dim 256 and
sliding-window layers for Gemma), fp32 on the CPU, sequences of 256 tokens in blocks of 64.
"""
import dataclasses
import json
import logging
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparse_attn as sa  # noqa: E402
from sparse_attn import estimators  # noqa: E402
from test_module import DENSE, STREAM  # noqa: E402  (registers the tests' estimators)

VOCAB, SEQ = 128, 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
GEMMA = dict(head_dim=256, sliding_window=32, layer_types=["sliding_attention", "full_attention"])


def _build(arch: str, attn_implementation: str = "sdpa", **overrides):
    t = transformers
    configs = {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM, {}),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM, {}),
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM, {"head_dim": 32}),
        "mistral": (t.MistralConfig, t.MistralForCausalLM, {"sliding_window": None}),
        "phi3": (t.Phi3Config, t.Phi3ForCausalLM, {}),
        "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM, {**GEMMA, "attn_logit_softcapping": None}),
        "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM, GEMMA),
    }
    config_cls, model_cls, extra = configs[arch]
    config = config_cls(**{**COMMON, **extra, **overrides})
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return model_cls(config).eval()


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3"]
# layers that keep the original implementation (Gemma's sliding-window layer 0)
SLIDING = {"gemma2": {0}, "gemma3": {0}}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    m = _build(arch)
    yield m
    if getattr(m, "_sparse_attn_handle", None) is not None:
        sa.unpatch(m)


def _generate(model, prompt, n, **kw):
    """Greedy, exactly ``n`` new tokens (random weights may produce EOS at once)."""
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def test_dense_layout_matches_unpatched(arch, model, ids):
    ref = _logits(model, ids)
    handle = sa.patch(model, DENSE, min_seqlen=0, record_stats=True)
    out = _logits(model, ids)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    sparse = set(range(2)) - SLIDING.get(arch, set())
    assert handle.sparse_layers == sorted(sparse)
    # the sparse path really ran on every sparsified layer
    assert {i for i, calls in handle.stats().items() if calls and calls[0]["path"] == "sparse"} \
        == sparse


def test_streaming_differs_and_is_finite(model, ids):
    ref = _logits(model, ids)
    sa.patch(model, STREAM, min_seqlen=0)
    out = _logits(model, ids)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-3


def test_generate_deterministic(model, ids):
    prompt = ids[:, :200]
    with torch.no_grad():
        dense = _generate(model, prompt, 4)
        handle = sa.patch(model, DENSE, min_seqlen=0, record_stats=True)
        same = _generate(model, prompt, 4)
        sa.patch(model, STREAM, min_seqlen=0, record_stats=True)
        first = _generate(model, prompt, 4)
        second = _generate(model, prompt, 4)
    assert torch.equal(dense, same)
    assert first.shape == (1, 204) and torch.equal(first, second)
    handle = model._sparse_attn_handle
    calls = next(iter(handle.stats().values()))
    # per generate: one sparse prefill, then dense decode steps
    assert [c["path"] for c in calls[:4]] == ["sparse", "dense", "dense", "dense"]
    assert calls[1]["reason"] == "decode" and calls[1]["seqlen_q"] == 1


def test_padded_batch_falls_back_to_dense(model, ids, caplog):
    batch = torch.cat([ids, ids.roll(7, dims=1)])
    mask = torch.ones_like(batch)
    mask[1, :40] = 0  # left padding
    ref = _logits(model, batch, attention_mask=mask)
    sa.patch(model, STREAM, min_seqlen=0)
    sa.ops._validate._logged.discard("hf-mask")
    with caplog.at_level(logging.INFO, logger="sparse_attn"):
        out = _logits(model, batch, attention_mask=mask)
        _logits(model, batch, attention_mask=mask)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert sum("attention mask is present" in r.getMessage() for r in caplog.records) == 1
    with torch.no_grad():
        gen = _generate(model, batch[:, :200], 3, attention_mask=mask[:, :200])
    assert gen.shape == (2, 203)


def test_unpatch_restores_exactly(model, ids):
    ref = _logits(model, ids)
    original = model.config._attn_implementation
    sa.patch(model, STREAM, min_seqlen=0)
    assert model.config._attn_implementation == "sparse_attn"
    assert sa.unpatch(model) is True
    assert model.config._attn_implementation == original
    assert not any(hasattr(m, "_sparse_attn_plan") for m in model.modules())
    assert torch.equal(_logits(model, ids), ref)


# ------------------------------------------------------------------ configuration (Llama)
@pytest.fixture
def llama():
    return _build("llama", num_hidden_layers=4)


def _hidden(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


def test_layers_and_per_layer_apply_only_there(llama, ids, tmp_path):
    ref = _hidden(llama, ids)
    handle = sa.patch(llama, STREAM, layers=[2], min_seqlen=0, record_stats=True)
    out = _hidden(llama, ids)
    # hidden_states[i] is the input of layer i: untouched up to layer 2's output
    for i in range(3):
        assert torch.equal(out[i], ref[i])
    assert not torch.allclose(out[3], ref[3])
    assert handle.sparse_layers == [2]
    assert {i: len(s) for i, s in handle.stats().items()} == {2: 1}

    path = tmp_path / "layers.json"
    path.write_text(json.dumps({"0": None, "1": {"local_blocks": 2},
                                "-1": {"method": DENSE, "block_size": 32}}))
    handle = sa.patch(llama, STREAM, per_layer=str(path), min_seqlen=0)
    assert handle.sparse_layers == [1, 2, 3]
    mods = handle.modules
    assert mods[1].estimator.local_blocks == 2 and mods[2].estimator.local_blocks == 1
    assert mods[3].method == DENSE and mods[3].estimator.block_size == 32
    assert all(m.min_seqlen == 0 for m in mods.values())
    assert handle.plans[0].status == "original (per_layer)"
    text = str(handle)
    for needle in ("LlamaForCausalLM", "original (per_layer)", STREAM, "local_blocks=2",
                   DENSE, "block_size=32", "min_seqlen=0", "decode=dense"):
        assert needle in text
    out = _hidden(llama, ids)
    assert torch.equal(out[1], ref[1]) and not torch.allclose(out[2], ref[2])


def test_patch_twice_and_unpatch_unpatched_are_harmless(llama, ids, caplog):
    ref = _logits(llama, ids)
    with caplog.at_level(logging.WARNING, logger="sparse_attn"):
        assert sa.unpatch(llama) is False
        sa.patch(llama, STREAM, min_seqlen=0)
        handle = sa.patch(llama, DENSE, min_seqlen=0)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "is not patched" in messages and "already patched" in messages
    torch.testing.assert_close(_logits(llama, ids), ref, atol=1e-4, rtol=1e-4)
    assert handle.unpatch() is True and handle.unpatch() is False
    assert torch.equal(_logits(llama, ids), ref)
    assert "(unpatched)" in str(handle)


def test_errors(llama):
    with pytest.raises(TypeError, match="Linear is not a transformers PreTrainedModel"):
        sa.patch(torch.nn.Linear(2, 2))

    class NoBackendLlama(transformers.LlamaForCausalLM):
        _supports_attention_backend = False

    with pytest.raises(TypeError, match="NoBackendLlama does not route its attention"):
        sa.patch(NoBackendLlama(llama.config))
    with pytest.raises(ValueError, match=r"layer 7.*accepted: \[-4, 4\)"):
        sa.patch(llama, STREAM, layers=[0, 7])
    with pytest.raises(ValueError, match=r"'x', not a layer index"):
        sa.patch(llama, STREAM, per_layer={"x": {}})
    with pytest.raises(ValueError, match=r"layer 0: .*accepted: \['block_size', 'local_blocks'\]"):
        sa.patch(llama, STREAM, budget=0.1)
    with pytest.raises(ValueError, match=r"layer 1: unknown estimator 'nope'; available"):
        sa.patch(llama, STREAM, per_layer={1: {"method": "nope"}})
    with pytest.raises(ValueError, match="unknown estimator 'nope'; available"):
        sa.patch(llama, "nope")
    with pytest.raises(TypeError, match="per_layer"):
        sa.patch(llama, STREAM, per_layer=[1, 2])
    # a failed patch leaves the model alone
    assert llama.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_sparse_attn_plan") for m in llama.modules())


def test_mistral_sliding_window_is_kept(ids):
    model = _build("mistral", sliding_window=32)
    ref = _logits(model, ids)
    handle = sa.patch(model, STREAM, min_seqlen=0)
    assert handle.sparse_layers == []
    assert "sliding window 32" in str(handle)
    assert torch.equal(_logits(model, ids), ref)


def test_eager_original_and_softcap(ids):
    # Gemma-2 as the original recommends it: eager with logit soft-capping. The sliding layer
    # and the soft-capped global layer keep the eager implementation (sdpa mask converted).
    model = _build("gemma2", attn_implementation="eager", attn_logit_softcapping=50.0)
    ref = _logits(model, ids)
    handle = sa.patch(model, STREAM, min_seqlen=0)
    assert handle.original == "eager"
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        out = model.generate(ids[:, :100], max_new_tokens=3, do_sample=False)
        sa.unpatch(model)
        assert torch.equal(out, model.generate(ids[:, :100], max_new_tokens=3, do_sample=False))


def test_eager_original_sparse_layers(ids):
    model = _build("llama", attn_implementation="eager")
    ref = _logits(model, ids)
    sa.patch(model, DENSE, min_seqlen=0)
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-4, rtol=1e-4)
    sa.patch(model, STREAM, min_seqlen=1000)  # everything below min_seqlen: eager
    assert torch.equal(_logits(model, ids), ref)


def test_static_cache_generate(ids):
    model = _build("llama")
    prompt = ids[:, :100]
    with torch.no_grad():
        ref = _generate(model, prompt, 3)
        handle = sa.patch(model, DENSE, min_seqlen=0, record_stats=True)
        out = _generate(model, prompt, 3, cache_implementation="static")
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    # the prefill of an empty static cache (no mask, spare slots cropped) ran sparse
    calls = handle.stats()[0]
    assert calls[0]["path"] == "sparse" and calls[0]["seqlen_k"] == 100


@pytest.mark.parametrize("method", ["dense", "streaming", "block_topk", "oracle"])
def test_builtin_estimators(method, ids):
    if method not in estimators.available():
        pytest.skip(f"built-in {method!r} estimator not there yet")
    model = _build("qwen2")
    ref = _logits(model, ids)
    handle = sa.patch(model, method, min_seqlen=0, record_stats=True, block_m=64, block_n=64)
    out = _logits(model, ids)
    assert all(calls[0]["path"] == "sparse" for calls in handle.stats().values())
    if method == "dense":
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    else:  # random weights: top-mass methods may keep every block of 256 tokens
        assert torch.isfinite(out).all()
    if method == "streaming":
        assert all(calls[0]["density"] < 1.0 for calls in handle.stats().values())
    assert _generate(model, ids[:, :200], 3).shape == (1, 203)
    sa.unpatch(model)
    assert torch.equal(_logits(model, ids), ref)


def test_import_is_lazy():
    code = "import sys, sparse_attn; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


class _CharTokenizer:
    """Stands in for SmolLM2's tokenizer in the demo's prompt builder: one token a character."""

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [ord(c) for c in text]})()

    def decode(self, ids):
        return "".join(map(chr, ids))

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, return_dict):
        return [ord(c) for c in f"<user>{messages[0]['content']}</user><assistant>"]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_demo_prompt(depth):
    from sparse_attn import demo

    text = demo.haystack_text()  # the shipped license texts
    assert "Apache License" in text and "GNU GENERAL PUBLIC LICENSE" in text
    ids = demo.build_prompt(_CharTokenizer(), 3000, depth, "12345")
    prompt = "".join(map(chr, ids[0].tolist()))
    assert abs(ids.shape[1] - 3000) < 10
    assert prompt.count("The passkey is 12345.") == 1 and prompt.endswith(
        demo.QUESTION + "</user><assistant>")
    at = prompt.index("The passkey is") / len(prompt)
    assert abs(at - depth) < 0.1
    long_ids = demo.build_prompt(_CharTokenizer(), len(text) + 5000, 0.5, "12345")
    assert long_ids.shape[1] >= len(text) + 4990  # repeats the texts past their length
