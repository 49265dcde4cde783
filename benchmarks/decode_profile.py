"""Where one decode step's time goes, and the memory-bandwidth bound it is measured against.

The embedded Gemma 3 270M, fp32, one row, a 64-token prompt already in the cache; each piece is
timed with its own `mx.eval` (median of --reps runs after warm-up):

- the whole step as `generate_step` runs it on the CPU (HostDecoder body + LM head + argmax), and
  the same step on MLX (compiled body + OneRowHead), token id on the host;
- the body alone both ways (18 decoder layers: embedding lookup to final norm): HostDecoder
  (cblas_sgemv per weight + numpy vector work) and MLX's compiled body;
- the LM head alone, (1, 640) @ (640, 262144) over the tied embedding, plus the argmax, three ways:
  MLX's matmul (sgemm, which packs the whole weight per call), `OneRowHead` (cblas_sgemv in the
  OpenBLAS MLX uses, as the decode path does) and numpy's `@` (its own OpenBLAS);
- one decoder layer, uncompiled, split into attention and MLP.

The bound: a decode step must read every weight once (fp32: the 671 MB tied embedding for the
head plus the layers), so tokens/s <= memory bandwidth / weight bytes. Bandwidth is measured
here as the read rate of a cblas_sgemv over a 1 GiB matrix (read-only streaming on every core).

    python benchmarks/decode_profile.py [--reps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def median_seconds(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def read_bandwidth_gbs(reps: int) -> float:
    from mlx_gemma.cpu.runtime import sgemv

    a = np.ones((256 * 1024, 1024), np.float32)  # 1 GiB
    x, out = np.ones(1024, np.float32), np.empty(256 * 1024, np.float32)
    s = median_seconds(lambda: sgemv(a, x, out), max(3, reps // 4), warmup=1)
    return a.nbytes / s / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    # every CPU path on, forced (the profile compares the host pieces with MLX's whatever this
    # machine's calibration chose); MLX_GEMMA_CPU_PATHS set by the caller wins
    os.environ.setdefault("MLX_GEMMA_CPU_PATHS", "all=on")
    import mlx_gemma  # (OpenBLAS first)
    import mlx.core as mx

    mlx_gemma.cpu.enable()
    from mlx.utils import tree_flatten

    from mlx_gemma.backend import override
    from mlx_gemma.generation import DecodeStep, OneRowHead, prefill
    from mlx_gemma.loading import load

    model, _ = load("gemma-3-270m", dtype="float32")
    model.eval()
    mx.eval(model.parameters())
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    head_bytes = model.model.embed_tokens.weight.nbytes

    cache = model.make_cache()
    prompt = mx.array([[2] + [1000 + (i * 7919) % 50000 for i in range(63)]])
    prefill(model, prompt, cache)
    step = DecodeStep(model)
    token = mx.array([[1234]])
    pos = mx.array([64])  # the same position each time: the step overwrites one cache slot

    def whole():
        logits = step(cache, token, pos, 65)
        mx.argmax(logits, axis=-1).item()

    def body():
        hidden, state = step.compiled(token, pos, [], [c.state for c in cache])
        mx.eval(hidden, state)

    hidden, _ = step.compiled(token, pos, [], [c.state for c in cache])
    mx.eval(hidden)

    def head():
        mx.argmax(model.logits(hidden), axis=-1).item()

    one_row = OneRowHead.of(model)

    def head_sgemv():
        mx.argmax(one_row(hidden), axis=-1).item()

    w_np = np.array(model.model.embed_tokens.weight, copy=False)
    h_np = np.array(hidden)

    def head_numpy():
        int(np.argmax(h_np @ w_np.T))

    layer = model.model.layers[0]
    x = model.model.embed(token)
    mx.eval(x)
    mask = model.model.masks(1, cache, pos)[layer.is_sliding]
    layer_cache = cache[0]

    def attention():
        mx.eval(layer.self_attn(layer.input_layernorm(x), mask, layer_cache, pos))

    def mlp():
        mx.eval(layer.mlp(layer.pre_feedforward_layernorm(x)))

    with override(host_decode=False):
        mlx_step = DecodeStep(model)

    def whole_mlx():
        logits = mlx_step(cache, token, pos, 65)
        mx.argmax(logits, axis=-1).item()

    def host_body():
        step.host_body(cache, 1234, 64)

    rows = [("whole step as generate_step runs it (host body + head + argmax + .item())", whole),
            ("whole step on MLX (compiled body + OneRowHead + argmax + .item())", whole_mlx),
            ("host body: 18 layers (HostDecoder: cblas_sgemv + numpy)", host_body),
            ("compiled body: 18 layers (MLX)", body),
            ("LM head + argmax (MLX matmul)", head),
            ("LM head + argmax (OneRowHead: cblas_sgemv, MLX's OpenBLAS)", head_sgemv),
            ("LM head + argmax (numpy @, numpy's own OpenBLAS)", head_numpy)]
    if step.host_body is None:
        raise SystemExit("the host decode path is off here (no OpenBLAS loaded, or not the CPU)")
    try:
        attention()
        rows += [("layer 0 attention, uncompiled", attention), ("layer 0 MLP, uncompiled", mlp)]
    except Exception as exc:  # the layer API differs: leave the split out rather than guess
        print(f"(layer split skipped: {exc})")
    load_before = os.getloadavg()[0]
    times = {name: median_seconds(fn, args.reps) for name, fn in rows}
    bw = read_bandwidth_gbs(args.reps)
    load_after = os.getloadavg()[0]

    print(f"\nGemma 3 270M fp32 decode step, 1 row, 64 cached positions, {os.cpu_count()} CPUs, "
          f"median of {args.reps}, load average {load_before:.1f} -> {load_after:.1f}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    total = times[rows[0][0]]
    print("| piece | ms | share of the step |")
    print("|---|---:|---:|")
    for name, _ in rows:
        print(f"| {name} | {1e3 * times[name]:.2f} | {100 * times[name] / total:.0f}% |")
    print(f"\nmemory read bandwidth (cblas_sgemv over 1 GiB): {bw:.1f} GB/s")
    print(f"weights read per token: {weight_bytes / 1e9:.3f} GB (LM head {head_bytes / 1e9:.3f} GB)")
    print(f"bandwidth bound: {bw * 1e9 / weight_bytes:.1f} tok/s; measured step: {1 / total:.1f} tok/s "
          f"({100 * (weight_bytes / total) / (bw * 1e9):.0f}% of the bound)")
    print(f"LM head alone at the bound: {1e3 * head_bytes / (bw * 1e9):.2f} ms (measured: MLX matmul "
          f"{1e3 * times[rows[4][0]]:.2f} ms, OneRowHead {1e3 * times[rows[5][0]]:.2f} ms, numpy "
          f"{1e3 * times[rows[6][0]]:.2f} ms)")
    print(f"layers alone at the bound: {1e3 * (weight_bytes - head_bytes) / (bw * 1e9):.2f} ms (measured: host "
          f"{1e3 * times[rows[2][0]]:.2f} ms, MLX {1e3 * times[rows[3][0]]:.2f} ms)")


if __name__ == "__main__":
    main()
