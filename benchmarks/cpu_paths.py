"""Each CPU path with and without, as the calibration times it, on this machine: the 270M in fp32
and in 8 bits (group 64), every round in a fresh process with an empty calibration cache.

For each path (mlx_gemma.cpu.PATHS) the table gives MLX's time and the path's time for the piece
the calibration measures (fastest of 3 alternating calls, see mlx_gemma/cpu/calibrate.py), their
ratio (min / median / max over the rounds) and whether the path would be kept (ratio >= MARGIN in
the median), plus how long a whole calibration took. The header names the CPU and the load.

    python benchmarks/cpu_paths.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def child(bits: int) -> None:
    import mlx_gemma
    import mlx.core as mx

    from mlx_gemma.cpu import calibrate
    from mlx_gemma.loading import load

    mlx_gemma.cpu.enable()
    os.environ["MLX_GEMMA_CPU_PATHS"] = "all=off"  # load without calibrating; timed below
    model, _ = load("gemma-3-270m", dtype="float32")
    del os.environ["MLX_GEMMA_CPU_PATHS"]
    if bits:
        from mlx_gemma.quant import quantize_model

        quantize_model(model, bits=bits, group_size=64)
    mx.eval(model.parameters())
    pieces = {}

    def measure(ours, theirs):
        ours(), theirs()
        best = [float("inf"), float("inf")]
        for _ in range(calibrate.ROUNDS):
            for i, fn in enumerate((ours, theirs)):
                start = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - start)
        pieces[len(pieces)] = best
        return best[1] / best[0]

    start = time.perf_counter()
    choices = calibrate.calibrate(model, measure=measure)
    total = time.perf_counter() - start
    timed = iter(pieces.values())
    out = {}
    for name, c in choices.items():
        if c.ratio is not None:
            ours, theirs = next(timed)
            out[name] = {"ours_ms": ours * 1e3, "mlx_ms": theirs * 1e3, "ratio": c.ratio}
    print(json.dumps({"paths": out, "seconds": total}))


def machine() -> str:
    from mlx_gemma.cpu.machine import cpu_name, isa_level

    return f"{cpu_name()} ({isa_level()}, {os.cpu_count()} cores)"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.child)
    from mlx_gemma.cpu.calibrate import MARGIN

    runs: dict = {0: [], 8: []}
    loads = [os.getloadavg()[0]]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for _ in range(args.rounds):
        for bits in runs:
            with tempfile.TemporaryDirectory() as home:
                env = {**os.environ, "MLX_GEMMA_HOME": home}
                env.pop("MLX_GEMMA_CPU_PATHS", None)
                # the converted 270M is reused from the user's cache through a symlink
                user = os.environ.get("MLX_GEMMA_HOME", os.path.expanduser("~/.cache/mlx-gemma"))
                os.symlink(os.path.join(user, "models"), os.path.join(home, "models"))
                out = subprocess.run([sys.executable, __file__, "--child", str(bits)], capture_output=True,
                                     text=True, env=env)
            loads.append(os.getloadavg()[0])
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            runs[bits].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {bits or 32}-bit: {runs[bits][-1]}", file=sys.stderr, flush=True)
    busy = " (measured while other work ran)" if max(loads) > 2.5 else ""
    print(f"\nCPU paths on {machine()}, {args.rounds} rounds from {started}, 1-min load average "
          f"{min(loads):.1f}-{max(loads):.1f}{busy}; min / median / max\n")
    print("| model | path | MLX ms | path ms | MLX ÷ path | kept (≥ %.2f) |" % MARGIN)
    print("|---|---|---:|---:|---:|:---:|")
    for bits, rs in runs.items():
        for name in (rs[0]["paths"] if rs else {}):
            got = [r["paths"][name] for r in rs if name in r["paths"]]
            ratio = [g["ratio"] for g in got]
            cells = [statistics.median(g[k] for g in got) for k in ("mlx_ms", "ours_ms")]
            print(f"| 270M {'8-bit' if bits else 'fp32'} | {name} | {cells[0]:.1f} | {cells[1]:.1f} | "
                  f"{min(ratio):.2f} / {statistics.median(ratio):.2f} / {max(ratio):.2f} | "
                  f"{'yes' if statistics.median(ratio) >= MARGIN else 'no'} |")
    for bits, rs in runs.items():
        if rs:
            secs = [r["seconds"] for r in rs]
            print(f"\nA whole calibration of the 270M {'8-bit' if bits else 'fp32'}: "
                  f"{min(secs):.2f} / {statistics.median(secs):.2f} / {max(secs):.2f} s")


if __name__ == "__main__":
    main()
