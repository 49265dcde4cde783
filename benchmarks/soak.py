"""Soak test of `mlx-gemma serve`: N minutes of mixed valid and malformed requests from 16 clients,
some of them dropping their connection, against one server on loopback (issue #32).

    python benchmarks/soak.py                 # 10 minutes, 16 clients, the embedded 270M
    python benchmarks/soak.py --minutes 3     # shorter, on a busy machine

What it reports: every request by kind and HTTP status; anything unexpected (a 5xx, a refused
connection, a status the kind should not get); whether the server process lived; its RSS sampled
every 10 s beside the prompt-prefix cache's size from /metrics (that cache may grow up to
--prompt-cache-mb, 512 by default; RSS less the cache flat after warm-up means no leak); and /health's running/waiting rows at the end
(must come back to 0). The server is stopped with SIGTERM at the end; its exit status is reported.

Bounded: traffic goes to 127.0.0.1 only, each client stops at the deadline, every request has a
timeout, and the whole run ends within --minutes plus a minute or two.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REQUEST_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ref_chain(n):
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(n)}
    defs[f"d{n}"] = {"type": "string"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "year"],
          "properties": {"city": {"enum": ["Paris", "Rome"]}, "year": {"type": "integer", "minimum": 1900,
                                                                       "maximum": 2100}}}
QUESTIONS = ["Name three colors.", "用一句话介绍长城。", "What is 2+2?", "Write a haiku about rain.",
             "List the planets.", "你好，今天怎么样？"]


def chat_body(rng, max_tokens, **extra):
    return {"model": "gemma-3-270m", "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
            "max_tokens": max_tokens, "temperature": rng.choice([0, 0.7, 1.0]), **extra}


def deep_body(n: int) -> bytes:
    return b'{"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], "x": ' + \
        b"[" * n + b"]" * n + b"}"


def requests(max_tokens: int):
    """{kind: (expected statuses, maker(rng) -> (path, body bytes, mode))}; mode: whole, stream,
    drop-stream (close after the first chunk), drop-whole (close before the answer)."""
    def j(obj):
        return json.dumps(obj).encode()

    fmt = lambda schema: {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}  # noqa: E731
    return {
        "chat": ({200}, lambda r: ("/v1/chat/completions", j(chat_body(r, max_tokens)), "whole")),
        "chat stream": ({200}, lambda r: ("/v1/chat/completions", j(chat_body(r, max_tokens, stream=True)), "stream")),
        "completion": ({200}, lambda r: ("/v1/completions", j({"model": "gemma-3-270m", "prompt": r.choice(QUESTIONS),
                                                                "max_tokens": max_tokens}), "whole")),
        "json_schema": ({200}, lambda r: ("/v1/chat/completions",
                                          j(chat_body(r, 24, response_format=fmt(SCHEMA))), "whole")),
        "stream, client drops": ({200}, lambda r: ("/v1/chat/completions",
                                                   j(chat_body(r, 4 * max_tokens, stream=True)), "drop-stream")),
        "whole, client drops": ({200}, lambda r: ("/v1/chat/completions", j(chat_body(r, max_tokens)), "drop-whole")),
        "bad JSON": ({400}, lambda r: ("/v1/chat/completions", b'{"model": "x", "messages": [', "whole")),
        "wrong types": ({422}, lambda r: ("/v1/chat/completions", j({"messages": "hi", "max_tokens": "x"}), "whole")),
        "NaN / 401-digit numbers": ({400}, lambda r: ("/v1/chat/completions", j(chat_body(
            r, max_tokens, temperature=r.choice([float("nan"), 10 ** 400, 1e300]))), "whole")),
        "lone surrogate": ({400}, lambda r: ("/v1/chat/completions", j({"model": "gemma-3-270m", "messages": [
            {"role": "user", "content": "hi \ud800"}]}), "whole")),
        "nested 5,000 deep": ({400}, lambda r: ("/v1/chat/completions", deep_body(5000), "whole")),
        "$ref chain 3,000": ({400}, lambda r: ("/v1/chat/completions",
                                               j(chat_body(r, 8, response_format=fmt(ref_chain(3000)))), "whole")),
        '{"$ref": "#"}': ({400}, lambda r: ("/v1/chat/completions",
                                            j(chat_body(r, 8, response_format=fmt({"$ref": "#"}))), "whole")),
        "unknown model": ({404}, lambda r: ("/v1/chat/completions", j({**chat_body(r, 4), "model": "../etc"}), "whole")),
        # the server answers 413 from Content-Length and closes while the client is still sending
        "body too large": ({413, "BrokenPipeError", "ConnectionResetError"}, lambda r: ("/v1/completions", j({"prompt": "x" * (5 << 20)}), "whole")),
    }


def send(port: int, path: str, body: bytes, mode: str, rng) -> int:
    """One request; returns the HTTP status (0 when this client dropped it on purpose)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        if mode == "drop-whole":
            time.sleep(rng.uniform(0.2, 2.0))
            return 0
        resp = conn.getresponse()
        if mode == "drop-stream":
            resp.readline()
            return 0
        resp.read()
        return resp.status
    finally:
        conn.close()


