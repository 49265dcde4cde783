"""GGUF export and import of Gemma 4 and Gemma 3n text models, with real llama.cpp as the reader.

Tiny random checkpoints saved by transformers (tests/gemma4_tiny.py) go through `convert_to_gguf`;
llama-cpp-python (whose llama.cpp has the gemma4 and gemma3n architectures) loads the file and must
give our token ids, our logits within its own numerics and our greedy tokens; our GGUF import must
give back our logits. The shapes are the E2B-like one (per-layer embeddings, KV sharing, double-wide
MLP), the MoE one (k == v, experts beside the MLP), the multimodal Gemma 4 checkpoint (text only) and
Gemma 3n (AltUp, LAuReL, sparsity, KV sharing),
each adjusted where llama.cpp hard-codes a hyper-parameter (see `VARIANTS`).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma.convert.gguf import write_gguf
from mlx_gemma.convert.spm import tokenizer_model_from_gguf_fields
from mlx_gemma.errors import UserError
from mlx_gemma.tokenizer import GemmaTokenizer

import gemma4_tiny as g4
from llamacpp_refs import assert_same_q8_0_files, assert_tokenizes_like_us, llamacpp_q8_0

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp "
                                                    "from source; install a prebuilt wheel to run these tests)")

S, F = g4.S, g4.F
VOCAB = 384
N3N = 22  # llama.cpp's gemma3n computes keys/values in exactly the first 20 layers: 22 layers, 2 shared
VARIANTS = {
    # gemma4_tiny's E2B shape, with layer types llama.cpp's KV reuse agrees with: it maps a shared
    # sliding layer to the second-to-last unshared layer and a shared full one to the last.
    "gemma4_e2b": dict(vocab_size_per_layer_input=VOCAB, layer_types=[S, S, F, S, F, S, S, F]),
    "gemma4_moe": {},
    # Gemma4ForConditionalGeneration (text weights under model.language_model), exported text only
    "gemma4_multimodal": dict(vocab_size_per_layer_input=VOCAB, layer_types=[S, S, S, F, S, F]),
    # llama.cpp fixes laurel_rank 64, per-layer input 256, sparsity 0.95 on the first 10 layers and
    # 20 KV layers. Its Gaussian top-k divides the variance by n - 1 where transformers divides by n:
    # the cut-off moves by sqrt(n / (n - 1)), 0.5% for a 96-wide MLP (max |Δlogit| 1.5 on these
    # random weights, measured), 0.05% at width 1024 (0.09), 0.006% on the real E2B (8192): a width of
    # 1024 keeps that numerics difference small enough to test the conversion.
    "gemma3n": dict(num_hidden_layers=N3N, layer_types=[F if i % 5 == 4 else S for i in range(N3N)],
                    num_kv_shared_layers=2, hidden_size_per_layer_input=256, vocab_size_per_layer_input=VOCAB,
                    laurel_rank=64, intermediate_size=[1024] * N3N,
                    activation_sparsity_pattern=[0.95] * 10 + [0.0] * (N3N - 10)),
}
# llama.cpp's numerics on the same f32 weights (f32 KV cache): its GELU reads a float16 table, its
# attention and norms accumulate in other orders. Measured max |Δlogit| over 24 random ids (logits
# up to ~3.4): e2b 0.012, moe 0.016, multimodal 0.009, gemma3n 0.094 (its top-k variance, above).
# The bounds leave headroom and stay far below what one wrong convention gives (the n - 1 variance
# alone, at width 96: 1.5).
LOGIT_BOUND = {"gemma4_e2b": 0.05, "gemma4_moe": 0.05, "gemma4_multimodal": 0.05, "gemma3n": 0.25}
F32_KV = dict(type_k=0, type_v=0)  # GGML_TYPE_F32: llama.cpp's default f16 KV cache rounds keys/values


def gemma4_tokenizer_bytes(vocab=VOCAB):
    """A Gemma-4-shaped SentencePiece vocabulary of `vocab` pieces: <pad> <eos> <bos> <unk> at 0-3,
    the turn / tool markers as control pieces, whitespace runs as user-defined pieces, 256 byte
    pieces, and BPE pieces for a few English words and Chinese characters (others fall back to bytes)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|tool_response>",
              "<tool_response|>"]
    types = [3, 3, 3, 2, 3, 3, 3, 3, 3]
    tokens += ["\n", "\n\n", "  ", "   "]
    types += [4, 4, 4, 4]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    normal = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [",", "?", "你", "好", "世", "界", "天",
                                                                        "气", "你好", "世界", "▁你", "▁你好", "天气"]
    for word in ["the", "there", "then", "cat", "sat", "on", "mat", "hi", "user", "model", "system"]:
        for k in range(2, len(word) + 1):
            normal += [word[:k], "▁" + word[:k]]
        normal.append("▁" + word[0])
    normal = list(dict.fromkeys(normal))
    while len(tokens) + len(normal) < vocab:
        normal.append(f"▁x{len(normal)}")
    tokens += normal
    types += [1] * len(normal)
    scores = [0.0] * (len(tokens) - len(normal)) + [-float(i) for i in range(len(normal))]
    return tokenizer_model_from_gguf_fields(tokens[:vocab], scores[:vocab], types[:vocab], 2, 1, 3, 0)


