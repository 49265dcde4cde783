"""Chat templates: a model dir's own Jinja template and our Gemma 3 / Gemma 4 fallback, held to
transformers' `apply_chat_template` on the same tokenizer.json (token ids, not just text), and
loss masks held to transformers' `return_assistant_tokens_mask`.

Google's Gemma 4 templates are not copied here: they are read at test time from the TRL package,
which ships them verbatim (trl/chat_templates/gemma4*.jinja, from google/gemma-4-E2B-it).
"""

import pytest

from chat_tiny import hf_tokenizer, tokenizer_dir, trl_template
from mlx_gemma.errors import UserError
from mlx_gemma.tokenizer import GEMMA4_CHAT_TEMPLATE, GEMMA_CHAT_TEMPLATE, GemmaTokenizer

pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi 你好"}],
    [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "  weather in Paris?  "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello there ✨"}, {"role": "user", "content": "Quotes \" and {braces}"}],
    [{"role": "user", "content": [{"type": "text", "text": "parts "}, {"type": "text", "text": "joined"}]},
     {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"},
     {"role": "assistant", "content": "Привет"}],
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"gemma3": tokenizer_dir(root / "g3", gemma4=False), "gemma4": tokenizer_dir(root / "g4", gemma4=True)}


def hf_ids(hf, messages, template, gen, **kw):
    return hf.apply_chat_template(messages, chat_template=template, tokenize=True, add_generation_prompt=gen,
                                  return_dict=False, **kw)


@pytest.mark.parametrize("gen", [False, True])
def test_gemma4_fallback_equals_googles_templates(dirs, gen):
    """Our Gemma 4 format (no template in the dir) gives the ids transformers gives with Google's
    Gemma 4 templates (the release and the current revision) and with our saved Jinja text."""
    tok, hf = GemmaTokenizer(dirs["gemma4"]), hf_tokenizer(dirs["gemma4"])
    assert tok.chat_template is None and tok.chat_markers.start == "<|turn>"
    assert set(tok.stop_ids) == {tok.eos_id, tok.piece_to_id("<turn|>"), tok.piece_to_id("<|tool_response>")}
    for messages in CONVERSATIONS:
        if not gen and messages[-1]["role"] != "assistant":
            continue
        ours = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
        for name in ("gemma4_v2", "gemma4_v5"):
            assert ours == hf_ids(hf, messages, trl_template(name), gen), (name, messages)
        assert ours == hf_ids(hf, messages, GEMMA4_CHAT_TEMPLATE, gen)
        assert ours.count(tok.bos_id) == 1 and ours[0] == tok.bos_id


def test_gemma3_fallback_equals_saved_template(dirs):
    tok, hf = GemmaTokenizer(dirs["gemma3"]), hf_tokenizer(dirs["gemma3"])
    assert tok.chat_template is None and tok.stop_ids == (tok.eos_id, tok.piece_to_id("<end_of_turn>"))
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True) == \
            hf_ids(hf, messages, GEMMA_CHAT_TEMPLATE, True)


@pytest.mark.parametrize("name", ["gemma4_v5", "gemma4", "gemma3", "gemma"])
def test_a_dirs_own_template_renders_as_transformers(dirs, tmp_path, name):
    """A dir's chat_template.jinja is used (not ours), rendered as transformers renders it, tools
    and template options included; ids equal, with the template's <bos> the only one."""
    family = "gemma4" if name.startswith("gemma4") else "gemma3"
    template = trl_template(name)
    d = tokenizer_dir(tmp_path / name, gemma4=family == "gemma4", template=template)
    tok, hf = GemmaTokenizer(d), hf_tokenizer(d)
    # Gemma 3's official template is ours, word for word: ours renders it (with clearer errors).
    assert tok.chat_template == (None if template.strip() == GEMMA_CHAT_TEMPLATE.strip() else template)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string", "description": "the city"}},
                                                   "required": ["city"]}}}]
    for messages in CONVERSATIONS:
        if name == "gemma" and messages[0]["role"] == "system":
            with pytest.raises(UserError, match="template refused"):
                tok.apply_chat_template(messages)
            continue
        for gen in (False, True):
            kw = {"tools": tools, "enable_thinking": True} if family == "gemma4" else {}
            ours = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, **kw)
            assert ours == hf_ids(hf, messages, template, gen, **kw), (name, messages, gen)
            assert ours.count(tok.bos_id) == 1


def test_template_from_tokenizer_config_and_errors(dirs, tmp_path):
    import json
    import shutil

    d = tmp_path / "cfg"
    shutil.copytree(dirs["gemma3"], d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"},
                               {"name": "default", "template": "{{ bos_token }}[{{ messages[0]['content'] }}]"}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = GemmaTokenizer(d)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<bos>[hi]"
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(UserError, match="syntax error at line 1"):
        GemmaTokenizer(d)


# ---- loss masks ----------------------------------------------------------------------------------


TOOL_CONVERSATION = [
    {"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
    {"role": "assistant", "content": "It is 21 C."}, {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome."}]


def _spans(tok, ids, mask):
    """The decoded text of each run of loss tokens."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def test_loss_mask_with_generation_markers_equals_transformers(dirs, tmp_path):
    """TRL's Gemma 3 training template has {% generation %} blocks: our mask is transformers'
    return_assistant_tokens_mask, token for token."""
    template = trl_template("gemma3_training")
    d = tokenizer_dir(tmp_path / "t", gemma4=False, template=template)
    tok, hf = GemmaTokenizer(d), hf_tokenizer(d)
    for messages in CONVERSATIONS[2:]:
        ids, mask = tok.encode_chat(messages)
        ref = hf.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert ids == ref["input_ids"] and mask == ref["assistant_masks"]
        assert sum(mask) > 0


def test_loss_mask_by_prefix_rendering_hand_checked(dirs, tmp_path):
    """Google's Gemma 4 template has no generation markers: every assistant turn, its end marker
    included, carries loss; tool results and the turn headers do not."""
    d = tokenizer_dir(tmp_path / "g4", gemma4=True, template=trl_template("gemma4_v5"))
    tok, hf = GemmaTokenizer(d), hf_tokenizer(d)
    ids, mask = tok.encode_chat(TOOL_CONVERSATION)
    assert ids == hf_ids(hf, TOOL_CONVERSATION, trl_template("gemma4_v5"), False)
    assert _spans(tok, ids, mask) == [
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>',
        "It is 21 C.<turn|>", "You are welcome.<turn|>"]
    # the same conversation with text only, through our own Gemma 4 format
    plain = [m for m in TOOL_CONVERSATION if m["role"] != "tool" and not m.get("tool_calls")][:-2]
    tok4 = GemmaTokenizer(dirs["gemma4"])
    plain = plain[:2] + [{"role": "assistant", "content": "It is 21 C."}]
    ids, mask = tok4.encode_chat(plain)
    assert ids == tok4.apply_chat_template(plain, tokenize=True)
    assert _spans(tok4, ids, mask) == ["It is 21 C.<turn|>"]
