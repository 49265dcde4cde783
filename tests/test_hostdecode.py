"""The CPU one-row decode step on the host (hostdecode.HostDecoder) against transformers and
against MLX's compiled step: every Gemma variant's logits at every step, the KV cache it writes,
greedy ids, the models it must decline, and cache arrays it must not write through."""

import copy
import json
import platform
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from mlx_gemma import backend
from mlx_gemma.convert import hf as hf_convert
from mlx_gemma.generation import DecodeStep, generate_step
from mlx_gemma.cpu.hostdecode import HostDecoder
from mlx_gemma.loading import build_model, read_config
from mlx_gemma.cpu import BLAS_STATUS

from tiny import make_hf_model, random_ids, save_hf_model

pytestmark = pytest.mark.skipif(not BLAS_STATUS.get("library"),
                                reason="no OpenBLAS loaded by mlx_gemma.cpu.runtime (macOS, or MLX_GEMMA_NO_OPENBLAS)")

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


def test_decode_step_takes_the_host_path_for_one_row_only(pair, monkeypatch):
    """DecodeStep uses the host body for one row without adapters; a batch goes through MLX."""
    _, model = pair
    with backend.override(host_decode=True, host_gemv=True):
        step = DecodeStep(model)
    assert step.host_body is not None
    with backend.override(host_decode=False):
        assert DecodeStep(model).host_body is None
    calls = []
    real = HostDecoder.__call__
    monkeypatch.setattr(HostDecoder, "__call__", lambda self, *a: calls.append(a) or real(self, *a))
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


def test_host_decoding_does_not_write_into_a_rows_slices(pair):
    """`ModelCache.row` hands out MLX slices that share the buffers (no Python reference shows
    it): after one, the next host step writes into a new private copy, so the row a chat session
    kept holds the keys it had, while the cache goes on with the new token's keys."""
    _, model = pair
    with backend.override(host_decode=True, host_gemv=True):
        step = DecodeStep(model, compile=False)
    assert step.host_body is not None
    cache = model.make_cache()
    for pos, token in enumerate([3, 9, 4]):
        step.greedy_next(cache, token, pos)
    kept = cache.row(0)
    before = [(np.array(c.keys), np.array(c.values)) for c in kept]
    step.greedy_next(cache, 11, 3)
    for layer, (c, (k0, v0)) in enumerate(zip(kept, before)):
        np.testing.assert_array_equal(np.array(c.keys), k0, err_msg=f"keys of layer {layer}")
        np.testing.assert_array_equal(np.array(c.values), v0, err_msg=f"values of layer {layer}")
    assert any(not np.array_equal(np.array(c.keys)[:, :, 3], k0[:, :, 3]) for c, (k0, _) in zip(cache, before))


def test_models_the_host_path_declines(pair):
    """Quantization the native kernel does not take (6 bits), LoRA in training mode and non-float32
    weights stay on the MLX path."""
    from mlx_gemma.lora import apply_lora

    _, model = pair
    cfg = model.config

    def copy(dtype=mx.float32):
        other = type(model)(cfg)
        other.update(model.parameters())
        other.set_dtype(dtype)
        return other

    quantized = copy()
    nn.quantize(quantized, group_size=32, bits=6, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    assert HostDecoder.of(quantized) is None
    lora = copy()
    apply_lora(lora, rank=4)
    lora.eval()
    assert HostDecoder.of(lora) is not None
    lora.train()
    assert HostDecoder.of(lora) is None  # dropout belongs to training
    assert HostDecoder.of(copy(mx.bfloat16)) is None
    assert HostDecoder.of(copy()) is not None


def test_lora_adapter_decodes_on_the_host_like_mlx_and_the_fused_model(pair):
    """An unfused LoRA adapter (random A and B on every linear layer, as `generate --adapter`
    loads one) decodes on the host with the MLX step's greedy ids and logits, and with the ids of
    the model whose weights have the adapter fused in."""
    from mlx.utils import tree_map

    from mlx_gemma.lora import apply_lora, fuse_lora, lora_layers

    _, model = pair
    lora = type(model)(copy.deepcopy(model.config))
    lora.update(model.parameters())
    apply_lora(lora, targets="all-linear", rank=4)
    rng = np.random.default_rng(3)
    lora.update(tree_map(lambda v: mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)),
                         lora.trainable_parameters()))
    lora.eval()
    assert lora_layers(lora) and HostDecoder.of(lora) is not None
    prompt = random_ids(512, (1, 13), seed=14)
    ids, host_logits, _ = decode_logits(lora, prompt, 20, host_decode=True)
    mlx_ids, mlx_logits, _ = decode_logits(lora, prompt, 20, host_decode=False)
    assert ids == mlx_ids
    for i, (a, b) in enumerate(zip(host_logits, mlx_logits)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=f"step {i}")
    fuse_lora(lora)
    assert not lora_layers(lora)
    assert decode_logits(lora, prompt, 20, host_decode=True)[0] == ids


