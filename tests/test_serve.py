"""`mlx-gemma serve` as a real process on 127.0.0.1, driven by the real `openai` client and raw HTTP.

References: `mlx_gemma.generate` on the same embedded 270M model (greedy text, with and without
an adapter), the OpenAI stream-chunk rules llama.cpp's server tests check, and HTTP status codes.
Traffic goes to loopback only; every loop is bounded in count and time.
"""

import concurrent.futures as futures
import http.client
import json
import signal
import socket
import subprocess
import sys
import time

import pytest

import openai

pytestmark = pytest.mark.slow  # every test here talks to a server process running the 270M

KEY = "test-key-123"
QUESTIONS = ["What is the capital of France?", "黄河发源于哪里？", "Write a haiku about rain.", "1+1=?",
             "Name three colors.", "用一句话介绍长城。", "What is MLX?", "Say hello in German."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir():
    from mlx_gemma.loading import resolve

    return resolve("gemma-3-270m")


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    """A LoRA adapter for the 270M with random non-zero B, so its answers differ from the base's."""
    from mlx_gemma.loading import load

    from tiny import random_lora_adapter

    model, _ = load(str(model_dir))
    return random_lora_adapter(model, tmp_path_factory.mktemp("adapter") / "zh", seed=3, rank=8, alpha=16.0,
                               scale=0.02, base_model=str(model_dir))


def launch(model_dir, log, *options):
    """Start `mlx-gemma serve` on a free loopback port, logging to `log`; (process, port) once
    /health answers (a failure to come up fails the test with the log)."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlx_gemma.cli", "serve", "--model", str(model_dir), "--port", str(port), *options]
    return start_server(cmd, port, log), port


def start_server(cmd: list, port: int, log, env=None, timeout=180) -> subprocess.Popen:
    """Run a `mlx-gemma serve` command (output to the file `log`, environment `env`) until /health answers 200."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            status, _ = raw(port, "GET", "/health")
            if status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
        assert proc.poll() is None, log.read_text()
    proc.kill()
    pytest.fail("server did not come up:\n" + log.read_text())


def stop_server(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops it; killed if it has not exited after 30 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


stop = stop_server  # the name tests/test_serve_scheduling.py imports


@pytest.fixture(scope="module")
def server(model_dir, adapter_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc, port = launch(model_dir, log, "--adapter", f"zh={adapter_dir}", "--api-key", KEY, "--max-body", "262144")
    yield {"port": port, "proc": proc, "log": log, "name": model_dir.name}
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference(model_dir, adapter_dir):
    """Greedy answers of mlx_gemma.generate, alone, in this process: {(adapter?, question, n): text}."""
    from mlx_gemma.generation import generate
    from mlx_gemma.loading import load

    models = {False: load(str(model_dir)), True: load(str(model_dir), adapter=str(adapter_dir))}
    cache = {}

    def answer(question, max_tokens, adapter=False, system=None):
        key = (adapter, question, max_tokens, system)
        if key not in cache:
            net, tok = models[adapter]
            cache[key] = generate(net, tok, [{"role": "user", "content": question}], system=system,
                                  max_tokens=max_tokens, temp=0.0)
        return cache[key]

    return answer


def raw(port, method, path, body=None, headers=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, payload


def auth():
    return {"Authorization": f"Bearer {KEY}"}


# ---- correctness ---------------------------------------------------------------------------


def test_greedy_chat_equals_generate(client, server, reference):
    r = client.chat.completions.create(model=server["name"], messages=[{"role": "user", "content": QUESTIONS[1]}],
                                       max_tokens=24, temperature=0)
    assert r.choices[0].message.content == reference(QUESTIONS[1], 24)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_system_prompt_and_multi_turn(client, server, model_dir):
    from mlx_gemma.generation import generate
    from mlx_gemma.loading import load

    messages = [{"role": "system", "content": "你是一个知识丰富的人工智能助手"},
                {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"},
                {"role": "user", "content": [{"type": "text", "text": "长江有多长？"}]}]
    r = client.chat.completions.create(model=server["name"], messages=messages, max_tokens=16, temperature=0)
    net, tok = load(str(model_dir))
    assert r.choices[0].message.content == generate(net, tok, messages, max_tokens=16, temp=0.0)


def test_stream_chunk_shapes(client, server, reference):
    chunks = list(client.chat.completions.create(
        model=server["name"], messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=20, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks[1:] if c.choices]
    assert all(c.choices[0].delta.role is None for c in body)
    last = body[-1]
    assert last.choices[0].finish_reason in ("stop", "length") and not last.choices[0].delta.content
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference(QUESTIONS[0], 20)


def test_completions_stop_and_logprobs(client, server, model_dir):
    from mlx_gemma.generation import generate
    from mlx_gemma.loading import load

    net, tok = load(str(model_dir))
    full = generate(net, tok, "The three primary colors are", max_tokens=30, temp=0.0)
    stop = full.strip().split()[2]  # a word the greedy continuation really reaches
    r = client.completions.create(model=server["name"], prompt="The three primary colors are", max_tokens=30,
                                  temperature=0, stop=[stop], logprobs=3)
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    for chosen, alts in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(alts) == 3
        assert abs(max(alts.values()) - chosen) < 1e-4  # greedy: the chosen token is the most likely


def test_seeded_sampling_repeats(client, server):
    def ask(seed):
        return client.chat.completions.create(model=server["name"], messages=[{"role": "user", "content": "Tell a story."}],
                                              max_tokens=16, temperature=1.0, top_p=0.9, seed=seed).choices[0].message.content
    assert ask(5) == ask(5)
    assert ask(5) != ask(6)


def test_adapter_by_name(client, server, reference):
    names = {m.id for m in client.models.list().data}
    assert names == {server["name"], "zh"}
    r = client.chat.completions.create(model="zh", messages=[{"role": "user", "content": QUESTIONS[2]}],
                                       max_tokens=16, temperature=0)
    assert r.choices[0].message.content == reference(QUESTIONS[2], 16, adapter=True)
    assert reference(QUESTIONS[2], 16, adapter=True) != reference(QUESTIONS[2], 16)


def test_utf8_is_never_split_in_a_stream(client, server):
    stream = client.chat.completions.create(model=server["name"], messages=[{"role": "user", "content": "用中文写一首诗，带表情符号🌧️"}],
                                            max_tokens=40, temperature=0, stream=True)
    for c in stream:
        if c.choices and c.choices[0].delta.content:
            assert "\ufffd" not in c.choices[0].delta.content


# ---- security and bad requests -------------------------------------------------------------


def test_api_key_and_health(server):
    port = server["port"]
    assert raw(port, "GET", "/health")[0] == 200  # open, for load balancers
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, body = raw(port, "GET", "/v1/models", headers=headers)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert raw(port, "GET", "/v1/models", headers=auth())[0] == 200


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"messages": "hi"}, 422, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 422, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "word " * 60000}]}, 413, None),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    got, payload = raw(server["port"], "POST", "/v1/chat/completions", body, auth())
    error = json.loads(payload)["error"]
    assert got == status, error
    assert error["param"] == param and error["message"] and error["type"]


def test_prompt_past_the_context_is_a_400(server):
    got, payload = raw(server["port"], "POST", "/v1/completions",
                       {"prompt": [2] + [1000] * 33000, "max_tokens": 4}, auth())  # context: 32,768
    error = json.loads(payload)["error"]
    assert got == 400 and error["code"] == "context_length_exceeded" and "32768" in error["message"]


# ---- load ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_32_concurrent_streams_mixed_lengths_adapters_and_a_killed_client(client, server, reference):
    port = server["port"]
    jobs = [(QUESTIONS[i % len(QUESTIONS)], 6 + (i * 7) % 26, i % 3 == 0) for i in range(32)]

    def stream(job):
        question, n, adapter = job
        s = client.chat.completions.create(model="zh" if adapter else server["name"], temperature=0, max_tokens=n,
                                           messages=[{"role": "user", "content": question}], stream=True)
        return "".join(c.choices[0].delta.content or "" for c in s if c.choices)

    def killed():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "Count to 500."}],
                     "max_tokens": 400, "stream": True}), {"Content-Type": "application/json", **auth()})
        resp = conn.getresponse()
        resp.read1(200)  # a few chunks, then the client vanishes
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()

    with futures.ThreadPoolExecutor(33) as pool:
        kill = pool.submit(killed)
        results = list(pool.map(stream, jobs, timeout=900))
        kill.result(timeout=120)
    for (question, n, adapter), text in zip(jobs, results):
        assert text == reference(question, n, adapter=adapter), (question, n, adapter)
    # the killed client's row was freed, and the server still serves and reports idle
    deadline = time.time() + 30
    while time.time() < deadline:
        health = json.loads(raw(port, "GET", "/health")[1])
        if health["running"] == 0 and health["waiting"] == 0:
            break
        time.sleep(0.5)
    assert health["running"] == 0 and health["waiting"] == 0
    assert "cancelled" in server["log"].read_text()