def llama(path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, seed=0, **kwargs)


def llama_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def ours_logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


IDS = [int(i) for i in g4.random_ids(VOCAB, (24,), seed=1)]  # longer than the sliding window (8)


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request, tmp_path_factory):
    """(kind, source HF dir, our f32 model, our tokenizer, f32 GGUF path)."""
    from mlx_gemma.export import convert_to_gguf
    from mlx_gemma.loading import load

    kind = request.param
    src = tmp_path_factory.mktemp(kind) / "hf"
    g4.save(g4.make_hf_model(kind, vocab_size=VOCAB, **VARIANTS[kind]), src)
    GemmaTokenizer.from_bytes(gemma4_tokenizer_bytes()).save(src)
    model, tok = load(str(src), dtype="float32")
    path = convert_to_gguf(src, src.parent / f"{kind}-f32.gguf", out_type="f32")
    return kind, src, model, tok, path


def test_file_uses_gguf_py_names_and_llamacpp_loads_it(case):
    import gguf

    kind, _, _, _, path = case
    arch = gguf.MODEL_ARCH.GEMMA3N if kind == "gemma3n" else gguf.MODEL_ARCH.GEMMA4
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == gguf.MODEL_ARCH_NAMES[arch]
    for t in reader.tensors:
        base = t.name.rsplit(".", 1)[0]  # without .weight / .scale
        generic = ".".join(["blk.{bid}"] + base.split(".")[2:]) if base.startswith("blk.") else base
        assert generic in allowed, t.name
    llm = llama(path)
    assert llm.n_vocab() == VOCAB


# A Gemma 4 conversation: native system turn, Chinese with characters outside the vocabulary (bytes),
# whitespace runs, an emoji.
CHAT = [dict(role="system", content="用中文回答。"), dict(role="user", content="你好 there, cat?"),
        dict(role="assistant", content="天气  then\n\nthe end"), dict(role="user", content="再说一遍 🙂")]


def test_tokenizer_ids_equal_ours_on_chinese_and_chat_markers(case):
    _, _, _, tok, path = case
    chat = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert chat.startswith("<bos><|turn>system\n")
    texts = ["the cat sat on the mat", "你好，世界！今天天气怎么样？ then\n\n  there   ", chat[len("<bos>"):],
             "<|tool_response>天气<tool_response|>"]
    llm = llama(path, vocab_only=True)
    assert_tokenizes_like_us(llm, tok, texts, ("<|turn>", "<turn|>", "<eos>", "<bos>", "<|tool_response>"))
    assert llm.metadata["tokenizer.chat_template"] == (tok.chat_template or tok.chat_markers.template)


