"""Speculative decoding with n-gram (prompt-lookup) drafts vs plain greedy, on Chinese Q&A.

The questions of data/zh_baike/test.jsonl (system prompt included) go through the embedded
Gemma 3 270M, greedy, alternating plain and `speculative="ngram"` per question for --repeats
rounds, in one process. Reports decode tok/s (median per mode), the draft acceptance rate
(accepted / drafted tokens) and tokens per verify step, and checks the answers are identical.

    python benchmarks/speculative.py [--questions 8] [--new-tokens 96] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import mlx_gemma  # noqa: F401  (OpenBLAS first)
from mlx_gemma.generation import stream_generate
from mlx_gemma.loading import load

DATA = Path(__file__).resolve().parent.parent / "data" / "zh_baike" / "test.jsonl"


def questions(n: int) -> list:
    """The first n conversations of the test split without their answers (system + user turns)."""
    out = []
    for line in DATA.read_text(encoding="utf-8").splitlines()[:n]:
        messages = json.loads(line)["messages"]
        out.append([m for m in messages if m["role"] != "assistant"])
    return out


def run(model, tok, messages, new, speculative):
    chunks = list(stream_generate(model, tok, messages, max_tokens=new, temp=0.0, speculative=speculative))
    stats = chunks[-1].stats
    return [c.token for c in chunks], stats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model, tok = load("gemma-3-270m", dtype="float32")
    qs = questions(args.questions)
    run(model, tok, qs[0], 8, None)  # compile traces
    run(model, tok, qs[0], 8, "ngram")
    tps = {None: [], "ngram": []}
    drafted = accepted = tokens = 0
    loads = []
    for _ in range(args.repeats):
        for q in qs:
            plain, s_plain = run(model, tok, q, args.new_tokens, None)
            spec, s_spec = run(model, tok, q, args.new_tokens, "ngram")
            assert spec == plain, "speculative output differs from plain greedy"
            tps[None].append(s_plain.generation_tps)
            tps["ngram"].append(s_spec.generation_tps)
            drafted, accepted, tokens = drafted + s_spec.drafted, accepted + s_spec.accepted, tokens + len(spec)
            loads.append(os.getloadavg()[0])
    steps = tokens - accepted  # one verify (or plain) step per token not taken from a draft
    a, b = statistics.median(tps[None]), statistics.median(tps["ngram"])
    print(f"\nGemma 3 270M fp32, greedy, {len(qs)} zh_baike questions x {args.repeats} rounds, up to "
          f"{args.new_tokens} new tokens, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"load {min(loads):.1f}-{max(loads):.1f}\n")
    print("| decoding | decode tok/s (median, min-max) | drafts accepted | tokens per step | speed-up |")
    print("|---|---:|---:|---:|---:|")
    print(f"| plain greedy | {a:.1f} ({min(tps[None]):.1f}-{max(tps[None]):.1f}) | - | 1.00 | 1.00x |")
    print(f"| n-gram drafts (k=4) | {b:.1f} ({min(tps['ngram']):.1f}-{max(tps['ngram']):.1f}) | "
          f"{accepted}/{drafted} ({accepted / max(drafted, 1):.0%}) | {tokens / max(steps, 1):.2f} | {b / a:.2f}x |")
    print("\nanswers identical to plain greedy: yes")


if __name__ == "__main__":
    main()