# ---- quantized weights: the native kernel ------------------------------------------------------


def native_kernel():
    from mlx_gemma.cpu.native import STATUS, qgemv

    fn = qgemv()
    if fn is None:
        pytest.skip(f"the native kernel is not available here: {STATUS['note']}")
    return fn


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_native_kernel_equals_the_dequantized_product(bits, group):
    """qgemv_affine on MLX's packed codes equals numpy's float64 product with the weight
    mx.dequantize gives, for both widths and every group size `mlx-gemma quantize` writes."""
    fn = native_kernel()
    rng = np.random.default_rng(bits * group)
    M, N = 96, 4 * group
    codes, scales, biases = mx.quantize(mx.array(rng.standard_normal((M, N)).astype(np.float32)), group_size=group,
                                        bits=bits)
    dense = np.array(mx.dequantize(codes, scales, biases, group_size=group, bits=bits), np.float64)
    x = rng.standard_normal(N).astype(np.float32)
    out, work = np.empty(M, np.float32), np.empty(2 * N, np.float32)
    q, s, b = (np.array(a, copy=False) for a in (codes, scales, biases))
    assert fn(q.ctypes.data, s.ctypes.data, b.ctypes.data, x.ctypes.data, out.ctypes.data, M, N, group, bits,
              work.ctypes.data) == 0
    np.testing.assert_allclose(out, dense @ x, rtol=1e-5, atol=1e-4)
    assert fn(q.ctypes.data, s.ctypes.data, b.ctypes.data, x.ctypes.data, out.ctypes.data, M, N, 48, bits,
              work.ctypes.data) == -1  # a group size it does not take is refused, not computed wrong


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_host_decoding_equals_mlx_kernels(pair, bits):
    """A model quantized by `quantize_model` (layers and tied embedding) decodes on the host with
    the native kernel: logits at every step within float32 rounding of MLX's quantized_matmul
    path, the same greedy ids. A mixed model (some layers left dense) goes too."""
    from mlx_gemma.quant import quantize_model

    native_kernel()
    _, model = pair
    q = type(model)(copy.deepcopy(model.config))  # quantize_model records itself in the config
    q.update(model.parameters())
    quantize_model(q, bits=bits, group_size=32)
    assert HostDecoder.of(q) is not None
    prompt = random_ids(512, (1, 13), seed=13)
    ids, host_logits, _ = decode_logits(q, prompt, 20, host_decode=True)
    ref_ids, ref_logits, _ = decode_logits(q, prompt, 20, host_decode=False, quantized_path="kernel")
    assert ids == ref_ids
    for i, (a, b) in enumerate(zip(host_logits, ref_logits)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=f"step {i}")
    q.model.layers[0].mlp.down_proj = model.model.layers[0].mlp.down_proj  # one dense product among quantized
    assert HostDecoder.of(q) is not None
    mixed, _, _ = decode_logits(q, prompt, 8, host_decode=True)
    assert mixed == decode_logits(q, prompt, 8, host_decode=False, quantized_path="kernel")[0]
    with backend.override(quantized_path="kernel"):
        assert HostDecoder.of(q) is None  # a forced MLX path is honoured


