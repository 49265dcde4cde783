"""Gemma 4 speed: mlx-gemma vs mlx-lm on the same random-weight checkpoints, CPU: generation
(prefill, decode) and LoRA training, with peak memory.

Two shapes, scaled down from the real models to fit a shared 24 GB / 2-core machine:
- `e2b`: E2B-shaped (per-layer embeddings, one KV head, global head size twice the local one,
  the last third of the layers KV-shared with double-wide MLPs);
- `moe`: 26B-A4B-shaped (experts beside the dense MLP on every layer, top-4 of 16, k == v on the
  global layers with their own KV-head count).
transformers builds each checkpoint (random weights, float32, ~1.3 / 1.5 GB) once into --dir.
mlx-lm reads the older config layout only (global_head_dim), so its copy of config.json gets
those fields added.

Every (part, engine) runs in its own subprocess per round; --rounds rounds, the engines' order
alternating; the table gives min / median / max over the rounds, and the header the CPU (lscpu
model name, x86-64 level), CPU count, the load averages seen before/after each process and the date.
- generate: greedy, a --prompt-tokens prompt then --new-tokens tokens. Prefill tok/s = prompt
  tokens / time to the first new token; decode tok/s = (new - 1) / time from the first to the
  last; peak = mx.get_peak_memory() (the weights included).
- train: LoRA r=16 alpha=32 (dropout 0.05) on q/k/v/o of every layer that has them, AdamW lr 2e-4
  (constant), the same batches for both: --train-warmup + --train-steps batches of --train-batch
  random-token rows of --train-seq tokens, loss on each row's second half, in the order
  mlx-gemma's trainer plans them. mlx-gemma trains through its real trainer
  (`mlx_gemma.training.trainer.setup` + `train`: chunked LM-head loss, compiled step, its default
  gradient clipping at norm 1.0); mlx-lm
  through its own tuner (`linear_to_lora_layers`, `mlx_lm.tuner.trainer.train` with its
  `default_loss`) on its gemma4_text model. The warm-up steps (compilation) are not timed;
  tok/s = real tokens of the timed steps / their time; peak = mx.get_peak_memory() over the run.
  An engine that cannot train a shape gets its error line in the table instead of a number.

    python benchmarks/gemma4.py [--shapes e2b,moe] [--parts generate,train] [--rounds 3]
        [--prompt-tokens 256] [--new-tokens 64] [--train-batch 2] [--train-seq 64]
        [--train-steps 3] [--train-warmup 2]

The default run (both shapes, 3 rounds, generation and training: 24 processes, the checkpoints
already built) took 11 minutes on a quiet 2-core AMD EPYC (2026-12-07; the script prints its own
estimate first). README has the table and the MoE experts fix it measured (mlx_gemma/moe.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import harness

S, F = "sliding_attention", "full_attention"
_ROPE = {S: {"rope_type": "default", "rope_theta": 10_000.0},
         F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}
_KINDS = [S, S, S, S, F] * 2 + [S, F]  # 12 layers, 5:1 with the last global
SHAPES = {
    "e2b": dict(vocab_size=32768, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                num_attention_heads=8, num_key_value_heads=1, head_dim=128, global_head_dim=256, sliding_window=512,
                layer_types=_KINDS, num_kv_shared_layers=4, hidden_size_per_layer_input=128,
                vocab_size_per_layer_input=32768, use_double_wide_mlp=True, final_logit_softcapping=30.0,
                max_position_embeddings=4096, rope_parameters=_ROPE),
    "moe": dict(vocab_size=32768, hidden_size=1024, intermediate_size=1024, num_hidden_layers=12,
                num_attention_heads=8, num_key_value_heads=2, head_dim=128, global_head_dim=256,
                num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=512, layer_types=_KINDS,
                hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=16, top_k_experts=4,
                moe_intermediate_size=512, final_logit_softcapping=30.0, max_position_embeddings=4096,
                rope_parameters=_ROPE),
}
ENGINES = ["mlx-gemma", "mlx-lm"]


def build(shape: str, root: Path) -> Path:
    """The transformers checkpoint (ours reads it as is) and a copy with mlx-lm's config fields."""
    path = root / shape
    if not (path / "config.json").exists():
        import torch
        import transformers as tf

        torch.manual_seed(0)
        model = tf.Gemma4ForCausalLM(tf.Gemma4TextConfig(**SHAPES[shape]))
        model.save_pretrained(str(path), safe_serialization=True)
    peer = root / f"{shape}-mlx-lm"
    if not (peer / "config.json").exists():
        shutil.copytree(path, peer, dirs_exist_ok=True)
        raw = json.loads((path / "config.json").read_text())
        override = next(iter(raw["per_layer_config"].values()))
        raw["global_head_dim"] = override["head_dim"]
        if "num_key_value_heads" in override:
            raw["num_global_key_value_heads"] = override["num_key_value_heads"]
        raw["sliding_window_pattern"] = 5
        (peer / "config.json").write_text(json.dumps(raw))
    return path


