"""Issue 32, cases 5 and 6, from outside: a real `mlx-gemma serve` process on the embedded 270M,
raw HTTP on loopback, `/health` as the witness.

- A non-streaming completion whose client closes the socket frees its row, as a streaming
  client's does (before: the row decoded on to max_tokens).
- A 1-token request that arrives while a long prompt prefills is answered long before that
  prefill ends: prefill is one bounded chunk per engine step, interleaved with other prompts and
  decoding (before: it waited behind the whole prefill).
- A prompt whose client leaves during its prefill is dropped from the queue (before: the prefill
  went on).
Timing assertions are ratios between requests of one run, so a loaded machine slows both sides.
Every wait is bounded; the server is stopped at the end.
"""

import http.client
import json
import socket
import threading
import time

import pytest

from test_serve import launch, raw, stop

pytestmark = pytest.mark.slow  # the 270M model in a server process

LONG_PROMPT = 2500  # token ids: seconds of prefill in 256-token chunks on any CPU seen here (minutes under load)
TIMEOUT = 900  # seconds an HTTP answer may take on a machine loaded by other work


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from mlx_gemma.loading import resolve

    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc, port = launch(resolve("gemma-3-270m"), log, "--prefill-step", "256")
    yield {"port": port, "proc": proc, "log": log}
    stop(proc)


def health(port) -> dict:
    return json.loads(raw(port, "GET", "/health")[1])


def wait_for(port, test, seconds: float) -> dict:
    """Poll /health until test(body) holds; the last body (the caller asserts on it)."""
    deadline = time.time() + seconds
    body = health(port)
    while not test(body) and time.time() < deadline:
        time.sleep(0.2)
        body = health(port)
    return body


def open_request(port, path: str, body: dict) -> socket.socket:
    """Send a POST and return the socket without reading the answer (the client 'hangs')."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def timed_post(port, body: dict, out: dict, key: str) -> None:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    out[key] = (response.status, json.loads(response.read()), time.perf_counter() - start, time.perf_counter())


def long_ids(n: int, shift: int = 0) -> list:
    """n prompt ids; another shift shares only <bos> with them (no prompt-cache hit)."""
    return [2] + [1000 + (i * 7919 + shift) % 20000 for i in range(n - 1)]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 3000, "temperature": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count from 1 to 5000, one number a line."}],
                              "max_tokens": 3000, "temperature": 0}),
])
def test_a_non_streaming_client_that_leaves_frees_its_row(server, path, body):
    port = server["port"]
    sock = open_request(port, path, body)
    busy = wait_for(port, lambda b: b["running"] == 1, 120)
    assert busy["running"] == 1  # it decodes (3,000 tokens would take minutes)
    time.sleep(1.0)
    sock.close()
    idle = wait_for(port, lambda b: b["running"] == 0 and b["waiting"] == 0, 60)
    assert idle["running"] == 0 and idle["waiting"] == 0, idle  # 3,000 tokens would take minutes more
    assert "(client gone)" in server["log"].read_text()


def test_a_short_request_is_answered_while_a_long_prompt_prefills_and_a_left_prefill_is_dropped(server):
    port = server["port"]
    out: dict = {}
    long = threading.Thread(target=timed_post, args=(port, {"prompt": long_ids(LONG_PROMPT), "max_tokens": 1,
                                                           "temperature": 0}, out, "long"))
    long.start()
    assert wait_for(port, lambda b: b["waiting"] == 1, 120)["waiting"] == 1  # its prefill has begun
    time.sleep(1.5)
    timed_post(port, {"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}, out, "short")
    long.join(timeout=TIMEOUT)
    (s_status, s_body, s_latency, s_end), (l_status, l_body, l_latency, l_end) = out["short"], out["long"]
    assert s_status == l_status == 200
    assert l_body["usage"]["prompt_tokens"] == LONG_PROMPT and s_body["choices"][0]["text"]
    assert s_end < l_end  # answered while the long prompt was still prefilling
    assert s_latency < 0.5 * l_latency, (s_latency, l_latency)

    # The same prompt again, its client gone as soon as the prefill begins: it is dropped from
    # the queue (after the chunk in progress), long before its prefill could have ended.
    start = time.perf_counter()
    # (another prompt: the first one's keys are in the server's prompt cache and would need no prefill)
    sock = open_request(port, "/v1/completions", {"prompt": long_ids(LONG_PROMPT, shift=1), "max_tokens": 1})
    assert wait_for(port, lambda b: b["waiting"] == 1, 120)["waiting"] == 1
    sock.close()
    idle = wait_for(port, lambda b: b["waiting"] == 0 and b["running"] == 0, l_latency)
    gone = time.perf_counter() - start
    assert idle["waiting"] == 0 and idle["running"] == 0
    assert gone < 0.6 * l_latency, (gone, l_latency)
    assert "cancelled after 0 tokens (client gone)" in server["log"].read_text()
