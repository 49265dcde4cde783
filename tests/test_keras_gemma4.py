"""Keras Gemma 4 and Gemma 3n presets: tiny random KerasHub `Gemma4Backbone`s and a
`Gemma3nBackbone`, saved as a preset dir and as a `.weights.h5` file, read by our converter, against
Keras' own forward pass (torch backend, float32); the vocabulary against keras-hub's
Gemma4Tokenizer; what keras-hub can say and we cannot, one named error each.

Every backbone sets its norm scales, `layer_scalar`s, router scales and per-expert scales away from
their defaults (Gemma 4 norms are x·w, starting at 1), and feeds 12 tokens through sliding windows
of 4, so a wrong convention or a window that does not bind cannot pass unseen.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported: no TensorFlow, no JAX

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_gemma.cli import main
from mlx_gemma.convert import keras as keras_convert
from mlx_gemma.errors import UserError
from mlx_gemma.loading import load

import keras
import keras_hub
from test_keras import SEQ, assert_loads_like_keras, keras_case, keras_logits, save_preset, train_vocab

S, F = "sliding_attention", "full_attention"
COMMON = dict(image_size=None, num_query_heads=4, num_key_value_heads=2, hidden_dim=32, head_dim=8,
              sliding_window_size=4, final_logit_soft_cap=30.0)
BACKBONES = {
    # E2B-like: per-layer embeddings, the last 3 layers reuse KV (both kinds), a 2x MLP on them,
    # global layers with twice the head size and proportional RoPE over a quarter of it.
    "e2b": dict(num_layers=8, intermediate_dim=48, layer_types=[S, S, F, S, S, S, F, F], global_head_dim=16,
                num_kv_shared_layers=3, hidden_size_per_layer_input=8, use_double_wide_mlp=True,
                global_rope_partial_rotary_factor=0.25, local_rope_wavelength=5_000.0, **COMMON),
    # 26B-A4B-like: experts beside the dense MLP, k == v on global layers with one KV head, proportional
    # RoPE scaled by 8.
    "moe": dict(num_layers=6, intermediate_dim=32, layer_types=[S, S, F, S, S, F], global_head_dim=16,
                num_global_key_value_heads=1, enable_moe_block=True, num_experts=4, expert_intermediate_dim=16,
                num_experts_per_token=2, global_rope_partial_rotary_factor=0.25, global_rope_scaling_factor=8.0,
                global_rope_wavelength=50_000.0, **COMMON),
    # No layer_types: keras-hub's pattern (every 3rd layer global), full RoPE scaled linearly.
    "pattern": dict(num_layers=6, intermediate_dim=48, sliding_window_pattern=3, global_rope_scaling_factor=4.0,
                    **COMMON),
}
VOCAB_SYMBOLS = dict(control_symbols=(), user_defined_symbols=("<|turn>", "<turn|>", "\n", "\t"))


@pytest.fixture(scope="module")
def vocab_spm():
    """A vocabulary with Gemma 4's turn markers as user-defined pieces, as keras-hub's converter builds
    them from tokenizer.json's added tokens."""
    return train_vocab(**VOCAB_SYMBOLS)


