"""HF dirs with only tokenizer.json (what transformers 5 saves): they load and convert, with the ids
of transformers' own tokenizer for the dir; and every dir we write carries tokenizer.json too,
which transformers reads to the same ids.

The fixture is a real transformers-5 `save_pretrained` dir of the embedded Gemma 3 270M, built by
transformers from the GGUF (tokenizer and dequantized bf16 weights).
"""

import json
import os

import pytest
from click.testing import CliRunner

from mlx_gemma.cli import main
from mlx_gemma.convert.spm import tokenizer_model_from_gguf_fields
from mlx_gemma.errors import UserError
from mlx_gemma.tokenizer import GemmaTokenizer

from test_tokenizer import CONVERSATIONS, CORPUS, read_gguf_tokenizer_fields

import transformers


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def hf_dir(gguf_path, tmp_path_factory):
    """transformers 5 save_pretrained of the 270M: tokenizer.json + tokenizer_config.json, bf16 weights."""
    import torch

    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    out = tmp_path_factory.mktemp("hf270")
    # AutoTokenizer resolves to this class through the GGUF's config (another ~20 s GGUF read).
    transformers.GemmaTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16,
        quantization_config=transformers.GgufConfig(dequantize=True))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(str(hf_dir))


def assert_same_ids(ours, ref, texts):
    bad = [s for s in texts if ours.encode(s) != ref.encode(s)]
    assert not bad, f"{len(bad)} strings differ, first: {bad[:3]}"


@pytest.mark.slow
def test_transformers5_dir_has_no_tokenizer_model(hf_dir):
    assert (hf_dir / "tokenizer.json").exists() and (hf_dir / "tokenizer_config.json").exists()
    assert not (hf_dir / "tokenizer.model").exists()


@pytest.mark.slow
def test_tokenizer_json_ids_equal_autotokenizer(hf_dir, hf_tok):
    ours = GemmaTokenizer(hf_dir)
    assert_same_ids(ours, hf_tok, CORPUS)
    for s in CORPUS:
        ids = ours.encode(s)
        assert ours.decode(ids) == hf_tok.decode(ids)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (2, 1, 0, 262144)
    assert ours.stop_ids == (1, 106)
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages, tokenize=True) == hf_tok.encode(
            ours.apply_chat_template(messages), add_special_tokens=False)


@pytest.mark.slow
def test_convert_round_trip_is_bit_exact_and_opens_in_transformers(hf_dir, hf_tok, tmp_path):
    import torch
    from safetensors.torch import load_file

    mlx_dir, back = tmp_path / "mlx", tmp_path / "hf"
    cli("convert", hf_dir, mlx_dir, "--dtype", "bfloat16")
    assert (mlx_dir / "tokenizer.model").exists() and (mlx_dir / "tokenizer.json").exists()
    cli("convert-to-hf", mlx_dir, back, "--dtype", "bfloat16")
    assert (back / "tokenizer.model").exists() and (back / "tokenizer.json").exists()

    original, again = (load_file(str(d / "model.safetensors")) for d in (hf_dir, back))
    assert sorted(original) == sorted(again)
    for name in original:  # compared as bit patterns: equal bits, not merely close values
        assert original[name].dtype == again[name].dtype == torch.bfloat16, name
        assert torch.equal(original[name].view(torch.int16), again[name].view(torch.int16)), name

    # transformers opens the result; with tokenizer.model gone it must read our tokenizer.json.
    os.remove(back / "tokenizer.model")
    tok_back = transformers.AutoTokenizer.from_pretrained(str(back))
    for s in CORPUS:
        assert tok_back.encode(s) == hf_tok.encode(s), s
    ids = torch.tensor([hf_tok.encode("The capital of France is 巴黎, and")])
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    back_model = transformers.AutoModelForCausalLM.from_pretrained(str(back), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(ref_model(ids).logits, back_model(ids).logits)


@pytest.mark.slow
def test_load_accepts_tokenizer_json_only_dir(hf_dir, hf_tok):
    from mlx_gemma import load

    model, tok = load(str(hf_dir), dtype="float32")
    assert tok.encode("你好 world") == hf_tok.encode("你好 world")
    assert model.config.model_type == "gemma3_text"


# ---- the tokenizer.json we write, from a tokenizer.model rebuilt from GGUF fields -----------------


@pytest.fixture(scope="module")
def gguf_tok(gguf_path):
    f = read_gguf_tokenizer_fields(gguf_path)
    return GemmaTokenizer.from_bytes(tokenizer_model_from_gguf_fields(
        f["tokens"], f["scores"], f["token_type"], f["bos_token_id"], f["eos_token_id"],
        f["unknown_token_id"], f["padding_token_id"]))


def test_written_tokenizer_json_reads_to_the_same_ids(gguf_tok, tmp_path):
    """Whitespace-run pieces are user-defined in this vocabulary (normal pieces in the HF file above):
    the other half of the mapping. Read by transformers and by us, tokenizer.model removed."""
    gguf_tok.save(tmp_path)
    os.remove(tmp_path / "tokenizer.model")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert_same_ids(gguf_tok, ref, CORPUS)
    for s in CORPUS[::4]:
        assert ref.decode(gguf_tok.encode(s)) == gguf_tok.decode(gguf_tok.encode(s))
    assert_same_ids(GemmaTokenizer(tmp_path), ref, CORPUS)


def test_unsupported_tokenizer_json_is_a_user_error(tmp_path):
    data = {"model": {"type": "BPE", "vocab": {"<unk>": 0, "a": 1}, "merges": [], "unk_token": "<unk>"},
            "normalizer": {"type": "NFKC"}, "pre_tokenizer": None, "added_tokens": []}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"tokenizer.json: normalizer .*NFKC"):
        GemmaTokenizer(tmp_path)
    data["model"]["type"] = "Unigram"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"tokenizer.json: model.type is 'Unigram'"):
        GemmaTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=r"tokenizer.json: invalid JSON"):
        GemmaTokenizer(tmp_path)
    os.remove(tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match=r"tokenizer.model or tokenizer.json"):
        GemmaTokenizer(tmp_path)
