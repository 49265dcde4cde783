"""Preference tuning (DPO, sigmoid, beta 0.1) throughput and peak memory: mlx-gemma against TRL 1.16's
DPOTrainer with PEFT on torch (CPU, fp32, eager attention).

The embedded Gemma 3 270M (our HF-layout cache dir, read by both), LoRA r=16 alpha=32 on q/k/v/o,
no dropout (TRL's disable_dropout), the same pairs in the same order: conversational records from
the bundled zh_baike train split (prompt = system + question; chosen = the reference answer;
rejected = the next record's answer), the chat template applied by each side's tokenizer. The
reference is the model with its adapter off on both sides (computed in each step). Each engine runs
in its own process; rounds alternate the order; min / median / max over the rounds.

    python benchmarks/preference.py [--rounds 3] [--steps 6] [--warmup 1] [--batch 2]

tok/s: real (unpadded) tokens of the chosen and rejected rows per second of the timed steps.
peak: MLX's peak array memory (mlx-gemma) and each process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("mlx-gemma", "trl")
RANK, ALPHA, BETA, LR, MAX_LEN = 16, 32.0, 0.1, 5e-5, 512


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def model_dir() -> str:
    import mlx_gemma  # noqa: F401
    from mlx_gemma.loading import resolve

    return str(resolve("gemma-3-270m"))


def make_pairs(path: Path, n: int) -> None:
    rows = [json.loads(x) for x in (ROOT / "data" / "zh_baike" / "train.jsonl").read_text("utf-8").splitlines()]
    pairs = [{"prompt": a["messages"][:-1], "chosen": [a["messages"][-1]], "rejected": [b["messages"][-1]]}
             for a, b in zip(rows[:n], rows[1:n + 1])]
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), "utf-8")


def worker_mlx_gemma(a) -> dict:
    import mlx.core as mx

    from mlx_gemma.loading import load
    from mlx_gemma.training.trainer import DPO, TrainArgs, setup, train
    from mlx_gemma.training import data as data_lib

    model, tok = load("gemma-3-270m")
    ds = data_lib.load_pair_dataset(a.pairs, tok, max_seq_len=MAX_LEN)
    args = TrainArgs(out=tempfile.mkdtemp(), iters=a.warmup + a.steps, batch_size=a.batch, lr=LR, rank=RANK,
                     alpha=ALPHA, dropout=0.0, method="dpo", eval_every=0, save_every=0, test=False,
                     max_seq_len=MAX_LEN, lr_schedule="constant", warmup=0)
    times, tokens = {}, {}

    def on_step(step, rec):
        times[step], tokens[step] = time.perf_counter(), rec["tokens"]

    mx.reset_peak_memory()
    res = train(model, tok, args, ds, adapter_config=setup(model, args), loss=DPO(beta=BETA), on_step=on_step,
                progress=False)
    timed = range(a.warmup + 1, a.warmup + a.steps + 1)
    return {"tok_s": sum(tokens[s] for s in timed) / (times[timed[-1]] - times[a.warmup]),
            "peak_gb": mx.get_peak_memory() / 1e9, "rss_gb": peak_rss_gb(), "loss": res.train_loss}


def worker_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(model_dir())
    data = Dataset.from_list([json.loads(x) for x in Path(a.pairs).read_text("utf-8").splitlines()])
    times, tokens = {}, {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times[state.global_step] = time.perf_counter()

    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), beta=BETA, per_device_train_batch_size=a.batch, learning_rate=LR,
                    lr_scheduler_type="constant", max_steps=a.warmup + a.steps, report_to=[], use_cpu=True,
                    logging_steps=1, save_strategy="no", max_length=MAX_LEN, gradient_checkpointing=False,
                    disable_dropout=True, precompute_ref_log_probs=False, seed=0)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[Clock()],
                         peft_config=LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    compute = trainer.compute_loss

    def counting(model, inputs, *args, **kw):
        tokens[len(tokens) + 1] = int(inputs["attention_mask"].sum()) - inputs["attention_mask"].shape[0]
        return compute(model, inputs, *args, **kw)

    trainer.compute_loss = counting
    trainer.train()
    timed = range(a.warmup + 1, a.warmup + a.steps + 1)
    return {"tok_s": sum(tokens[s] for s in timed) / (times[timed[-1]] - times[a.warmup]), "peak_gb": None,
            "rss_gb": peak_rss_gb(), "loss": None}


def run(name: str, a, pairs: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--pairs", pairs, "--steps", str(a.steps), "--warmup",
           str(a.warmup), "--batch", str(a.batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=2, help="pairs per step")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps({"mlx-gemma": worker_mlx_gemma, "trl": worker_trl}[a.worker](a)))
        return
    started, loads = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), []
    results = {name: [] for name in ENGINES}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = Path(tmp) / "pairs.jsonl"
        make_pairs(pairs, a.batch * (a.warmup + a.steps))
        for r in range(a.rounds):
            for name in (ENGINES if r % 2 == 0 else ENGINES[::-1]):
                loads.append(os.getloadavg()[0])
                results[name].append(run(name, a, str(pairs)))
                print(f"  round {r + 1} {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "?")
    print(f"\nDPO with LoRA, Gemma 3 270M, fp32 CPU ({cpu}, {os.cpu_count()} CPUs, {platform.machine()}), "
          f"{a.batch} pairs per step, {a.steps} timed steps after {a.warmup}, {a.rounds} rounds, from {started}, "
          f"load average {min(loads):.1f}-{max(loads):.1f}\n")
    print("| engine | tok/s min / median / max | peak MLX arrays (GB) | peak RSS (GB) |")
    print("|---|---|---:|---:|")
    for name, rows in results.items():
        t = sorted(x["tok_s"] for x in rows)
        peak = max((x["peak_gb"] for x in rows if x["peak_gb"] is not None), default=None)
        print(f"| {name} | {t[0]:.0f} / {statistics.median(t):.0f} / {t[-1]:.0f} | "
              f"{'-' if peak is None else f'{peak:.2f}'} | {max(x['rss_gb'] for x in rows):.2f} |")


if __name__ == "__main__":
    main()
