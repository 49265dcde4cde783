"""Tool calling through `mlx-gemma serve` with the real `openai` client: call -> tool result ->
answer, streamed and not, for Gemma 4's native format (the dir ships Google's template, read from
TRL's package) and for the JSON prompt format of Gemma 1-3 (our template).

References: the openai client's own parsing of responses and stream chunks, `jsonschema`, and for
Gemma 4 transformers' `apply_chat_template` with Google's template, whose token count must equal
the prompt tokens the server reports for the conversation holding the call and its result.
"""

import json
import sys

import pytest

from chat_tiny import hf_tokenizer, tiny_model_dir, trl_template

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 6},
    "options": {"type": "object", "properties": {"days": {"type": "integer"},
                                                 "tags": {"type": "array", "items": {"type": "boolean"}}},
                "required": ["days"]}},
    "required": ["city", "options"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": PARAMS}}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


# Every test here talks to a real `mlx-gemma serve` process (a tiny model, but a server): slow.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["gemma4", "gemma3"])
def server(request, tmp_path_factory):
    from test_serve import free_port, start_server, stop_server

    gemma4 = request.param == "gemma4"
    d = tiny_model_dir(tmp_path_factory.mktemp(request.param), gemma4=gemma4,
                       template=trl_template("gemma4_v5") if gemma4 else None)
    port = free_port()
    proc = start_server([sys.executable, "-m", "mlx_gemma.cli", "serve", "--model", str(d), "--port", str(port),
                         "--model-name", "m"], port, d / "server.log")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=300)
    yield {"client": client, "dir": d, "family": request.param, "port": port}
    stop_server(proc)


def _history(call_id, name, arguments):
    return QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": '{"temp": 21, "sky": "clear ☀"}'}]


def _check_prompt_tokens(server, history, reported):
    """Gemma 4: the server's prompt is Google's template rendered by transformers, token for token."""
    if server["family"] != "gemma4":
        return
    hf = hf_tokenizer(server["dir"])
    messages = [dict(m, tool_calls=[{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                                    for c in m["tool_calls"]]) if m.get("tool_calls") else m for m in history]
    ids = hf.apply_chat_template(messages, tools=TOOLS, chat_template=trl_template("gemma4_v5"), tokenize=True,
                                 add_generation_prompt=True, return_dict=False)
    assert reported == len(ids)


def test_round_trip(server):
    client = server["client"]
    first = client.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=3, max_tokens=300)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), PARAMS)
    history = _history(call.id, call.function.name, call.function.arguments)
    second = client.chat.completions.create(model="m", messages=history, tools=TOOLS, tool_choice="none",
                                            temperature=0.0, max_tokens=12)
    assert second.choices[0].finish_reason in ("stop", "length")
    assert isinstance(second.choices[0].message.content, str) and not second.choices[0].message.tool_calls
    _check_prompt_tokens(server, history, second.usage.prompt_tokens)


def test_round_trip_streamed(server):
    client = server["client"]
    stream = client.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS, stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            temperature=1.0, seed=5, max_tokens=300)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    items = [item for c in chunks if c.choices for item in (c.choices[0].delta.tool_calls or [])]
    head, fragments = items[0], items[1:]
    assert head.index == 0 and head.id.startswith("call_") and head.function.name == "get_weather"
    assert head.function.arguments == ""
    assert fragments and all(f.index == 0 and f.id is None and f.function.name is None for f in fragments)
    arguments = "".join(f.function.arguments for f in fragments)
    jsonschema.validate(json.loads(arguments), PARAMS)
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and chunks[-1].choices[0].delta.tool_calls is None
    assert len({c.id for c in chunks}) == 1

    history = _history(head.id, "get_weather", arguments)
    answer = list(client.chat.completions.create(model="m", messages=history, tools=TOOLS, tool_choice="none",
                                                 stream=True, temperature=0.0, max_tokens=12,
                                                 stream_options={"include_usage": True}))
    finish = [c.choices[0].finish_reason for c in answer if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
    whole = client.chat.completions.create(model="m", messages=history, tools=TOOLS, tool_choice="none",
                                           temperature=0.0, max_tokens=12)
    assert text == whole.choices[0].message.content  # the same greedy answer, streamed or not
    _check_prompt_tokens(server, history, answer[-1].usage.prompt_tokens)


def test_tool_errors_are_400s(server):
    client = server["client"]
    with pytest.raises(openai.BadRequestError, match="tool_choice names function 'nope'"):
        client.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="needs 'tools'"):
        client.chat.completions.create(model="m", messages=QUESTION, tool_choice="required")
