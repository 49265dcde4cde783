"""GGUF import/export against independent references.

- Dequantisers vs gguf-py's `gguf.quants.dequantize` on random blocks, every supported type.
- Name mapping vs gguf-py's own HF->GGUF tensor-name map and transformers' tiny Gemma models
  (real HF names and shapes), for gemma, gemma2 and gemma3; files written by gguf.GGUFWriter.
- write_gguf -> read_gguf round trips for every out_type, checked also with gguf.GGUFReader.
- The real Gemma 3 270M GGUF vs transformers' own GGUF loader, tensor by tensor and config.
"""

import os

import mlx_gemma  # noqa: F401  (before anything imports mlx.core)
import numpy as np
import pytest

import gguf
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import quants  # noqa: E402

from mlx_gemma.convert.gguf import GGUFCheckpoint, read_gguf, write_gguf  # noqa: E402
from mlx_gemma.convert.gguf_quants import BLOCK_LAYOUT, GGMLType, dequantize, quantize_q8_0  # noqa: E402
from mlx_gemma.errors import UserError  # noqa: E402

ALL_TYPES = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]
# Byte offsets of the float16 scale fields in each block layout (ggml-common.h).
_F16_FIELDS = {QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q8_0: [0], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}


def random_raw(qtype, n_elements, rng):
    """Random raw data of `qtype` for n_elements weights: random bytes, but finite small f16 scales."""
    block_size, block_bytes = quants.GGML_QUANT_SIZES[qtype]
    n_blocks = n_elements // block_size
    if qtype == QT.F32:
        return rng.standard_normal(n_elements).astype(np.float32).view(np.uint8)
    if qtype == QT.F16:
        return rng.standard_normal(n_elements).astype(np.float16).view(np.uint8)
    if qtype == QT.BF16:
        return (rng.standard_normal(n_elements).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in _F16_FIELDS.get(qtype, []):
        blocks[:, off : off + 2] = (rng.standard_normal((n_blocks, 1)) * 0.02).astype(np.float16).view(np.uint8)
    return blocks.reshape(-1)


# ---------------------------------------------------------------------------------------------
# Dequantisers and the Q8_0 quantiser
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_reference(qtype):
    rng = np.random.default_rng(int(qtype))
    n = 256 * 37
    raw = random_raw(qtype, n, rng)
    ours = dequantize(raw, int(qtype), n)
    ref = quants.dequantize(raw.reshape(-1, quants.GGML_QUANT_SIZES[qtype][1]), qtype).reshape(-1)
    assert ours.dtype == np.float32 and ours.shape == (n,)
    assert np.abs(ref).max() > 0
    np.testing.assert_array_equal(ours, ref)  # same float32 operations: bit-exact


def test_block_layouts_match_gguf():
    for t in GGMLType:
        assert BLOCK_LAYOUT[t] == quants.GGML_QUANT_SIZES[QT(int(t))], t.name


def test_quantize_q8_0_matches_gguf_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 256)).astype(np.float32) * 3
    x[0, :32] = 0  # all-zero block: d = 0
    x[1, :32] = np.arange(32) - 15.5  # values landing on .5 after scaling exercise the rounding
    x[2, :64] = np.linspace(-127, 127, 64, dtype=np.float32) + 0.5
    ours = quantize_q8_0(x)
    assert ours.shape == (48, 256 // 32 * 34)
    np.testing.assert_array_equal(ours, quants.quantize(x, QT.Q8_0))
    np.testing.assert_allclose(dequantize(ours, GGMLType.Q8_0, x.size).reshape(x.shape), x, atol=np.abs(x).max() / 127)


# ---------------------------------------------------------------------------------------------
# Tiny models: transformers gives the real HF names/shapes, gguf-py the GGUF names
# ---------------------------------------------------------------------------------------------

GGUF_ARCH = {"gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3_text": gguf.MODEL_ARCH.GEMMA3}
VOCAB = 64


def tiny_config(model_type):
    """A classic (config.json style) tiny config; GQA, head_dim != hidden/heads."""
    c = dict(
        model_type=model_type, vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_attention_heads=2,
        num_key_value_heads=1, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=1024, rope_theta=10000.0,
        bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
    )
    if model_type == "gemma":
        c.update(num_hidden_layers=2)
    if model_type == "gemma2":
        c.update(num_hidden_layers=2, query_pre_attn_scalar=128, sliding_window=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if model_type == "gemma3_text":
        c.update(
            num_hidden_layers=7, query_pre_attn_scalar=128, sliding_window=16, rope_theta=1e6, rope_local_base_freq=10000.0,
            sliding_window_pattern=6, rope_scaling={"rope_type": "linear", "factor": 8.0},
        )
    return c


@pytest.fixture(scope="module")
def hf_tiny():
    """model_type -> (config dict, HF state dict as float32 numpy) from transformers' own classes."""
    import transformers
    import torch
    torch.manual_seed(0)
    out = {}
    for model_type, (cfg_cls, model_cls) in {
        "gemma": ("GemmaConfig", "GemmaForCausalLM"),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
        "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    }.items():
        c = tiny_config(model_type)
        kw = {k: v for k, v in c.items() if k not in ("model_type", "rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern")}
        if model_type == "gemma3_text":
            kw["rope_parameters"] = {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            }
        else:
            kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
        model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw))
        sd = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        rng = np.random.default_rng(0)
        for k, v in sd.items():  # HF inits norms at 0 / 1: randomise so the +-1 rule is visible
            sd[k] = rng.standard_normal(v.shape).astype(np.float32) * 0.1
        out[model_type] = (c, sd, model.config)
    return out


def spm_model_bytes(n_pieces=VOCAB):
    """A small SentencePiece ModelProto: control, unknown, user-defined (with U+2581), byte, normal pieces."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    specials = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 2), ("<start_of_turn>", 3), ("\u2581\u2581", 4), ("<0x0A>", 6)]
    for i in range(n_pieces):
        p = m.pieces.add()
        if i < len(specials):
            p.piece, p.type = specials[i]
            p.score = 0.0
        else:
            p.piece, p.type, p.score = f"\u2581tok{i}", 1, -float(i)
    m.trainer_spec.pad_id, m.trainer_spec.eos_id, m.trainer_spec.bos_id, m.trainer_spec.unk_id = 0, 1, 2, 3
    return m.SerializeToString()


def write_raw_gguf(path, model_type, config, sd, types, *, arch=None, drop_tokenizer=False, extra=None):
    """Write `sd` with gguf.GGUFWriter under gguf-py's names, the i-th 2-D tensor as types[i % len(types)].

    Returns {HF name: reference float32 tensor in HF form}: gguf-py's dequantisation of what
    was written, minus 1 for norm weights (llama.cpp stores 1 + w).
    """
    arch_name = arch or gguf.MODEL_ARCH_NAMES[GGUF_ARCH[model_type]]
    name_map = gguf.get_tensor_name_map(GGUF_ARCH[model_type], config["num_hidden_layers"])
    w = gguf.GGUFWriter(str(path), arch_name)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    if model_type != "gemma":
        w.add_sliding_window(config["sliding_window"])
    if model_type == "gemma3_text":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(8.0)
    for key, value in (extra or {}).items():
        w.add_uint32(key, value)
    if not drop_tokenizer:
        w.add_tokenizer_model("llama")
        w.add_token_list([f"t{i}" for i in range(VOCAB)])
        w.add_token_scores([float(-i) for i in range(VOCAB)])
        w.add_token_types([3, 3, 3, 2] + [1] * (VOCAB - 4))
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_pad_token_id(0)
        w.add_unk_token_id(3)
    rng = np.random.default_rng(1)
    expected = {}
    matrices = 0
    for hf_name, t in sd.items():
        gguf_name = name_map.get_name(hf_name[: -len(".weight")]) + ".weight"
        is_norm = gguf_name.endswith("norm.weight")
        qtype = QT.F32 if t.ndim == 1 else types[matrices % len(types)]
        matrices += t.ndim == 2
        if qtype in (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS):
            # gguf-py cannot quantise k-quants and IQ types: random blocks
            raw = random_raw(qtype, t.size, rng)
        elif qtype == QT.F32:
            raw = (t + 1 if is_norm else t).astype(np.float32).view(np.uint8)
        else:
            raw = quants.quantize(t, qtype).view(np.uint8)
        raw = raw.reshape(*t.shape[:-1], -1)
        w.add_tensor(gguf_name, raw, raw_dtype=qtype)
        with np.errstate(all="ignore"):  # random Q2_K blocks may hold inf scales
            ref = quants.dequantize(raw, qtype).reshape(t.shape).astype(np.float32)
        expected[hf_name] = ref - 1 if is_norm else ref
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


ARCHS = ["gemma", "gemma2", "gemma3_text"]
CONFIG_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
    "hidden_activation", "query_pre_attn_scalar", "sliding_window", "layer_types", "attn_logit_softcapping",
    "final_logit_softcapping",
]


def assert_config_matches(ours, config, hf_config):
    """ours vs the classic tiny config and vs transformers' config of the same model."""
    hf = hf_config.to_dict()
    assert ours["model_type"] == config["model_type"]
    for key in CONFIG_FIELDS:
        if key in hf:
            assert ours.get(key) == hf[key], key
    assert ours["rms_norm_eps"] == pytest.approx(config["rms_norm_eps"], rel=1e-6)
    rope = hf["rope_parameters"]
    full = rope.get("full_attention", rope)
    assert ours["rope_theta"] == full["rope_theta"]
    if config["model_type"] == "gemma3_text":
        assert ours["rope_local_base_freq"] == rope["sliding_attention"]["rope_theta"]
        assert ours["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}


@pytest.mark.parametrize("model_type", ARCHS)
def test_read_raw_gguf_every_type_and_name(tmp_path, hf_tiny, model_type):
    config, sd, hf_config = hf_tiny[model_type]
    path = tmp_path / "raw.gguf"
    types = [t for t in ALL_TYPES if t != QT.F32] + [QT.F32]
    expected = write_raw_gguf(path, model_type, config, sd, types)
    ck = read_gguf(path)
    assert isinstance(ck, GGUFCheckpoint)
    assert set(ck.tensors) == set(sd)  # every HF tensor transformers has, nothing else
    for name, ref in expected.items():
        assert ck.tensors[name].dtype == np.float32 and ck.tensors[name].shape == sd[name].shape, name
        np.testing.assert_array_equal(ck.tensors[name], ref, err_msg=name)
    assert {ck.tensor_types[n] for n in ck.tensors} == {t.name for t in ALL_TYPES}
    assert_config_matches(ck.config, config, hf_config)
    assert ck.tokenizer["tokens"][:2] == ["t0", "t1"] and ck.tokenizer["bos_id"] == 2 and ck.tokenizer["unk_id"] == 3
    assert ck.tokenizer["token_types"].tolist()[:5] == [3, 3, 3, 2, 1]


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("model_type", ARCHS)
def test_write_read_round_trip(tmp_path, hf_tiny, model_type, out_type):
    config, sd, hf_config = hf_tiny[model_type]
    path = tmp_path / "model.gguf"
    write_gguf(sd, config, spm_model_bytes(), path, out_type=out_type)
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temp file left behind
    ck = read_gguf(path)
    assert set(ck.tensors) == set(sd)
    for name, t in sd.items():
        got = ck.tensors[name]
        if t.ndim == 1 or out_type == "f32":
            # Norms round-trip through +1/-1 in float32: exact up to that rounding.
            np.testing.assert_allclose(got, t, rtol=0, atol=1e-7 if t.ndim == 1 else 0, err_msg=name)
        elif out_type == "f16":
            np.testing.assert_array_equal(got, t.astype(np.float16).astype(np.float32), err_msg=name)
        elif out_type == "bf16":
            np.testing.assert_allclose(got, t, rtol=2**-8, err_msg=name)
        else:
            ref = quants.dequantize(quants.quantize(t, QT.Q8_0), QT.Q8_0)
            np.testing.assert_array_equal(got, ref, err_msg=name)
    assert_config_matches(ck.config, config, hf_config)
    tok = ck.tokenizer
    assert tok["tokens"][5] == "  "  # user-defined piece: U+2581 stored as spaces, as llama.cpp does
    assert tok["tokens"][10] == "\u2581tok10" and tok["scores"][10] == -10.0
    assert tok["token_types"].tolist()[:7] == [3, 3, 3, 2, 3, 4, 6]
    assert (tok["pad_id"], tok["eos_id"], tok["bos_id"], tok["unk_id"]) == (0, 1, 2, 3)
    assert (tok["add_bos_token"], tok["add_eos_token"], tok["add_space_prefix"]) == (True, False, False)

    # What llama.cpp sees, through gguf-py's own reader: types and stored norms (1 + w).
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in reader.tensors}
    want = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}[out_type]
    assert types["output_norm.weight"] == QT.F32 and types["blk.0.attn_q.weight"] == want
    stored = {t.name: t for t in reader.tensors}["output_norm.weight"].data
    np.testing.assert_allclose(stored, sd["model.norm.weight"] + 1, rtol=0, atol=0)
    assert reader.fields["general.architecture"].contents() == gguf.MODEL_ARCH_NAMES[GGUF_ARCH[model_type]]


