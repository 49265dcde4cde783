"""Where a 16-row decode step of the server's engine spends its time.

The embedded Gemma 3 270M (fp32 on the CPU), 16 greedy chat rows decoding together in a
BatchGenerator (the server's engine), each piece timed alone with its own `mx.eval` (median of
--reps after warm-up):

- the whole engine step (`BatchGenerator.step`: decode + sampling + per-row bookkeeping);
- the compiled body (18 decoder layers) at B=16;
- the LM head at B=16, (16, 640) @ (640, 262144) over the tied embedding, as the step runs it;
- greedy sampling: argmax over (16, 262144) logits and the ids to Python;
- the per-row Python work: `_advance` (detokenizer, stop strings, finish checks) for 16 rows.

As `mlx-gemma serve` runs (`mlx_gemma.cpu.enable()`), or with --library-default on MLX's own kernels.

    python benchmarks/serve_profile.py [--rows 16] [--reps 10] [--library-default]
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

from decode_profile import median_seconds
from serve import machine_line


def median_ms(fn, reps: int) -> float:
    return 1000 * median_seconds(fn, reps, warmup=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--library-default", action="store_true", help="MLX's own kernels (no cpu.enable())")
    args = ap.parse_args()

    import mlx_gemma.cpu  # (OpenBLAS first)
    import mlx.core as mx

    if not args.library_default:
        mlx_gemma.cpu.enable()  # as `mlx-gemma serve` runs: the CPU paths this machine's calibration keeps

    from mlx_gemma.generation import BatchGenerator, Request
    from mlx_gemma.loading import load
    from mlx_gemma.sampling import SamplingParams

    load_before, started = os.getloadavg()[0], datetime.datetime.now(datetime.timezone.utc)
    net, tok = load(args.model)
    mx.eval(net.parameters())
    questions = ["What is the capital of France?", "Why is the sky blue?", "用一句话介绍长城。", "What does a CPU do?"]
    gen = BatchGenerator(net, tok, 256, True)
    for i in range(args.rows):
        ids = tok.apply_chat_template([{"role": "user", "content": questions[i % 4] + " " * (i // 4)}],
                                      add_generation_prompt=True, tokenize=True)
        gen.submit(Request(ids, SamplingParams(max_tokens=10_000, temp=0.0)))
    while len(gen.active) < args.rows:
        gen.step()
    rows = gen.active
    cache = gen.scheduler.cache
    pieces = {"engine step (all of it)": median_ms(gen.step, args.reps)}
    tokens = mx.array([[r.next_input] for r in rows], mx.int32)
    pos = mx.array([r.pos for r in rows], mx.int32)
    state = cache.state

    def body():
        hidden, _ = gen.decode.compiled(tokens, pos, [], state)
        mx.eval(hidden)
        return hidden

    def body_and_cache():
        mx.eval(gen.decode.compiled(tokens, pos, [], state))

    hidden = body()
    pieces["body (compiled, 18 layers), hidden state only"] = median_ms(body, args.reps)
    pieces["body with the cache writes evaluated"] = median_ms(body_and_cache, args.reps)
    pieces["LM head (MLX matmul)"] = median_ms(lambda: mx.eval(net.logits(hidden)), args.reps)
    logits = net.logits(hidden)
    mx.eval(logits)
    pieces["greedy sampling (argmax + tolist)"] = median_ms(lambda: mx.argmax(logits, axis=-1).tolist(), args.reps)
    picked = mx.argmax(logits, axis=-1).tolist()

    def per_row():
        # what the engine does per row after sampling (finisher: detokenizer, stop strings, length)
        for r, t in zip(rows, picked):
            r.finisher.advance(r.rid, t)
            r.finisher.tokens.pop()

    pieces["per-row Python (finisher x rows)"] = median_ms(per_row, args.reps)
    load_after = os.getloadavg()[0]
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    mode = "MLX's own kernels" if args.library_default else "as `mlx-gemma serve` runs (cpu.enable())"
    print(f"\n{machine_line(started, load_before, load_after)} · {args.rows} rows · {mode} · "
          f"OPENBLAS_NUM_THREADS={threads}\n")
    print("| piece | ms (median) |\n|---|---|")
    for name, ms in pieces.items():
        print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
    main()