def test_native_build_failure_leaves_nothing_and_falls_back(tmp_path):
    """A compiler that fails: qgemv() is None with the reason, no file is left in the cache,
    and decoding a quantized model still works on MLX's kernel."""
    code = "import mlx_gemma.cpu.native as n; print(n.qgemv() is None); print(n.STATUS['note'])"
    env = {**os.environ, "CC": "false", "MLX_GEMMA_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "True" and "could not build qgemv.c" in lines[1]
    assert not list((tmp_path / "native").glob("*"))


# ---- models it must decline: Gemma 3n / 4 by their fields and modules -------------------------


@pytest.mark.parametrize("field, value", [("num_kv_shared_layers", 2), ("hidden_size_per_layer_input", 8),
                                          ("global_head_dim", 64), ("attention_k_eq_v", True),
                                          ("enable_moe_block", True), ("altup_num_inputs", 4),
                                          ("laurel_rank", 4)])
def test_declines_a_config_with_gemma4_or_3n_fields(pair, field, value):
    """A config carrying any field that makes Gemma 3n / 4 compute something else is declined,
    whatever its model_type says (the fields are what differ, not the name)."""
    _, model = pair
    other = type(model)(copy.deepcopy(model.config))
    other.update(model.parameters())
    assert HostDecoder.of(other) is not None
    object.__setattr__(other.config, field, value)  # a field a Gemma 4 / 3n config adds
    assert HostDecoder.of(other) is None


def test_declines_a_model_with_modules_it_does_not_compute(pair):
    """A decoder layer with an extra parameter or block (Gemma 4's layer_scalar, a MoE router) is
    declined even when the config says nothing."""
    _, model = pair
    other = type(model)(copy.deepcopy(model.config))
    other.update(model.parameters())
    other.model.layers[1].layer_scalar = mx.ones((1,))
    assert HostDecoder.of(other) is None
    del other.model.layers[1]["layer_scalar"]
    other.model.layers[0].mlp.router = nn.Linear(4, 4, bias=False)
    assert HostDecoder.of(other) is None


# ---- the native kernel's build key -------------------------------------------------------------


def test_a_library_built_for_other_cpu_features_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    """The build key holds the CPU's instruction-set features. A file under the key of another
    feature set (here: garbage that would crash if loaded) sits in the cache folder; a process on
    this CPU builds and loads its own library beside it. MLX_GEMMA_HOME='~/x' is expanded once:
    the library lands in $HOME/x/native, and no folder named '~' appears."""
    from mlx_gemma.cpu import native

    cc = native._compiler()
    if cc is None:
        pytest.skip("no C compiler here")
    monkeypatch.setattr(native, "isa_features", lambda: ("sse2",))  # a CPU without this one's vector units
    foreign = tmp_path / "x" / "native" / f"qgemv-{native.build_key(native.SOURCE.read_bytes(), cc, native.FLAG_SETS[0])}.so"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"not a shared library")
    code = "import mlx_gemma.cpu.native as n; print(n.qgemv() is not None); print(n.STATUS['library'])"
    env = {**os.environ, "HOME": str(tmp_path), "MLX_GEMMA_HOME": "~/x", "CC": cc}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    loaded, library = proc.stdout.splitlines()
    assert loaded == "True"
    assert library.startswith(str(tmp_path / "x" / "native" / "qgemv-")) and library != str(foreign)
    assert foreign.read_bytes() == b"not a shared library"
    assert not (tmp_path / "~").exists()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="reads x86 instructions")
def test_the_native_kernel_is_vectorised_in_the_code_the_compiler_made():
    """8-bit decoding reads a quarter of fp32's bytes only if the codes are widened and multiplied
    a vector at a time: the built library's qgemv_affine converts packed integers to packed floats
    (cvtdq2ps) and multiply-adds packed floats (an FMA or mulps/addps on packed registers), as
    objdump shows. A compiler that fell back to scalar conversion would fail this."""
    import shutil

    fn = native_kernel()
    from mlx_gemma.cpu.native import STATUS

    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    assert fn is not None
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", STATUS["library"]], capture_output=True,
                          text=True, check=True).stdout
    body = text[text.index("<qgemv_affine>:"):]
    body = body[:body.find("\n\n")]
    assert "cvtdq2ps" in body
    packed_fma = any(op in body for op in ("vfmadd231ps", "vfmadd213ps", "vfmadd132ps"))
    assert packed_fma or ("mulps" in body and "addps" in body)
    assert "cvtsi2ss" not in body  # no scalar int -> float conversion of codes


def test_quantized_model_decodes_on_mlx_when_the_native_build_fails(tmp_path):
    """With the compiler failing (CC=false), a 4-bit model still decodes: 12 greedy tokens under the
    machine's own policy equal the forced MLX quantized_matmul path's (what the test above only
    promised in its docstring)."""
    code = """
import json
import mlx_gemma, numpy as np, mlx.core as mx
import mlx_gemma.cpu.native as native
from mlx_gemma import backend
from mlx_gemma.config import GemmaConfig
from mlx_gemma.generation import generate_step
from mlx_gemma.model import Gemma
from mlx_gemma.quant import quantize_model
assert native.qgemv() is None
cfg = GemmaConfig.from_dict(dict(model_type="gemma3_text", vocab_size=512, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                 query_pre_attn_scalar=16, sliding_window=8))
mx.random.seed(0)
model = Gemma(cfg)
quantize_model(model, bits=4, group_size=32)
prompt = mx.array(np.random.default_rng(1).integers(3, 512, (1, 9)))
def run(**policy):
    with backend.override(**policy):
        return [t.item() for t in generate_step(model, prompt, cache=model.make_cache(), max_tokens=12)]
print(json.dumps([run(), run(host_decode=False, quantized_path="kernel")]))
"""
    env = {**os.environ, "CC": "false", "MLX_GEMMA_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    default, forced = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(default) == 12 and default == forced
