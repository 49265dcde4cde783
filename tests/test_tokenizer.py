"""Tokenizer tests: tokenizer.model rebuilt from the real Gemma 3 GGUF against transformers' own GGUF
tokenizer, the chat format against the official Jinja templates rendered by transformers, the
streaming detokenizer, the chat segments / loss mask, and errors.
"""

import json
import os
import random
import struct

import pytest

from mlx_gemma.convert.spm import tokenizer_model_from_gguf_fields
from mlx_gemma.errors import UserError
from mlx_gemma.tokenizer import GEMMA_CHAT_TEMPLATE, GemmaTokenizer, StreamingDetokenizer

# ---- the official chat templates, as published in Google's Gemma tokenizer_config.json files ----

# google/gemma-*-it and google/gemma-2-*-it (identical in both generations).
GEMMA12_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# google/gemma-3-*-it.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


# ---- reading the GGUF's tokenizer fields ---------------------------------------------------------


def read_gguf_tokenizer_fields(path):
    """The `tokenizer.ggml.*` metadata of a GGUF file. A minimal reader: gguf.GGUFReader takes ~20 s
    on a 262k-token vocabulary because it builds a numpy view per string."""
    import numpy as np

    fixed = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
             11: "<i8", 12: "<f8"}
    with open(path, "rb") as f:
        blob = f.read(64 << 20)  # metadata sits at the start; 64 MiB is far more than any vocabulary
    assert blob[:4] == b"GGUF"
    _, _, kv_count = struct.unpack_from("<IQQ", blob, 4)
    pos = 24

    def string(pos):
        (n,) = struct.unpack_from("<Q", blob, pos)
        return blob[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n

    def value(pos, vtype):
        if vtype == 8:
            return string(pos)
        if vtype == 9:
            etype, count = struct.unpack_from("<IQ", blob, pos)
            pos += 12
            if etype in fixed:
                arr = np.frombuffer(blob, dtype=fixed[etype], count=count, offset=pos)
                return arr.tolist(), pos + arr.nbytes
            items = []
            for _ in range(count):
                item, pos = value(pos, etype)
                items.append(item)
            return items, pos
        arr = np.frombuffer(blob, dtype=fixed[vtype], count=1, offset=pos)
        return arr.item(), pos + arr.nbytes

    fields = {}
    for _ in range(kv_count):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", blob, pos)
        val, pos = value(pos + 4, vtype)
        if key.startswith("tokenizer.ggml."):
            fields[key[len("tokenizer.ggml."):]] = val
    return fields


@pytest.fixture(scope="session")
def gguf_fields(gguf_path):
    return read_gguf_tokenizer_fields(gguf_path)


@pytest.fixture(scope="session")
def tok(gguf_fields):
    f = gguf_fields
    data = tokenizer_model_from_gguf_fields(f["tokens"], f["scores"], f["token_type"], f["bos_token_id"],
                                            f["eos_token_id"], f["unknown_token_id"], f["padding_token_id"])
    return GemmaTokenizer.from_bytes(data)


@pytest.fixture(scope="session")
def hf_gguf_tok(gguf_path):
    """transformers' tokenizer built from the same GGUF: the independent reference.

    `AutoTokenizer.from_pretrained(dir, gguf_file=name)` resolves the class to GemmaTokenizer
    through the model config, which for gemma3 goes through gguf.GGUFReader (~20 s CPU); calling
    the class directly runs the same GGUF tokenizer conversion without that detour."""
    import transformers
    return transformers.GemmaTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                       gguf_file=os.path.basename(gguf_path))


# ---- a varied corpus -------------------------------------------------------------------------------

FRAGMENTS = [
    "Hello", "world", "The quick brown fox jumps over the lazy dog.", "tokenization", "I'm", "don't",
    "你好", "世界", "机器学习模型", "中文，标点。", "日本語のテキスト", "한국어", "Привет, мир", "مرحبا", "नमस्ते",
    "🤗", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "😀😃", "✨", "𝔘𝔫𝔦", "𐍈",
    "0", "7", "42", "3.14159", "1,000,000", "2024-06-01", "0x1F", "1e-5",
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "if __name__ == '__main__':", "SELECT * FROM t WHERE a = 1;", "{\"key\": [1, 2, 3]}", "a->b", "x != y",
    " ", "  ", "   ", "    ", "        ", "\n", "\n\n", "\n\n\n", "\t", "\t\t", " \n ", "\r\n", "\u00a0", "\u200b",
    "<table>", "</table>", "<tr><td>cell</td></tr>", "<b>bold</b>", "<div class=\"x\">", "<p>", "</code>",
    "<start_of_turn>user\n", "<end_of_turn>\n", "<start_of_turn>model\n", "<bos>", "<eos>", "<pad>", "<unk>",
    "<mask>", "<unused0>", "<unused99>", "<start_of_image>", "[multimodal]", "<start_of_turn", "end_of_turn>",
    "<<bos>>", "▁", "▁▁x", "café", "naïve", "e\u0301", "Ⅻ", "ﬁ", "…", "—", "\\n", "%", "&amp;", "`code`",
]


