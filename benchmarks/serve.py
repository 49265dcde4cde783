"""Server throughput side by side: `mlx-gemma serve` vs `mlx_lm.server` on the same weights.

Each server runs in its own process on 127.0.0.1 (both start first and stay idle while the other
is measured). For concurrency 1, 4 and 16, that many clients each stream one greedy chat answer
of --max-tokens tokens (prompts differ per client: Chinese and English questions); the engines
alternate within every round. Reported per engine and concurrency, over the rounds:
aggregate tokens/s (tokens of all answers / wall time of the burst; tokens counted by
re-tokenizing each answer with the model's tokenizer, so both servers are counted alike) and
time to first token (median over the requests of a burst), as min / median / max, with the
machine's load average before and after.

    python benchmarks/serve.py --rounds 3 --max-tokens 64
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

QUESTIONS = ["黄河发源于哪里？", "What is the capital of France?", "用一句话介绍长城。", "Why is the sky blue?",
             "什么是光合作用？", "Name three programming languages.", "长江有多长？", "What does a CPU do?"]


def cpu_name() -> str:
    """The CPU's model name as lscpu gives it (timings on these machines depend on it)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        out = ""
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor() or platform.machine())


def machine_line(started: datetime.datetime, load_before: float, load_after: float) -> str:
    """Date and time, CPU, cores and load average of a run, flagged when other work ran."""
    busy = " (measured while other work ran)" if max(load_before, load_after) > 2.5 else ""
    return (f"{started:%Y-%m-%d %H:%M} UTC · {cpu_name()} · {os.cpu_count()} cores · load average "
            f"{load_before:.2f} before, {load_after:.2f} after{busy}")


def stop_all(procs) -> None:
    """Terminate the server processes this benchmark started and wait for them."""
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port: int, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on {port} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"server on {port} did not come up")


def start(engine: str, model_dir: str, port: int, extra: tuple = ()):
    """Start one server process; `extra`: more command-line arguments for it."""
    env = dict(os.environ)
    if engine == "mlx-gemma":
        cmd = [sys.executable, "-m", "mlx_gemma.cli", "serve", "--model", model_dir, "--port", str(port),
               "--log-level", "warning", *extra]
    else:
        # mlx-lm loads the same HF-layout dir; OpenBLAS under its matmuls too, as for us (same BLAS)
        cmd = [sys.executable, "-c", "import mlx_gemma, runpy, sys; sys.argv = ['mlx_lm.server'] + sys.argv[1:]; "
               "runpy.run_module('mlx_lm.server', run_name='__main__')", "--model", model_dir, "--port", str(port),
               "--log-level", "WARNING", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stream_one(port: int, model: str, question: str, max_tokens: int) -> tuple[str, float]:
    """(answer text, seconds to the first content chunk) for one streamed greedy chat request."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first, parts = None, []
    with urllib.request.urlopen(req, timeout=900) as resp:
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    first = first or time.perf_counter()
                    parts.append(text)
    return "".join(parts), (first or time.perf_counter()) - start


def burst(port: int, model: str, concurrency: int, max_tokens: int, tokenizer) -> dict:
    """One burst of `concurrency` clients; a request the server fails (a reset connection, an
    HTTP error) counts in "failed" and adds no tokens."""
    jobs = [QUESTIONS[i % len(QUESTIONS)] for i in range(concurrency)]

    def one(question):
        try:
            return stream_one(port, model, question, max_tokens)
        except OSError:  # ConnectionResetError, urllib's HTTPError / URLError
            return None

    start = time.perf_counter()
    with futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, jobs))
    wall = time.perf_counter() - start
    done = [r for r in results if r is not None]
    tokens = sum(len(tokenizer.encode(text, add_bos=False)) for text, _ in done)
    ttft = statistics.median(t for _, t in done) if done else float("nan")
    return {"tps": tokens / wall, "ttft": ttft, "tokens": tokens, "failed": len(results) - len(done)}


def spread(values) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--engines", default="mlx-gemma,mlx-lm")
    args = ap.parse_args()

    import mlx_gemma  # noqa: F401
    from mlx_gemma.loading import resolve
    from mlx_gemma.tokenizer import GemmaTokenizer

    model_dir = str(resolve(args.model))
    tokenizer = GemmaTokenizer(model_dir)
    engines = args.engines.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    ports = {e: free_port() for e in engines}
    procs = {e: start(e, model_dir, ports[e]) for e in engines}
    load_before, started = os.getloadavg(), datetime.datetime.now(datetime.timezone.utc)
    results = {(e, c): [] for e in engines for c in levels}
    # the id each server knows the model by: ours serves the dir's name, mlx-lm the path it loaded
    names = {e: os.path.basename(model_dir) if e == "mlx-gemma" else model_dir for e in engines}
    try:
        for e in engines:
            wait_up(ports[e], procs[e])
            stream_one(ports[e], names[e], QUESTIONS[0], 4)  # warm-up (compile, caches)
        for r in range(args.rounds):
            for c in levels:
                for e in (engines if r % 2 == 0 else engines[::-1]):
                    res = burst(ports[e], names[e], c, args.max_tokens, tokenizer)
                    results[(e, c)].append(res)
                    print(f"round {r + 1} {e:10s} c={c:2d}: {res['tps']:6.1f} tok/s, ttft {res['ttft']:.2f} s, "
                          f"{res['failed']} failed", file=sys.stderr, flush=True)
    finally:
        stop_all(procs.values())
    load_after = os.getloadavg()
    print(f"\n{machine_line(started, load_before[0], load_after[0])} · {args.rounds} rounds · "
          f"{args.max_tokens} new tokens per request\n")
    print("| engine | clients | aggregate tok/s (min / median / max) | time to first token, s (min / median / max) "
          "| failed requests |")
    print("|---|---|---|---|---|")
    for c in levels:
        for e in engines:
            runs = results[(e, c)]
            print(f"| {e} | {c} | {spread([x['tps'] for x in runs])} | {spread([x['ttft'] for x in runs])} "
                  f"| {sum(x['failed'] for x in runs)} |")
    if len(engines) == 2:
        print()
        for c in levels:
            ours = statistics.median(x["tps"] for x in results[(engines[0], c)])
            theirs = statistics.median(x["tps"] for x in results[(engines[1], c)])
            print(f"- {c} clients: {engines[0]} / {engines[1]} = {ours / theirs:.2f}x aggregate tokens/s")


if __name__ == "__main__":
    main()
