"""Structured output and the chat page of `mlx-gemma serve`, on one real server process.

References: `jsonschema` validates every answer of the real `openai` client; the chat page runs in
a real headless browser (Debian's chromium driven by Playwright) against the same server.
Traffic goes to loopback only; every loop is bounded in count and time.
"""

import concurrent.futures as futures
import json
import os
import shutil
import time

import pytest

from test_serve import KEY, raw  # noqa: F401  (the server helpers of the serve tests)
from test_serve import adapter_dir, model_dir, server  # noqa: F401  (module fixtures, one server here)

import openai
import jsonschema
import llguidance  # noqa: F401  (a required test dependency: imported, never skipped)

pytestmark = pytest.mark.slow  # every test here talks to a server process running the 270M

N = 20  # sampled answers per schema
N_FREE = 10  # unconstrained answers per schema, for contrast (printed, not asserted)

SCHEMAS = {
    "nested object, required fields, string pattern": (80, {
        "type": "object", "additionalProperties": False, "required": ["person", "address"],
        "properties": {
            "person": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
                       "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{1,9}$"},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
            "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                        "properties": {"city": {"enum": ["Paris", "Rome", "北京"]},
                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}),
    "array of objects, enums, bounded numbers, optional field": (150, {
        "type": "object", "additionalProperties": False, "required": ["items", "score"],
        "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "additionalProperties": False, "required": ["sku", "qty", "color"],
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                           "color": {"enum": ["red", "green", "blue"]}}}},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "passed": {"type": "boolean"}}}),
}


@pytest.fixture(scope="module")
def client(server):  # noqa: F811
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key=KEY, max_retries=0, timeout=1200)


def ask(client, schema, max_tokens, seed, constrained=True):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    prompt = "Answer with one JSON object that follows this JSON Schema:\n" + json.dumps(schema, ensure_ascii=False)
    resp = client.chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": prompt}], temperature=1.0, seed=seed,
        max_tokens=max_tokens, **({"response_format": fmt} if constrained else {}))
    return resp.choices[0]


def valid(text, schema) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_answers_all_parse_and_validate(client, name):
    max_tokens, schema = SCHEMAS[name]
    with futures.ThreadPoolExecutor(N + N_FREE) as pool:  # all rows share the server's continuous batch
        # the free rows rarely stop by themselves: fewer tokens keep the test short
        free_jobs = [pool.submit(ask, client, schema, min(max_tokens, 60), s, False) for s in range(N_FREE)]
        constrained = list(pool.map(lambda s: ask(client, schema, max_tokens, s), range(N)))
        free = [f.result() for f in free_jobs]
    bad = [(c.finish_reason, c.message.content) for c in constrained if not valid(c.message.content, schema)]
    assert not bad, bad
    assert all(c.finish_reason == "stop" for c in constrained)
    assert len({c.message.content for c in constrained}) > 1  # sampled, not one canned answer
    n_free = sum(valid(c.message.content, schema) for c in free)
    print(f"\n[{name}] constrained: {N}/{N} valid; unconstrained: {n_free}/{N_FREE} valid; "
          f"e.g. {constrained[0].message.content!r} vs {free[0].message.content[:80]!r}")


def test_json_object_streamed(client):
    stream = client.chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "用JSON描述一只猫。"}], temperature=1.0, seed=5,
        max_tokens=120, response_format={"type": "json_object"}, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict), text


NUMBERS = "array of objects, enums, bounded numbers, optional field"


def test_free_row_unaffected_by_constrained_neighbours(client, server):  # noqa: F811
    """A free greedy request gives the same text whether or not constrained rows run beside it."""
    def free():
        return client.chat.completions.create(model="gemma-3-270m", temperature=0, max_tokens=24,
                                              messages=[{"role": "user", "content": "Name three colors."}])
    alone = free().choices[0].message.content
    with futures.ThreadPoolExecutor(4) as pool:
        side = [pool.submit(ask, client, SCHEMAS[NUMBERS][1], SCHEMAS[NUMBERS][0], s)
                for s in range(3)]
        together = pool.submit(free)
        assert together.result().choices[0].message.content == alone
        for f in side:
            assert valid(f.result().message.content, SCHEMAS[NUMBERS][1])


@pytest.mark.parametrize("fmt, status, needle", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {}, "then": {}}}},
     400, 'Unimplemented keys: ["if", "then"]'),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}, 400, "Invalid type: strng"),
    ({"type": "xml"}, 400, "json_object or json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, 422, "response_format.json_schema.schema"),
    ("json", 422, "response_format"),
])
def test_bad_response_format_is_an_openai_error(server, fmt, status, needle):  # noqa: F811
    body = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], "response_format": fmt}
    code, payload = raw(server["port"], "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"})
    error = json.loads(payload)["error"]
    assert code == status and needle in error["message"], (code, error)
    assert error["param"].startswith("response_format")


