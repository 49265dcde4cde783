"""Forward-pass throughput: mlx-gemma vs mlx-lm's gemma3_text on the same weights and BLAS.

A Gemma 3 270M-size config (18 layers, hidden 640, 4 heads / 1 KV head, head_dim 256,
vocab 262,144) with random weights, fp32, batch 4 x 128 tokens, full logits.
Both run in this process after `import mlx_gemma` (OpenBLAS is loaded once for both).

    python benchmarks/forward.py [--batch 4] [--seq 128] [--repeats 5]
"""

import argparse
import platform
import time
from datetime import date

import mlx_gemma  # noqa: F401  (OpenBLAS first)
import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_gemma.config import GemmaConfig
from mlx_gemma.model import Gemma

CONFIG_270M = dict(
    model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
    num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
    query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, max_position_embeddings=32768,
    rms_norm_eps=1e-6,
)


def timed(fn, repeats):
    mx.eval(fn())  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    config = GemmaConfig.from_dict(CONFIG_270M)
    ours = Gemma(config)
    mx.random.seed(0)
    weights = {k: mx.random.normal(v.shape) * 0.02 for k, v in tree_flatten(ours.parameters())}
    ours.load_weights(list(weights.items()))
    mx.eval(ours.parameters())

    from mlx_lm.models import gemma3_text

    theirs = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(CONFIG_270M))
    theirs.load_weights(list(theirs.sanitize(dict(weights)).items()))
    mx.eval(theirs.parameters())

    ids = mx.random.randint(0, config.vocab_size, (args.batch, args.seq))
    # Same weights, same outputs: check before timing.
    diff = mx.abs(ours(ids) - theirs(ids)).max().item()
    tokens = args.batch * args.seq
    rows = []
    for name, model in (("mlx-gemma", ours), ("mlx-lm", theirs)):
        mx.reset_peak_memory()
        t = timed(lambda: model(ids), args.repeats)
        rows.append((name, tokens / t, t * 1000, mx.get_peak_memory() / 1e9))
    print(f"forward pass, Gemma 3 270M-size config, fp32, batch {args.batch} x {args.seq}, "
          f"{date.today()}, {platform.machine()} {mx.default_device()}, max |dlogit| between the two: {diff:.2e}")
    print("| implementation | tokens/s | ms / batch | peak memory (GB) |")
    print("|---|---:|---:|---:|")
    for name, tps, ms, mem in rows:
        print(f"| {name} | {tps:,.0f} | {ms:,.0f} | {mem:.2f} |")
    print(f"\nmlx-gemma / mlx-lm: {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
