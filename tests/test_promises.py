"""Promises README makes that no other test held: the CLI's --debug, adapter refusals with configs
written by peft itself, and the MLX_GEMMA_* switches of the Linux set-up."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mlx_gemma.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Gemma 3 dir with the real tokenizer (fast CLI runs)."""
    from mlx_gemma.convert import hf as hf_convert
    from mlx_gemma.loading import build_model, read_config, resolve, save_model
    from mlx_gemma.tokenizer import GemmaTokenizer

    from tiny import make_hf_model, save_hf_model

    src = save_hf_model(make_hf_model("gemma3_text", vocab_size=262144), tmp_path_factory.mktemp("hf"))
    model = build_model(read_config(src), hf_convert.load_safetensors(hf_convert.safetensors_files(src)),
                        str(src), "float32")
    return save_model(model, GemmaTokenizer(resolve("gemma-3-270m")), tmp_path_factory.mktemp("m") / "tiny")


def peft_adapter_dir(path, **config):
    """An adapter dir whose adapter_config.json is what peft's own LoraConfig writes."""
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **config).to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(cfg, default=str))
    return path


@pytest.mark.parametrize("config, field", [
    (dict(use_dora=True), "use_dora"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
    (dict(alpha_pattern={"q_proj": 16}), "alpha_pattern"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
])
def test_unsupported_peft_features_are_refused_in_one_line(tiny_dir, tmp_path, config, field):
    adapter = peft_adapter_dir(tmp_path / "adapter", **config)
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_dir), "--adapter", str(adapter),
                                       "--prompt", "hi", "--max-tokens", "1"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], result.output
    assert str(adapter / "adapter_config.json") in lines[0]


def test_debug_shows_the_traceback_and_without_it_one_line(tiny_dir, tmp_path):
    adapter = peft_adapter_dir(tmp_path / "adapter", use_dora=True)
    args = ["generate", "--model", str(tiny_dir), "--adapter", str(adapter), "--prompt", "hi"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    plain = subprocess.run([sys.executable, "-m", "mlx_gemma.cli", *args], capture_output=True, text=True, env=env)
    debug = subprocess.run([sys.executable, "-m", "mlx_gemma.cli", "--debug", *args], capture_output=True, text=True,
                           env=env)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("error: ")
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "UserError" in debug.stderr and "use_dora" in debug.stderr


def _info(**env):
    proc = subprocess.run([sys.executable, "-m", "mlx_gemma.cli", "info"], capture_output=True, text=True,
                          env={**os.environ, **env}, check=True)
    return {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}


@pytest.mark.skipif(sys.platform != "linux", reason="the OpenBLAS set-up is Linux-only")
def test_openblas_switches():
    """MLX_GEMMA_NO_OPENBLAS=1 turns the OpenBLAS preload off; MLX_GEMMA_OPENBLAS picks the library."""
    default = _info()["blas"]
    assert "openblas" in default.lower() and "loaded before mlx.core" in default
    off = _info(MLX_GEMMA_NO_OPENBLAS="1")["blas"]
    assert "loaded before" not in off and off != default
    path = default.split()[1]
    chosen = _info(MLX_GEMMA_OPENBLAS=path)["blas"]
    assert path in chosen and "loaded before mlx.core" in chosen


def _load(path):
    from mlx_gemma.loading import load

    return load(str(path), dtype="float32")[0]


@pytest.mark.slow
def test_quantize_keep_embedding_keeps_the_float_embedding(tiny_dir, tmp_path):
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    out = tmp_path / "q4e"
    result = CliRunner().invoke(main, ["quantize", str(tiny_dir), str(out), "--bits", "4", "--keep-embedding",
                                       "--calibration", "none", "--no-eval"])
    assert result.exit_code == 0, result.output
    original, quantized = _load(tiny_dir), _load(out)
    emb = quantized.model.embed_tokens
    assert type(emb) is nn.Embedding  # not quantized
    np.testing.assert_array_equal(np.array(emb.weight), np.array(original.model.embed_tokens.weight))
    q_proj = quantized.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == 4
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert mx.all(mx.isfinite(quantized(mx.array([[2, 300, 301]])))).item()


@pytest.mark.slow
def test_convert_q_mixed_recipe_puts_the_chosen_layers_at_8_bits(tiny_dir, tmp_path):
    from mlx_gemma.quant import mixed_recipe_upgrades

    out = tmp_path / "mixed"
    result = CliRunner().invoke(main, ["convert", str(tiny_dir), str(out), "-q", "--bits", "4", "--group-size", "32",
                                       "--recipe", "mixed", "--calibration", "none"])
    assert result.exit_code == 0, result.output
    model = _load(out)
    n = len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        for name, module in (("self_attn.v_proj", layer.self_attn.v_proj), ("mlp.down_proj", layer.mlp.down_proj),
                             ("self_attn.q_proj", layer.self_attn.q_proj)):
            want = 8 if mixed_recipe_upgrades(f"model.layers.{i}.{name}", n) else 4
            assert module.bits == want, f"layer {i} {name}"
    assert model.model.embed_tokens.bits == 8  # the embedding / LM head is always upgraded
    assert any(mixed_recipe_upgrades(f"model.layers.{i}.self_attn.v_proj", n) for i in range(n))


_MALLOC_PROBE = """
import ctypes, os, mlx_gemma.cpu
mlx_gemma.cpu.enable()  # what the CLI does; importing alone leaves malloc as it is
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
before = rss()
p = libc.malloc(200 << 20)
ctypes.memset(p, 1, 200 << 20)
libc.free(ctypes.c_void_p(p))
print((rss() - before) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_tuning_keeps_freed_blocks_and_the_switch_turns_it_off():
    """README: with the CPU paths enabled (the CLI, or mlx_gemma.cpu.enable()), freed blocks up to
    1 GiB stay in the heap for reuse; MLX_GEMMA_NO_MALLOPT=1 keeps glibc's defaults (a 200 MB block is mmap'ed and returned to the system on free)."""
    def kept_mb(**env):
        out = subprocess.run([sys.executable, "-c", _MALLOC_PROBE], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}).stdout
        return int(out.split()[-1])

    assert kept_mb() >= 150
    assert kept_mb(MLX_GEMMA_NO_MALLOPT="1") <= 50
