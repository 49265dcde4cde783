"""LoRA training throughput and peak memory: mlx-gemma vs mlx-lm vs transformers + PEFT.

The embedded Gemma 3 270M (our converted HF-layout cache dir, loaded by all three), fp32 on the
CPU, LoRA r=16, alpha=32 (scale 2) on q/k/v/o of every layer, dropout 0.05, AdamW lr 2e-4,
batch 4, the bundled zh_baike chat training split. Every trainer runs the *same* batches: the
first `warmup + steps` batches of mlx-gemma's length-grouped order (seed 0), with loss on the
answer tokens only. The first `warmup` steps (compilation, allocator warm-up) are not timed.

Each trainer runs in its own subprocess, so peak memory is its own, --rounds times (default 3),
the trainers' order alternating between rounds; the table gives min / median / max over the
rounds, and its header the CPU (lscpu model name, x86-64 level), CPU count and the 1-minute load
averages seen before/after each process:
- mlx-gemma: `mlx_gemma.training.trainer.train` (the real trainer: chunked LM-head loss, compiled step),
  after `mlx_gemma.cpu.enable()`, as the CLI runs it (run with MLX_GEMMA_CPU_PATHS=all=off for MLX's
  own kernels); the header names the paths it ran with;
- mlx-lm: `mlx_lm.tuner.trainer.train` with its `default_loss` (full logits) and LoRA layers,
  fed our batches; run after `import mlx_gemma`, so both MLX trainers use the same OpenBLAS;
- transformers + PEFT on torch CPU, fp32, eager attention, the same loss positions.

tokens/s counts real (unpadded) input tokens. Peak memory: MLX's `mx.get_peak_memory()` for the
MLX trainers (arrays only, reset before training), and for every process its peak RSS (the OS
view; for torch the only one, and it includes loading the model).

    python benchmarks/train.py [--rounds 3] [--steps 8] [--warmup 2] [--batch 4] [--max-seq-len 512]
        [--only mlx-gemma,mlx-lm,torch,parallel] [--json results.json]

The default run (3 trainers x 3 rounds) took 11 minutes on a quiet 2-core AMD EPYC (2026-12-07:
77 / 53 / 97 tok/s); `parallel` adds ~1.5 and ~2.5 min per round.

`parallel` adds two mlx-gemma rows on the same batches: one process with 2 OpenBLAS threads, and
2 data-parallel ranks (mlx.launch, ring backend on loopback) with 1 thread each; peak memory is
the larger rank's.
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
from pathlib import Path

import numpy as np

import harness
from harness import ALPHA, DROPOUT, LR, RANK, TARGETS, peak_rss_gb

TRAINERS = ("mlx-gemma", "mlx-lm", "torch")
# data-parallel rows on this CPU: (row name, ranks, OpenBLAS threads per rank); the same global
# batch and steps as the mlx-gemma row, its rows shared out over the ranks
PARALLEL = {"mlx-gemma 1 rank x 2 threads": (1, 2), "mlx-gemma 2 ranks x 1 thread": (2, 1)}

# ---- the batches (parent process) ---------------------------------------------------------------


def make_batches(path: Path, n: int, batch: int, max_seq_len: int) -> dict:
    """The first n batches mlx-gemma's trainer will see (seed 0), saved to `path` (.npz)."""
    import mlx_gemma  # noqa: F401
    from mlx_gemma.loading import load_tokenizer, resolve
    from mlx_gemma.training import data as data_lib
    from mlx_gemma.training.trainer import default_data_dir

    tok = load_tokenizer(resolve("gemma-3-270m"))
    train_set = data_lib.load_dataset(default_data_dir() / "train.jsonl", tok, "train", max_seq_len)
    pad = tok.pad_id if tok.pad_id is not None else 0
    it = data_lib.iterate_batches(train_set, batch, max_seq_len, pad, seed=0)
    arrays, tokens = {}, []
    for k in range(n):
        _, _, b = next(it)
        arrays[f"inputs{k}"], arrays[f"targets{k}"], arrays[f"weights{k}"] = b["inputs"], b["targets"], b["weights"]
        tokens.append(b["tokens"])
    np.savez(path, tokens=np.array(tokens), pad=np.array(pad), **arrays)
    return {"tokens": tokens, "shapes": [arrays[f"inputs{k}"].shape for k in range(n)]}


