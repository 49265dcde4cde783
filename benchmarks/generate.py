"""Generation speed on the embedded Gemma 3 270M: mlx-gemma vs mlx-lm vs transformers, fp32 on CPU.

Greedy, a PROMPT-token prompt then NEW tokens (default 512 / 128). Each engine runs in its own
subprocess (clean peak memory; MLX engines import mlx_gemma first, so all use the same OpenBLAS),
alternating engines for --repeats rounds and keeping each one's best. Prefill tok/s = prompt
tokens / time to the first new token; decode tok/s = (NEW - 1) / time from the first to the last.
Peak memory: mx.get_peak_memory() for MLX, peak RSS for torch.

    python benchmarks/generate.py [--prompt-tokens 512] [--new-tokens 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

ENGINES = ["mlx-gemma", "mlx-gemma-bf16", "mlx-lm", "transformers"]


def prompt_ids(n: int) -> list:
    # Deterministic ordinary-text ids (no specials): <bos> then a cycle through common pieces.
    return [2] + [1000 + (i * 7919) % 50000 for i in range(n - 1)]


def timed(steps, first_time_from):
    """Consume an iterator of tokens; return (time to first, per-token times)."""
    times = []
    for _ in steps:
        times.append(time.perf_counter())
    return times[0] - first_time_from, times


def run_mlx_gemma(ids, new, dtype):
    import mlx_gemma  # noqa: F401  (OpenBLAS first)
    import mlx.core as mx

    from mlx_gemma.generation import generate_step
    from mlx_gemma.loading import load

    model, _ = load("gemma-3-270m", dtype=dtype)
    mx.eval(model.parameters())
    for _ in range(2):  # the first run pays for the compile traces
        mx.reset_peak_memory()
        start = time.perf_counter()
        ttft, times = timed((t.item() for t in generate_step(model, mx.array([ids]), max_tokens=new)), start)
    return ttft, times, mx.get_peak_memory()


def run_mlx_lm(ids, new):
    import mlx_gemma  # noqa: F401  (same OpenBLAS as mlx-gemma)
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from mlx_gemma.loading import resolve

    model, _ = load(str(resolve("gemma-3-270m")))
    mx.eval(model.parameters())
    for _ in range(2):
        mx.reset_peak_memory()
        start = time.perf_counter()
        steps = (t for t, _ in generate_step(mx.array(ids), model, max_tokens=new))
        ttft, times = timed(steps, start)
    return ttft, times, mx.get_peak_memory()


def run_transformers(ids, new):
    import resource

    import torch
    from transformers import AutoModelForCausalLM

    from mlx_gemma.loading import resolve

    model = AutoModelForCausalLM.from_pretrained(str(resolve("gemma-3-270m")), dtype=torch.float32).eval()

    def steps():
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            yield token.item()
            for _ in range(new - 1):
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                yield token.item()

    for _ in range(2):
        start = time.perf_counter()
        ttft, times = timed(steps(), start)
    return ttft, times, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(engine, n_prompt, new):
    ids = prompt_ids(n_prompt)
    if engine == "mlx-gemma":
        ttft, times, peak = run_mlx_gemma(ids, new, "float32")
    elif engine == "mlx-gemma-bf16":
        ttft, times, peak = run_mlx_gemma(ids, new, "bfloat16")
    elif engine == "mlx-lm":
        ttft, times, peak = run_mlx_lm(ids, new)
    else:
        ttft, times, peak = run_transformers(ids, new)
    print(json.dumps({"prefill_tps": n_prompt / ttft, "decode_tps": (len(times) - 1) / (times[-1] - times[0]),
                      "peak_gb": peak / 1e9}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.prompt_tokens, args.new_tokens)
    engines = args.engines.split(",")
    best: dict = {}
    for _ in range(args.repeats):
        for engine in engines:
            out = subprocess.run([sys.executable, __file__, "--child", engine, "--prompt-tokens",
                                  str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)],
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"{engine} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            b = best.setdefault(engine, r)
            b["prefill_tps"] = max(b["prefill_tps"], r["prefill_tps"])
            b["decode_tps"] = max(b["decode_tps"], r["decode_tps"])
            print(f"  {engine}: {r}", file=sys.stderr, flush=True)
    base = best.get("mlx-gemma", {})
    print(f"\nGemma 3 270M, greedy, {args.prompt_tokens}-token prompt + {args.new_tokens} new tokens, "
          f"CPU (best of {args.repeats})\n")
    print("| engine | dtype | prefill tok/s | decode tok/s | mlx-gemma decode speed-up | peak memory |")
    print("|---|---|---:|---:|---:|---:|")
    for engine, r in best.items():
        dtype = "bf16" if engine.endswith("bf16") else "fp32"
        ratio = base.get("decode_tps", 0) / r["decode_tps"] if r["decode_tps"] else 0
        print(f"| {engine} | {dtype} | {r['prefill_tps']:.1f} | {r['decode_tps']:.2f} | {ratio:.2f}x | "
              f"{r['peak_gb']:.2f} GB |")


if __name__ == "__main__":
    main()
