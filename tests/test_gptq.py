"""Calibrated (GPTQ) quantization against a textbook reference, the lattice start of the
error-minimising grid, the calibrated model path, the calibration inputs and their user errors."""

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_gemma import quant as Q
from mlx_gemma.quant import calibration as calib
from mlx_gemma.quant import gptq
from mlx_gemma.cli import main
from mlx_gemma.errors import UserError

from test_quantize import load_dir, logits, tiny_dir, tiny_model_dir  # noqa: F401 (fixtures)
from tiny import random_ids


def dequant(packed, scales, biases, group_size, bits):
    return np.array(mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits))


def correlated_inputs(n, cols, seed):
    """Inputs with strongly correlated columns and a few large ones, like LLM activations."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((cols, cols)) / np.sqrt(cols) + np.eye(cols)
    x = rng.standard_normal((n, cols)) @ mix
    x[:, :3] *= 8.0
    return x.astype(np.float32)


def obs_reference(w, h, scale, bias, bits):
    """Textbook optimal-brain-quantization order: quantize column j on the fixed grid, then move
    the remaining columns by -(w_j - q_j) / Hinv_jj * Hinv_j,: with Hinv the inverse of H
    restricted to the columns still unquantized (recomputed by a plain inverse each step)."""
    w = w.astype(np.float64).copy()
    rows, cols = w.shape
    top = 2 ** bits - 1
    out = np.zeros_like(w)
    for j in range(cols):
        rest = np.arange(j, cols)
        hinv = np.linalg.inv(h[np.ix_(rest, rest)])
        s, b = scale[:, j], bias[:, j]
        q = np.clip(np.rint((w[:, j] - b) / s), 0, top)
        out[:, j] = s * q + b
        err = (w[:, j] - out[:, j]) / hinv[0, 0]
        w[:, rest] -= np.outer(err, hinv[0])
    return out


def test_gptq_matches_the_textbook_sequential_update():
    """With one group spanning all inputs (so the grid is fixed before any update), GPTQ's
    Cholesky form must give the same quantized weights as the explicit per-column inverse."""
    rng = np.random.default_rng(0)
    cols, bits = 32, 4
    w = (rng.standard_normal((6, cols)) * 0.05).astype(np.float32)
    x = correlated_inputs(400, cols, 1)
    h = (x.T @ x).astype(np.float64)
    packed, scales, biases = gptq.gptq_quantize(mx.array(w), mx.array(h.astype(np.float32)), cols, bits, damp=0.0)
    ours = dequant(packed, scales, biases, cols, bits)
    s, b = np.repeat(np.array(scales), cols, 1), np.repeat(np.array(biases), cols, 1)
    ref = obs_reference(w, h, s.astype(np.float64), b.astype(np.float64), bits)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    assert np.mean(np.isclose(ours, ref, atol=1e-6)) == 1.0


@pytest.mark.parametrize("group_size", [32, 64])
def test_gptq_lowers_the_output_error_of_the_error_minimising_grid(group_size):
    rng = np.random.default_rng(group_size)
    cols, bits = 128, 4
    w = (rng.standard_normal((96, cols)) * 0.05).astype(np.float32)
    x = correlated_inputs(2000, cols, 2)
    h = mx.array(x.T @ x)
    ours = dequant(*gptq.gptq_quantize(mx.array(w), h, group_size, bits), group_size, bits)
    grid = dequant(*Q.quantize_affine(mx.array(w), group_size, bits), group_size, bits)

    def output_error(q):
        return float(np.sum((x @ (q - w).T) ** 2))

    assert output_error(ours) < 0.7 * output_error(grid)


def test_gptq_with_uncorrelated_inputs_is_the_error_minimising_grid():
    """H = I spreads no error, so GPTQ must reduce to quantize_affine: same codes, scales, biases."""
    rng = np.random.default_rng(3)
    w = mx.array((rng.standard_normal((40, 128)) * 0.05).astype(np.float32))
    ours = gptq.gptq_quantize(w, mx.eye(128), 32, 4)
    grid = Q.quantize_affine(w, 32, 4)
    for a, b in zip(ours, grid):
        assert np.array_equal(np.array(a), np.array(b))


def test_gptq_on_bfloat16_weights_keeps_their_dtype_for_scales():
    rng = np.random.default_rng(9)
    w = mx.array((rng.standard_normal((16, 64)) * 0.05).astype(np.float32))
    h = mx.array(correlated_inputs(200, 64, 9).T @ correlated_inputs(200, 64, 9))
    packed, scales, biases = gptq.gptq_quantize(w.astype(mx.bfloat16), h, 32, 4)
    assert scales.dtype == biases.dtype == mx.bfloat16
    ref = dequant(*gptq.gptq_quantize(w.astype(mx.bfloat16).astype(mx.float32), h, 32, 4), 32, 4)
    ours = np.array(mx.dequantize(packed, scales, biases, group_size=32, bits=4).astype(mx.float32))
    assert np.max(np.abs(ours - ref)) < 0.02 * np.abs(ref).max()  # bf16 rounding of scale and bias only


def test_gptq_zeroes_inputs_that_are_never_active():
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((8, 64)) * 0.05).astype(np.float32)
    x = correlated_inputs(300, 64, 5)
    x[:, 10] = 0.0
    out = dequant(*gptq.gptq_quantize(mx.array(w), mx.array(x.T @ x), 32, 4), 32, 4)
    assert np.all(np.isfinite(out))
    assert np.allclose(out[:, 10], 0.0, atol=np.abs(w).max() / 7)  # on the grid point nearest 0


def test_lattice_start_recovers_weights_dequantized_from_a_32_block_format():
    """Weights built like a dequantized Q4_K / Q4_1 GGUF (per 32-block: scale * code - min, codes
    that need not reach 0 or 15) come back exactly at group size 32, which mx.quantize misses."""
    rng = np.random.default_rng(6)
    rows, cols = 64, 256
    codes = rng.integers(2, 14, size=(rows, cols)).astype(np.float32)  # no block uses codes 0/15
    scale = rng.uniform(0.001, 0.01, size=(rows, cols // 32, 1)).astype(np.float32)
    offset = rng.uniform(-0.08, -0.02, size=(rows, cols // 32, 1)).astype(np.float32)
    w = (codes.reshape(rows, -1, 32) * scale + offset).reshape(rows, cols)
    ours = dequant(*Q.quantize_affine(mx.array(w), 32, 4), 32, 4)
    rtn = dequant(*mx.quantize(mx.array(w), 32, 4), 32, 4)
    assert np.max(np.abs(ours - w)) < 1e-6
    assert np.max(np.abs(rtn - w)) > 1e-4


def calibration(vocab=512, n=4, length=64):
    return mx.array(random_ids(vocab, (n, length), seed=7).astype(np.int32))


def test_calibrated_model_saves_loads_and_beats_uncalibrated_on_its_data(tiny_dir, tmp_path):  # noqa: F811
    from mlx_gemma.loading import save_model
    from test_quantize import StubTokenizer

    windows = calibration()
    reference = logits(load_dir(tiny_dir), np.array(windows))
    calibrated = Q.quantize_model(load_dir(tiny_dir), bits=4, group_size=32, calibration=windows)
    plain = Q.quantize_model(load_dir(tiny_dir), bits=4, group_size=32)
    assert calibrated.config.quantization == {"group_size": 32, "bits": 4, "mode": "affine"}
    ours = logits(calibrated, np.array(windows))
    assert np.mean((ours - reference) ** 2) < np.mean((logits(plain, np.array(windows)) - reference) ** 2)
    save_model(calibrated, StubTokenizer(), tmp_path / "q")
    held_out = random_ids(512, (1, 12), seed=8)
    assert np.array_equal(logits(load_dir(tmp_path / "q"), held_out), logits(calibrated, held_out))


def test_calibrated_model_keeps_embedding_when_asked(tiny_dir):  # noqa: F811
    model = Q.quantize_model(load_dir(tiny_dir), bits=4, group_size=32, quantize_embedding=False,
                             calibration=calibration())
    assert not Q.is_quantized_layer(model.model.embed_tokens)
    assert model.config.quantization["model.embed_tokens"] is False
    assert Q.is_quantized_layer(model.model.layers[0].mlp.down_proj)


def test_calibration_ids_beyond_the_vocabulary_are_refused_before_any_change(tiny_dir):  # noqa: F811
    model = load_dir(tiny_dir)
    with pytest.raises(UserError, match="outside the model's vocabulary of 512"):
        Q.quantize_model(model, bits=4, group_size=32, calibration=mx.array([[2, 9000, 5]]))
    assert not Q.quantized_layers(model)


class CharTokenizer:
    bos_id, eos_id = 2, 1

    def encode(self, text, add_bos=True):
        return ([self.bos_id] if add_bos else []) + [3 + ord(c) % 500 for c in text]


def test_calibration_windows_share_the_budget_and_cut_consecutive_windows(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("x" * 100, encoding="utf-8")  # 101 ids with <bos>: 3 windows of 32
    b.write_text("".join(chr(65 + i % 26) for i in range(300)), encoding="utf-8")  # 301 ids: 9 windows
    tok = CharTokenizer()
    w = np.array(calib.calibration_windows(tok, [a, b], tokens=32 * 8, window=32))
    ids_b = tok.encode(b.read_text())
    assert w.shape == (8, 32)
    # turns alternate a, b while a lasts (3 windows), then b fills the rest
    assert np.array_equal(w[1], ids_b[:32]) and np.array_equal(w[3], ids_b[32:64])
    assert np.array_equal(w[6], ids_b[96:128]) and np.array_equal(w[7], ids_b[128:160])
    assert np.all(w[[0, 2, 4]][:, 1:] == tok.encode("x", add_bos=False)[0])


@pytest.mark.slow  # loads the 270M (for its tokenizer)
def test_calibration_from_a_jsonl_data_file_renders_records_as_training_does(tmp_path):
    from mlx_gemma.loading import load
    from mlx_gemma.training.data import encode_record

    _, tok = load("gemma-3-270m")
    records = [{"prompt": f"问题{i}：为什么天空是蓝色的？", "completion": "因为蓝光被散射得最多。" * 3} for i in range(20)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    stream = sum((encode_record(r, tok, "x")[1].tolist() for r in records), [])
    w = np.array(calib.calibration_windows(tok, [path], tokens=64, window=64))
    assert w.tolist() == [stream[:64]]


def test_resolve_sources():
    assert calib.resolve_sources(None, 4) == calib.default_sources()
    assert calib.resolve_sources(("auto",), 8) is None
    assert calib.resolve_sources(("none",), 4) is None
    assert all(p.is_file() for p in calib.default_sources())
    with pytest.raises(UserError, match="cannot be combined"):
        calib.resolve_sources(("none", "a.txt"), 4)


@pytest.mark.parametrize("args,message", [
    (["--calibration", "missing.txt"], "--calibration missing.txt: no such file"),
    (["--calibration-tokens", "100"], "--calibration-tokens must be at least 512"),
    (["--calibration", "{text}", "--group-size", "32", "--no-eval"], "outside the model's vocabulary of 512"),
])
def test_cli_calibration_errors_one_line_exit_1_nothing_written(tiny_model_dir, tmp_path, args, message):  # noqa: F811
    text = tmp_path / "calib.txt"
    text.write_text("福建土楼是分布在福建西南部山区的一种大型夯土民居。" * 60, encoding="utf-8")
    out = tmp_path / "q"
    args = [a.format(text=text) for a in args]
    result = CliRunner().invoke(main, ["quantize", str(tiny_model_dir), str(out), *args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not out.exists()


@pytest.mark.slow
def test_cli_calibrated_mixed_quantize_end_to_end(tiny_model_dir, tmp_path):  # noqa: F811
    """`quantize --recipe mixed --calibration FILE` on a tiny model whose tokenizer fits its
    vocabulary: the report names the method, the dir reloads with the per-layer bits, and its
    logits equal those of the same quantization done in Python."""
    import shutil

    from mlx_gemma.loading import load
    from test_export import tiny_tokenizer_bytes

    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    (src / "tokenizer.model").write_bytes(tiny_tokenizer_bytes(512))
    text = tmp_path / "calib.txt"
    text.write_text("the cat sat on the mat, then the hat sat there. " * 120, encoding="utf-8")
    out = tmp_path / "q"
    result = CliRunner().invoke(main, ["quantize", str(src), str(out), "--bits", "4", "--group-size", "32",
                                       "--recipe", "mixed", "--calibration", str(text), "--text", str(text)])
    assert result.exit_code == 0, result.output
    assert "4/8-bit mixed, group 32" in result.output
    assert re.search(r"GPTQ on \d+ calibration tokens of calib\.txt", result.output)
    model, tok = load(str(out))
    assert dict(Q.quantized_layers(model))["model.embed_tokens"].bits == 8
    expected = load_dir(src)
    windows = calib.calibration_windows(load(str(src))[1], [text])
    Q.quantize_model(expected, bits=4, group_size=32, recipe="mixed", calibration=windows)
    ids = random_ids(512, (1, 11))
    np.testing.assert_array_equal(logits(model, ids), logits(expected, ids))

