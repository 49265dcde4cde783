"""A short generate repeated on one model: what one engine per model saves between calls.

`generate(model, tok, prompt, max_tokens=4)` on the embedded Gemma 3 270M, the first call and
then REPEATS more on the same model, each in one process per round; rounds alternate between
this checkout and another one given with --other (e.g. /work/main, the code before the engine
was kept per model), each run with that checkout's own `mlx_gemma`. Prints min / median / max of
the first call and of the repeated calls' medians, and the load average.

    python benchmarks/repeat_generate.py [--other /path/to/checkout] [--rounds 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
from mlx_gemma.loading import load
from mlx_gemma.generation import generate
model, tok = load("gemma-3-270m")
times = []
for _ in range(1 + int(sys.argv[1])):
    start = time.perf_counter()
    generate(model, tok, "The capital of France is", max_tokens=4, temp=0.0)
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def run(checkout: Path, repeats: int) -> list:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(repeats)], cwd=checkout, env=env, capture_output=True,
                         text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, default=None, help="another checkout to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    checkouts = {"this checkout": here, **({str(args.other): args.other} if args.other else {})}
    results = {name: {"first": [], "repeat": []} for name in checkouts}
    loads = []
    for _ in range(args.rounds):
        for name, path in checkouts.items():
            times = run(path, args.repeats)
            results[name]["first"].append(times[0])
            results[name]["repeat"].append(statistics.median(times[1:]))
            loads.append(os.getloadavg()[0])
    print(f"| code | first call, s (min / median / max) | repeated call, s (min / median / max) |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {spread(r['first'])} | {spread(r['repeat'])} |")
    print(f"load average during the rounds: {min(loads):.1f} .. {max(loads):.1f}")


if __name__ == "__main__":
    main()
