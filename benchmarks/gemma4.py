"""Gemma 4 generation speed: mlx-gemma vs mlx-lm on the same random-weight checkpoints, CPU.

Two shapes, scaled down from the real models to fit a shared 24 GB / 2-core machine:
- `e2b`: E2B-shaped (per-layer embeddings, one KV head, global head size twice the local one,
  the last third of the layers KV-shared with double-wide MLPs);
- `moe`: 26B-A4B-shaped (experts beside the dense MLP on every layer, top-4 of 16, k == v on the
  global layers with their own KV-head count).
transformers builds each checkpoint (random weights, float32) once into --dir. Each engine runs
in its own subprocess per round, engines alternating for --repeats rounds; the table gives min /
median / max over the rounds. Greedy, a --prompt-tokens prompt then --new-tokens tokens.
Prefill tok/s = prompt tokens / time to the first new token; decode tok/s = (new - 1) / time from
the first to the last; peak memory from mx.get_peak_memory(). mlx-lm reads the older config
layout only (global_head_dim), so its copy of config.json gets those fields added.

    python benchmarks/gemma4.py [--shapes e2b,moe] [--prompt-tokens 256] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


def run_engine(engine: str, path: str, prompt: int, new: int) -> dict:
    """In a fresh process: load, then time one greedy generation of `new` tokens."""
    import mlx_gemma  # noqa: F401 (OpenBLAS before mlx.core, for both engines)
    import mlx.core as mx

    ids = mx.array([[2] + [1000 + (i * 7919) % 30000 for i in range(prompt - 1)]])
    if engine == "mlx-gemma":
        from mlx_gemma.convert import hf as hf_convert
        from mlx_gemma.generation import generate_step
        from mlx_gemma.loading import build_model, read_config

        p = Path(path)
        model = build_model(read_config(p), hf_convert.load_safetensors(hf_convert.safetensors_files(p)), path,
                            "float32")
        steps = generate_step(model, ids, max_tokens=new)
    else:
        from mlx_lm.generate import generate_step as lm_step
        from mlx_lm.utils import load_model

        model = load_model(Path(path + "-mlx-lm"))[0]
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


def _stats(values):
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="e2b,moe")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=str(Path("~/.cache/mlx-gemma/bench-gemma4").expanduser()))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_engine(args.child[0], args.child[1], args.prompt_tokens, args.new_tokens)))
        return
    root = Path(args.dir)
    print(f"# {_cpu()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| shape | engine | prefill tok/s min/med/max | decode tok/s min/med/max | peak GB | load avg |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        path = build(shape, root)
        results = {e: [] for e in ENGINES}
        loads = []
        for _ in range(args.repeats):
            for engine in ENGINES:
                out = subprocess.run([sys.executable, __file__, "--prompt-tokens", str(args.prompt_tokens),
                                      "--new-tokens", str(args.new_tokens), "--child", engine, str(path)],
                                     capture_output=True, text=True, check=True)
                results[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
                loads.append(os.getloadavg()[0])
        for engine, runs in results.items():
            print(f"| {shape} | {engine} | {_stats([r['prefill'] for r in runs])} | "
                  f"{_stats([r['decode'] for r in runs])} | {max(r['peak_gb'] for r in runs):.2f} | "
                  f"{min(loads):.1f}-{max(loads):.1f} |")


def _cpu() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
