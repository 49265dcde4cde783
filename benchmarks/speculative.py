"""Speculative decoding vs plain greedy on Chinese Q&A: n-gram (prompt-lookup) drafts and draft models.

The questions of data/zh_baike/test.jsonl (system prompt included) go through the embedded
Gemma 3 270M (fp32), greedy, alternating the modes per question for --repeats rounds, in one
process: plain greedy, `speculative="ngram"`, and `draft_model=` the same 270M quantized to 8 and
to 4 bits (group 64; no smaller Gemma 3 exists offline, and a quantized copy is the cheapest
drafter that mostly agrees). Reports decode tok/s (median per mode), the draft acceptance rate
(accepted / drafted tokens), tokens per verify step, and checks every answer equals plain greedy's.

    python benchmarks/speculative.py [--questions 8] [--new-tokens 96] [--repeats 2] [--modes plain,ngram,q8,q4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import mlx_gemma  # (OpenBLAS before mlx.core)
mlx_gemma.cpu.enable()  # the CPU paths as the CLI runs them (calibrated on this machine)
from mlx_gemma.generation import stream_generate
from mlx_gemma.loading import load

DATA = Path(__file__).resolve().parent.parent / "data" / "zh_baike" / "test.jsonl"
LABELS = {"plain": "plain greedy", "ngram": "n-gram drafts (k=4)", "q8": "draft model: the 270M in 8 bits (k=4)",
          "q4": "draft model: the 270M in 4 bits (k=4)"}


def questions(n: int) -> list:
    """The first n conversations of the test split without their answers (system + user turns)."""
    out = []
    for line in DATA.read_text(encoding="utf-8").splitlines()[:n]:
        messages = json.loads(line)["messages"]
        out.append([m for m in messages if m["role"] != "assistant"])
    return out


def drafter(bits: int):
    from mlx_gemma.cpu.calibrate import prepare
    from mlx_gemma.quant import quantize_model

    model, _ = load("gemma-3-270m", dtype="float32")
    quantize_model(model, bits=bits, group_size=64)
    prepare(model)  # the quantized model's own choices (native kernel, host step)
    return model


def run(model, tok, messages, new, how):
    chunks = list(stream_generate(model, tok, messages, max_tokens=new, temp=0.0, **how))
    return [c.token for c in chunks], chunks[-1].stats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default="plain,ngram,q8,q4")
    args = ap.parse_args()
    modes = ["plain"] + [m for m in args.modes.split(",") if m != "plain"]
    model, tok = load("gemma-3-270m", dtype="float32")
    how = {"plain": {}, "ngram": {"speculative": "ngram"}}
    for m in modes:
        if m in ("q8", "q4"):
            how[m] = {"draft_model": drafter(int(m[1]))}
    qs = questions(args.questions)
    for m in modes:
        run(model, tok, qs[0], 8, how[m])  # compile traces, native kernel build
    tps = {m: [] for m in modes}
    counts = {m: [0, 0, 0] for m in modes}  # drafted, accepted, tokens
    loads = []
    for _ in range(args.repeats):
        for q in qs:
            plain = None
            for m in modes:
                out, stats = run(model, tok, q, args.new_tokens, how[m])
                plain = out if plain is None else plain
                assert out == plain, f"{m}: speculative output differs from plain greedy"
                tps[m].append(stats.generation_tps)
                c = counts[m]
                c[0], c[1], c[2] = c[0] + stats.drafted, c[1] + stats.accepted, c[2] + len(out)
                loads.append(os.getloadavg()[0])
    base = statistics.median(tps["plain"])
    print(f"\nGemma 3 270M fp32, greedy, {len(qs)} zh_baike questions x {args.repeats} rounds, up to "
          f"{args.new_tokens} new tokens, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"load {min(loads):.1f}-{max(loads):.1f}\n")
    print("| decoding | decode tok/s (median, min-max) | drafts accepted | tokens per step | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for m in modes:
        drafted, accepted, tokens = counts[m]
        med = statistics.median(tps[m])
        rate = f"{accepted}/{drafted} ({accepted / max(drafted, 1):.0%})" if m != "plain" else "-"
        per_step = tokens / max(tokens - accepted, 1)  # one verify (or plain) step per token not from a draft
        print(f"| {LABELS[m]} | {med:.1f} ({min(tps[m]):.1f}-{max(tps[m]):.1f}) | {rate} | {per_step:.2f} | "
              f"{med / base:.2f}x |")
    print("\nanswers identical to plain greedy: yes")


if __name__ == "__main__":
    main()
