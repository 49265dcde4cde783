"""fp32 vs 8-bit vs 4-bit Gemma 3 270M on this machine: prefill / decode tokens/s, peak memory,
size on disk, perplexity; and, for the quantized models, MLX's quantized_matmul kernel against
the dequantize + fp32 matmul path (what `auto` picks on the CPU: dequantize for >= 8 rows).

    python benchmarks/quantize.py [--prompt 256] [--decode 32] [--ppl-chars 0 (=all)]
                                  [--configs 8:64 4:64:none 4:64 4:32 4:32:mixed]

Each config is BITS:GROUP[:none|:mixed]: `none` skips calibration (the error-minimising grid
alone), `mixed` is the mixed recipe (calibrated); 4-bit configs are otherwise calibrated on the
bundled calibration text, as `mlx-gemma quantize` does by default.

Prints a Markdown table. Timings on a shared 2-core box move by +-30%: compare within one run.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time

import mlx_gemma  # (OpenBLAS before mlx.core)
mlx_gemma.cpu.enable()  # the CPU paths as the CLI runs them (calibrated on this machine)
import mlx.core as mx
import numpy as np

from mlx_gemma import backend
from mlx_gemma import quant as Q
from mlx_gemma.data import DATA_DIR
from mlx_gemma.evaluate import perplexity
from mlx_gemma.generation import generate_step, prefill
from mlx_gemma.quant.calibration import calibration_windows, resolve_sources
from mlx_gemma.quant.checkpoint import disk_bytes
from mlx_gemma.loading import load, resolve, save_model


def prefill_tps(model, ids, reps=2) -> float:
    """Tokens/s of filling the KV cache with the prompt (no LM head, as generate's prefill)."""
    best = float("inf")
    for _ in range(reps):
        cache = model.make_cache()
        t = time.perf_counter()
        prefill(model, ids, cache)
        best = min(best, time.perf_counter() - t)
    return ids.shape[1] / best


def decode_tps(model, ids, n) -> float:
    """Greedy tokens/s after a prompt: one row per step, logits of that row only."""
    steps = generate_step(model, ids, max_tokens=n + 1, compile=False)
    next(steps).item()  # prefill and a warm-up step
    t = time.perf_counter()
    for tok in steps:
        tok.item()
    return n / (time.perf_counter() - t)


def measure(name, model, tokenizer, ids, args, disk) -> dict:
    row = {"model": name, "disk_mb": disk / 1e6, "param_mb": Q.parameter_bytes(model) / 1e6}
    mx.reset_peak_memory()
    quantized = bool(Q.quantized_layers(model))
    paths = ["auto", "kernel", "dequantize"] if quantized else ["auto"]
    for path in paths:
        backend.configure(quantized_path=path)
        row[f"prefill_{path}"] = prefill_tps(model, ids)
        row[f"decode_{path}"] = decode_tps(model, ids, args.decode)
    backend.configure(quantized_path="auto")
    row["peak_mb"] = mx.get_peak_memory() / 1e6
    if args.ppl_chars >= 0:
        text = (DATA_DIR / "heldout_zh_en.txt").read_text(encoding="utf-8")
        text = text[:args.ppl_chars] if args.ppl_chars else text
        res = perplexity(model, tokenizer, text, max_seq_len=1024)
        row["ppl"], row["ppl_tokens"] = res["perplexity"], res["tokens"]
    print(f"  {name}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
          flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=256, help="Prompt tokens for prefill / before decode.")
    ap.add_argument("--decode", type=int, default=16, help="Decode steps timed.")
    ap.add_argument("--ppl-chars", type=int, default=0, help="Characters of the held-out text (0: all, -1: skip).")
    ap.add_argument("--configs", nargs="+", default=["8:64", "4:64:none", "4:64", "4:32", "4:32:mixed"])
    args = ap.parse_args()

    ids = mx.array(np.random.default_rng(0).integers(1000, 200_000, size=(1, args.prompt)))
    rows = []
    model, tokenizer = load("gemma-3-270m", dtype="float32")
    rows.append(measure("fp32", model, tokenizer, ids, args, disk_bytes(resolve("gemma-3-270m"))))
    for config in args.configs:
        bits, group, *flags = config.split(":")
        bits, group = int(bits), int(group)
        recipe = "mixed" if "mixed" in flags else "uniform"
        sources = None if "none" in flags else resolve_sources("auto", bits)
        model, _ = load("gemma-3-270m", dtype="float32")
        t = time.perf_counter()
        windows = None if sources is None else calibration_windows(tokenizer, sources)
        Q.quantize_model(model, bits=bits, group_size=group, calibration=windows, recipe=recipe)
        seconds = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, tokenizer, f"{tmp}/q")
            disk = disk_bytes(f"{tmp}/q")
        name = (f"{'4/8-bit mixed' if recipe == 'mixed' else f'{bits}-bit'} g{group}, "
                f"{'GPTQ' if windows is not None else 'no calibration'}")
        row = measure(name, model, tokenizer, ids, args, disk)
        row["quantize_s"] = seconds
        rows.append(row)

    print(f"\nGemma 3 270M, MLX {mx.__version__} on {mx.default_device()}, {platform.machine()} "
          f"{platform.system()}, {datetime.date.today()}; prompt {args.prompt} tokens, {args.decode} decode steps")
    print("prefill / decode tok/s: auto path (kernel | dequantize+matmul forced)\n")
    print("| model | prefill tok/s | decode tok/s | peak mem MB | params MB | disk MB | perplexity | quantize s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        def both(kind):
            if f"{kind}_kernel" not in r:
                return f"{r[f'{kind}_auto']:.1f}"
            return f"{r[f'{kind}_auto']:.1f} ({r[f'{kind}_kernel']:.1f} \\| {r[f'{kind}_dequantize']:.1f})"
        ppl = f"{r['ppl']:.2f} ({r['ppl_tokens']} tok)" if "ppl" in r else "-"
        ppl += f" {r['ppl'] / rows[0]['ppl'] - 1:+.1%}" if "ppl" in r and r is not rows[0] else ""
        took = f"{r['quantize_s']:.0f}" if "quantize_s" in r else "-"
        print(f"| {r['model']} | {both('prefill')} | {both('decode')} | {r['peak_mb']:.0f} | {r['param_mb']:.0f} "
              f"| {r['disk_mb']:.0f} | {ppl} | {took} |")


if __name__ == "__main__":
    main()