def test_gemma4_tool_markers_visible_to_llamacpp_and_special_again_on_import(case):
    """llama.cpp's converter stores Gemma 4's tool / channel markers as user-defined pieces so that
    its chat parser sees them in the output; ours does too, and our import makes them control again."""
    from mlx_gemma.loading import load

    kind, _, _, tok, path = case
    marker = tok.piece_to_id("<tool_response|>")  # (llama.cpp makes <|tool_response>, an end of generation, control)
    shown = llama(path, vocab_only=True).detokenize([marker], special=False)
    assert shown == (b"" if kind == "gemma3n" else b"<tool_response|>")  # gemma3n: SentencePiece, as Gemma 3
    back_tok = load(str(path), dtype="float32")[1]
    assert back_tok.is_special(marker) and tok.is_special(marker)


def test_f32_logits_within_llamacpp_numerics(case):
    kind, _, model, _, path = case
    theirs = llama_logits(llama(path, logits_all=True, **F32_KV), IDS)
    mine = ours_logits(model, IDS)
    diff = np.abs(theirs - mine).max()
    assert diff < LOGIT_BOUND[kind], diff
    clear = np.diff(np.sort(mine, axis=-1)[:, -2:], axis=-1)[:, 0] > 2 * LOGIT_BOUND[kind]
    assert clear.any()  # the argmax check below is not empty (the greedy test compares every step)
    assert (theirs.argmax(-1)[clear] == mine.argmax(-1)[clear]).all()


def test_greedy_tokens_equal_over_16_steps(case):
    from mlx_gemma.generation import generate_step

    _, _, model, _, path = case
    prompt = IDS[:12]
    mine = [int(t[0]) for t in generate_step(model, mx.array([prompt]), max_tokens=16)]
    llm = llama(path, logits_all=True, **F32_KV)
    llm.reset()
    llm.eval(prompt)
    theirs = []
    for _ in range(16):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert theirs == mine
    assert len(set(mine)) > 2, "a constant answer would prove little"


def test_import_of_our_f32_file_gives_our_logits(case):
    from mlx_gemma.loading import load

    _, _, model, tok, path = case
    back, back_tok = load(str(path), dtype="float32")
    np.testing.assert_array_equal(ours_logits(back, IDS), ours_logits(model, IDS))
    assert back.config.layer_types == model.config.layer_types
    assert back_tok.encode("你好 the cat") == tok.encode("你好 the cat")


def test_f16_file_read_alike_by_llamacpp_and_us(case):
    """llama.cpp on the f16 file vs our import of that same file (the same rounded weights)."""
    import gguf

    from mlx_gemma.export import convert_to_gguf
    from mlx_gemma.loading import load

    kind, src, _, _, _ = case
    path = convert_to_gguf(src, src.parent / f"{kind}-f16.gguf", out_type="f16")
    back, _ = load(str(path), dtype="float32")
    theirs = llama_logits(llama(path, logits_all=True, **F32_KV), IDS)
    # llama.cpp also rounds the activations to f16 before each f16 matmul (measured: e2b 0.024,
    # moe 0.015, multimodal 0.017, gemma3n 0.22).
    assert np.abs(theirs - ours_logits(back, IDS)).max() < 2 * LOGIT_BOUND[kind]
    # our reading of the stored weights is gguf-py's reading of them
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for gguf_name, ours in (("token_embd.weight", back.model.embed_tokens.weight),
                            ("blk.0.attn_q.weight", back.model.layers[0].self_attn.q_proj.weight)):
        t = stored[gguf_name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F16, gguf_name
        np.testing.assert_array_equal(np.array(ours), gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape))


