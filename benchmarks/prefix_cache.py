"""Time to first token for turn 5 of a chat with ~2,000 tokens of history: the prefix cache's
point, side by side with mlx_lm.server and its own prompt cache.

Three servers on the same 270M dir, each in its own process on 127.0.0.1, all loaded before any
is measured: `mlx-gemma serve` (prefix cache on, the default), `mlx-gemma serve
--prompt-cache-mb 0` (off) and `mlx_lm.server` (its LRU prompt cache, on by default). Each round,
each server gets a conversation of its own (a round tag in the system prompt, so no round reuses
another's prefix), sent as a chat client does: four user turns, each carrying a ~450-token passage
and a question, each answered (greedy, --answer-tokens) and appended to the history with the
server's answer; then turn 5, a short question over ~2,000 tokens of history, whose time to
first token (to the first content chunk of the stream) is what is measured. Servers alternate
order every round. Reported: min / median / max over the rounds, load average, CPU.

    python benchmarks/prefix_cache.py --rounds 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from serve import free_port, machine_line, start, stop_all, wait_up

ROOT = Path(__file__).resolve().parent.parent
SERVERS = {"mlx-gemma (prefix cache)": ("mlx-gemma", ()),
           "mlx-gemma (no cache)": ("mlx-gemma", ("--prompt-cache-mb", "0")),
           "mlx_lm.server (its prompt cache)": ("mlx-lm", ())}
QUESTIONS = ["Summarise the passage in one sentence.", "What is the main point?", "Name one detail from it.",
             "What would you ask the author?"]


def passages() -> list:
    """Four ~450-token passages from the project's own English calibration text."""
    text = (ROOT / "data" / "calibration_en.txt").read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    out, i = [], 0
    for _ in range(4):
        chunk = []
        while len(" ".join(chunk)) < 2000:
            chunk.append(paragraphs[i % len(paragraphs)])
            i += 1
        out.append(" ".join(chunk))
    return out


def chat(port: int, model: str, messages: list, max_tokens: int) -> tuple[str, float]:
    """(answer, seconds to the first content chunk) for one streamed greedy chat request."""
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    begin, first, parts = time.perf_counter(), None, []
    with urllib.request.urlopen(req, timeout=900) as resp:
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    first = first or time.perf_counter()
                    parts.append(text)
    return "".join(parts), (first or time.perf_counter()) - begin


def conversation(port: int, model: str, tag: str, docs: list, answer_tokens: int) -> tuple[float, list]:
    """Turns 1-4 as a chat client sends them, then turn 5; (turn 5's time to first token, history)."""
    messages = [{"role": "system", "content": f"[{tag}] You are a careful reader. Answer briefly."}]
    for doc, question in zip(docs, QUESTIONS):
        messages.append({"role": "user", "content": f"{doc}\n\n{question}"})
        answer, _ = chat(port, model, messages, answer_tokens)
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": "Which of the passages did you like best, and why?"})
    _, ttft = chat(port, model, messages, 8)
    return ttft, messages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--answer-tokens", type=int, default=24)
    args = ap.parse_args()

    import mlx_gemma  # noqa: F401
    from mlx_gemma.loading import resolve
    from mlx_gemma.tokenizer import GemmaTokenizer

    model_dir = str(resolve(args.model))
    tokenizer = GemmaTokenizer(model_dir)
    docs = passages()
    ports = {name: free_port() for name in SERVERS}
    procs = {name: start(kind, model_dir, ports[name], extra) for name, (kind, extra) in SERVERS.items()}
    names = {name: os.path.basename(model_dir) if kind == "mlx-gemma" else model_dir
             for name, (kind, _) in SERVERS.items()}
    results = {name: [] for name in SERVERS}
    history_tokens = 0
    load_before, started = os.getloadavg(), datetime.datetime.now(datetime.timezone.utc)
    try:
        for name in SERVERS:
            wait_up(ports[name], procs[name])
            chat(ports[name], names[name], [{"role": "user", "content": "Hello"}], 4)  # warm-up
        for r in range(args.rounds):
            order = list(SERVERS) if r % 2 == 0 else list(SERVERS)[::-1]
            for name in order:
                ttft, messages = conversation(ports[name], names[name], f"round {r} {name}", docs, args.answer_tokens)
                results[name].append(ttft)
                history_tokens = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
                print(f"round {r + 1} {name:34s} turn-5 ttft {ttft:.3f} s ({history_tokens} prompt tokens)",
                      file=sys.stderr, flush=True)
    finally:
        stop_all(procs.values())
    load_after = os.getloadavg()
    print(f"\n{machine_line(started, load_before[0], load_after[0])} · {args.rounds} rounds · turn 5 prompt: "
          f"{history_tokens} tokens · answers of {args.answer_tokens} tokens\n")
    print("| server | turn-5 time to first token, s (min / median / max) |\n|---|---|")
    for name, runs in results.items():
        print(f"| {name} | {min(runs):.3f} / {statistics.median(runs):.3f} / {max(runs):.3f} |")
    ours, off, peer = (statistics.median(results[n]) for n in SERVERS)
    print(f"\n- prefix cache on vs off: {off / ours:.1f}x faster; vs mlx_lm.server's prompt cache: {peer / ours:.1f}x")


if __name__ == "__main__":
    main()