def load_engine_model(engine: str, path: str):
    """The checkpoint as the engine loads it (fp32): ours reads the transformers dir, mlx-lm its copy."""
    import mlx_gemma  # noqa: F401 (OpenBLAS before mlx.core, for both engines)

    if engine == "mlx-gemma":
        from mlx_gemma.convert import hf as hf_convert
        from mlx_gemma.loading import build_model, read_config

        p = Path(path)
        return build_model(read_config(p), hf_convert.load_safetensors(hf_convert.safetensors_files(p)), path,
                           "float32")
    from mlx_lm.utils import load_model

    return load_model(Path(path + "-mlx-lm"))[0]


def run_generate(engine: str, path: str, args) -> dict:
    """In a fresh process: load, then time one greedy generation of `new` tokens."""
    import mlx_gemma  # noqa: F401 (OpenBLAS before mlx.core: imported after it, MLX keeps its reference BLAS)
    import mlx.core as mx

    prompt, new = args.prompt_tokens, args.new_tokens
    ids = mx.array([[2] + [1000 + (i * 7919) % 30000 for i in range(prompt - 1)]])
    model = load_engine_model(engine, path)
    if engine == "mlx-gemma":
        from mlx_gemma.generation import generate_step

        steps = generate_step(model, ids, max_tokens=new)
    else:
        from mlx_lm.generate import generate_step as lm_step

        steps = (t for t, _ in lm_step(ids[0], model, max_tokens=new))
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    start = time.perf_counter()
    first = last = None
    for i, token in enumerate(steps):
        mx.eval(token)
        last = time.perf_counter()
        if i == 0:
            first = last
    return {"prefill": prompt / (first - start), "decode": (new - 1) / (last - first),
            "peak_gb": mx.get_peak_memory() / 1e9}


