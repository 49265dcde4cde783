"""Gemma 4 and Gemma 3n text models against transformers, through the production loader.

Each tiny checkpoint is built and saved by transformers (tests/gemma4_tiny.py), read back with
`loading.read_config` + `build_model`, and compared in float32 on sequences longer than the
sliding window: Gemma 4 E2B-like (per-layer embeddings, KV sharing, double-wide MLP), Gemma 4
MoE with k == v, Gemma4ForConditionalGeneration and the unified model (weights under
model.language_model.*), and Gemma3nForCausalLM (AltUp, LAuReL, activation sparsity).
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_gemma.config import GemmaConfig
from mlx_gemma.convert import hf as hf_convert
from mlx_gemma.errors import UserError
from mlx_gemma.loading import build_model, read_config

from gemma4_tiny import KINDS, make_hf_model, random_ids, save, vocab_of


def load_dir(path):
    config = read_config(path)
    weights = hf_convert.load_safetensors(hf_convert.safetensors_files(path))
    return build_model(config, weights, str(path), "float32")


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    hf = make_hf_model(request.param)
    path = save(hf, tmp_path_factory.mktemp(request.param))
    return request.param, hf, path


def test_logits_match_transformers(pair):
    kind, hf, path = pair
    ids = random_ids(vocab_of(hf), (2, 21))  # 21 tokens > the sliding window of 8
    expected = hf_logits(hf, ids)
    got = np.array(load_dir(path)(mx.array(ids)))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4


def _rewrite_config(path, tmp_path, change):
    out = tmp_path / "rewritten"
    shutil.copytree(path, out)
    raw = json.loads((out / "config.json").read_text())
    text = raw.get("text_config", raw)
    change(text)
    (out / "config.json").write_text(json.dumps(raw))
    return out


def _to_transformers4_layout(text):
    """The older layout: global_head_dim / num_global_key_value_heads and flat RoPE fields
    instead of transformers 5's per_layer_config and rope_parameters."""
    per_layer = text.pop("per_layer_config", None)
    if per_layer:
        override = next(iter(per_layer.values()))
        text["global_head_dim"] = override["head_dim"]
        if "num_key_value_heads" in override:
            text["num_global_key_value_heads"] = override["num_key_value_heads"]
    rope = text.pop("rope_parameters")
    if text["model_type"].startswith("gemma3n"):
        text["rope_theta"] = rope["full_attention"]["rope_theta"]
        text["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    # Gemma 4 without rope_parameters: transformers' defaults (1M proportional 0.25 / 10k), as the fixtures use


def test_transformers4_config_layout_gives_the_same_logits(pair, tmp_path):
    kind, hf, path = pair
    old = _rewrite_config(path, tmp_path, _to_transformers4_layout)
    assert "per_layer_config" not in json.loads((old / "config.json").read_text()).get("text_config", {})
    ids = random_ids(vocab_of(hf), (1, 19), seed=4)
    assert np.abs(np.array(load_dir(old)(mx.array(ids))) - hf_logits(hf, ids)).max() <= 1e-4


def test_shared_layers_kv_weights_in_checkpoint_are_dropped(tmp_path):
    """Google's checkpoints still hold k/v weights for KV-shared layers; they are unused."""
    hf = make_hf_model("gemma4_e2b")
    path = save(hf, tmp_path / "ckpt")
    config = read_config(path)
    weights = dict(hf_convert.load_safetensors(hf_convert.safetensors_files(path)))
    shared = [i for i in range(config.num_hidden_layers) if config.kv_source(i) != i]
    assert shared == [5, 6, 7]
    for i in shared:
        D = config.layer_head_dim(i)
        for name, shape in (("k_proj.weight", (2 * D, 64)), ("v_proj.weight", (2 * D, 64)), ("k_norm.weight", (D,))):
            weights[f"model.layers.{i}.self_attn.{name}"] = mx.ones(shape)
    model = build_model(config, weights, str(path), "float32")
    ids = random_ids(256, (1, 12))
    assert np.abs(np.array(model(mx.array(ids))) - hf_logits(hf, ids)).max() <= 1e-4


def test_multimodal_towers_are_skipped_with_one_line(tmp_path, capsys):
    hf = make_hf_model("gemma4_multimodal")
    path = save(hf, tmp_path / "mm")
    raw = json.loads((path / "config.json").read_text())
    raw["vision_config"] = {"model_type": "gemma4_vision", "hidden_size": 32}
    (path / "config.json").write_text(json.dumps(raw))
    weights = dict(hf_convert.load_safetensors(hf_convert.safetensors_files(path)))
    weights["model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight"] = mx.ones((4, 4))
    weights["model.embed_vision.embedding_projection.weight"] = mx.ones((4, 4))
    capsys.readouterr()  # transformers' save progress
    config = read_config(path)
    err = capsys.readouterr().err
    assert "skipping vision_config" in err and len(err.strip().splitlines()) == 1
    model = build_model(config, weights, str(path), "float32")
    ids = random_ids(256, (1, 10))
    assert np.abs(np.array(model(mx.array(ids))) - hf_logits(hf, ids)).max() <= 1e-4


def test_config_round_trip_and_fields(pair):
    kind, hf, path = pair
    raw = json.loads((path / "config.json").read_text())
    config = GemmaConfig.from_dict(raw)
    again = GemmaConfig.from_dict(config.to_dict())
    again.extra = config.extra
    assert again == config
    text = hf.config.get_text_config()
    for i in range(config.num_hidden_layers):
        attn = (hf.model.language_model if hasattr(hf.model, "language_model") else hf.model).layers[i].self_attn
        assert config.layer_head_dim(i) == attn.head_dim
        assert (config.kv_source(i) != i) == attn.is_kv_shared_layer
    assert config.model_type in ("gemma4_text", "gemma3n_text")
    assert text.num_kv_shared_layers == config.num_kv_shared_layers


@pytest.mark.parametrize("change, words", [
    (lambda c: c.pop("hidden_size"), "missing required field(s): hidden_size"),
    (lambda c: c.update(per_layer_config={"0": {"head_dim": 32}}), "not a full_attention layer"),
    (lambda c: c.update(use_bidirectional_attention="all"), "bidirectional"),
    (lambda c: c.update(num_kv_shared_layers=8), "num_kv_shared_layers"),
    (lambda c: c.update(enable_moe_block=True), "num_experts"),
])
def test_config_mistakes_are_one_clear_error(change, words):
    from gemma4_tiny import E2B

    raw = {"model_type": "gemma4_text", **json.loads(json.dumps(E2B))}
    raw["some_future_key"] = 1  # unknown keys are ignored
    GemmaConfig.from_dict(raw)
    change(raw)
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        GemmaConfig.from_dict(raw)


def test_unified_text_has_no_per_layer_embeddings_or_experts():
    raw = {"model_type": "gemma4_unified", "text_config": {"model_type": "gemma4_unified_text", "vocab_size": 256,
           "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16}, "vision_config": None}
    config = GemmaConfig.from_dict(raw)
    assert config.model_type == "gemma4_text" and config.per_layer_input_size == 0 and not config.enable_moe_block
    assert config.layer_types[-1] == "full_attention" and config.layer_head_dim(5) == 512


def test_cpu_host_decoder_declines_gemma4_and_3n(pair):
    """hostdecode computes Gemma 1-3 layers only; for these it must leave decoding to the MLX step."""
    from mlx_gemma.cpu.hostdecode import HostDecoder

    _, _, path = pair
    assert HostDecoder.of(load_dir(path)) is None


def test_gemma3n_multimodal_layout_loads_its_text_model(tmp_path, capsys):
    """A `gemma3n` (multimodal) dir: text config under text_config, weights under
    model.language_model.*, audio/vision towers beside them. (transformers' own
    Gemma3nForConditionalGeneration needs timm for its vision tower, so the dir is laid out from the
    text checkpoint; the reference is Gemma3nForCausalLM on the same weights.)"""
    hf = make_hf_model("gemma3n")
    path = save(hf, tmp_path / "text")
    text = json.loads((path / "config.json").read_text())
    raw = {"model_type": "gemma3n", "architectures": ["Gemma3nForConditionalGeneration"], "text_config": text,
           "vision_config": {"model_type": "gemma3n_vision"}, "audio_config": {"model_type": "gemma3n_audio"}}
    out = tmp_path / "mm"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(raw))
    weights = hf_convert.load_safetensors(hf_convert.safetensors_files(path))
    moved = {k.replace("model.", "model.language_model.", 1): v for k, v in weights.items()}
    moved["model.audio_tower.subsample_conv_projection.conv_0.conv.weight"] = mx.ones((2, 2))
    moved["model.embed_audio.embedding.weight"] = mx.ones((2, 2))
    mx.save_safetensors(str(out / "model.safetensors"), moved)
    capsys.readouterr()
    model = load_dir(out)
    assert "skipping vision_config and audio_config" in capsys.readouterr().err
    ids = random_ids(256, (1, 20))
    assert np.abs(np.array(model(mx.array(ids))) - hf_logits(hf, ids)).max() <= 1e-4