def make_corpus(n=240, seed=0):
    """At least 200 strings: fixed edge cases plus random mixes of the fragments and separators."""
    rng = random.Random(seed)
    corpus = ["", " ", "a", " a", "a ", "  a  b  ", "\n", "\n\nx\n\n", "\t\tindented", "x" * 50, "1234567890",
              "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "<end_of_turn><eos>",
              "Hello,   world!\n\n\n\tTabs\tand    spaces", "emoji 🤗 and 中文 mixed in one line"]
    corpus += FRAGMENTS
    separators = ["", " ", "  ", "\n", "\n\n", "\t", " \t ", "   \n"]
    while len(corpus) < n + len(FRAGMENTS):
        k = rng.randint(1, 8)
        corpus.append("".join(rng.choice(FRAGMENTS) + rng.choice(separators) for _ in range(k)))
    return corpus


CORPUS = make_corpus()


def test_corpus_is_varied():
    assert len(CORPUS) >= 200
    joined = "".join(CORPUS)
    for needle in ("你好", "🤗", "<start_of_turn>", "   ", "\n\n", "\t", "<table>", "42", "def "):
        assert needle in joined


# ---- token-id parity ---------------------------------------------------------------------------------


def test_ids_match_transformers_gguf_tokenizer(tok, hf_gguf_tok):
    """Same ids as transformers' tokenizer for the same GGUF, with and without <bos>.

    The GGUF says add_space_prefix=false and both tokenizers add no dummy prefix: real Gemma
    (tokenizer.model: add_dummy_prefix=false) tokenizes " a" as "▁a" and "a" as "a". The
    explicit checks below pin that down so a prefix-space change on either side fails here.
    """
    mismatches = []
    for s in CORPUS:
        ours, ref = tok.encode(s, add_bos=False), hf_gguf_tok.encode(s, add_special_tokens=False)
        if ours != ref:
            mismatches.append((s, ours, ref))
    assert not mismatches, f"{len(mismatches)} strings differ, first: {mismatches[:3]}"
    for s in CORPUS[:40]:
        assert tok.encode(s) == hf_gguf_tok.encode(s)
    # No dummy prefix: "Hello" is a word-initial piece without "▁", " Hello" carries it.
    assert [tok.id_to_piece(i) for i in tok.encode("Hello world", add_bos=False)] == ["Hello", "▁world"]
    assert [tok.id_to_piece(i) for i in tok.encode(" Hello", add_bos=False)] == ["▁Hello"]


def test_space_runs_and_specials_use_their_own_pieces(tok):
    """The two GGUF pitfalls: space-run pieces stored with real spaces, and control-piece text."""
    assert tok.encode("a   b", add_bos=False) == [tok.piece_to_id("a"), tok.piece_to_id("▁▁▁"), tok.piece_to_id("b")]
    assert tok.piece_to_id("▁▁") == 138 and tok.piece_to_id("  ") is None
    ids = tok.encode("<start_of_turn>user\nhi<end_of_turn>", add_bos=False)
    assert ids[0] == tok.start_of_turn_id == 105 and ids[-1] == tok.end_of_turn_id == 106
    assert tok.encode("x<unused0>y", add_bos=False)[1] == tok.piece_to_id("<unused0>")
    assert tok.encode("<start_of_turn", add_bos=False)[0] != tok.start_of_turn_id


def test_decode_roundtrip_and_matches_transformers(tok, hf_gguf_tok):
    for s in CORPUS:
        ids = tok.encode(s)
        # A literal "▁" in the input is indistinguishable from an escaped space (SentencePiece
        # itself, and so real Gemma, decodes it as " "); every other string must round-trip.
        assert tok.decode(ids[1:]) == (s.replace("▁", " "))
        assert tok.decode(ids) == hf_gguf_tok.decode(ids)
        assert tok.decode(ids, skip_special=True) == hf_gguf_tok.decode(ids, skip_special_tokens=True)


