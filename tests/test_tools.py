"""Tool calling (mlx_gemma.tools) without a server: the call parsers against calls written by
Google's Gemma 4 template and by json.dumps, streaming fragments against whole answers, the call
grammars against those texts, and sampled calls from a tiny random model checked with `jsonschema`.

References: Google's Gemma 4 template (read at test time from TRL's package, rendered by
transformers), `json`, and `jsonschema.validate`.
"""

import json

import pytest

from chat_tiny import hf_tokenizer, spm_bytes, tiny_model_dir, tokenizer_dir, trl_template
from mlx_gemma import tools as T
from mlx_gemma.errors import UserError
from mlx_gemma.tokenizer import GemmaTokenizer

jsonschema = pytest.importorskip("jsonschema")

# Nested objects and arrays, enums, every scalar type.
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer"},
    "options": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}},
        "detail": {"type": "boolean"},
        "window": {"type": "object", "properties": {"start": {"type": "number"}, "end": {"type": "number"}},
                   "required": ["start"]}},
        "required": ["detail", "window"]}},
    "required": ["city", "options"]}
POINTS = {"type": "object", "properties": {
    "points": {"type": "array", "items": {"type": "object", "properties": {
        "x": {"type": "integer"}, "label": {"type": "string", "maxLength": 5}}, "required": ["x", "label"]}},
    "closed": {"type": "boolean"}}, "required": ["points"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "draw", "description": "Draw a path", "parameters": POINTS}}]
SCHEMAS = {"get_weather": WEATHER, "draw": POINTS}

# Arguments a parser must carry through unchanged: quotes, braces, brackets, colons and commas in
# strings, Unicode, nesting, every scalar.
HARD_ARGS = [
    {"city": 'Pa"r{is}: [1, 2]', "options": {"detail": True, "window": {"start": -1.5, "end": 2e3}, "tags": []}},
    {"city": "北京 ✨ Ünï", "unit": "celsius", "days": 0,
     "options": {"detail": False, "window": {"start": 0}, "tags": ["a,b", "}{", "\\", "<x>"]}},
    {"points": [{"x": 1, "label": "a:b"}, {"x": -20, "label": "é"}], "closed": True},
]


@pytest.fixture(scope="module")
def toks():
    return {"gemma4": GemmaTokenizer.from_bytes(spm_bytes(True)), "gemma3": GemmaTokenizer.from_bytes(spm_bytes(False))}


def call_text(fmt_name, name, args, tmp_path=None):
    """The text of one call as the reference writes it: Google's template (Gemma 4), json.dumps (JSON format)."""
    if fmt_name == "gemma3":
        return "```tool_call\n" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + "\n```"
    return None


@pytest.fixture(scope="module")
def google_calls(tmp_path_factory):
    """Each HARD_ARGS call rendered by Google's Gemma 4 template through transformers: the call's text."""
    d = tokenizer_dir(tmp_path_factory.mktemp("g4"), gemma4=True)
    hf = hf_tokenizer(d)
    out = []
    for args in HARD_ARGS:
        name = "draw" if "points" in args else "get_weather"
        messages = [{"role": "user", "content": "x"},
                    {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                          "function": {"name": name, "arguments": args}}]}]
        text = hf.apply_chat_template(messages, chat_template=trl_template("gemma4_v5"), tokenize=False)
        out.append((name, args, text[text.index("<|tool_call>"):text.index("<tool_call|>") + len("<tool_call|>")]))
    return out


def _read(tok, spec, text, stream=False):
    ids = tok.encode(text, add_bos=False)
    if not stream:
        return T.parse_answer(tok, spec, ids + [tok.stop_ids[-1]], "stop")
    parser = T.StreamParser(tok, spec)
    return [d for t in ids for d in parser.feed(t)] + parser.finish()


def test_native_parser_reads_googles_calls(toks, google_calls):
    tok = toks["gemma4"]
    spec = T.ToolSpec.of(tok, TOOLS, "required")
    for name, args, text in google_calls:
        answer = _read(tok, spec, text)
        assert answer.finish_reason == "tool_calls" and answer.content is None
        (call,) = answer.tool_calls
        assert call["function"]["name"] == name and json.loads(call["function"]["arguments"]) == args
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