@pytest.mark.slow
def test_a_burst_of_malformed_requests_leaves_the_server_serving(client, server, reference):
    port = server["port"]
    bad = [(b"\xff\xfe", 400), (b"[]", 422), (b'{"messages": []}', 422), (b"x" * 300000, 413),
           (b'{"messages": [{"role": "user", "content": "hi"}], "stop": 5}', 422)]

    def send(item):
        body, status = item
        return raw(port, "POST", "/v1/chat/completions", body, auth())[0], status

    with futures.ThreadPoolExecutor(8) as pool:
        for got, want in pool.map(send, bad * 8):
            assert got == want
    assert raw(port, "POST", "/v1/chat/completions", b"{}", {})[0] == 401
    r = client.chat.completions.create(model=server["name"], messages=[{"role": "user", "content": QUESTIONS[3]}],
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.content == reference(QUESTIONS[3], 8)
    assert server["proc"].poll() is None


# ---- promises the openai client does not show (tests/conftest.py: issue 30) ------------------


@pytest.fixture(scope="module")
def library(model_dir):
    """The served model loaded in this process once: (model, tokenizer), for the library's answers."""
    from mlx_gemma.loading import load

    return load(str(model_dir))


def greedy(library, question, max_tokens):
    """`generate`'s greedy answer to one user message (what `reference` gives, without the adapter model)."""
    from mlx_gemma.generation import generate

    return generate(*library, [{"role": "user", "content": question}], max_tokens=max_tokens, temp=0.0)


def sse_events(port, path, body, timeout=300):
    """POST a streaming request over plain http.client; the list of `data:` payloads, exactly as sent."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **auth()})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    raw_text = resp.read().decode("utf-8")
    conn.close()
    assert raw_text.endswith("\n\n"), raw_text[-200:]
    events = [e for e in raw_text.split("\n\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: "):] for e in events]


def test_raw_sse_chat_stream_follows_the_chunk_rules(server, library):
    """The bytes on the wire: role first, one id, content-only chunks, a finish chunk without
    content, a usage chunk with choices [], then `data: [DONE]` last."""
    events = sse_events(server["port"], "/v1/chat/completions", {
        "messages": [{"role": "user", "content": QUESTIONS[4]}], "max_tokens": 12, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert not chunks[0]["choices"][0]["delta"].get("content")
    usage, finish, body = chunks[-1], chunks[-2], chunks[1:-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    assert finish["choices"][0]["finish_reason"] in ("stop", "length") and not finish["choices"][0]["delta"].get("content")
    assert body and all(set(c["choices"][0]["delta"]) == {"content"} and c["choices"][0]["finish_reason"] is None
                        for c in body)
    assert "".join(c["choices"][0]["delta"]["content"] for c in body) == greedy(library, QUESTIONS[4], 12)


def test_raw_sse_completions_stream(server, library):
    from mlx_gemma.generation import generate

    net, tok = library
    prompt = "The history of the printing press"
    events = sse_events(server["port"], "/v1/completions", {"prompt": prompt, "max_tokens": 10, "temperature": 0,
                                                            "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and all(c["object"] == "text_completion" for c in chunks)
    usage, finish, body = chunks[-1], chunks[-2], chunks[:-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    assert finish["choices"][0]["finish_reason"] == "length" and finish["choices"][0]["text"] == ""
    assert all(c["choices"][0]["finish_reason"] is None for c in body)
    assert "".join(c["choices"][0]["text"] for c in body) == generate(net, tok, prompt, max_tokens=10, temp=0.0)


def test_chat_logprobs_equal_a_full_forward_pass(client, server, library):
    """Chat logprobs / top_logprobs against a second path: greedy decoding by uncached forward
    passes over the whole sequence, each token's log_softmax there; tokens compared as bytes."""
    import mlx.core as mx
    import numpy as np

    from mlx_gemma.generation import encode_prompt

    messages = [{"role": "user", "content": QUESTIONS[0]}]
    r = client.chat.completions.create(model=server["name"], messages=messages, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8") == r.choices[0].message.content
    net, tok = library
    ids = encode_prompt(tok, messages)
    assert len(ids) == r.usage.prompt_tokens
    for k, e in enumerate(entries):
        logits = net(mx.array([ids]))[0, -1].astype(mx.float32)
        logp = np.array(logits - mx.logsumexp(logits))
        top = [int(i) for i in np.argsort(-logp)[:3]]
        assert bytes(e.bytes) == tok.token_bytes(top[0]), k  # greedy: the most likely token
        assert e.logprob == pytest.approx(float(logp[top[0]]), abs=2e-3), k
        assert [bytes(a.bytes) for a in e.top_logprobs] == [tok.token_bytes(i) for i in top], k
        assert [a.logprob for a in e.top_logprobs] == pytest.approx([float(logp[i]) for i in top], abs=2e-3), k
        ids.append(top[0])
    if len(entries) < 8:  # the answer ended: there the most likely next token is a stop token
        assert int(mx.argmax(net(mx.array([ids]))[0, -1]).item()) in tok.stop_ids


@pytest.mark.parametrize("options", [
    {"temperature": 0, "frequency_penalty": 1.5, "presence_penalty": 0.5},
    {"temperature": 0, "repetition_penalty": 1.3},
    {"temperature": 1.0, "top_k": 5, "seed": 7},
    {"temperature": 1.0, "min_p": 0.2, "seed": 7},
], ids=["frequency-presence", "repetition", "top_k", "min_p"])
def test_sampling_options_through_the_server_equal_the_library(client, server, library, options):
    """The server passes each option on: its text equals `generate` with the same options, and the
    option changes the text (for the penalties: vs the unpenalised greedy text)."""
    from mlx_gemma.generation import generate

    net, tok = library
    prompt = "List the numbers: one, two, one, two, one, two,"
    library = {"temperature": "temp", "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
               "repetition_penalty": "repetition_penalty", "top_k": "top_k", "min_p": "min_p", "seed": "seed"}
    named = {k: v for k, v in options.items() if k in ("temperature", "seed", "frequency_penalty", "presence_penalty")}
    extra = {k: v for k, v in options.items() if k not in named}  # not in OpenAI's API: sent as extra body fields
    r = client.completions.create(model=server["name"], prompt=prompt, max_tokens=24, extra_body=extra or None,
                                  **named)
    ours = generate(net, tok, prompt, max_tokens=24, **{library[k]: v for k, v in options.items()})
    assert r.choices[0].text == ours
    if options["temperature"] == 0:
        assert ours != generate(net, tok, prompt, max_tokens=24, temp=0.0)
    else:  # the filter matters: unfiltered sampling from the same seed gives another text
        assert ours != generate(net, tok, prompt, max_tokens=24, temp=1.0, seed=options["seed"])


def test_constrained_answer_cut_at_max_tokens_says_length(client, server):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "story": {"type": "string"}},
              "required": ["name", "story"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=server["name"], messages=[{"role": "user", "content": "Describe a cat as JSON."}], max_tokens=4,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)  # cut short: not (yet) a complete object
    assert r.choices[0].message.content.lstrip().startswith("{")


def test_one_batch_holds_greedy_top_k_and_min_p_rows_each_equal_to_alone(server):
    """Three requests at once share the decode batch (/health shows 3 running rows) and each row's
    text equals the same request sent alone: a row's sampler, seed and filters are its own."""
    port = server["port"]
    rows = [{"temperature": 0}, {"temperature": 1.0, "top_k": 8, "seed": 11}, {"temperature": 1.0, "min_p": 0.1, "seed": 12}]

    def ask(opts):
        body = {"messages": [{"role": "user", "content": "Tell me a long story about a dragon."}], "max_tokens": 48,
                **opts}
        status, payload = raw(port, "POST", "/v1/chat/completions", body, auth(), timeout=600)
        assert status == 200, payload
        return json.loads(payload)["choices"][0]["message"]["content"]

    alone = [ask(opts) for opts in rows]
    assert len(set(alone)) == 3
    widths = []
    with futures.ThreadPoolExecutor(3) as pool:
        together = [pool.submit(ask, opts) for opts in rows]
        while not all(f.done() for f in together):
            widths.append(json.loads(raw(port, "GET", "/health")[1])["running"])
            time.sleep(0.05)
        together = [f.result() for f in together]
    assert max(widths) >= 3, widths
    assert together == alone


def test_utf8_stream_delivers_the_whole_answer(client, server, library):
    """test_utf8_is_never_split_in_a_stream passes on an empty stream; this one needs the text."""
    question = "用中文写一首诗，带表情符号🌧️"
    stream = client.chat.completions.create(model=server["name"], messages=[{"role": "user", "content": question}],
                                            max_tokens=40, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert pieces and all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == greedy(library, question, 40)