def load_batches(path: str) -> tuple[list, list, int]:
    z = np.load(path)
    n = len(z["tokens"])
    return ([(z[f"inputs{k}"], z[f"targets{k}"], z[f"weights{k}"]) for k in range(n)], z["tokens"].tolist(),
            int(z["pad"]))


def model_dir() -> str:
    import mlx_gemma  # noqa: F401
    from mlx_gemma.loading import resolve

    return str(resolve("gemma-3-270m"))


# ---- workers (one subprocess each) -------------------------------------------------------------


def worker_mlx_gemma(args, batches, tokens, pad) -> dict:
    import mlx_gemma.cpu
    import mlx.core as mx

    mlx_gemma.cpu.enable()  # as `mlx-gemma train` runs: the CPU paths this machine's calibration keeps
    from mlx_gemma import load
    from mlx_gemma.training import data as data_lib
    from mlx_gemma.training import distributed
    from mlx_gemma.training.trainer import default_data_dir

    model, tok = load("gemma-3-270m", dtype="float32")
    train_set = data_lib.load_dataset(default_data_dir() / "train.jsonl", tok, "train", args.max_seq_len)
    res = harness.mlx_gemma_lora(model, tok, train_set, args.steps, args.warmup, args.batch, args.max_seq_len,
                                 tokens=tokens)
    from mlx_gemma import backend

    return dict(res, mlx=mx.__version__, rank=distributed.rank(), policy=backend.policy().describe())


def worker_mlx_lm(args, batches, tokens, pad) -> dict:
    import mlx_gemma  # noqa: F401  (the same OpenBLAS under MLX as mlx-gemma)
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(model_dir()))
    return harness.mlx_lm_lora(model, batches, tokens, args.steps, args.warmup, args.batch, args.max_seq_len)


