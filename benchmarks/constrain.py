"""Per-token cost of constrained decoding (the grammar mask) at batch 1 and 16.

On the embedded Gemma 3 270M, B rows (1 and 16) decode --tokens greedy tokens each on one
BatchGenerator, once free and once with every row under a JSON Schema (response_format-style);
the two alternate within each round. Reported over the rounds, as min / median / max:
- step ms: wall time of one decode step of the whole batch (model + sampling + mask);
- mask ms/token: time inside the grammar processors per row-token (llguidance's mask into a
  bit array, its expansion to a (1, V) MLX mask; the forward pass overlaps it, see constrain.py);
- overhead: (constrained step - free step) / B, the added cost per generated token.
Absolute times on shared machines move by +-30%; the ratio is what counts.

    python benchmarks/constrain.py --rounds 3 --tokens 32
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import mlx_gemma  # (OpenBLAS before mlx.core)
mlx_gemma.cpu.enable()  # the CPU paths as the CLI runs them (calibrated on this machine)

from mlx_gemma.constrain import GrammarMask, grammar_tokenizer, json_schema_constraint
from mlx_gemma.generation import BatchGenerator, Request, SamplingParams, encode_prompt
from mlx_gemma.loading import load, resolve

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "tags", "score"],
          "properties": {"name": {"type": "string", "maxLength": 200},
                         "tags": {"type": "array", "items": {"type": "string"}},
                         "score": {"type": "number"}}}
QUESTIONS = ["Describe a city as JSON.", "用JSON描述一本书。", "Give a product as JSON.", "Describe a person as JSON."]


class Timed:
    """A processor wrapper that adds up the time spent inside it."""

    def __init__(self, inner, clock: list):
        self.inner, self.clock = inner, clock

    def __call__(self, history, logits):
        start = time.perf_counter()
        out = self.inner(history, logits)
        self.clock.append(time.perf_counter() - start)
        return out


def run(model, tok, batch: int, tokens: int, constrained: bool, constraint) -> tuple[float, float]:
    """(median step seconds, median mask seconds per row-token) for one pass."""
    engine = BatchGenerator(model, tok)
    params = SamplingParams(max_tokens=tokens, stop=())
    clock: list = []
    for i in range(batch):
        ids = encode_prompt(tok, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
        procs = [Timed(GrammarMask(constraint, tok), clock)] if constrained else []
        engine.submit(Request(ids, params, processors=procs))
    while len(engine.active) < batch:  # prefill everything first: time decode steps only
        engine.step()
    steps = []
    while engine.busy and len(engine.active) == batch:
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    while engine.busy:
        engine.step()
    return statistics.median(steps[1:] or steps), (statistics.median(clock) if clock else 0.0)


def spread(xs) -> str:
    return f"{min(xs):.1f} / {statistics.median(xs):.1f} / {max(xs):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args()

    model, tok = load(str(resolve("gemma-3-270m")))
    start = time.perf_counter()
    grammar_tokenizer(tok)
    setup = time.perf_counter() - start
    constraint = json_schema_constraint(SCHEMA)
    run(model, tok, 1, 4, True, constraint)  # warm-up: compile traces, the grammar's lexer
    print(f"# {datetime.date.today()} {platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"grammar vocabulary setup {setup:.1f} s (once per tokenizer)")
    print("| batch | step ms free | step ms constrained | mask ms / row-token | overhead ms / token |")
    print("|---:|---:|---:|---:|---:|")
    for batch in [int(b) for b in args.batches.split(",")]:
        free, cons, mask, over = [], [], [], []
        for _ in range(args.rounds):
            f, _ = run(model, tok, batch, args.tokens, False, constraint)
            c, m = run(model, tok, batch, args.tokens, True, constraint)
            free.append(f * 1e3)
            cons.append(c * 1e3)
            mask.append(m * 1e3)
            over.append((c - f) * 1e3 / batch)
        print(f"| {batch} | {spread(free)} | {spread(cons)} | {spread(mask)} | {spread(over)} |", flush=True)
    print("(min / median / max over rounds; each value the median over the decode steps of one pass)")


if __name__ == "__main__":
    main()
