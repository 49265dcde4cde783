"""Preference tuning (DPO, sigmoid, beta 0.1) throughput and peak memory: mlx-gemma against TRL 1.16's
DPOTrainer with PEFT on torch (CPU, fp32, eager attention), and against mlx-lm-lora's DPO when its venv
is given.

The embedded Gemma 3 270M (our HF-layout cache dir, read by all), LoRA r=16 alpha=32 on q/k/v/o,
no dropout (TRL's disable_dropout), AdamW lr 5e-5, the same pairs: conversational records from the
bundled zh_baike train split (prompt = system + question; chosen = the reference answer;
rejected = the next record's answer), the chat template applied by each side's tokenizer. Each
engine runs in its own process; rounds alternate the order; min / median / max over the rounds;
the header names the CPU (lscpu model name, x86-64 level), CPU count and the load averages seen
before/after each process.
- mlx-gemma: `mlx_gemma.training.trainer.train` with `DPO(beta)`; the reference is the model with
  its adapter off (no second copy), computed in each step.
- trl: `DPOTrainer` + PEFT; the reference is the PEFT model with its adapter disabled, each step.
- mlx-lm-lora (5.10.2, with mlx-lm 0.32.2 and mlx 0.32.4 in its own venv): its
  `trainer.dpo_trainer.train_dpo` on mlx-lm's model with `linear_to_lora_layers`; the reference is a
  second loaded copy of the model, frozen, as its CLI does. It batches the same pairs its own way
  (sorted by length, shuffled with numpy seed 0). On the CPU `train_dpo`'s first line,
  `mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])`, raises KeyError
  (the key is Metal-only; MLX's CPU device_info has only architecture and device_name), so the
  worker gives device_info that key with 0 (no wired limit, which means nothing on the CPU).
  Its process runs with this checkout on PYTHONPATH only so that `import mlx_gemma` loads the
  same OpenBLAS under MLX as the other MLX engine.
  Install it in a throw-away venv, never in the project's:
      python3 -m venv /tmp/mll && /tmp/mll/bin/pip install mlx-lm-lora "mlx[cpu]==0.32.4"
  (plain `pip install mlx-lm-lora` pulls `mlx` without its Linux CPU library: libmlx.so missing.)

    python benchmarks/preference.py [--rounds 3] [--steps 6] [--warmup 1] [--batch 2]
        [--mlx-lm-lora-python /tmp/mll/bin/python]

tok/s: real (unpadded) tokens of the chosen and rejected rows per second of the timed steps.
peak: MLX's peak array memory (the MLX engines; mlx-lm-lora's includes its reference copy) and
each process's peak RSS.
The default run with mlx-lm-lora (3 engines x 3 rounds) took 12 min on a quiet 2-core AMD EPYC
(2026-12-07).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import TARGETS, peak_rss_gb

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("mlx-gemma", "trl")
RANK, ALPHA, BETA, LR, MAX_LEN = 16, 32.0, 0.1, 5e-5, 512


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
    import mlx_gemma.cpu  # (OpenBLAS before mlx.core: imported after it, MLX keeps its reference BLAS)
    import mlx.core as mx

    mlx_gemma.cpu.enable()  # as `mlx-gemma train --method dpo` runs: the CPU paths calibration keeps

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


def worker_mlx_lm_lora(a) -> dict:
    """mlx-lm-lora's own DPO (`mlx_lm_lora.trainer.dpo_trainer.train_dpo`, sigmoid loss) on mlx-lm's
    Gemma 3 model, run by the interpreter of the venv it is installed in. Its reference is a second
    loaded copy of the model, frozen, as its CLI does (`load_reference_model`)."""
    import mlx_gemma  # noqa: F401  (PYTHONPATH: this checkout; only for the same OpenBLAS under MLX)
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm import load as lm_load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm_lora.trainer import dpo_trainer
    from mlx_lm_lora.trainer.datasets import DPODataset

    np.random.seed(0)
    mx.random.seed(0)
    info = mx.device_info()
    if "max_recommended_working_set_size" not in info:
        # train_dpo starts with mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"]),
        # a Metal-only key (KeyError on the CPU); a wired limit means nothing on the CPU, so 0 (none)
        mx.device_info = lambda: dict(info, max_recommended_working_set_size=0)
    model, tok = lm_load(a.model_dir)
    ref_model = lm_load(a.model_dir)[0].freeze()
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0,
                                                     "keys": [f"self_attn.{t}" for t in TARGETS]})
    records = []
    for x in (json.loads(line) for line in Path(a.pairs).read_text("utf-8").splitlines()):
        system = [m["content"] for m in x["prompt"] if m["role"] == "system"]
        records.append({"prompt": x["prompt"][-1]["content"], "chosen": x["chosen"][0]["content"],
                        "rejected": x["rejected"][0]["content"], **({"system": system[0]} if system else {})})
    data = DPODataset(records, tok)
    times, tokens = {}, {}
    batches = dpo_trainer.iterate_dpo_batches

    def counting(*args, **kw):  # real tokens per step: unpadded ids (pad 0) less one per row, as ours
        for batch in batches(*args, **kw):
            tokens[len(tokens) + 1] = sum(int((x != 0).sum()) - x.shape[0] for x in batch[:2])
            yield batch

    class Clock(TrainingCallback):
        def on_train_loss_report(self, report):
            times[report["iteration"]] = time.perf_counter()
            times["loss"] = report["train_loss"]

    dpo_trainer.iterate_dpo_batches = counting
    targs = dpo_trainer.DPOTrainingArgs(batch_size=a.batch, iters=a.warmup + a.steps, steps_per_report=1,
                                        steps_per_eval=10 ** 9, steps_per_save=10 ** 9, max_seq_length=MAX_LEN,
                                        beta=BETA, loss_type="sigmoid",
                                        adapter_file=os.path.join(tempfile.mkdtemp(), "adapters.safetensors"))
    mx.reset_peak_memory()
    dpo_trainer.train_dpo(model, ref_model, optim.AdamW(learning_rate=LR, weight_decay=0.0), data, args=targs,
                          training_callback=Clock(), loss_type="sigmoid")
    timed = range(a.warmup + 1, a.warmup + a.steps + 1)
    return {"tok_s": sum(tokens[s] for s in timed) / (times[timed[-1]] - times[a.warmup]),
            "peak_gb": mx.get_peak_memory() / 1e9, "rss_gb": peak_rss_gb(), "loss": times["loss"]}


WORKERS = {"mlx-gemma": worker_mlx_gemma, "trl": worker_trl, "mlx-lm-lora": worker_mlx_lm_lora}


def run(name: str, a, pairs: str, loads: list) -> dict:
    python, env = sys.executable, None
    if name == "mlx-lm-lora":
        from mlx_gemma.cpu.runtime import BLAS_STATUS

        # its own venv; this checkout on PYTHONPATH so `import mlx_gemma` loads the same OpenBLAS
        python = a.mlx_lm_lora_python
        env = dict(os.environ, PYTHONPATH=str(ROOT), MLX_GEMMA_OPENBLAS=BLAS_STATUS["library"] or "")
    cmd = [python, __file__, "--worker", name, "--pairs", pairs, "--steps", str(a.steps), "--warmup",
           str(a.warmup), "--batch", str(a.batch), "--model-dir", model_dir()]
    return harness.run_child(cmd, loads, env)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=2, help="pairs per step")
    ap.add_argument("--mlx-lm-lora-python", help="the python of a venv with mlx-lm-lora installed (e.g. "
                    "/tmp/mll/bin/python); without it that engine is skipped")
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(harness.RESULT + json.dumps(WORKERS[a.worker](a)))
        return
    engines = list(ENGINES) + (["mlx-lm-lora"] if a.mlx_lm_lora_python else [])
    if not a.mlx_lm_lora_python:
        print("mlx-lm-lora skipped: no --mlx-lm-lora-python given", file=sys.stderr)
    results, loads = {name: [] for name in engines}, []
    with tempfile.TemporaryDirectory() as tmp:
        pairs = Path(tmp) / "pairs.jsonl"
        make_pairs(pairs, a.batch * (a.warmup + a.steps))
        for r in range(a.rounds):
            for name in harness.round_order(engines, r):
                results[name].append(run(name, a, str(pairs), loads))
                print(f"  round {r + 1} {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    print(f"\nDPO (sigmoid, beta {BETA}) with LoRA r={RANK} alpha={ALPHA:g} q/k/v/o, Gemma 3 270M, fp32 CPU, "
          f"{a.batch} pairs per step, {a.steps} timed steps after {a.warmup}, {a.rounds} rounds, min / median / max")
    print(f"# {harness.machine_header(loads)}\n")
    print("| engine | tok/s min / median / max | peak MLX arrays GB min / median / max | peak RSS GB (max) "
          "| failed rounds |")
    print("|---|---|---|---:|---:|")
    for name, rows in results.items():
        ok = [x for x in rows if "error" not in x]
        if not ok:
            print(f"| {name} | failed: {rows[0]['error'].replace('|', '/')[:160]} | | | {len(rows)} |")
            continue
        print(f"| {name} | {harness.spread([x['tok_s'] for x in ok], 0)} | "
              f"{harness.spread([x['peak_gb'] for x in ok], 2)} | {max(x['rss_gb'] for x in ok):.2f} | "
              f"{len(rows) - len(ok)} |")
    if not a.mlx_lm_lora_python:
        print("\nmlx-lm-lora: skipped (no --mlx-lm-lora-python)")


if __name__ == "__main__":
    main()