def test_json_format_parser_and_parallel_calls(toks):
    tok = toks["gemma3"]
    spec = T.ToolSpec.of(tok, TOOLS, "auto")
    blocks = [call_text("gemma3", "draw" if "points" in a else "get_weather", a) for a in HARD_ARGS]
    answer = _read(tok, spec, "Let me check.\n" + "\n".join(blocks))
    assert answer.content == "Let me check.\n"
    assert [json.loads(c["function"]["arguments"]) for c in answer.tool_calls] == HARD_ARGS
    assert len({c["id"] for c in answer.tool_calls}) == 3
    # no call at all: plain content, finish_reason untouched
    plain = _read(tok, spec, "Just text with ``` fences {and braces}")
    assert plain.content == "Just text with ``` fences {and braces}" and plain.tool_calls == []
    assert plain.finish_reason == "stop"


@pytest.mark.parametrize("family", ["gemma4", "gemma3"])
def test_stream_deltas_follow_openai_and_equal_the_whole_answer(toks, google_calls, family):
    tok = toks[family]
    spec = T.ToolSpec.of(tok, TOOLS, "auto")
    texts = [t for _, _, t in google_calls] if family == "gemma4" else \
        [call_text("gemma3", "draw" if "points" in a else "get_weather", a) for a in HARD_ARGS]
    sep = "" if family == "gemma4" else "\n"
    text = "Sure: " + sep.join(texts)
    deltas = _read(tok, spec, text, stream=True)
    whole = _read(tok, spec, text)
    firsts = [item for d in deltas for item in d.get("tool_calls", ()) if "id" in item]
    assert [f["index"] for f in firsts] == [0, 1, 2]
    assert all(f["function"]["arguments"] == "" and f["type"] == "function" for f in firsts)
    # every fragment comes after its call's first item, and carries only index + arguments
    seen = set()
    for d in deltas:
        for item in d.get("tool_calls", ()):
            if "id" in item:
                seen.add(item["index"])
            else:
                assert item["index"] in seen and set(item) == {"index", "function"}
    folded = T.collect(deltas, "stop")
    assert folded.content == whole.content == "Sure: "
    assert [c["function"] for c in folded.tool_calls] == [c["function"] for c in whole.tool_calls]
    assert [json.loads(c["function"]["arguments"]) for c in whole.tool_calls] == HARD_ARGS
    assert sum(len(d.get("tool_calls", ())) for d in deltas) > 10  # arguments really came in fragments


def test_grammar_accepts_valid_calls_and_refuses_invalid_ones(toks, google_calls):
    import llguidance

    from mlx_gemma.constrain import grammar_tokenizer

    def accepted(tok, spec, text):
        matcher = llguidance.LLMatcher(grammar_tokenizer(tok), spec.grammar())
        return all(matcher.consume_token(t) for t in tok.encode(text, add_bos=False)) and matcher.is_accepting()

    g4 = T.ToolSpec.of(toks["gemma4"], TOOLS, "required")
    for _, _, text in google_calls:
        assert accepted(toks["gemma4"], g4, text)
    assert not accepted(toks["gemma4"], g4, '<|tool_call>call:draw{closed:true}<tool_call|>')  # points missing
    assert not accepted(toks["gemma4"], g4, '<|tool_call>call:nope{}<tool_call|>')
    g3 = T.ToolSpec.of(toks["gemma3"], TOOLS, {"type": "function", "function": {"name": "draw"}})
    assert accepted(toks["gemma3"], g3, call_text("gemma3", "draw", HARD_ARGS[2]))
    assert not accepted(toks["gemma3"], g3, call_text("gemma3", "get_weather", HARD_ARGS[0]))  # not the named one
    assert not accepted(toks["gemma3"], g3, "Hello")  # a named function: the whole answer is the call


def test_tool_spec_errors(toks):
    tok = toks["gemma4"]
    with pytest.raises(UserError, match="tool_choice names function 'nope'"):
        T.ToolSpec.of(tok, TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(UserError, match="tool_choice must be"):
        T.ToolSpec.of(tok, TOOLS, "sometimes")
    with pytest.raises(UserError, match=r"tools\[0\].function.name"):
        T.ToolSpec.of(tok, [{"type": "function", "function": {"name": "bad name"}}])
    with pytest.raises(UserError, match="'pattern'"):
        T.ToolSpec.of(tok, [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "string", "pattern": "^x$"}}}}}])


# ---- sampled calls from a tiny random model --------------------------------------------------------


