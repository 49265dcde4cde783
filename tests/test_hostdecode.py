"""The CPU one-row decode step on the host (hostdecode.HostDecoder) against transformers and
against MLX's compiled step: every Gemma variant's logits at every step, the KV cache it writes,
greedy ids, the models it must decline, and cache arrays it must not write through."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from mlx_gemma import backend
from mlx_gemma.convert import hf as hf_convert
from mlx_gemma.generation import DecodeStep, generate_step
from mlx_gemma.hostdecode import HostDecoder
from mlx_gemma.loading import build_model, read_config
from mlx_gemma.runtime import BLAS_STATUS

from tiny import make_hf_model, random_ids, save_hf_model

pytestmark = pytest.mark.skipif(not BLAS_STATUS.get("library"),
                                reason="no OpenBLAS loaded by mlx_gemma.runtime (macOS, or MLX_GEMMA_NO_OPENBLAS)")

VARIANTS = {
    "gemma1-gqa": ("gemma", {}),
    "gemma2-softcaps-window8": ("gemma2", {}),
    "gemma3-qknorm-window8": ("gemma3_text", {}),
    "gemma3-linear-rope": ("gemma3_text", {"rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, our float32 model) with the same random weights."""
    kind, overrides = VARIANTS[request.param]
    hf = make_hf_model(kind, seed=7, **overrides)
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    ours = build_model(read_config(path), hf_convert.load_safetensors(hf_convert.safetensors_files(path)), str(path),
                       "float32")
    return hf, ours


def decode_logits(model, prompt, steps, **policy):
    """Greedy ids and each step's logits from generate_step under a forced backend policy."""
    seen = []

    def record(history, logits):
        seen.append(np.array(logits[0]))
        return logits

    cache = model.make_cache()
    with backend.override(**policy):
        ids = [t.item() for t in generate_step(model, mx.array(prompt), cache=cache, max_tokens=steps,
                                               logits_processors=[record], prefill_step=5)]
    return ids, seen, cache


def test_host_decoding_equals_transformers_and_the_mlx_step(pair):
    """30 greedy steps after a 13-token prompt (windows of 8 wrap several times): the host step's
    logits equal transformers' forward over the whole sequence at every step, its ids are the
    compiled MLX step's, and it leaves the same keys and values in the cache."""
    hf, model = pair
    assert HostDecoder.of(model) is not None
    prompt = random_ids(512, (1, 13), seed=11)
    ids, host_logits, host_cache = decode_logits(model, prompt, 30, host_decode=True, host_gemv=True)
    mlx_ids, mlx_logits, mlx_cache = decode_logits(model, prompt, 30, host_decode=False)
    assert ids == mlx_ids
    with torch.no_grad():
        ref = hf(torch.tensor([list(prompt[0]) + ids])).logits[0].float().numpy()
    for i in range(30):
        np.testing.assert_allclose(host_logits[i], ref[12 + i], atol=1e-4, rtol=1e-4, err_msg=f"step {i}")
        np.testing.assert_allclose(host_logits[i], mlx_logits[i], atol=2e-5, rtol=1e-5, err_msg=f"step {i}")
    for layer, (a, b) in enumerate(zip(host_cache, mlx_cache)):
        np.testing.assert_allclose(np.array(a.keys), np.array(b.keys), atol=1e-5, err_msg=f"keys of layer {layer}")
        np.testing.assert_allclose(np.array(a.values), np.array(b.values), atol=1e-5, err_msg=f"values of layer {layer}")


def test_decode_step_takes_the_host_path_for_one_row_only(pair):
    """DecodeStep uses the host body for one row without adapters; a batch goes through MLX."""
    _, model = pair
    with backend.override(host_decode=True, host_gemv=True):
        step = DecodeStep(model)
    assert step.host_body is not None
    with backend.override(host_decode=False):
        assert DecodeStep(model).host_body is None
    calls = []
    real = step.host_body.__call__
    step.host_body = lambda *a: calls.append(a) or real(*a)
    for rows in (1, 2):
        cache = model.make_cache()
        step(cache, mx.array([[5]] * rows), mx.array([0] * rows), 1)
    assert len(calls) == 1


def test_host_decoding_does_not_write_through_arrays_it_was_given(pair):
    """The cache arrays a caller still holds (a chat session's kept cache is a slice of the
    engine's) keep their values: the host path writes into private copies it installs."""
    _, model = pair
    prompt = random_ids(512, (1, 13), seed=12)
    cache = model.make_cache()
    with backend.override(host_decode=True, host_gemv=True):
        list(generate_step(model, mx.array(prompt), cache=cache, max_tokens=1))
        held = [(c.keys, c.values) for c in cache]
        before = [(np.array(k), np.array(v)) for k, v in held]
        list(generate_step(model, mx.array([[7]]), cache=cache, start=14, max_tokens=6))
    for (k, v), (k0, v0) in zip(held, before):
        np.testing.assert_array_equal(np.array(k), k0)
        np.testing.assert_array_equal(np.array(v), v0)
    assert any(not np.array_equal(np.array(c.keys), k0) for c, (k0, _) in zip(cache, before))


def test_models_the_host_path_declines(pair):
    """Quantized layers, LoRA-wrapped layers and non-float32 weights stay on the MLX path."""
    from mlx_gemma.lora import apply_lora

    _, model = pair
    cfg = model.config

    def copy(dtype=mx.float32):
        other = type(model)(cfg)
        other.update(model.parameters())
        other.set_dtype(dtype)
        return other

    quantized = copy()
    nn.quantize(quantized, group_size=32, bits=8, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    assert HostDecoder.of(quantized) is None
    lora = copy()
    apply_lora(lora, rank=4)
    assert HostDecoder.of(lora) is None
    assert HostDecoder.of(copy(mx.bfloat16)) is None
    assert HostDecoder.of(copy()) is not None