def make_backbone(kind, vocab_size, seed=0):
    """A Gemma4Backbone with random weights; norm scales, layer scalars, the router's scale and the
    per-expert scales around 1 (their default) but away from it."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.Gemma4Backbone(vocabulary_size=vocab_size, dtype="float32", **BACKBONES[kind])
    rng = np.random.default_rng(seed)
    for w in backbone.weights:
        noise = rng.standard_normal(w.shape).astype("float32")
        w.assign(1.0 + 0.3 * noise if w.path.endswith(("scale", "layer_scalar")) else 0.08 * noise)
    return backbone


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_preset_and_weights_file_match_keras_logits(kind, vocab_spm, tmp_path):
    preset, lm, ids, ref = keras_case(make_backbone, kind, vocab_spm, tmp_path)
    # the CausalLM's save_weights nests the backbone one level down (gemma4_backbone/...)
    assert assert_loads_like_keras(preset, lm, ids, ref, tmp_path).config.model_type == "gemma4_text"


def test_backbones_exercise_what_gemma4_adds():
    """The parity test above covers these only if the tiny configs turn them on."""
    e2b = keras_convert.hf_config("Gemma4Backbone", dict(BACKBONES["e2b"], vocabulary_size=64))
    moe = keras_convert.hf_config("Gemma4Backbone", dict(BACKBONES["moe"], vocabulary_size=64))
    pattern = keras_convert.hf_config("Gemma4Backbone", dict(BACKBONES["pattern"], vocabulary_size=64))
    assert e2b["num_kv_shared_layers"] and e2b["hidden_size_per_layer_input"] and e2b["use_double_wide_mlp"]
    assert {S, F} <= set(e2b["layer_types"][-e2b["num_kv_shared_layers"]:])  # shared layers of both kinds
    assert e2b["global_head_dim"] != e2b["head_dim"] and e2b["rope_scaling"]["rope_type"] == "proportional"
    assert moe["enable_moe_block"] and moe["attention_k_eq_v"] and moe["num_global_key_value_heads"] == 1
    assert moe["rope_scaling"]["factor"] == 8.0 and moe["rope_theta"] == 50_000.0
    assert pattern["layer_types"] == [S, S, F, S, S, F] and pattern["rope_scaling"]["rope_type"] == "linear"
    assert COMMON["sliding_window_size"] < SEQ


def test_tokenizer_ids_equal_keras_hub(vocab_spm, tmp_path):
    keras_tok = keras_hub.models.Gemma4Tokenizer(proto=vocab_spm, has_vision_tokens=False, has_video_tokens=False)
    preset = save_preset(make_backbone("pattern", 1000), vocab_spm, tmp_path / "preset")
    _, ours = load(str(preset), dtype="float32")
    texts = ["Hello, 世界! 机器学习 is fun.", "  spaces   and\ttabs\n\n",
             "<|turn>user\n福建土楼<turn|>\n<|turn>model\n"]
    for text in texts:
        assert ours.encode(text, add_bos=False) == keras.ops.convert_to_numpy(keras_tok(text)).tolist(), text
    # A vocabulary with Gemma 4's turn markers gets Gemma 4's chat format.
    prompt = ours.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert prompt.endswith("<|turn>user\nhi<turn|>\n<|turn>model\n")


def test_vocabulary_built_as_keras_hub_builds_gemma4_presets(vocab_spm, tmp_path):
    """keras-hub makes a Gemma 4 preset's vocabulary.spm from HF's tokenizer.json (a BPE proto with
    merge-rank scores, added tokens user-defined): ours on that file = keras-hub's Gemma4Tokenizer =
    the `tokenizers` library on the tokenizer.json it came from."""
    import json

    import tokenizers
    from keras_hub.src.utils.transformers.convert_gemma4 import _build_sentencepiece_proto

    from mlx_gemma.convert.tokenizer_json import tokenizer_json_from_model

    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json_from_model(vocab_spm)))
    proto = _build_sentencepiece_proto(json.loads((tmp_path / "tokenizer.json").read_text()))
    hf_tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    keras_tok = keras_hub.models.Gemma4Tokenizer(proto=proto, has_vision_tokens=False, has_video_tokens=False)
    size = 1001  # keras-hub appends a <|video|> piece when the tokenizer.json has none
    _, ours = load(str(save_preset(make_backbone("pattern", size), proto, tmp_path / "preset")), dtype="float32")
    assert ours.vocab_size == size
    texts = ["Hello, 世界! 机器学习 is fun.", "  spaces   and\ttabs\n\n", "emoji 🤗 and 中文 mixed",
             "数字 12345 and punctuation：，。！", "<|turn>user\n福建土楼<turn|>\n<|turn>model\n"]
    for text in texts:
        ids = ours.encode(text, add_bos=False)
        assert ids == keras.ops.convert_to_numpy(keras_tok(text)).tolist(), text
        assert ids == hf_tok.encode(text, add_special_tokens=False).ids, text


def test_cli_converts_a_preset_that_transformers_reads(vocab_spm, tmp_path):
    """Keras -> HF in one step: transformers' Gemma4ForCausalLM on what convert-to-hf wrote = Keras' logits."""
    import torch
    import transformers

    backbone = make_backbone("e2b", 1000)
    ids = np.random.default_rng(2).integers(3, 1000, size=(1, SEQ))
    ref, _ = keras_logits(backbone, ids)
    preset = save_preset(backbone, vocab_spm, tmp_path / "preset")
    result = CliRunner().invoke(main, ["convert-to-hf", str(preset), str(tmp_path / "hf"), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager")
    assert type(hf).__name__ == "Gemma4ForCausalLM"
    with torch.no_grad():
        hf_logits = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(hf_logits - ref).max() <= 1e-4


@pytest.mark.parametrize("kind", ["gemma4_e2b", "gemma4_moe"])
def test_preset_made_by_keras_hubs_hf_converter_matches_transformers(kind, vocab_spm, tmp_path):
    """Kaggle's Keras presets come from keras-hub's own HF -> Keras converter: a tiny transformers
    checkpoint through it (Gemma4Backbone.from_preset on the HF dir), saved as a preset, read by us,
    against transformers' logits on the original (20 tokens, window 8)."""
    import json
    import torch

    from gemma4_tiny import make_hf_model, random_ids, save

    hf = make_hf_model(kind, vocab_size=1000, vocab_size_per_layer_input=1000)
    hf_dir = save(hf, tmp_path / "hf")
    # keras-hub 0.32's converter reads the older fields only, not transformers 5's per_layer_config.
    config = json.loads((hf_dir / "config.json").read_text())
    override = next(iter(config["per_layer_config"].values()))
    config["global_head_dim"] = override["head_dim"]
    config["num_global_key_value_heads"] = override.get("num_key_value_heads")
    (hf_dir / "config.json").write_text(json.dumps(config))
    backbone = keras_hub.models.Gemma4Backbone.from_preset(str(hf_dir), dtype="float32")
    preset = save_preset(backbone, vocab_spm, tmp_path / "preset")
    ids = random_ids(1000, (2, 20))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    model, _ = load(str(preset), dtype="float32")
    assert np.abs(np.array(model(mx.array(ids))) - ref).max() <= 1e-4