def worker_torch(args, batches, tokens, pad) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                             target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    times = {}
    loss = None
    for k, (inputs, targets, weights) in enumerate(batches, 1):
        x = torch.from_numpy(inputs.astype(np.int64))
        t = torch.from_numpy(targets.astype(np.int64))
        w = torch.from_numpy(weights) > 0
        attn = (x != pad).long()  # right padding with <pad>, which never occurs in the text
        logits = model(input_ids=x, attention_mask=attn).logits  # (B, L, V)
        loss = torch.nn.functional.cross_entropy(logits[w], t[w])
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times[k] = time.perf_counter()
    return {"seconds": times[args.warmup + args.steps] - times[args.warmup], "loss": float(loss),
            "tokens": sum(tokens[args.warmup:args.warmup + args.steps]),
            "peak_gb": None, "rss_gb": peak_rss_gb(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


WORKERS = {"mlx-gemma": worker_mlx_gemma, "mlx-lm": worker_mlx_lm, "torch": worker_torch}


# ---- parent ---------------------------------------------------------------------------------------


def run_worker(name: str, args, batches_path: str, loads: list) -> dict:
    ranks, threads = PARALLEL.get(name, (1, None))
    cmd = [sys.executable, __file__, "--worker", "mlx-gemma" if name in PARALLEL else name, "--batches",
           batches_path, "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--max-seq-len", str(args.max_seq_len)]
    env = dict(os.environ, **({"OPENBLAS_NUM_THREADS": str(threads)} if threads else {}))
    if ranks == 1:
        return harness.run_child(cmd, loads, env)
    from mlx_gemma.training.distributed import free_port_pair

    # a venv made over another (the worktrees') has no mlx.launch script of its own: its module then
    script = Path(sys.executable).with_name("mlx.launch")
    launcher = [str(script)] if script.exists() else [
        sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; main()"]
    cmd = [*launcher, "-n", str(ranks), "--backend", "ring", "-p", str(free_port_pair()), "--env",
           f"OPENBLAS_NUM_THREADS={threads}", "--", *cmd]
    loads.append(os.getloadavg()[0])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    loads.append(os.getloadavg()[0])
    results = [json.loads(ln[len(harness.RESULT):]) for ln in proc.stdout.splitlines()
               if ln.startswith(harness.RESULT)]
    if proc.returncode != 0 or len(results) != ranks:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "stderr": proc.stderr[-3000:]}
    res = next(r for r in results if r.get("rank", 0) == 0)
    res["peak_gb"] = max(r["peak_gb"] for r in results)  # per rank: the largest
    res["rss_gb"] = max(r["rss_gb"] for r in results)
    return res


def print_table(args, names: list, results: dict, info: dict, loads: list) -> None:
    timed_tokens = sum(info["tokens"][args.warmup:])
    print(f"\nLoRA training, Gemma 3 270M, fp32 CPU, r={RANK} alpha={ALPHA:g} q/k/v/o, batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup} warm-up ({timed_tokens} real tokens, row lengths "
          f"{sorted({s[1] for s in info['shapes']})}), {args.rounds} rounds")
    print(f"# {harness.machine_header(loads)}")
    policies = sorted({r["policy"] for r in results.get("mlx-gemma", []) if "policy" in r})
    print(f"# mlx-gemma ran as: {'; '.join(policies) or '?'}\n")
    print("| trainer | tokens/s min / median / max | s / step (median) | peak MLX arrays GB min / median / max "
          "| peak RSS GB (max) | last loss | failed rounds |")
    print("|---|---|---:|---|---:|---:|---:|")
    for name in names:
        ok = [r for r in results[name] if "error" not in r]
        failed = len(results[name]) - len(ok)
        if not ok:
            print(f"| {name} | failed: {results[name][0]['error']} | | | | | {failed} |")
            continue
        for r in ok:
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
        step_s = statistics.median(r["seconds"] / args.steps for r in ok)
        print(f"| {name} | {harness.spread([r['tokens_per_s'] for r in ok], 0)} | {step_s:.2f} | "
              f"{harness.spread([r['peak_gb'] for r in ok], 2)} | {max(r['rss_gb'] for r in ok):.2f} | "
              f"{ok[-1]['loss']:.3f} | {failed} |")
    print()
    ours = _median(results.get("mlx-gemma", []), "tokens_per_s")
    for other in ("mlx-lm", "torch"):
        theirs = _median(results.get(other, []), "tokens_per_s")
        if ours and theirs:
            line = f"mlx-gemma / {other}: {ours / theirs:.2f}x tokens/s (medians)"
            if other == "mlx-lm":
                line += (f", {_median(results['mlx-gemma'], 'peak_gb') / _median(results['mlx-lm'], 'peak_gb'):.2f}x"
                         " peak MLX memory")
            print(line)


def _median(runs: list, key: str):
    values = [r[key] for r in runs if key in r and r[key] is not None]
    return statistics.median(values) if values else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the trainers' order alternates between rounds")
    ap.add_argument("--only", default=",".join(TRAINERS), help="comma-separated subset of " + ",".join(TRAINERS)
                    + " (add 'parallel' for the 1 rank x 2 threads vs 2 ranks x 1 thread rows)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    ap.add_argument("--batches", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        batches, tokens, pad = load_batches(args.batches)
        res = WORKERS[args.worker](args, batches, tokens, pad)
        print(harness.RESULT + json.dumps(res))
        return

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if "parallel" in names:
        names = [n for n in names if n != "parallel"] + list(PARALLEL)
    results, loads = {name: [] for name in names}, []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batches.npz"
        info = make_batches(path, args.warmup + args.steps, args.batch, args.max_seq_len)
        for r in range(args.rounds):
            for name in harness.round_order(names, r):
                print(f"round {r + 1}/{args.rounds}: {name}...", file=sys.stderr, flush=True)
                results[name].append(run_worker(name, args, str(path), loads))
    print_table(args, names, results, info, loads)
    for name, runs in results.items():
        for r in runs:
            if "stderr" in r:
                print(f"\n{name} stderr:\n{r['stderr']}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "tokens": sum(info["tokens"][args.warmup:]),
                                               "results": results, "loads": loads}, indent=2))


if __name__ == "__main__":
    main()