def _sample(model, tok, spec, n, constrained, max_tokens=240):
    """n answers sampled at temperature 1 (one batch, a seed per row); returns the generated ids."""
    from mlx_gemma.generation import BatchGenerator, Request
    from mlx_gemma.sampling import SamplingParams

    ids = T.render_prompt(tok, [{"role": "user", "content": "What is the weather in Paris?"}], spec)
    engine = BatchGenerator(model, tok)
    rids = [engine.submit(Request(ids, SamplingParams(max_tokens=max_tokens, temp=1.0, seed=s),
                                  processors=[T.call_mask(tok, spec)] if constrained else ()))
            for s in range(n)]
    out, finish = {r: [] for r in rids}, {}
    while engine.busy:
        for event in engine.step():
            out[event.rid].append(event.token)
            if event.finish_reason:
                finish[event.rid] = event.finish_reason
    return [(out[r], finish[r]) for r in rids]


def _valid_calls(tok, spec, sampled):
    """How many answers are calls whose arguments parse and validate against their function."""
    good = 0
    for ids, finish in sampled:
        answer = T.parse_answer(tok, spec, ids, finish)
        try:
            assert answer.tool_calls
            for call in answer.tool_calls:
                jsonschema.validate(json.loads(call["function"]["arguments"]),
                                    SAMPLE_SCHEMAS[call["function"]["name"]])
            good += 1
        except (AssertionError, ValueError, KeyError, jsonschema.ValidationError):
            pass
    return good


# Smaller arguments for sampling: a random model spends up to 4 byte-fallback tokens a character.
SAMPLE_SCHEMAS = {
    "get_weather": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 6}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "options": {"type": "object", "properties": {
            "detail": {"type": "boolean"}, "days": {"type": "integer"},
            "window": {"type": "object", "properties": {"start": {"type": "integer"}}, "required": ["start"]}},
            "required": ["detail", "window"]}},
        "required": ["city", "options"]},
    "draw": {"type": "object", "properties": {
        "points": {"type": "array", "items": {"type": "object", "properties": {
            "x": {"type": "integer"}, "ok": {"type": "boolean"}}, "required": ["x", "ok"]}},
        "closed": {"type": "boolean"}}, "required": ["points"]}}
SAMPLE_TOOLS = [{"type": "function", "function": {"name": n, "description": n, "parameters": p}}
                for n, p in SAMPLE_SCHEMAS.items()]


@pytest.fixture(scope="module", params=["gemma4", "gemma3"])
def tiny(request, tmp_path_factory):
    from mlx_gemma.loading import load

    d = tiny_model_dir(tmp_path_factory.mktemp(request.param), gemma4=request.param == "gemma4")
    model, tok = load(str(d))
    return model, tok


@pytest.mark.slow
def test_50_sampled_required_calls_all_validate(tiny):
    model, tok = tiny
    spec = T.ToolSpec.of(tok, SAMPLE_TOOLS, "required", parallel_tool_calls=False)
    sampled = _sample(model, tok, spec, 50, constrained=True)
    assert all(finish == "stop" for _, finish in sampled), [f for _, f in sampled]
    assert _valid_calls(tok, spec, sampled) == 50
    names = {T.parse_answer(tok, spec, ids, f).tool_calls[0]["function"]["name"] for ids, f in sampled}
    assert names == {"get_weather", "draw"}  # sampling really chose between the functions


@pytest.mark.slow
def test_unconstrained_sampling_does_not_validate(tiny):
    """The contrast: the same random model, prompt and seeds without the grammar give no valid call."""
    model, tok = tiny
    spec = T.ToolSpec.of(tok, SAMPLE_TOOLS, "required", parallel_tool_calls=False)
    sampled = _sample(model, tok, spec, 50, constrained=False)
    assert _valid_calls(tok, spec, sampled) == 0


# ---- the library and the CLI ------------------------------------------------------------------------


def test_generate_with_tools_returns_validated_calls(tiny):
    from mlx_gemma import generate

    model, tok = tiny
    answer = generate(model, tok, [{"role": "user", "content": "Draw."}], tools=SAMPLE_TOOLS,
                      tool_choice={"type": "function", "function": {"name": "draw"}}, temp=1.0, seed=2,
                      max_tokens=240)
    assert isinstance(answer, T.ToolAnswer) and answer.finish_reason == "tool_calls"
    assert [c["function"]["name"] for c in answer.tool_calls][:1] == ["draw"]
    for call in answer.tool_calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]), SAMPLE_SCHEMAS["draw"])
    with pytest.raises(UserError, match="tools or json_schema"):
        generate(model, tok, "hi", tools=SAMPLE_TOOLS, json_schema={"type": "object"})