def client(port, deadline, kinds, seed, counts, unexpected, lock):
    rng = random.Random(seed)
    names = list(kinds)
    weights = [4 if n in ("chat", "chat stream", "completion") else 1 for n in names]
    while time.time() < deadline:
        name = rng.choices(names, weights)[0]
        expected, make = kinds[name]
        path, body, mode = make(rng)
        try:
            status = send(port, path, body, mode, rng)
        except (OSError, http.client.HTTPException) as exc:
            status = f"{type(exc).__name__}"
        with lock:
            counts[(name, status)] += 1
            if status != 0 and status not in expected and status != "TimeoutError":
                unexpected.append((name, status))


def health(port) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


def prompt_cache_mib(port) -> float:
    """The server's prompt-prefix cache size from /metrics (parsed by prometheus_client): the part
    of the RSS that is meant to grow, up to --prompt-cache-mb."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    for family in text_string_to_metric_families(text):
        if family.name == "mlx_gemma_prompt_cache_bytes":
            return family.samples[0].value / (1 << 20)
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the clients send requests")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--max-tokens", type=int, default=16, help="answer length of the valid requests")
    ap.add_argument("--log", default=None, help="server log file (default: a temporary file)")
    args = ap.parse_args()
    if not 0 < args.minutes <= 60 or not 1 <= args.clients <= 64:
        ap.error("--minutes must be in (0, 60] and --clients in [1, 64]")

    port = free_port()
    log = Path(args.log or f"/tmp/soak-server-{os.getpid()}.log")
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlx_gemma.cli", "serve", "--model", args.model, "--port",
                                   str(port), "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT)
    try:
        start = time.time()
        while True:
            try:
                health(port)
                break
            except OSError:
                if server.poll() is not None or time.time() - start > 300:
                    print(log.read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.5)
        return soak(args, port, server, log)
    finally:
        if server.poll() is None:
            server.kill()


def soak(args, port, server, log) -> int:
    kinds = requests(args.max_tokens)
    counts, unexpected, lock = Counter(), [], threading.Lock()
    t0 = time.time()
    deadline = t0 + 60 * args.minutes
    threads = [threading.Thread(target=client, args=(port, deadline, kinds, i, counts, unexpected, lock), daemon=True)
               for i in range(args.clients)]
    for t in threads:
        t.start()
    rss = []  # (seconds since start, RSS MiB, prompt-cache MiB)
    while any(t.is_alive() for t in threads) and server.poll() is None:
        rss.append((time.time() - t0, rss_mib(server.pid), prompt_cache_mib(port)))
        time.sleep(10)
    for t in threads:
        t.join(timeout=REQUEST_TIMEOUT_S)
    lived = server.poll() is None
    final, waited = {}, 0.0
    while lived and waited < 120:  # rows of dropped clients must all leave
        final = health(port)
        if final["running"] == 0 and final["waiting"] == 0:
            break
        time.sleep(1)
        waited += 1
    server.send_signal(signal.SIGTERM)
    try:
        code = server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        code = "did not exit in 120 s"
    report(args, counts, unexpected, rss, lived, final, waited, code, log, time.time() - t0)
    return 0 if lived and not unexpected and final.get("running") == 0 and code in (0, 143) else 1


def report(args, counts, unexpected, rss, lived, final, waited, code, log, elapsed) -> None:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    print(f"soak: {args.minutes:g} min, {args.clients} clients, {args.model}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {cpu}, {os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.1f}")
    print(f"\n| kind | requests | statuses |\n|---|---:|---|")
    by_kind: dict = {}
    for (name, status), n in sorted(counts.items(), key=lambda kv: str(kv[0])):
        by_kind.setdefault(name, []).append((status, n))
    for name, items in by_kind.items():
        total = sum(n for _, n in items)
        shown = ", ".join(f"{'dropped' if s == 0 else s}: {n}" for s, n in items)
        print(f"| {name} | {total} | {shown} |")
    timeouts = sum(n for (_, status), n in counts.items() if status == "TimeoutError")
    print(f"\nrequests: {sum(counts.values())} in {elapsed / 60:.1f} min; unexpected answers: {len(unexpected)}"
          + (f" {Counter(unexpected).most_common(5)}" if unexpected else "")
          + f"; client timeouts (no answer within {REQUEST_TIMEOUT_S} s): {timeouts}")
    print(f"server alive at the end: {lived}; exit status after SIGTERM: {code}")
    if rss:
        for label, values in (("RSS", [(t, m) for t, m, _ in rss]),
                              ("RSS less the prompt cache", [(t, m - c) for t, m, c in rss])):
            warm = [m for t, m in values if t >= 60] or [m for _, m in values]
            print(f"{label}, MiB: first sample {values[0][1]:.0f}, after warm-up (>= 60 s) min {min(warm):.0f} / "
                  f"max {max(warm):.0f} / last {values[-1][1]:.0f} ({len(values)} samples)")
        print("over time (s: RSS / prompt cache MiB): "
              + ", ".join(f"{t:.0f}: {m:.0f} / {c:.0f}" for t, m, c in rss[::max(1, len(rss) // 12)]))
    print(f"/health at the end: running {final.get('running')}, waiting {final.get('waiting')} "
          f"(after {waited:.0f} s of waiting for rows to leave)")
    text = log.read_text(errors="replace")
    print(f"server log: {len(text.splitlines())} lines, longest {max((len(l) for l in text.splitlines()), default=0)} "
          f"chars, tracebacks: {text.count('Traceback')}")


if __name__ == "__main__":
    sys.exit(main())