def test_our_q8_0_file_equals_llamacpp_own_quantization(case):
    """Our q8_0 file vs llama.cpp quantizing our f32 file itself: the same tensors, types and blocks.
    (Logits are not compared: llama.cpp also rounds activations to 8 bits in q8_0 matmuls, which moves
    these random networks' logits by 0.5 to 2.2, measured.)"""
    import gguf

    from mlx_gemma.export import convert_to_gguf
    from mlx_gemma.loading import load

    kind, src, _, _, f32_path = case
    ours_path = convert_to_gguf(src, src.parent / f"{kind}-q8_0.gguf", out_type="q8_0")
    theirs_path = src.parent / f"{kind}-llamacpp-q8_0.gguf"
    llamacpp_q8_0(llama_cpp, f32_path, theirs_path)
    assert_same_q8_0_files(ours_path, theirs_path)
    back, _ = load(str(ours_path), dtype="float32")
    t = next(t for t in gguf.GGUFReader(ours_path).tensors if t.name == "token_embd.weight")
    np.testing.assert_array_equal(np.array(back.model.embed_tokens.weight),
                                  gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.data.shape[0], -1))
    assert llama(ours_path).n_vocab() == VOCAB


# ---- configs llama.cpp would run differently are refused in one line -------------------------------------


def _refused(kind, **overrides):
    from mlx_gemma.config import GemmaConfig

    hf = g4.make_hf_model(kind, vocab_size=VOCAB, **overrides)
    config = GemmaConfig.from_dict(hf.config.to_dict()).to_dict()
    with pytest.raises(UserError) as e:
        write_gguf({}, config, gemma4_tokenizer_bytes(), "/nonexistent/never-written.gguf", out_type="f32")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_kv_sharing_llamacpp_maps_differently_is_refused():
    # gemma4_tiny's own E2B types: the last unshared layer is sliding, so llama.cpp would feed the
    # shared full layers a sliding layer's keys.
    assert "sliding then full" in _refused("gemma4_e2b", vocab_size_per_layer_input=VOCAB)


@pytest.mark.parametrize("overrides, word", [
    (dict(laurel_rank=8), "laurel_rank=8"),
    (dict(hidden_size_per_layer_input=8), "hidden_size_per_layer_input=8"),
    (dict(num_kv_shared_layers=0, num_hidden_layers=N3N - 1), "exactly the first 20"),
    (dict(activation_sparsity_pattern=[0.95] * 2 + [0.0] * (N3N - 2)), "activation_sparsity_pattern"),
])
def test_gemma3n_hyperparameters_llamacpp_hard_codes_are_refused(overrides, word):
    base = {**VARIANTS["gemma3n"], "intermediate_size": [96] * N3N}
    if overrides.get("num_hidden_layers"):
        n = overrides["num_hidden_layers"]
        base.update(layer_types=base["layer_types"][:n], intermediate_size=[96] * n,
                    activation_sparsity_pattern=[0.95] * 10 + [0.0] * (n - 10))
    assert word in _refused("gemma3n", **{**base, **overrides})


def test_cli_refusal_is_one_line_and_writes_nothing(tmp_path):
    from click.testing import CliRunner

    from mlx_gemma.cli import main

    src = tmp_path / "hf"
    g4.save(g4.make_hf_model("gemma4_e2b", vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB), src)
    GemmaTokenizer.from_bytes(gemma4_tokenizer_bytes()).save(src)
    r = CliRunner().invoke(main, ["convert-to-gguf", str(src), str(tmp_path / "out.gguf"), "--type", "f32"])
    assert r.exit_code == 1, r.output
    assert len(r.output.strip().splitlines()) == 1 and "sliding then full" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no output, no temporary file


def test_import_of_a_file_missing_a_tensor_is_one_line_naming_it(case, tmp_path):
    from mlx_gemma.export import dense_weights
    from mlx_gemma.loading import load

    _, src, _, tok, _ = case
    model, _ = load(str(src), dtype="float32")
    tensors = {k: np.array(v) for k, v in dense_weights(model).items() if k != "model.layers.1.self_attn.q_proj.weight"}
    path = tmp_path / "incomplete.gguf"
    write_gguf(tensors, model.config.to_dict(), tok.model_bytes, path, "f32")
    with pytest.raises(UserError) as e:
        load(str(path))
    assert "layers.1.self_attn.q_proj" in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