def test_multimodal_gemma4_preset_reads_its_language_model(vocab_spm, tmp_path):
    from keras_hub.src.models.gemma4.gemma4_vision_encoder import Gemma4VisionEncoder

    encoder = Gemma4VisionEncoder(image_size=16, patch_size=4, num_heads=2, hidden_dim=8, num_layers=1,
                                  intermediate_dim=16, head_dim=4, output_dim=32, pool_size=2,
                                  position_embedding_size=16)
    kwargs = dict(BACKBONES["e2b"], image_size=16)
    backbone = keras_hub.models.Gemma4Backbone(vocabulary_size=1000, vision_encoder=encoder, dtype="float32", **kwargs)
    for w in backbone.weights:  # the vision encoder's too: nothing may be taken for the text model's
        w.assign(np.random.default_rng(len(w.path)).standard_normal(w.shape).astype("float32"))
    save_preset(backbone, vocab_spm, tmp_path / "p")
    ckpt = keras_convert.read_checkpoint(tmp_path / "p")
    assert not any("vision" in name for name in ckpt.weights)
    for layer, name in (("final_normalization", "model.norm.weight"),
                        ("per_layer_projection_norm", "model.per_layer_projection_norm.weight")):
        scale = keras.ops.convert_to_numpy(backbone.get_layer(layer).scale)
        assert np.array_equal(np.array(ckpt.weights[name]), scale), name


def test_bfloat16_preset_keeps_its_scalars(vocab_spm, tmp_path):
    """bf16 variables (2-byte opaque data in the .h5), the 0-d layer_scalar among them, come back exactly."""
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Gemma4Backbone(vocabulary_size=1000, dtype="bfloat16", **BACKBONES["moe"])
    for w in backbone.weights:
        if w.path.endswith(("layer_scalar", "per_expert_scale")):
            w.assign(np.random.default_rng(3).uniform(0.5, 1.5, w.shape).astype("float32"))
    save_preset(backbone, vocab_spm, tmp_path / "p")
    ckpt = keras_convert.read_checkpoint(tmp_path / "p")
    for i in range(len(backbone.transformer_layers)):
        block = backbone.get_layer(f"decoder_block_{i}")
        for ours, theirs in ((f"model.layers.{i}.layer_scalar", block.layer_scalar),
                             (f"model.layers.{i}.router.per_expert_scale", block.moe_expert_bank.per_expert_scale)):
            assert ckpt.weights[ours].dtype == mx.bfloat16
            ref = keras.ops.convert_to_numpy(keras.ops.cast(theirs, "float32")).reshape(-1)
            assert np.array_equal(np.array(ckpt.weights[ours].astype(mx.float32)), ref), ours