def test_cli_generate_tools(tmp_path):
    import subprocess
    import sys

    d = tiny_model_dir(tmp_path / "m", gemma4=False)
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(SAMPLE_TOOLS))
    cmd = [sys.executable, "-m", "mlx_gemma.cli", "generate", "--model", str(d), "--prompt", "Weather?",
           "--tools", str(tools_file), "--tool-choice", "get_weather", "--temp", "1", "--seed", "4",
           "--max-tokens", "240"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    calls = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    assert calls and all(c["name"] == "get_weather" for c in calls)
    for c in calls:
        jsonschema.validate(c["arguments"], SAMPLE_SCHEMAS["get_weather"])
    assert "finish_reason: tool_calls" in run.stderr
    tools_file.write_text('[{"type": "function", "function": {"name": "bad name"}}]')
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert f"--tools {tools_file}: tools[0].function.name" in bad.stderr


def test_our_gemma4_tool_prompt_equals_googles_template(tmp_path):
    """Without a template in the dir, our Gemma 4 rendering of declarations (nested schemas), a
    call, its result, a final answer and a new question gives transformers' ids with Google's
    templates (the release and the current revision)."""
    d = tokenizer_dir(tmp_path / "g4", gemma4=True)
    tok, hf = GemmaTokenizer(d), hf_tokenizer(d)
    messages = [
        {"role": "system", "content": "Be useful."}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": json.dumps(HARD_ARGS[1], ensure_ascii=False)}},
            {"id": "c2", "type": "function", "function": {"name": "draw", "arguments": json.dumps(HARD_ARGS[2])}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C"}, {"role": "tool", "tool_call_id": "c2", "content": "ok"},
        {"role": "assistant", "content": "It is 21 C."}, {"role": "user", "content": "Thanks"}]
    for tools in (TOOLS, SAMPLE_TOOLS):
        ours = T.render_prompt(tok, messages, T.ToolSpec.of(tok, tools))
        with_dicts = [dict(m, tool_calls=[{**c, "function": {"name": c["function"]["name"],
                                                             "arguments": json.loads(c["function"]["arguments"])}}
                                          for c in m["tool_calls"]]) if m.get("tool_calls") else m for m in messages]
        for name in ("gemma4_v5", "gemma4"):
            assert ours == hf.apply_chat_template(with_dicts, tools=tools, chat_template=trl_template(name),
                                                  tokenize=True, add_generation_prompt=True, return_dict=False)


CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "draw", "arguments": '{"points": []}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "done"},
    {"role": "assistant", "content": "Drawn."}]


def _loss_runs(tok, ids, mask):
    runs, current = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs


def test_json_format_prompt_and_training_mask(toks):
    """Gemma 1-3: the declarations lead the first user turn, the call is the model's text, the
    result is the next user turn; loss on the call block and the answer, each with <end_of_turn>."""
    tok = toks["gemma3"]
    text = T.render_prompt(tok, CONVERSATION[:3], T.ToolSpec.of(tok, SAMPLE_TOOLS), tokenize=False)
    assert text.startswith("<bos><start_of_turn>user\nYou can call the functions below.")
    assert text.endswith('Weather in Paris?<end_of_turn>\n<start_of_turn>model\n```tool_call\n'
                         '{"name": "draw", "arguments": {"points": []}}\n```<end_of_turn>\n<start_of_turn>user\n'
                         '```tool_response\n{"name": "draw", "content": "done"}\n```<end_of_turn>\n'
                         '<start_of_turn>model\n')
    ids, mask = T.encode_conversation(tok, CONVERSATION, SAMPLE_TOOLS)
    assert _loss_runs(tok, ids, mask) == ['```tool_call\n{"name": "draw", "arguments": {"points": []}}\n```<end_of_turn>',
                                          "Drawn.<end_of_turn>"]
    with pytest.raises(UserError, match="message 1 is a tool result with no assistant tool_calls"):
        T.render_prompt(tok, [CONVERSATION[0], CONVERSATION[2]], None)


def test_gemma4_training_mask_with_our_template(toks):
    tok = toks["gemma4"]
    ids, mask = T.encode_conversation(tok, CONVERSATION, SAMPLE_TOOLS)
    assert _loss_runs(tok, ids, mask) == ["<|tool_call>call:draw{points:[]}<tool_call|><|tool_response>",
                                          "Drawn.<turn|>"]
    assert tok.decode(ids).count("<|tool_response>") == 1  # the result continues the call's marker
