"""A short generate repeated on one model: what one engine per model saves between calls.

`generate(model, tok, prompt, max_tokens=4)` on the embedded Gemma 3 270M, the first call and
then REPEATS more on the same model, each in one process per round, twice: as a library user
runs it by default (MLX's own kernels) and as the CLI runs it (`mlx_gemma.cpu.enable()`: the CPU
paths this machine's calibration keeps). Rounds alternate between this checkout and another one
given with --other (e.g. the code before the engine was kept per model), each run with that
checkout's own `mlx_gemma` (code from before mlx_gemma.cpu existed runs its CPU paths in both
modes). Prints min / median / max of the first call and of the repeated
calls' medians, and harness's machine line (CPU, load, date).

    python benchmarks/repeat_generate.py [--other /path/to/checkout [--other-home DIR]] [--rounds 3] [--repeats 5]

--other-home gives the other checkout its own MLX_GEMMA_HOME (an older model cache format).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import harness

CHILD = r"""
import json, sys, time
import mlx_gemma
try:
    import mlx_gemma.cpu as cpu
except ImportError:  # code from before the CPU paths were optional: they are always on
    cpu = None
if sys.argv[2] == "cli" and cpu is not None:
    cpu.enable()
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


MODES = {"library": "library default (MLX kernels)", "cli": "as the CLI runs (cpu.enable())"}


def run(checkout: Path, repeats: int, mode: str, home=None) -> list:
    env = {**os.environ, "PYTHONPATH": str(checkout), **({"MLX_GEMMA_HOME": str(home)} if home else {})}
    out = subprocess.run([sys.executable, "-c", CHILD, str(repeats), mode], cwd=checkout, env=env, capture_output=True,
                         text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, default=None, help="another checkout to compare with")
    parser.add_argument("--other-home", type=Path, default=None, help="MLX_GEMMA_HOME for --other")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    checkouts = {"this checkout": here, **({str(args.other): args.other} if args.other else {})}
    runs = [(name, mode) for name in checkouts for mode in MODES]
    results = {run_: {"first": [], "repeat": []} for run_ in runs}
    loads = []
    for r in range(args.rounds):
        for name, mode in harness.round_order(runs, r):
            loads.append(os.getloadavg()[0])
            times = run(checkouts[name], args.repeats, mode, args.other_home if name == str(args.other) else None)
            results[name, mode]["first"].append(times[0])
            results[name, mode]["repeat"].append(statistics.median(times[1:]))
            loads.append(os.getloadavg()[0])
    print(f"# {harness.machine_header(loads)}; {args.rounds} rounds, {args.repeats} repeated calls per process")
    print("| code | mode | first call, s (min / median / max) | repeated call, s (min / median / max) |")
    print("|---|---|---|---|")
    for (name, mode), r in results.items():
        print(f"| {name} | {MODES[mode]} | {spread(r['first'])} | {spread(r['repeat'])} |")


if __name__ == "__main__":
    main()