def test_what_gemma4_cannot_express_is_named():
    base = dict(BACKBONES["pattern"], vocabulary_size=64)
    last_sliding = "layer_types makes the last layer 'sliding_attention'"
    for change, words in ((dict(layer_types=[S, S, F, S, S, S]), last_sliding),
                          (dict(use_sliding_window_attention=False), "use_sliding_window_attention is false"),
                          (dict(local_rope_scaling_factor=2.0), "local_rope_scaling_factor 2.0"),
                          (dict(is_embedding_model=True), "is_embedding_model is true"),
                          (dict(attention_logit_soft_cap=50.0), "attention_logit_soft_cap is 50.0")):
        with pytest.raises(UserError, match=words):
            keras_convert.hf_config("Gemma4Backbone", dict(base, **change))


# Gemma 3n: AltUp (4 streams), LAuReL, Gaussian top-k sparsity on the first layer, per-layer MLP
# widths, per-layer embeddings, the last two layers reusing KV (one of each kind).
GEMMA3N = dict(text_hidden_size=32, num_hidden_layers=6, pad_token_id=0, num_attention_heads=4, num_key_value_heads=2,
               head_dim=8, intermediate_size=[48, 48, 64, 64, 48, 48], hidden_activation="gelu_approximate",
               layer_types=[S, F, S, S, F, S], sliding_window=4, rope_theta=1_000_000.0, rope_local_base_freq=5_000.0,
               max_position_embeddings=256, hidden_size_per_layer_input=8, altup_num_inputs=4, laurel_rank=4,
               activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0, 0.0, 0.0], num_kv_shared_layers=2,
               final_logit_soft_cap=30.0)


def test_gemma3n_preset_matches_keras_logits(vocab_spm, tmp_path):
    vocab = 1000
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Gemma3nBackbone(text_vocab_size=vocab, vocab_size_per_layer_input=vocab,
                                                dtype="float32", **GEMMA3N)
    rng = np.random.default_rng(0)
    for w in backbone.weights:
        noise = rng.standard_normal(w.shape).astype("float32")
        w.assign(1.0 + 0.3 * noise if w.path.endswith("scale") else 0.08 * noise)
    ids = np.random.default_rng(1).integers(3, vocab, size=(2, SEQ))
    lm = keras_hub.models.Gemma3nCausalLM(backbone=backbone, preprocessor=None)
    ref = keras.ops.convert_to_numpy(lm({"token_ids": ids.astype("int32"), "padding_mask": np.ones_like(ids, bool)}))
    backbone.save_to_preset(str(tmp_path / "p"))
    # Gemma3nTokenizer insists on image / audio tokens; the preset's vocabulary file is what we read.
    (tmp_path / "p" / "assets" / "tokenizer").mkdir(parents=True)
    (tmp_path / "p" / "assets" / "tokenizer" / "vocabulary.spm").write_bytes(vocab_spm)
    model = assert_loads_like_keras(tmp_path / "p", lm, ids, ref, tmp_path)  # gemma3n_backbone/... in the .h5
    assert model.config.model_type == "gemma3n_text" and model.config.altup_num_inputs == 4


def test_what_gemma3n_cannot_express_is_named():
    base = dict(GEMMA3N, text_vocab_size=64, vocab_size_per_layer_input=64)
    for change, words in ((dict(attention_bias=True), "attention_bias is True"),
                          (dict(rope_scaling=8.0), "rope_scaling is 8.0"),
                          (dict(hidden_activation="relu"), "hidden_activation 'relu'"),
                          (dict(final_logit_soft_cap=None), "final_logit_soft_cap is null")):
        with pytest.raises(UserError, match=words):
            keras_convert.hf_config("Gemma3nBackbone", dict(base, **change))
    with pytest.raises(UserError, match="has no text_hidden_size"):
        keras_convert.hf_config("Gemma3nBackbone", {k: v for k, v in base.items() if k != "text_hidden_size"})
