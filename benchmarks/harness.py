"""What the side-by-side benchmarks share: the machine header, rounds of one process per engine,
min / median / max, and the two LoRA training loops (ours through mlx-gemma's trainer, mlx-lm's
through its tuner) fed the same batches.

The project's benchmark standard: every engine in its own process, several rounds whose engine
order alternates, min / median / max over the rounds, and a header naming the CPU (lscpu's model
name and the x86-64 instruction-set level), the CPU count and the load average.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time

import numpy as np

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK, ALPHA, DROPOUT, LR = 16, 32.0, 0.05, 2e-4
RESULT = "RESULT "  # a child's last stdout line: RESULT {json}

# x86-64 micro-architecture levels (the psABI's), each the flags /proc/cpuinfo lists for it
_LEVELS = (("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
           ("x86-64-v3", {"avx2", "fma", "bmi2", "movbe", "f16c"}),
           ("x86-64-v2", {"sse4_2", "popcnt", "ssse3"}))


def cpu_model() -> str:
    """lscpu's model name (the CPU, not just the core count, sets the speed here)."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((x.split(":", 1)[1].strip() for x in out.splitlines() if x.startswith("Model name")), "unknown CPU")


def isa_level() -> str:
    """The highest x86-64 level whose flags the CPU has, plus AMX when present (else the machine name)."""
    try:
        flags = next(x for x in open("/proc/cpuinfo") if x.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return platform.machine()
    level = next((name for name, need in _LEVELS if need <= set(flags)), platform.machine())
    return level + (" + AMX" if "amx_tile" in flags else "")


def machine_header(loads: list) -> str:
    """One line: CPU model, instruction-set level, CPUs, the load averages seen, the UTC date."""
    lo, hi = (min(loads), max(loads)) if loads else (os.getloadavg()[0],) * 2
    return (f"{cpu_model()} ({isa_level()}), {os.cpu_count()} CPUs, load average {lo:.1f}-{hi:.1f} "
            f"(1-min, before/after each process), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def round_order(names, r: int) -> list:
    """Round r's engine order: forwards on even rounds, backwards on odd ones."""
    names = list(names)
    return names if r % 2 == 0 else names[::-1]


def run_child(cmd: list, loads: list, env: dict | None = None) -> dict:
    """Run one engine process; its RESULT line as a dict, or {"error": last stderr line, "stderr": tail}.
    The 1-minute load average before and after goes into `loads`."""
    loads.append(os.getloadavg()[0])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    loads.append(os.getloadavg()[0])
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT)]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1],
                "stderr": proc.stderr[-3000:]}
    return json.loads(lines[-1][len(RESULT):])


def spread(values, digits: int = 1) -> str:
    """min / median / max of the numbers, or '-' when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return " / ".join(f"{v:,.{digits}f}" for v in (min(values), statistics.median(values), max(values)))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


# ---- LoRA training, in the engine's own process ----------------------------------------------------


def mlx_gemma_lora(model, tokenizer, train_set, steps: int, warmup: int, batch: int, max_seq_len: int,
                   tokens: list | None = None, lr_schedule: str | None = None) -> dict:
    """Train through mlx-gemma's real trainer (`setup` + `train`: chunked LM-head loss, compiled step).
    `tokens`, when given, are the real tokens of the batches the peer runs: the trainer must see the same.
    Returns the timed steps' seconds and tokens, the last loss and peak memory (MLX arrays, RSS)."""
    from mlx_gemma.training.trainer import TrainArgs, setup, train

    times, seen = {}, {}

    def on_step(step, rec):
        times[step], seen[step] = time.perf_counter(), rec["tokens"]
        if tokens is not None and step <= len(tokens):  # exactly the peer's batches
            assert rec["tokens"] == tokens[step - 1], (step, rec["tokens"], tokens[step - 1])

    with tempfile.TemporaryDirectory() as out:
        targs = TrainArgs(out=out, iters=warmup + steps, batch_size=batch, rank=RANK, alpha=ALPHA, dropout=DROPOUT,
                          lr=LR, max_seq_len=max_seq_len, eval_every=0, save_every=0, test=False, seed=0,
                          lr_schedule=lr_schedule)
        result = train(model, tokenizer, targs, train_set, progress=False, on_step=on_step,
                       adapter_config=setup(model, targs))
    timed = range(warmup + 1, warmup + steps + 1)
    return {"seconds": times[warmup + steps] - times[warmup], "tokens": sum(seen[s] for s in timed),
            "loss": result.train_loss, "peak_gb": result.peak_memory_gb, "rss_gb": peak_rss_gb()}


def mlx_lm_batches(batches):
    """Our (inputs, targets, weights) batches as mlx-lm's tuner takes them: the ids (B, L + 1) and
    per row (offset, length), its loss on target steps offset..length (1-based), which equals our
    loss positions when each row has one contiguous answer."""
    import mlx.core as mx

    for inputs, targets, weights in batches:
        ids = np.concatenate([inputs, targets[:, -1:]], axis=1)
        spans = []
        for w in weights:
            pos = np.nonzero(w)[0]
            assert len(pos) == pos[-1] - pos[0] + 1, "one contiguous answer per row"
            spans.append((pos[0] + 1, pos[-1] + 1))
        yield mx.array(ids), mx.array(np.array(spans, np.int32))


def mlx_lm_lora(model, batches: list, tokens: list, steps: int, warmup: int, batch: int, max_seq_len: int) -> dict:
    """Train an mlx-lm model with mlx-lm's own tuner: `linear_to_lora_layers` on q/k/v/o of every
    layer, `mlx_lm.tuner.trainer.train` (its `default_loss`, full logits; its compiled step), AdamW,
    fed `batches` in order (`tokens`: their real tokens). Returns what `mlx_gemma_lora` returns."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": RANK, "scale": ALPHA / RANK, "dropout": DROPOUT,
                                                     "keys": [f"self_attn.{t}" for t in TARGETS]})
    mx.random.seed(0)
    times = {}

    class Clock(TrainingCallback):
        def on_train_loss_report(self, info):
            times[info["iteration"]] = time.perf_counter()
            times["loss"] = info["train_loss"]

    def iterate(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        return mlx_lm_batches(batches)

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArgs(batch_size=batch, iters=warmup + steps, steps_per_report=1, steps_per_eval=10 ** 9,
                             steps_per_save=10 ** 9, max_seq_length=max_seq_len + 1,
                             adapter_file=os.path.join(out, "adapters.safetensors"))
        mx.reset_peak_memory()
        train(model, optim.AdamW(learning_rate=LR, weight_decay=0.0), [None] * len(batches), args=targs,
              iterate_batches=iterate, training_callback=Clock())
    return {"seconds": times[warmup + steps] - times[warmup], "tokens": sum(tokens[warmup:warmup + steps]),
            "loss": times["loss"],
            "peak_gb": mx.get_peak_memory() / 1e9, "rss_gb": peak_rss_gb()}