def train_data(vocab: int, args):
    """The LoRA batches, the same in every process: (warm-up + timed steps) x batch random-token rows
    of train-seq + 1 tokens (bos first), loss on the second half (one contiguous answer per row), in
    the order mlx-gemma's trainer plans them (seed 0). Returns the Dataset, the batches as
    (inputs, targets, weights) and each batch's real tokens."""
    import numpy as np
    from mlx_gemma.training import data as data_lib

    rng = np.random.default_rng(0)
    n, length = (args.train_warmup + args.train_steps) * args.train_batch, args.train_seq + 1
    dataset = data_lib.Dataset(name="train")
    for _ in range(n):
        ids = np.concatenate([[2], rng.integers(3, vocab, length - 1)]).astype(np.int32)
        dataset.examples.append((ids, (np.arange(length) > length // 2).astype(np.int32)))
    it = data_lib.iterate_batches(dataset, args.train_batch, length, pad_id=0, seed=0)
    batches = [next(it)[2] for _ in range(n // args.train_batch)]
    return dataset, [(b["inputs"], b["targets"], b["weights"]) for b in batches], [b["tokens"] for b in batches]


def run_train(engine: str, path: str, args) -> dict:
    """In a fresh process: load, LoRA-train through the engine's own trainer, time the steps after warm-up."""
    from types import SimpleNamespace

    import harness

    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    dataset, batches, tokens = train_data(vocab, args)
    model = load_engine_model(engine, path)
    if engine == "mlx-gemma":
        # the trainer reads only pad_id from the tokenizer when no test split is given
        return harness.mlx_gemma_lora(model, SimpleNamespace(pad_id=0), dataset, args.train_steps,
                                      args.train_warmup, args.train_batch, args.train_seq + 1, tokens=tokens,
                                      lr_schedule="constant")
    return harness.mlx_lm_lora(model, batches, tokens, args.train_steps, args.train_warmup, args.train_batch,
                               args.train_seq + 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="e2b,moe")
    parser.add_argument("--parts", default="generate,train", help="generate, train or both")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=2, help="rows per LoRA step")
    parser.add_argument("--train-seq", type=int, default=64, help="tokens per row (a multiple of 32)")
    parser.add_argument("--train-steps", type=int, default=3, help="timed LoRA steps")
    parser.add_argument("--train-warmup", type=int, default=2, help="untimed LoRA steps first (compilation)")
    parser.add_argument("--repeats", "--rounds", type=int, default=3, dest="repeats",
                        help="rounds; the engines' order alternates between rounds")
    parser.add_argument("--dir", default=str(Path("~/.cache/mlx-gemma/bench-gemma4").expanduser()))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task, engine, path = args.child
        out = (run_generate if task == "generate" else run_train)(engine, path, args)
        print(harness.RESULT + json.dumps(out))
        return
    parts = [p for p in ("generate", "train") if p in args.parts.split(",")]
    print(f"expected: about {expected_minutes(args, parts):.0f} min on a quiet 2-core machine", file=sys.stderr)
    root, rows, loads = Path(args.dir), [], []
    for shape in args.shapes.split(","):
        path = build(shape, root)
        results = {(p, e): [] for p in parts for e in ENGINES}
        for r in range(args.repeats):
            for part in parts:
                for engine in harness.round_order(ENGINES, r):
                    print(f"{shape} round {r + 1}/{args.repeats}: {part} {engine}...", file=sys.stderr, flush=True)
                    results[part, engine].append(harness.run_child(
                        [sys.executable, __file__, *child_options(args), "--child", part, engine, str(path)],
                        loads))
        rows += [table_row(shape, engine, {p: results[p, engine] for p in parts}) for engine in ENGINES]
    print_table(args, rows, loads)


def child_options(args) -> list:
    return ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--train-batch",
            str(args.train_batch), "--train-seq", str(args.train_seq), "--train-steps", str(args.train_steps),
            "--train-warmup", str(args.train_warmup)]


# LoRA training tok/s guessed for a quiet 2-core machine (only for the printed time estimate)
_TRAIN_RATE = {("e2b", "mlx-gemma"): 40, ("e2b", "mlx-lm"): 40, ("moe", "mlx-gemma"): 40, ("moe", "mlx-lm"): 40}


def expected_minutes(args, parts: list) -> float:
    """A rough wall time: ~15 s per process to start and load a 1.3-1.5 GB checkpoint, generation at
    ~300 prefill / ~10 decode tok/s, LoRA steps at the _TRAIN_RATE guesses."""
    seconds = 0.0
    for shape in args.shapes.split(","):
        for engine in ENGINES:
            if "generate" in parts:
                seconds += 15 + args.prompt_tokens / 300 + args.new_tokens / 10
            if "train" in parts:
                tokens = (args.train_warmup + args.train_steps) * args.train_batch * args.train_seq
                seconds += 15 + tokens / _TRAIN_RATE.get((shape, engine), 40)
    return seconds * args.repeats / 60


def _failed(runs: list):
    """The first failure's reason when no round succeeded (as a table cell), else None."""
    ok = [r for r in runs if "error" not in r]
    return None if ok else "failed: " + runs[0]["error"].replace("|", "/")[:160]


def table_row(shape: str, engine: str, results: dict) -> str:
    cells = []
    gen = results.get("generate")
    if gen is not None:
        ok = [r for r in gen if "error" not in r]
        cells += [_failed(gen), "-", "-"] if not ok else [
            harness.spread([r["prefill"] for r in ok]), harness.spread([r["decode"] for r in ok]),
            harness.spread([r["peak_gb"] for r in ok], 2)]
    train = results.get("train")
    if train is not None:
        ok = [r for r in train if "error" not in r]
        cells += [_failed(train), "-"] if not ok else [
            harness.spread([r["tokens"] / r["seconds"] for r in ok]), harness.spread([r["peak_gb"] for r in ok], 2)]
    failed = sum("error" in r for runs in results.values() for r in runs)
    return f"| {shape} | {engine} | " + " | ".join(cells) + f" | {failed} |"


def print_table(args, rows: list, loads: list) -> None:
    parts = [p for p in ("generate", "train") if p in args.parts.split(",")]
    head = []
    if "generate" in parts:
        head += [f"prefill tok/s ({args.prompt_tokens}-token prompt)", f"decode tok/s ({args.new_tokens} new)",
                 "generate peak GB"]
    if "train" in parts:
        head += [f"LoRA train tok/s (batch {args.train_batch} x {args.train_seq})", "train peak GB"]
    print(f"\nGemma 4 random-weight shapes, fp32 CPU, greedy; LoRA r={harness.RANK} alpha={harness.ALPHA:g} "
          f"q/k/v/o, AdamW lr {harness.LR:g}, {args.train_warmup} warm-up + {args.train_steps} timed steps; "
          f"{args.repeats} rounds, min / median / max")
    print(f"# {harness.machine_header(loads)}\n")
    print("| shape | engine | " + " | ".join(head) + " | failed runs |")
    print("|---|---|" + "---|" * len(head) + "---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
