"""Keras Gemma checkpoints: tiny random KerasHub backbones (Gemma 1, Gemma 2, Gemma 3), saved as a
preset dir and as a `.weights.h5` file, converted by our reader, against Keras' own forward pass
(torch backend, float32); and the vocabulary against keras-hub's GemmaTokenizer.
"""

import io
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported: no TensorFlow, no JAX

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_gemma.cli import main
from mlx_gemma.convert import keras as keras_convert
from mlx_gemma.errors import UserError
from mlx_gemma.loading import load
from mlx_gemma.tokenizer import GemmaTokenizer

import keras_hub
import keras

DATA = Path(__file__).resolve().parent.parent / "data" / "heldout_zh_en.txt"
TEXTS = ["Hello, 世界! 机器学习 is fun.", "福建土楼是分布在福建西南部 the Tulou of Fujian", "  spaces   and\ttabs\n\n",
         "emoji 🤗 and 中文 mixed", "数字 12345 and punctuation：，。！", "<start_of_turn>user\nhi<end_of_turn>"]

# Tiny backbones that exercise every difference: GQA, a sliding window (4) shorter than the
# sequence (12), Gemma 2's soft caps and alternating windows, Gemma 3's q/k norm, 5:1 pattern,
# two RoPE bases and linear scaling on global layers.
COMMON = dict(num_query_heads=4, num_key_value_heads=2, hidden_dim=32, head_dim=8)
BACKBONES = {
    "gemma": ("GemmaBackbone", dict(num_layers=2, intermediate_dim=64, **COMMON)),
    "gemma2": ("GemmaBackbone", dict(num_layers=4, intermediate_dim=64, use_post_ffw_norm=True,
                                     use_post_attention_norm=True, attention_logit_soft_cap=50.0,
                                     final_logit_soft_cap=30.0, use_sliding_window_attention=True,
                                     sliding_window_size=4, **COMMON)),
    "gemma3_text": ("Gemma3Backbone", dict(num_layers=7, intermediate_dim=48, image_size=None,
                                           use_post_ffw_norm=True, use_post_attention_norm=True,
                                           use_sliding_window_attention=True, sliding_window_size=4,
                                           global_rope_scaling_factor=8.0, **COMMON)),
}
SEQ = 12
VOCAB = 1000


@pytest.fixture(scope="module")
def vocab_spm():
    return train_vocab()


def train_vocab(control_symbols=("<start_of_turn>", "<end_of_turn>"), user_defined_symbols=("\n", "\t")) -> bytes:
    """A small Gemma-shaped SentencePiece BPE vocabulary trained on our Chinese + English text."""
    import sentencepiece as spm

    lines = DATA.read_text(encoding="utf-8").splitlines()[:400]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=VOCAB, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", control_symbols=list(control_symbols), user_defined_symbols=list(user_defined_symbols),
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=0.98, normalization_rule_name="identity",
        minloglevel=2)
    return out.getvalue()


def make_backbone(model_type, vocab_size, seed=0):
    """A KerasHub backbone with random weights everywhere (norm scales too: they initialise to 0)."""
    class_name, kwargs = BACKBONES[model_type]
    keras.utils.set_random_seed(seed)
    backbone = getattr(keras_hub.models, class_name)(vocabulary_size=vocab_size, dtype="float32", **kwargs)
    rng = np.random.default_rng(seed)
    for w in backbone.weights:
        scale = 0.3 if w.path.endswith("scale") else 0.08
        w.assign(rng.standard_normal(w.shape).astype("float32") * scale)
    return backbone