def test_special_ids_read_from_vocab(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (2, 1, 0, 3)
    assert tok.stop_ids == (1, 106)
    assert tok.vocab_size == 262144
    assert tok.id_to_piece(106) == "<end_of_turn>" and tok.piece_to_id("<end_of_turn>") == 106
    assert tok.piece_to_id("no-such-piece-xyz") is None


def tiny_fields(eot_id):
    """A tiny Gemma-1/2-shaped vocabulary: specials, bytes, a few user-defined runs, a few words."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"]
    types = [3, 3, 3, 2]
    while len(tokens) < eot_id - 1:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(3)
    tokens += ["<start_of_turn>", "<end_of_turn>", "\n", "  ", "   ", "<b>"]
    types += [3, 3, 4, 4, 4, 4]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    words = ["▁", "h", "i", "hi", "▁hi", "▁h"]
    tokens += words
    types += [1] * len(words)
    scores = [0.0] * (len(tokens) - len(words)) + [-float(k) for k in range(len(words))]
    return tokens, scores, types


@pytest.mark.parametrize("eot_id", [107, 106])
def test_tiny_vocab_ids_come_from_the_vocab(eot_id):
    tokens, scores, types = tiny_fields(eot_id)
    tok = GemmaTokenizer.from_bytes(tokenizer_model_from_gguf_fields(tokens, scores, types, 2, 1, 3, 0))
    assert tok.end_of_turn_id == eot_id and tok.start_of_turn_id == eot_id - 1
    assert tok.stop_ids == (1, eot_id)
    ids = tok.encode("hi   hi<b>\n<end_of_turn>é")
    pieces = [tok.id_to_piece(i) for i in ids]
    assert pieces == ["<bos>", "hi", "▁▁▁", "hi", "<b>", "\n", "<end_of_turn>", "<0xC3>", "<0xA9>"]
    assert tok.decode(ids) == "<bos>hi   hi<b>\n<end_of_turn>é"
    assert tok.decode(ids, skip_special=True) == "hi   hi<b>\né"


def test_spm_rejects_inconsistent_fields():
    tokens, scores, types = tiny_fields(107)
    with pytest.raises(ValueError):
        tokenizer_model_from_gguf_fields(tokens, scores[:-1], types, 2, 1, 3, 0)
    with pytest.raises(ValueError):
        tokenizer_model_from_gguf_fields(tokens + ["▁▁"], scores + [0.0], types + [4], 2, 1, 3, 0)


# ---- chat template -----------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "  What is 2+2?\n"}, {"role": "assistant", "content": "\n4 "}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？🤗"},
     {"role": "user", "content": "Write code"}, {"role": "model", "content": "def f():\n    pass\n"}],
    [{"role": "user", "content": [{"type": "text", "text": " part one "}, {"type": "text", "text": "two"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}],
    [{"role": "user", "content": "a\n\n  b"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "x"}],
    [{"role": "user", "content": "Say <end_of_turn> literally"}, {"role": "assistant", "content": "<end_of_turn>"}],
]
SYSTEM_CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": " Sys with spaces \n"}, {"role": "user", "content": " q "},
     {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}],
    [{"role": "system", "content": [{"type": "text", "text": "List system"}]}, {"role": "user", "content": "u"}],
]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_official_templates(tok, hf_gguf_tok, add_generation_prompt):
    for messages in CONVERSATIONS:
        ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        # Gemma 1/2's template only knows string content; list content is Gemma 3's.
        plain = all(isinstance(m["content"], str) for m in messages)
        for template in ((GEMMA12_TEMPLATE,) if plain else ()) + (GEMMA3_TEMPLATE, GEMMA_CHAT_TEMPLATE):
            ref = hf_gguf_tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
            assert ours == ref, (messages, template[:40])
        ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        assert ids == hf_gguf_tok.encode(ours, add_special_tokens=False)
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    for messages in SYSTEM_CONVERSATIONS:
        ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        for template in (GEMMA3_TEMPLATE, GEMMA_CHAT_TEMPLATE):
            ref = hf_gguf_tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
            assert ours == ref, messages


def test_chat_template_literal_format(tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": " U "},
                {"role": "assistant", "content": "A"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n")


@pytest.mark.parametrize("messages", [
    [],
    [{"role": "assistant", "content": "first"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
    [{"role": "system", "content": "only"}],
    [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}],
    [{"role": "user", "content": 5}],
    [{"content": "no role"}],
])
def test_chat_template_user_errors(tok, messages):
    with pytest.raises(UserError):
        tok.apply_chat_template(messages)


# ---- chat segments and the loss mask ----------------------------------------------------------------

def random_conversations(n=40, seed=1):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        turns = rng.randint(1, 3)
        messages = [{"role": "system", "content": rng.choice(FRAGMENTS)}] if rng.random() < 0.3 else []
        for _ in range(turns):
            messages.append({"role": "user", "content": rng.choice(CORPUS)})
            messages.append({"role": rng.choice(["assistant", "model"]), "content": rng.choice(CORPUS)})
        out.append(messages)
    return out


def test_chat_segments_and_encode_chat(tok):
    for messages in random_conversations() + CONVERSATIONS + SYSTEM_CONVERSATIONS:
        for gen in (False, True):
            segments = tok.chat_segments(messages, add_generation_prompt=gen)
            text = tok.apply_chat_template(messages, add_generation_prompt=gen)
            assert "".join(s for s, _ in segments) == text
            answers = [m["content"] for m in messages if m["role"] in ("assistant", "model")]
            answers = [a.strip() if isinstance(a, str) else "".join(p["text"].strip() for p in a) for a in answers]
            flagged = [s for s, is_answer in segments if is_answer]
            assert flagged == [a + "<end_of_turn>" for a in answers]
            ids, mask = tok.encode_chat(messages, add_generation_prompt=gen)
            assert ids == tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
            assert ids == tok.encode(text, add_bos=False)
            assert len(mask) == len(ids)
            answer_ids = [i for i, m in zip(ids, mask) if m]
            assert tok.decode(answer_ids) == "".join(a + "<end_of_turn>" for a in answers).replace("▁", " ")
            # Each masked run ends with <end_of_turn>, is preceded by the model header's "\n" and
            # followed by the unmasked "\n".
            for k in range(len(ids)):
                if mask[k] and (k + 1 == len(ids) or not mask[k + 1]):
                    assert ids[k] == tok.end_of_turn_id
                    assert ids[k + 1] == tok.piece_to_id("\n")
                if mask[k] and not mask[k - 1]:
                    assert tok.decode(ids[:k]).endswith("<start_of_turn>model\n")
            if gen:
                assert not any(mask[-3:])


# ---- streaming detokenizer --------------------------------------------------------------------------


def test_streaming_detokenizer(tok):
    texts = ["你好，世界！🤗👨‍👩‍👧‍👦 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 naïve", "<start_of_turn>model\n机器学习 🇫🇷\n\n  done<end_of_turn>"]
    texts += [s for s in CORPUS if any(ord(c) > 0x7F for c in s)][:60]
    saw_byte_tokens = False
    for text in texts:
        ids = tok.encode(text)
        saw_byte_tokens |= any(tok.id_to_piece(i).startswith("<0x") for i in ids)
        for skip in (False, True):
            detok = StreamingDetokenizer(tok, skip_special=skip)
            chunks = [detok.add_token(i) for i in ids] + [detok.finalize()]
            for chunk in chunks:
                assert "\ufffd" not in chunk
                chunk.encode("utf-8")  # raises on lone surrogates
            assert "".join(chunks) == tok.decode(ids, skip_special=skip)
    assert saw_byte_tokens  # the test covers characters split across byte-fallback tokens
    # Invalid byte sequences still agree with decode().
    stray = [tok.piece_to_id("<0xE4>"), tok.piece_to_id("a"), tok.piece_to_id("<0xB8>"), tok.piece_to_id("<0xE4>")]
    detok = StreamingDetokenizer(tok)
    assert "".join([detok.add_token(i) for i in stray] + [detok.finalize()]) == tok.decode(stray)


# ---- files -------------------------------------------------------------------------------------------


def test_missing_tokenizer_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "tokenizer.model")):
        GemmaTokenizer(tmp_path)
    with pytest.raises(UserError, match="nope.model"):
        GemmaTokenizer(tmp_path / "nope.model")
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="tokenizer.model"):
        GemmaTokenizer(tmp_path)


def test_save_opens_in_transformers(tok, tmp_path):
    import transformers
    tok.save(tmp_path)
    again = GemmaTokenizer(tmp_path)
    assert again.encode(CORPUS[-1]) == tok.encode(CORPUS[-1])
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == GEMMA_CHAT_TEMPLATE and config["eos_token"] == "<eos>"
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for s in CORPUS[::3]:
        assert hf.encode(s) == tok.encode(s), s
    for messages in CONVERSATIONS + SYSTEM_CONVERSATIONS:
        assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            tok.apply_chat_template(messages, add_generation_prompt=True)
