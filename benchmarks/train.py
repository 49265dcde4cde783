"""LoRA training throughput and peak memory: mlx-gemma vs mlx-lm vs transformers + PEFT.

The embedded Gemma 3 270M (our converted HF-layout cache dir, loaded by all three), fp32 on the
CPU, LoRA r=16, alpha=32 (scale 2) on q/k/v/o of every layer, dropout 0.05, AdamW lr 2e-4,
batch 4, the bundled zh_baike chat training split. Every trainer runs the *same* batches: the
first `warmup + steps` batches of mlx-gemma's length-grouped order (seed 0), with loss on the
answer tokens only. The first `warmup` steps (compilation, allocator warm-up) are not timed.

Each trainer runs in its own subprocess, so peak memory is its own:
- mlx-gemma: `mlx_gemma.training.trainer.train` (the real trainer: chunked LM-head loss, compiled step);
- mlx-lm: `mlx_lm.tuner.trainer.train` with its `default_loss` (full logits) and LoRA layers,
  fed our batches; run after `import mlx_gemma`, so both MLX trainers use the same OpenBLAS;
- transformers + PEFT on torch CPU, fp32, eager attention, the same loss positions.

tokens/s counts real (unpadded) input tokens. Peak memory: MLX's `mx.get_peak_memory()` for the
MLX trainers (arrays only, reset before training), and for every process its peak RSS (the OS
view; for torch the only one, and it includes loading the model).

    python benchmarks/train.py [--steps 8] [--warmup 2] [--batch 4] [--only mlx-gemma,mlx-lm,torch,parallel]

`parallel` adds two mlx-gemma rows on the same batches: one process with 2 OpenBLAS threads, and
2 data-parallel ranks (mlx.launch, ring backend on loopback) with 1 thread each; peak memory is
the larger rank's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

TRAINERS = ("mlx-gemma", "mlx-lm", "torch")
# data-parallel rows on this CPU: (row name, ranks, OpenBLAS threads per rank); the same global
# batch and steps as the mlx-gemma row, its rows shared out over the ranks
PARALLEL = {"mlx-gemma 1 rank x 2 threads": (1, 2), "mlx-gemma 2 ranks x 1 thread": (2, 1)}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK, ALPHA, DROPOUT, LR = 16, 32.0, 0.05, 2e-4


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


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
    import mlx_gemma  # noqa: F401
    from mlx_gemma import load
    from mlx_gemma.training import data as data_lib
    from mlx_gemma.training import distributed
    from mlx_gemma.training.trainer import TrainArgs, default_data_dir, setup, train

    model, tok = load("gemma-3-270m", dtype="float32")
    train_set = data_lib.load_dataset(default_data_dir() / "train.jsonl", tok, "train", args.max_seq_len)
    times = {}

    def on_step(step, rec):
        times[step] = time.perf_counter()
        if step <= len(tokens):  # the trainer must have run exactly our batches
            assert rec["tokens"] == tokens[step - 1], (step, rec["tokens"], tokens[step - 1])

    with tempfile.TemporaryDirectory() as out:
        targs = TrainArgs(out=out, iters=args.warmup + args.steps, batch_size=args.batch, rank=RANK, alpha=ALPHA,
                          dropout=DROPOUT, lr=LR, max_seq_len=args.max_seq_len, eval_every=0, save_every=0,
                          test=False, seed=0)
        result = train(model, tok, targs, train_set, progress=False, on_step=on_step,
                       adapter_config=setup(model, targs))
    import mlx.core as mx

    return {"seconds": times[args.warmup + args.steps] - times[args.warmup],
            "loss": result.train_loss, "peak_gb": result.peak_memory_gb, "rss_gb": peak_rss_gb(),
            "mlx": mx.__version__, "rank": distributed.rank()}


def worker_mlx_lm(args, batches, tokens, pad) -> dict:
    import mlx_gemma  # noqa: F401  (the same OpenBLAS under MLX as mlx-gemma)
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(model_dir()))
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": RANK, "scale": ALPHA / RANK, "dropout": DROPOUT,
                                                     "keys": [f"self_attn.{t}" for t in TARGETS]})
    mx.random.seed(0)

    def iterate(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        # mlx-lm's batch: the ids (B, L + 1) and per row (offset, length): loss on targets
        # steps offset..length (1-based) == our loss positions (one contiguous answer per row)
        for inputs, targets, weights in batches:
            ids = np.concatenate([inputs, targets[:, -1:]], axis=1)
            spans = []
            for w in weights:
                pos = np.nonzero(w)[0]
                assert len(pos) == pos[-1] - pos[0] + 1, "one contiguous answer per row"
                spans.append((pos[0] + 1, pos[-1] + 1))
            yield mx.array(ids), mx.array(np.array(spans, np.int32))

    times = {}

    class Clock(TrainingCallback):
        def on_train_loss_report(self, info):
            times[info["iteration"]] = time.perf_counter()
            times["loss"] = info["train_loss"]

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArgs(batch_size=args.batch, iters=args.warmup + args.steps, steps_per_report=1,
                             steps_per_eval=10 ** 9, steps_per_save=10 ** 9, max_seq_length=args.max_seq_len + 1,
                             adapter_file=os.path.join(out, "adapters.safetensors"))
        mx.reset_peak_memory()
        train(model, optim.AdamW(learning_rate=LR, weight_decay=0.0), [None] * len(batches), args=targs,
              iterate_batches=iterate, training_callback=Clock())
    return {"seconds": times[args.warmup + args.steps] - times[args.warmup], "loss": times["loss"],
            "peak_gb": mx.get_peak_memory() / 1e9, "rss_gb": peak_rss_gb()}


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
            "peak_gb": None, "rss_gb": peak_rss_gb(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


WORKERS = {"mlx-gemma": worker_mlx_gemma, "mlx-lm": worker_mlx_lm, "torch": worker_torch}


# ---- parent ---------------------------------------------------------------------------------------


def run_worker(name: str, args, batches_path: str) -> dict:
    ranks, threads = PARALLEL.get(name, (1, None))
    cmd = [sys.executable, __file__, "--worker", "mlx-gemma" if name in PARALLEL else name, "--batches",
           batches_path, "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--max-seq-len", str(args.max_seq_len)]
    env = dict(os.environ, **({"OPENBLAS_NUM_THREADS": str(threads)} if threads else {}))
    if ranks > 1:
        from mlx_gemma.training.distributed import free_port_pair

        cmd = [str(Path(sys.executable).with_name("mlx.launch")), "-n", str(ranks), "--backend", "ring", "-p",
               str(free_port_pair()), "--env", f"OPENBLAS_NUM_THREADS={threads}", "--", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    results = [json.loads(ln[len("RESULT "):]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or len(results) != ranks:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "stderr": proc.stderr[-3000:]}
    res = next(r for r in results if r.get("rank", 0) == 0)
    res["peak_gb"] = max(r["peak_gb"] for r in results)  # per rank: the largest
    res["rss_gb"] = max(r["rss_gb"] for r in results)
    res["wall"] = time.perf_counter() - t0
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--only", default=",".join(TRAINERS), help="comma-separated subset of " + ",".join(TRAINERS)
                    + " (add 'parallel' for the 1 rank x 2 threads vs 2 ranks x 1 thread rows)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    ap.add_argument("--batches", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        batches, tokens, pad = load_batches(args.batches)
        res = WORKERS[args.worker](args, batches, tokens, pad)
        print("RESULT " + json.dumps(res))
        return

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if "parallel" in names:
        names = [n for n in names if n != "parallel"] + list(PARALLEL)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batches.npz"
        info = make_batches(path, args.warmup + args.steps, args.batch, args.max_seq_len)
        timed_tokens = sum(info["tokens"][args.warmup:])
        results = {}
        for name in names:
            print(f"running {name}...", file=sys.stderr, flush=True)
            results[name] = run_worker(name, args, str(path))
    load = os.getloadavg()
    print(f"\nLoRA training, Gemma 3 270M, fp32 CPU, r={RANK} alpha={ALPHA:g} q/k/v/o, batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup} warm-up ({timed_tokens} real tokens, row lengths "
          f"{sorted({s[1] for s in info['shapes']})}), {date.today()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f}")
    print()
    print("| trainer | tokens/s | s / step | peak memory (MLX arrays, GB) | peak RSS (GB) | last loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        r = results[name]
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | |")
            continue
        r["tokens_per_s"] = timed_tokens / r["seconds"]
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['seconds'] / args.steps:.2f} | {peak} | "
              f"{r['rss_gb']:.2f} | {r['loss']:.3f} |")
    ours = results.get("mlx-gemma", {})
    print()
    for other in ("mlx-lm", "torch"):
        r = results.get(other, {})
        if "tokens_per_s" in ours and "tokens_per_s" in r:
            line = f"mlx-gemma / {other}: {ours['tokens_per_s'] / r['tokens_per_s']:.2f}x tokens/s"
            if other == "mlx-lm":
                line += f", {ours['peak_gb'] / r['peak_gb']:.2f}x peak MLX memory"
            print(line)
    for name, r in results.items():
        if "stderr" in r:
            print(f"\n{name} stderr:\n{r['stderr']}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "tokens": timed_tokens, "results": results},
                                              indent=2))


if __name__ == "__main__":
    main()