def test_write_gguf_accepts_transformers5_rope_parameters(tmp_path, hf_tiny):
    config, sd, hf_config = hf_tiny["gemma3_text"]
    hf_dict = hf_config.to_dict()
    write_gguf(sd, hf_dict, spm_model_bytes(), tmp_path / "m.gguf", out_type="f32")
    ck = read_gguf(tmp_path / "m.gguf")
    assert_config_matches(ck.config, config, hf_config)


def test_write_gguf_is_strict(tmp_path, hf_tiny):
    config, sd, _ = hf_tiny["gemma2"]
    bad = dict(sd)
    del bad["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(UserError, match="model.layers.1.mlp.up_proj.weight"):
        write_gguf(bad, config, spm_model_bytes(), tmp_path / "m.gguf")
    bad = dict(sd, **{"model.layers.0.self_attn.q_proj.weight": np.zeros((3, 256), np.float32)})
    with pytest.raises(UserError, match="q_proj.weight has shape"):
        write_gguf(bad, config, spm_model_bytes(), tmp_path / "m.gguf")
    with pytest.raises(UserError, match="extra.weight"):
        write_gguf(dict(sd, **{"extra.weight": np.zeros(3, np.float32)}), config, spm_model_bytes(), tmp_path / "m.gguf")
    with pytest.raises(UserError, match="query_pre_attn_scalar"):
        write_gguf(sd, dict(config, query_pre_attn_scalar=100), spm_model_bytes(), tmp_path / "m.gguf")
    with pytest.raises(UserError, match="out_type"):
        write_gguf(sd, config, spm_model_bytes(), tmp_path / "m.gguf", out_type="q4_k")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_gguf(tmp_path, hf_tiny):
    config, sd, _ = hf_tiny["gemma3_text"]
    path = tmp_path / "small.gguf"
    write_raw_gguf(path, "gemma3_text", config, sd, [QT.Q8_0])
    return path, config, sd


def _raises_naming(path, *fragments):
    with pytest.raises(UserError) as e:
        read_gguf(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_truncated_files(small_gguf, tmp_path):
    path, _, _ = small_gguf
    data = path.read_bytes()
    for cut, what in [(2, "not a GGUF"), (20, "truncated"), (700, "truncated"), (len(data) - 10, "truncated: tensor")]:
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        _raises_naming(p, what)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _raises_naming(empty, "empty")
    _raises_naming(tmp_path / "nope.gguf", "no such file")


def test_wrong_magic(small_gguf, tmp_path):
    path, _, _ = small_gguf
    p = tmp_path / "magic.gguf"
    p.write_bytes(b"GGML" + path.read_bytes()[4:])
    _raises_naming(p, "not a GGUF file")


def test_unsupported_architecture(tmp_path, hf_tiny):
    config, sd, _ = hf_tiny["gemma2"]
    p = tmp_path / "llama.gguf"
    write_raw_gguf(p, "gemma2", config, sd, [QT.F16], arch="llama")
    _raises_naming(p, "'llama'", "not supported")


@pytest.mark.parametrize("qtype", [QT.Q2_K, QT.Q3_K, QT.IQ4_NL, QT.IQ4_XS])
def test_unsupported_tensor_type(tmp_path, hf_tiny, qtype):
    """README: IQ-type, Q2_K and Q3_K tensors are refused, naming the tensor and its type."""
    config, sd, _ = hf_tiny["gemma"]
    p = tmp_path / f"{qtype.name}.gguf"
    write_raw_gguf(p, "gemma", config, sd, [qtype])
    _raises_naming(p, "token_embd.weight", qtype.name, "cannot dequantize")


def test_missing_tokenizer_metadata(tmp_path, hf_tiny):
    config, sd, _ = hf_tiny["gemma"]
    p = tmp_path / "notok.gguf"
    write_raw_gguf(p, "gemma", config, sd, [QT.F16], drop_tokenizer=True)
    _raises_naming(p, "tokenizer.ggml.tokens")


def test_shape_and_name_mismatches(tmp_path, hf_tiny):
    config, sd, _ = hf_tiny["gemma2"]
    p = tmp_path / "ff.gguf"
    write_raw_gguf(p, "gemma2", dict(config, intermediate_size=1024), sd, [QT.F16])  # metadata lies about ffn size
    _raises_naming(p, "blk.0.ffn_gate.weight", "shape")
    fewer = {k: v for k, v in sd.items() if not k.startswith("model.layers.1.")}
    p = tmp_path / "missing.gguf"
    write_raw_gguf(p, "gemma2", config, fewer, [QT.F16])
    _raises_naming(p, "missing tensor blk.1.")


# ---------------------------------------------------------------------------------------------
# The real Gemma 3 270M GGUF vs transformers' own GGUF loader
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_ckpt(gguf_path):
    return read_gguf(gguf_path)


@pytest.fixture(scope="module")
def transformers_270m(gguf_path):
    """(state dict as numpy, config dict) from transformers' GGUF loader.

    from_pretrained parses the file twice (config, then weights) with gguf.GGUFReader, ~25 s
    each on these machines; both parses see the same bytes, so share one reader object.
    """
    import torch
    import transformers
    readers = {}

    def shared_reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real_reader(path, *args, **kwargs)
        return readers[key]

    real_reader = gguf.GGUFReader
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", shared_reader)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
        )
    assert len(readers) == 1  # the patch took: one parse served both of transformers' reads
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = model.config.to_dict()
    del model
    return sd, cfg


@pytest.mark.slow
def test_real_270m_matches_transformers(real_ckpt, transformers_270m):
    sd, hf = transformers_270m
    ours = real_ckpt.tensors
    # transformers materialises the tied lm_head; we keep it tied (tie_word_embeddings=True).
    assert set(ours) == set(sd) - {"lm_head.weight"}
    assert real_ckpt.config["tie_word_embeddings"] is True and hf["tie_word_embeddings"] is True
    worst = 0.0
    for name, t in ours.items():
        assert t.shape == sd[name].shape and t.dtype == np.float32, name
        worst = max(worst, float(np.abs(t - sd[name]).max()))
    assert worst <= 1e-6
    c = real_ckpt.config
    for key in CONFIG_FIELDS + ["model_type"]:
        if key in hf:
            assert c.get(key) == hf[key], key
    assert c["rms_norm_eps"] == pytest.approx(hf["rms_norm_eps"], rel=1e-6)
    assert c["rope_theta"] == hf["rope_parameters"]["full_attention"]["rope_theta"] == 1e6
    assert c["rope_local_base_freq"] == hf["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert c["rope_scaling"] is None and hf["rope_parameters"]["full_attention"]["rope_type"] == "default"
    assert c["sliding_window_pattern"] == hf["_sliding_window_pattern"] == 6
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (18, 640, 4, 1, 256)


@pytest.mark.slow  # reads the real 270M GGUF's tensors
def test_real_270m_metadata(real_ckpt):
    """Cheap checks on the real file that do not need transformers."""
    tok = real_ckpt.tokenizer
    assert len(tok["tokens"]) == real_ckpt.config["vocab_size"] == 262144
    assert (tok["bos_id"], tok["eos_id"], tok["unk_id"], tok["pad_id"]) == (2, 1, 3, 0)
    assert tok["tokens"][2] == "<bos>" and set(np.unique(tok["token_types"])) <= {1, 2, 3, 4, 5, 6}
    assert real_ckpt.tensor_types["model.embed_tokens.weight"] == "Q8_0"
    assert set(real_ckpt.tensor_types.values()) == {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"}
    assert all(t.dtype == np.float32 for t in real_ckpt.tensors.values())


@pytest.mark.slow  # reads the real 270M GGUF's tensors (read_gguf)
def test_real_vocab_round_trips_through_write_gguf(real_ckpt, tmp_path):
    """GGUF vocab -> tokenizer.model (convert.spm) -> write_gguf -> read_gguf keeps every piece.

    A tiny random network carries the real 262,144-piece vocabulary, so the export path sees
    the real user-defined pieces (runs of spaces, stored with literal spaces by llama.cpp).
    """
    import mlx_gemma.convert.spm  # noqa: F401  (a required test dependency: imported, never skipped)
    from mlx_gemma.convert.gguf import tokenizer_model_bytes

    tok = real_ckpt.tokenizer
    vocab = len(tok["tokens"])
    config = dict(tiny_config("gemma3_text"), vocab_size=vocab, hidden_size=32, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=1, head_dim=32, query_pre_attn_scalar=32,
                  rope_scaling=None)
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (vocab, 32), "model.norm.weight": (32,)}
    for n, s in [("self_attn.q_proj", (32, 32)), ("self_attn.k_proj", (32, 32)), ("self_attn.v_proj", (32, 32)),
                 ("self_attn.o_proj", (32, 32)), ("mlp.gate_proj", (32, 32)), ("mlp.up_proj", (32, 32)),
                 ("mlp.down_proj", (32, 32)), ("self_attn.q_norm", (32,)), ("self_attn.k_norm", (32,)),
                 ("input_layernorm", (32,)), ("post_attention_layernorm", (32,)),
                 ("pre_feedforward_layernorm", (32,)), ("post_feedforward_layernorm", (32,))]:
        shapes[f"model.layers.0.{n}.weight"] = s
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    write_gguf(tensors, config, tokenizer_model_bytes(real_ckpt), tmp_path / "v.gguf", out_type="f32")
    back = read_gguf(tmp_path / "v.gguf").tokenizer
    assert back["tokens"] == tok["tokens"]
    np.testing.assert_array_equal(back["scores"], tok["scores"])
    # llama.cpp types Gemma 3's <unk> CONTROL (from tokenizer_config); SentencePiece has it UNKNOWN.
    want_types = tok["token_types"].copy()
    want_types[tok["unk_id"]] = 2
    np.testing.assert_array_equal(back["token_types"], want_types)
    for key in ("bos_id", "eos_id", "unk_id", "pad_id", "add_bos_token", "add_eos_token", "add_space_prefix"):
        assert back[key] == tok[key], key