# ---- the chat page in a real browser ---------------------------------------------------------

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the page test needs a real browser")
    from playwright import sync_api
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def wait_for(predicate, timeout=120.0, every=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out waiting")


def test_chat_page_streams_stops_switches_adapter_and_survives_reload(browser, server):  # noqa: F811
    port = server["port"]
    context = browser.new_context()  # one profile: its tabs share localStorage, each has its own sessionStorage
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{port}/")
    assert page.title() == "mlx-gemma chat"
    # No key yet: the models list is refused, and the page says so.
    wait_for(lambda: "API key" in page.inner_text("#status") or "401" in page.inner_text("#status"), 30)
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    wait_for(lambda: page.eval_on_selector_all("#model-a option", "os => os.map(o => o.value)") ==
             [server["name"], "zh"], 30)

    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "input")
    page.fill("#max-tokens", "400")
    page.dispatch_event("#max-tokens", "input")
    page.fill("#prompt", "请写一篇很长的文章，详细介绍长城的历史。")
    page.click("#send")
    answer = '.column[data-col="a"] .msg.assistant >> nth=-1'
    content = answer + " >> .content"
    # Streamed text grows across several observations while the answer is still running.
    lengths = []
    deadline = time.time() + 180
    while len(set(lengths)) < 4 and time.time() < deadline:
        assert page.get_attribute(answer, "data-state") == "streaming", "the answer ended before it was seen growing"
        lengths.append(len(page.inner_text(content)))
        time.sleep(0.4)
    assert len(set(lengths)) >= 4 and lengths == sorted(lengths), lengths
    assert any("\u4e00" <= ch <= "\u9fff" for ch in page.inner_text(content))  # Chinese text streamed whole

    page.click("#stop")
    wait_for(lambda: page.get_attribute(answer, "data-state") == "stopped", 30)
    stopped_text = page.inner_text(content)
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    time.sleep(1.0)
    assert page.inner_text(content) == stopped_text  # nothing arrives after stop
    wait_for(lambda: json.loads(raw(port, "GET", "/health")[1])["running"] == 0, 30)  # the server freed the row

    # Switch to the adapter and ask again: the answer comes from "zh" (the server logs the model).
    page.select_option("#model-a", "zh")
    page.fill("#max-tokens", "12")
    page.dispatch_event("#max-tokens", "input")
    page.fill("#prompt", "你好")
    page.press("#prompt", "Enter")
    wait_for(lambda: page.get_attribute(answer, "data-state") == "done", 180)
    assert page.inner_text(answer + " >> .who") == "zh"
    assert "model=zh" in server["log"].read_text()
    n_messages = page.locator(".column[data-col='a'] .msg").count()
    assert n_messages == 4  # two user turns, two answers (the stopped one kept its text)

    # Reload: the conversation and the model choice come back from localStorage, the key from
    # sessionStorage (this tab only): by default no storage that outlives the tab holds the key.
    page.reload()
    wait_for(lambda: page.locator(".column[data-col='a'] .msg").count() == n_messages, 30)
    assert page.input_value("#api-key") == KEY
    wait_for(lambda: page.input_value("#model-a") == "zh", 30)
    assert page.inner_text('.column[data-col="a"] .msg.assistant >> nth=0 >> .content') == stopped_text
    assert KEY not in page.evaluate("() => JSON.stringify(localStorage)")
    assert not page.is_checked("#remember-key")
    other_tab = context.new_page()  # same browser profile (localStorage), a new tab (sessionStorage)
    other_tab.goto(f"http://127.0.0.1:{port}/")
    wait_for(lambda: other_tab.locator(".column[data-col='a'] .msg").count() == n_messages, 30)
    assert other_tab.input_value("#api-key") == ""
    # An explicit "remember": the key is kept in localStorage, and a new tab has it.
    page.check("#remember-key")
    assert KEY in page.evaluate("() => JSON.stringify(localStorage)")
    other_tab.reload()
    wait_for(lambda: other_tab.input_value("#api-key") == KEY, 30)
    assert other_tab.is_checked("#remember-key")
    page.uncheck("#remember-key")  # forgetting it removes it
    assert KEY not in page.evaluate("() => JSON.stringify(localStorage)")
    other_tab.close()
    page.close()
    context.close()


def test_chat_page_compare_mode_with_a_system_prompt(browser, server, model_dir, adapter_dir):  # noqa: F811
    """Compare mode asks two models the same question in two columns, each with the system-prompt
    field's text as the system message: column A's streamed text is the base model's greedy
    answer and column B's the adapter's, both equal to `generate` on the same messages."""
    from mlx_gemma.generation import generate
    from mlx_gemma.loading import load

    system, question = "你是一个只用中文回答的助手。", "天空为什么是蓝色的？"
    port = server["port"]
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{port}/")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    wait_for(lambda: page.eval_on_selector_all("#model-a option", "os => os.map(o => o.value)") ==
             [server["name"], "zh"], 30)
    assert not page.is_visible("#model-b") and not page.is_visible('.column[data-col="b"]')
    page.check("#compare")
    assert page.is_visible("#model-b") and page.is_visible('.column[data-col="b"]')
    page.select_option("#model-a", server["name"])
    page.select_option("#model-b", "zh")
    page.fill("#system", system)
    page.dispatch_event("#system", "input")
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "input")
    page.fill("#max-tokens", "16")
    page.dispatch_event("#max-tokens", "input")
    page.fill("#prompt", question)
    page.click("#send")
    answers = {col: f'.column[data-col="{col}"] .msg.assistant >> nth=-1' for col in "ab"}
    for sel in answers.values():
        wait_for(lambda: page.get_attribute(sel, "data-state") == "done", 300)
    got = {col: page.eval_on_selector(sel + " >> .content", "e => e.textContent") for col, sel in answers.items()}
    assert page.inner_text(answers["b"] + " >> .who") == "zh"
    assert "model=zh" in server["log"].read_text()
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    expected = {"a": generate(*load(str(model_dir)), messages, max_tokens=16, temp=0.0),
                "b": generate(*load(str(model_dir), adapter=str(adapter_dir)), messages, max_tokens=16, temp=0.0)}
    assert got == expected and got["a"] != got["b"]
    page.close()