def keras_logits(backbone, ids):
    """Keras' fp32 logits (the CausalLM task around `backbone`; Gemma 4's soft cap is the backbone's)."""
    causal_lm_cls = {"GemmaBackbone": keras_hub.models.GemmaCausalLM, "Gemma3Backbone": keras_hub.models.Gemma3CausalLM,
                     "Gemma4Backbone": keras_hub.models.Gemma4CausalLM}[type(backbone).__name__]
    lm = causal_lm_cls(backbone=backbone, preprocessor=None)
    inputs = {"token_ids": ids.astype("int32"), "padding_mask": np.ones_like(ids, dtype="int32")}
    if "position_ids" in backbone.input:  # Gemma 4 takes them as an input
        inputs["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype="int32"), ids.shape)
    return keras.ops.convert_to_numpy(lm(inputs)), lm


def save_preset(backbone, vocab_spm, path):
    """What save_to_preset writes for a CausalLM as Kaggle ships it: backbone + tokenizer assets."""
    tokenizer_cls, kwargs = {
        "GemmaBackbone": (keras_hub.models.GemmaTokenizer, {}),
        "Gemma3Backbone": (keras_hub.models.Gemma3Tokenizer, {"has_vision_tokens": False}),
        "Gemma4Backbone": (keras_hub.models.Gemma4Tokenizer, {"has_vision_tokens": False, "has_video_tokens": False}),
    }[type(backbone).__name__]
    backbone.save_to_preset(str(path))
    tokenizer_cls(proto=vocab_spm, **kwargs).save_to_preset(str(path))
    return path


def keras_case(make, key, vocab_spm, tmp_path):
    """A random backbone `make(key, vocabulary size)` saved as a preset, its CausalLM, 2 x SEQ random
    ids and Keras' logits on them."""
    vocab_size = GemmaTokenizer.from_bytes(vocab_spm).vocab_size
    backbone = make(key, vocab_size)
    ids = np.random.default_rng(1).integers(3, vocab_size, size=(2, SEQ))
    ref, lm = keras_logits(backbone, ids)
    return save_preset(backbone, vocab_spm, tmp_path / "preset"), lm, ids, ref


@pytest.mark.parametrize("model_type", list(BACKBONES))
def test_preset_and_weights_file_match_keras_logits(model_type, vocab_spm, tmp_path):
    preset, lm, ids, ref = keras_case(make_backbone, model_type, vocab_spm, tmp_path)
    assert {"config.json", "model.weights.h5", "tokenizer.json"} <= set(os.listdir(preset))
    assert (preset / "assets" / "tokenizer" / "vocabulary.spm").exists()
    assert assert_loads_like_keras(preset, lm, ids, ref, tmp_path).config.model_type == model_type


def assert_loads_like_keras(preset, lm, ids, ref, tmp_path):
    """The preset dir, and the guide's form (the task's save_weights + the vocabulary + the
    preset's config.json), loaded by us: fp32 logits within 1e-4 of Keras' `ref`. Returns the model."""
    model, _ = load(str(preset), dtype="float32")
    assert np.abs(np.array(model(mx.array(ids))) - ref).max() <= 1e-4
    lm.save_weights(str(tmp_path / "tuned.weights.h5"))
    shutil.copy(preset / "assets" / "tokenizer" / "vocabulary.spm", tmp_path / "vocabulary.spm")
    model2, _ = load(str(tmp_path / "tuned.weights.h5"), dtype="float32", vocab=str(tmp_path / "vocabulary.spm"),
                     keras_config=str(preset / "config.json"))
    assert np.abs(np.array(model2(mx.array(ids))) - ref).max() <= 1e-4
    return model


def test_sliding_window_is_shorter_than_the_sequence():
    """The parity test above means something for windows only if they bind."""
    for model_type in ("gemma2", "gemma3_text"):
        assert BACKBONES[model_type][1]["sliding_window_size"] < SEQ


def test_tokenizer_ids_equal_keras_hub(vocab_spm, tmp_path):
    keras_tok = keras_hub.models.GemmaTokenizer(proto=vocab_spm)
    preset = save_preset(make_backbone("gemma", VOCAB), vocab_spm, tmp_path / "preset")
    _, ours = load(str(preset), dtype="float32")
    for text in TEXTS[:-1]:  # Keras' tokenizer does not parse special-token text; HF's and ours do
        assert ours.encode(text, add_bos=False) == keras.ops.convert_to_numpy(keras_tok(text)).tolist(), text
    chinese = [i for i in ours.encode(TEXTS[1], add_bos=False) if not ours.id_to_piece(i).startswith("<0x")]
    assert chinese, "the vocabulary should hold Chinese pieces, not only byte fallback"


def test_cli_convert_preset_and_weights_file(vocab_spm, tmp_path):
    backbone = make_backbone("gemma2", VOCAB)
    ids = np.random.default_rng(2).integers(3, VOCAB, size=(1, SEQ))
    ref, lm = keras_logits(backbone, ids)
    preset = save_preset(backbone, vocab_spm, tmp_path / "preset")
    runner = CliRunner()
    result = runner.invoke(main, ["convert", str(preset), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "tokenizer.model").exists() and (tmp_path / "out" / "tokenizer.json").exists()
    model, tok = load(str(tmp_path / "out"), dtype="float32")
    assert np.abs(np.array(model(mx.array(ids))) - ref).max() <= 1e-4
    # The tokenizer.json written for a SentencePiece-trained vocabulary: transformers reads the same ids.
    import transformers
    os.remove(tmp_path / "out" / "tokenizer.model")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for text in TEXTS:
        assert hf_tok.encode(text) == tok.encode(text), text

    # Keras -> HF in one step, the export script's job: transformers' logits = Keras'.
    result = runner.invoke(main, ["convert-to-hf", str(preset), str(tmp_path / "hf"), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    import torch

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager")
    with torch.no_grad():
        hf_logits = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(hf_logits - ref).max() <= 1e-4

    lm.save_weights(str(tmp_path / "w.weights.h5"))
    (tmp_path / "vocabulary.spm").write_bytes(vocab_spm)
    result = runner.invoke(main, ["convert", str(tmp_path / "w.weights.h5"), str(tmp_path / "out2"),
                                  "--vocab", str(tmp_path / "vocabulary.spm"), "--config", str(preset)])
    assert result.exit_code == 0, result.output
    # Without the vocabulary and architecture: one line saying what to add.
    result = runner.invoke(main, ["generate", "-m", str(tmp_path / "w.weights.h5"), "-p", "hi"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "--vocab" in result.output
    result = runner.invoke(main, ["convert", str(tmp_path / "w.weights.h5"), str(tmp_path / "out3"),
                                  "--vocab", str(tmp_path / "vocabulary.spm"), "--size", "gemma2_9b"])
    assert result.exit_code == 1 and "has shape" in result.output and not (tmp_path / "out3").exists()


def test_unknown_variable_is_one_clear_error(vocab_spm, tmp_path):
    import h5py

    preset = save_preset(make_backbone("gemma", VOCAB), vocab_spm, tmp_path / "preset")
    with h5py.File(preset / "model.weights.h5", "a") as f:
        f["layers/gemma_decoder_block/extra_adapter/vars/0"] = np.zeros((3,), "float32")
    with pytest.raises(UserError, match=r"unknown Keras variable gemma_decoder_block/extra_adapter/0"):
        load(str(preset))


def test_unsupported_backbone_options_are_named(tmp_path):
    base = dict(vocabulary_size=10, num_layers=1, intermediate_dim=8, **COMMON)
    with pytest.raises(UserError, match="PaliGemmaBackbone"):
        keras_convert.hf_config("PaliGemmaBackbone", base)
    g3 = dict(base, use_post_ffw_norm=True, use_post_attention_norm=True)
    with pytest.raises(UserError, match="use_post_ffw_norm is false"):
        keras_convert.hf_config("Gemma3Backbone", dict(g3, use_post_ffw_norm=False))
    with pytest.raises(UserError, match="use_bidirectional_attention"):
        keras_convert.hf_config("Gemma3Backbone", dict(g3, use_bidirectional_attention=True))
    with pytest.raises(UserError, match="local_rope_scaling_factor"):
        keras_convert.hf_config("Gemma3Backbone", dict(g3, local_rope_scaling_factor=2.0))
    with pytest.raises(UserError, match="use_post_ffw_norm=False"):
        keras_convert.hf_config("GemmaBackbone", dict(base, use_post_attention_norm=True))
    with pytest.raises(UserError, match="has no head_dim"):
        keras_convert.hf_config("GemmaBackbone", {k: v for k, v in base.items() if k != "head_dim"})
    # Gemma 2 / 3 27B scale scores by hidden / heads, as keras-hub's HF exporter writes it.
    cfg = keras_convert.hf_config("Gemma3Backbone", dict(g3, query_head_dim_normalize=False))
    assert cfg["query_pre_attn_scalar"] == 32 // 4


def test_sizes_describe_the_released_models():
    """The size table against transformers' own config of the same models (7B: GemmaConfig's defaults;
    others: the fields HF publishes, as transformers' config classes build them)."""
    import transformers
    ours = keras_convert.hf_config(*_with_vocab(keras_convert.SIZES["gemma_7b"], 256000))
    ref = transformers.GemmaConfig()
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size"):
        assert ours[field] == getattr(ref, field), field
    g3 = keras_convert.hf_config(*_with_vocab(keras_convert.SIZES["gemma3_270m"], 262144))
    assert g3["layer_types"].count("full_attention") == 3 and g3["sliding_window"] == 512
    g27 = keras_convert.hf_config(*_with_vocab(keras_convert.SIZES["gemma2_27b"], 256000))
    assert g27["query_pre_attn_scalar"] == 144 and g27["intermediate_size"] == 36864


def test_size_matches_the_embedded_270m(gguf_path):
    """gemma3_270m against the real 270M's GGUF config, as our GGUF reader maps it to HF fields."""
    from mlx_gemma.config import GemmaConfig
    from mlx_gemma.loading import resolve

    real = GemmaConfig.from_dict(json.loads((resolve("gemma-3-270m") / "config.json").read_text()))
    ours = GemmaConfig.from_dict(keras_convert.hf_config(*_with_vocab(keras_convert.SIZES["gemma3_270m"], 262144)))
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "sliding_window", "layer_types", "query_pre_attn_scalar",
                  "rope_theta", "rope_local_base_freq", "vocab_size"):
        assert getattr(ours, field) == getattr(real, field), field


def _with_vocab(size_entry, vocab):
    class_name, cfg = size_entry
    return class_name, dict(cfg, vocabulary_size=vocab)


def test_bfloat16_sharded_preset_is_read_bit_exactly(vocab_spm, tmp_path):
    """bf16 variables (stored by Keras as 2-byte opaque data) come back with the same bits, from a
    preset whose weights Keras split into shards (model.weights.json + model_NNNNN.weights.h5)."""
    class_name, kwargs = BACKBONES["gemma3_text"]
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Gemma3Backbone(vocabulary_size=VOCAB, dtype="bfloat16", **kwargs)
    backbone.save_to_preset(str(tmp_path / "p"), max_shard_size=0.0001)  # GB: ~100 kB shards
    keras_hub.models.Gemma3Tokenizer(proto=vocab_spm, has_vision_tokens=False).save_to_preset(str(tmp_path / "p"))
    assert (tmp_path / "p" / "model.weights.json").exists()
    assert len(list((tmp_path / "p").glob("model_*.weights.h5"))) > 1
    ckpt = keras_convert.read_checkpoint(tmp_path / "p")
    embed = ckpt.weights["model.embed_tokens.weight"]
    assert embed.dtype == mx.bfloat16
    ref = backbone.get_layer("token_embedding").embeddings
    ref_bits = keras.ops.convert_to_numpy(keras.ops.cast(ref, "float32")).view(np.uint32) >> 16
    assert np.array_equal(np.array(embed.view(mx.uint16)), ref_bits.astype(np.uint16))
    q = keras.ops.convert_to_numpy(keras.ops.cast(backbone.get_layer("decoder_block_3").attention.query_dense.kernel,
                                                  "float32"))
    ours = np.array(ckpt.weights["model.layers.3.self_attn.q_proj.weight"].astype(mx.float32))
    assert np.array_equal(ours, q.transpose(0, 2, 1).reshape(-1, q.shape[1]))


def test_weights_file_with_a_size(vocab_spm, tmp_path, monkeypatch):
    """The guide's flow: `backbone.enable_lora(rank=4)`, train, `save_weights`, then the `--size`
    form (a tiny size added to the table). Keras merges the LoRA matrices into the kernels on save."""
    backbone = make_backbone("gemma", VOCAB)
    backbone.enable_lora(rank=4)
    rng = np.random.default_rng(4)
    lora_b = [w for w in backbone.weights if "lora_kernel_b" in w.path]
    assert lora_b
    for w in lora_b:  # zero-initialised: give the adapter an effect
        w.assign(rng.standard_normal(w.shape).astype("float32") * 0.1)
    ids = np.random.default_rng(3).integers(3, VOCAB, size=(1, SEQ))
    ref, lm = keras_logits(backbone, ids)
    lm.save_weights(str(tmp_path / "w.weights.h5"))
    (tmp_path / "vocabulary.spm").write_bytes(vocab_spm)
    monkeypatch.setitem(keras_convert.SIZES, "tiny", BACKBONES["gemma"])
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "w.weights.h5"), str(tmp_path / "out"),
                                       "--vocab", str(tmp_path / "vocabulary.spm"), "--size", "tiny"])
    assert result.exit_code == 0, result.output
    model, tok = load(str(tmp_path / "out"), dtype="float32")
    assert np.abs(np.array(model(mx.array(ids))) - ref).max() <= 1e-4
    assert tok.encode(TEXTS[0]) == GemmaTokenizer.from_bytes(vocab_spm).encode(TEXTS[0])


def test_multimodal_gemma3_preset_reads_its_language_model(vocab_spm, tmp_path):
    from keras_hub.src.models.gemma3.gemma3_vision_encoder import Gemma3VisionEncoder

    encoder = Gemma3VisionEncoder(image_size=16, patch_size=4, num_heads=2, hidden_dim=8, num_layers=1,
                                  intermediate_dim=16, output_dim=32, pool_size=2)
    _, kwargs = BACKBONES["gemma3_text"]
    backbone = keras_hub.models.Gemma3Backbone(vocabulary_size=VOCAB, vision_encoder=encoder,
                                               **dict(kwargs, image_size=16))
    backbone.save_to_preset(str(tmp_path / "p"))
    (tmp_path / "p" / "assets" / "tokenizer").mkdir(parents=True)
    (tmp_path / "p" / "assets" / "tokenizer" / "vocabulary.spm").write_bytes(vocab_spm)
    ckpt = keras_convert.read_checkpoint(tmp_path / "p")
    assert not any("vision" in name for name in ckpt.weights)
    norm = keras.ops.convert_to_numpy(backbone.get_layer("decoder_block_6").pre_ffw_norm.scale)
    assert np.array_equal(np.array(ckpt.weights["model.layers.6.pre_feedforward_layernorm.weight"]), norm)
