"""LoRA / QLoRA fine-tuning: TrainArgs, the training loop, evaluation, checkpoints and resume.

`train(model, tokenizer, args, train_set, valid_set)` is the library entry point (the CLI's
`mlx-gemma train` calls `run_training(args)`, which loads the model and data, then `train`).

The loop: AdamW with linear warmup + cosine decay; gradient accumulation (the loss is the mean
over every loss token of the effective batch, so batch 4 == batch 2 x accumulation 2); an
`mx.compile`d step with the model / optimizer / RNG state as inputs and outputs (on a GPU; on
the CPU the LM-head loss runs in numpy between the forward and backward halves and only the
optimizer update is compiled); the chunked LM-head loss of train/loss.py; optional per-layer
gradient checkpointing.

Reproducibility and resume: the batch order is a function of (seed, epoch) and the dropout RNG is
reseeded from (seed, micro-batch index) before every micro-batch, so a run resumed from a
checkpoint (adapter + optimizer state + step) replays exactly the steps the uninterrupted run
would have taken.

Adapter dir layout (`args.out`):
    adapter_model.safetensors, adapter_config.json   the latest adapter, PEFT format
    train_config.json                                 the TrainArgs used (+ data summary)
    metrics.jsonl                                     one JSON object per step / evaluation
    loss.png                                          train and validation loss curves
    checkpoints/step-000100/                          adapter + optimizer.safetensors + trainer_state.json
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..errors import UserError
from ..files import atomic_output_dir, write_json_atomic
from . import data as data_lib
from ..backend import policy
from .loss import DEFAULT_CHUNK, batch_loss, loss_and_grad, loss_positions

DEFAULT_MODEL = "gemma-3-270m"
DEFAULT_OUT = "adapters/gemma-3-270m-zh"
KEEP_CHECKPOINTS = 3


def _opt(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class TrainArgs:
    """Every training option; `mlx-gemma train` builds its options (and their help) from these fields."""

    model: str = _opt(DEFAULT_MODEL, "Base model: dir, .gguf, HF repo id or alias.")
    data: Optional[str] = _opt(None, "JSONL/JSON file, or dir with train/valid/test files "
                                     "(default: the bundled zh_baike chat splits).")
    out: str = _opt(DEFAULT_OUT, "Adapter dir to write (adapter, checkpoints, metrics, loss curve).")
    rank: int = _opt(16, "LoRA rank r.")
    alpha: float = _opt(32.0, "LoRA alpha (scale = alpha / r).")
    dropout: float = _opt(0.05, "LoRA dropout.")
    targets: str = _opt("q_proj,k_proj,v_proj,o_proj", "Comma-separated modules to adapt, or all-linear.")
    num_layers: Optional[int] = _opt(None, "Adapt only the last N decoder layers (default: all).")
    quantize_bits: Optional[int] = _opt(None, "Quantize the base to 4 or 8 bits first (QLoRA).", choices=(4, 8))
    quantize_group_size: int = _opt(64, "Group size for --quantize-bits.")
    lr: float = _opt(2e-4, "Peak learning rate (AdamW).")
    min_lr: float = _opt(0.0, "Learning rate at the end of the cosine decay.")
    warmup: Optional[int] = _opt(None, "Linear warmup steps (default: 5% of the steps).")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = _opt(1.0, "Clip the gradient to this global norm (0: off).")
    epochs: Optional[int] = _opt(None, "Passes over the training set (default 1; the main job, on the bundled "
                                       "data without --epochs/--iters: 160 steps).")
    iters: Optional[int] = _opt(None, "Optimizer steps (overrides --epochs).")
    batch_size: Optional[int] = _opt(None, "Rows per micro-batch (default 4; 2 in the main job).")
    grad_accum: int = _opt(1, "Micro-batches per optimizer step.")
    max_seq_len: int = _opt(512, "Tokens per record; longer records are truncated (or dropped with --drop-long).")
    drop_long: bool = _opt(False, "Drop records longer than --max-seq-len instead of truncating them.")
    pack: bool = _opt(False, "Pack short records into rows of --max-seq-len (attention stays inside each).")
    train_on_prompt: bool = _opt(False, "Put loss on prompt tokens too (default: assistant answers only).")
    grad_checkpoint: bool = _opt(False, "Recompute each layer's activations in the backward pass (less memory).")
    eval_every: Optional[int] = _opt(None, "Validate every N steps (0: only at the end; default 50, 0 in the main job).")
    eval_batches: Optional[int] = _opt(None, "Validation batches per evaluation (default: the whole split).")
    save_every: int = _opt(100, "Checkpoint every N steps (0: only at the end).")
    seed: int = _opt(0, "Seed for data order, LoRA init and dropout.")
    dtype: str = _opt("auto", "Compute dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16.")
    loss_chunk: int = _opt(DEFAULT_CHUNK, "Vocabulary chunk of the cross-entropy.")
    test: bool = _opt(True, "Evaluate on the test split at the end (when there is one).")
    resume: bool = _opt(False, "Continue from the latest checkpoint in --out.")
    force: bool = _opt(False, "Start over in an --out dir that holds another run.")

    # options that shape the adapter or the step sequence: a resumed run must keep them
    RESUME_KEYS = ("model", "rank", "alpha", "targets", "num_layers", "quantize_bits", "quantize_group_size",
                   "batch_size", "grad_accum", "max_seq_len", "pack", "seed", "lr", "train_on_prompt")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train_fields() -> list:
    return dataclasses.fields(TrainArgs)


def load_config_file(path) -> dict:
    """A YAML or JSON file of TrainArgs fields -> dict (UserError naming an unknown key or bad file)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as exc:  # json / yaml parse errors
        raise UserError(f"{path}: cannot parse ({str(exc).splitlines()[0]})") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a config file must be a mapping of option: value")
    names = {f.name for f in train_fields()}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise UserError(f"{path}: unknown key {key!r}; valid keys are the `mlx-gemma train` options "
                            f"({', '.join(sorted(names))})")
        out[name] = value
    return out


# The main job: `mlx-gemma train` on the bundled data without --epochs/--iters. Sized so that the
# evaluation before and after plus training fit in 15 minutes on a 2-core CPU (see README):
# batch 2 gives twice the optimizer steps of batch 4 for the same tokens (measured: what teaches
# the base model to stop in so short a run); one validation, at the end.
MAIN_JOB = {"iters": 160, "batch_size": 2, "eval_every": 0}
DEFAULTS = {"batch_size": 4, "eval_every": 50}


def is_main_job(args: TrainArgs) -> bool:
    return args.data is None and args.epochs is None and args.iters is None


def resolve_defaults(args: TrainArgs) -> TrainArgs:
    """A copy with the options left at None filled: the main job's preset (only where the user
    gave no value) on the bundled data without --epochs/--iters, the usual defaults otherwise."""
    preset = MAIN_JOB if is_main_job(args) else {}
    changes = {name: preset.get(name, DEFAULTS.get(name)) for name in ("iters", "batch_size", "eval_every")
               if getattr(args, name) is None}
    return dataclasses.replace(args, **changes)


def check_args(args: TrainArgs) -> None:
    """Reject impossible values with one line naming the option."""
    positive = ("rank", "batch_size", "grad_accum", "max_seq_len", "loss_chunk")
    for name in positive:
        if getattr(args, name) is None or int(getattr(args, name)) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("epochs", "iters", "num_layers"):
        v = getattr(args, name)
        if v is not None and int(v) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.quantize_bits not in (None, 4, 8):
        raise UserError(f"--quantize-bits must be 4 or 8, got {args.quantize_bits}")
    if not args.lr > 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.max_seq_len < 2:
        raise UserError("--max-seq-len must be at least 2")


# ---- model setup ------------------------------------------------------------------------------


def prepare_model(model, args: TrainArgs) -> dict:
    """Quantize the base (QLoRA, when args.quantize_bits) and wrap the targets in LoRA.

    Seeds MLX's RNG with args.seed first, so the LoRA init is reproducible. Returns the adapter config.
    """
    from ..lora import apply_lora

    if args.quantize_bits:
        from ..quantize import quantize_model

        quantize_model(model, bits=int(args.quantize_bits), group_size=int(args.quantize_group_size))
    mx.random.seed(args.seed)
    targets = args.targets if args.targets == "all-linear" else tuple(t.strip() for t in args.targets.split(","))
    return apply_lora(model, targets=targets, rank=int(args.rank), alpha=float(args.alpha),
                      dropout=float(args.dropout), num_layers=args.num_layers, base_model=str(args.model))


def _checkpointed_class(cls):
    """A subclass of a decoder-layer class whose call recomputes its activations in the backward pass."""
    if getattr(cls, "_grad_checkpointed", False):
        return cls

    def __call__(self, x, mask, cache=None, pos=None):
        def inner(params, x):
            self.update(params)
            return cls.__call__(self, x, mask, cache, pos)

        return mx.checkpoint(inner)(self.trainable_parameters(), x)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__, "_grad_checkpointed": True})


def enable_grad_checkpoint(model) -> None:
    """Per layer instance (not class-wide, so other models in the process are untouched)."""
    for layer in model.layers:
        layer.__class__ = _checkpointed_class(type(layer))


# ---- steps ------------------------------------------------------------------------------------


def _device_batch(batch: dict):
    idx, w = loss_positions(batch["weights"])
    seg = batch["segment_ids"]
    return (mx.array(batch["inputs"]), mx.array(batch["targets"]), mx.array(idx), mx.array(w),
            None if seg is None else mx.array(seg))


def eval_loss_fn(model, loss_chunk: int = DEFAULT_CHUNK):
    """batch_loss without gradients: compiled, except on the CPU where the head runs in numpy."""
    fn = partial(batch_loss, model, chunk=loss_chunk, differentiable=False)
    return fn if policy().host_loss else mx.compile(fn, inputs=[model.state])


def evaluate_dataset(model, tokenizer, dataset, batch_size: int = 4, max_seq_len: Optional[int] = None,
                     max_batches: Optional[int] = None, loss_chunk: int = DEFAULT_CHUNK, _fn=None) -> dict:
    """Mean token loss over a tokenized Dataset (loss positions as in training), in eval mode.

    Returns {"loss", "perplexity", "tokens"} (tokens: loss-carrying tokens counted).
    """
    was_training = model.training
    model.eval()
    max_seq_len = max_seq_len or int(dataset.lengths.max())
    fn = _fn or eval_loss_fn(model, loss_chunk)
    plan = data_lib.plan_batches(dataset, batch_size, 0, 0, max_seq_len, shuffle=False)
    if max_batches:
        plan = plan[:max_batches]
    total, count = 0.0, 0.0
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    for rows in plan:
        loss, n = fn(*_device_batch(data_lib.make_batch(dataset, rows, pad, max_seq_len)))
        mx.eval(loss, n)
        total += loss.item()
        count += n.item()
    model.train(was_training)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count)}


def make_schedule(args: TrainArgs, total_steps: int):
    warmup = args.warmup if args.warmup is not None else max(1, round(0.05 * total_steps))
    warmup = min(int(warmup), total_steps)
    decay = optim.cosine_decay(args.lr, max(total_steps - warmup, 1), end=args.min_lr)
    if warmup == 0:
        return decay
    ramp = optim.linear_schedule(args.lr / warmup, args.lr, warmup - 1) if warmup > 1 else (lambda s: args.lr)
    return optim.join_schedules([ramp, decay], [warmup])


class NonFiniteLoss(UserError):
    """Training produced a NaN / inf loss."""


@dataclass
class TrainResult:
    """What a training run did; `summary()` is the text the CLI prints."""

    out: str
    steps: int
    total_steps: int
    train_loss: Optional[float] = None
    val_loss: Optional[float] = None
    test_loss: Optional[float] = None
    test_perplexity: Optional[float] = None
    tokens: int = 0
    seconds: float = 0.0
    peak_memory_gb: float = 0.0
    trainable: int = 0
    interrupted: bool = False
    metrics: list = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        def f(x):
            return "-" if x is None else f"{x:.4f}"

        lines = [f"{'interrupted' if self.interrupted else 'trained'}: {self.steps}/{self.total_steps} steps, "
                 f"{self.tokens} tokens in {self.seconds:.1f} s ({self.tokens_per_second:.0f} tok/s), "
                 f"peak memory {self.peak_memory_gb:.2f} GB",
                 f"loss: train {f(self.train_loss)}  valid {f(self.val_loss)}  test {f(self.test_loss)}"
                 + (f" (perplexity {self.test_perplexity:.2f})" if self.test_perplexity else ""),
                 f"adapter: {self.out}"]
        if self.interrupted:
            lines.append(f"continue with: mlx-gemma train --out {self.out} --resume")
        return "\n".join(lines)


class Progress:
    """One status line on stderr: step, loss, learning rate, tok/s, peak memory, ETA."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.last = 0.0

    def update(self, step: int, loss: float, lr: float, tok_s: float, peak_gb: float, eta_s: float) -> None:
        if not self.enabled:
            return
        width = 20
        done = int(width * step / max(self.total, 1))
        eta = time.strftime("%H:%M:%S", time.gmtime(max(eta_s, 0))) if eta_s == eta_s else "?"
        line = (f"[{'#' * done}{'.' * (width - done)}] step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                f"{tok_s:.0f} tok/s peak {peak_gb:.2f} GB ETA {eta}")
        now = time.time()
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
            self.stream.flush()
        elif step == self.total or now - self.last > 10 or step == 1:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last = now

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---- output dir, checkpoints ------------------------------------------------------------------


def _checkpoints(out: Path) -> list:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def prepare_out_dir(args: TrainArgs) -> Optional[Path]:
    """Check the output dir; return the checkpoint to resume from (or None for a fresh run).

    A dir holding another run is an error unless --resume (continue) or --force (start over).
    """
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    has_run = out.is_dir() and any(out.iterdir())
    if args.resume:
        ckpts = _checkpoints(out)
        if not ckpts:
            raise UserError(f"--resume: no checkpoint in {out}/checkpoints; start a new run without --resume")
        previous = out / "train_config.json"
        if previous.exists():
            old = json.loads(previous.read_text())
            for key in TrainArgs.RESUME_KEYS:
                if key in old and old[key] != getattr(args, key):
                    raise UserError(f"--resume: {key} was {old[key]!r} in {previous}, now {getattr(args, key)!r}; "
                                    "use the same value, or --force to start over")
        return ckpts[-1]
    if has_run and not args.force:
        raise UserError(f"--out {out} already holds files (another run?); pass --resume to continue it or "
                        "--force to start over")
    return None


def _clean_out_dir(out: Path) -> None:
    """--force: remove what a previous run wrote (only our files, never the whole dir)."""
    for name in ("adapter_model.safetensors", "adapter_config.json", "train_config.json", "metrics.jsonl", "loss.png",
                 "report.md", "report.json"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def save_checkpoint(out: Path, model, adapter_config: dict, optimizer, state: dict) -> Path:
    """checkpoints/step-N/ (adapter, optimizer state, trainer state) written into a temp dir and
    renamed; then the top-level adapter is updated. Keeps the last KEEP_CHECKPOINTS."""
    from ..lora import save_adapter

    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['step']:06d}"
    with atomic_output_dir(final, force=True) as tmp:
        save_adapter(model, tmp, adapter_config)
        opt = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt)
        write_json_atomic(tmp / "trainer_state.json", state)
    save_adapter(model, out, adapter_config)
    for old in _checkpoints(out)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer) -> dict:
    """Restore LoRA weights and optimizer state from a checkpoint dir; return its trainer state."""
    from ..convert import peft as peft_format
    from ..lora import lora_parameters

    weights = peft_format.from_peft(mx.load(str(ckpt / "adapter_model.safetensors")), str(ckpt))
    current = lora_parameters(model)
    if set(weights) != set(current):
        raise UserError(f"{ckpt}: the checkpoint's LoRA tensors do not match this model's; use --force to start over")
    model.update(tree_unflatten(list(weights.items())))
    optimizer.state = tree_unflatten(list(mx.load(str(ckpt / "optimizer.safetensors")).items()))
    return json.loads((ckpt / "trainer_state.json").read_text())


# ---- the loop ---------------------------------------------------------------------------------


def _total_steps(args: TrainArgs, batches: int) -> int:
    if args.iters:
        return int(args.iters)
    return max(1, math.ceil((args.epochs or 1) * batches / args.grad_accum))


def train(model, tokenizer, args: TrainArgs, train_set, valid_set=None, test_set=None, *,
          adapter_config: Optional[dict] = None, on_step: Optional[Callable] = None, progress: bool = True,
          extra_config: Optional[dict] = None) -> TrainResult:
    """Fine-tune `model` with LoRA on tokenized datasets (train/data.py `Dataset`s), writing `args.out`.

    If the model has no LoRA layers yet, `prepare_model` adds them (and quantizes for QLoRA);
    otherwise pass the `adapter_config` that apply_lora returned. `on_step(step, record)` is called
    after every optimizer step (a KeyboardInterrupt raised there acts like Ctrl-C: checkpoint and
    return with `interrupted=True`). Raises NonFiniteLoss (a UserError) when the loss becomes NaN/inf;
    the last checkpoint is kept as it was. Returns a TrainResult.
    """
    from ..lora import count_parameters, lora_layers

    args = resolve_defaults(args)
    check_args(args)
    out = Path(args.out).expanduser()
    resume_from = prepare_out_dir(args)
    if adapter_config is None:
        if lora_layers(model):
            raise UserError("the model already has LoRA layers; pass the adapter_config apply_lora returned")
        adapter_config = prepare_model(model, args)
    if args.grad_checkpoint:
        enable_grad_checkpoint(model)
    model.train()
    if not resume_from and out.exists():
        _clean_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)

    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    per_epoch = data_lib.batches_per_epoch(train_set, args.batch_size, args.max_seq_len, args.pack)
    total = _total_steps(args, per_epoch)
    optimizer = optim.AdamW(learning_rate=make_schedule(args, total), weight_decay=args.weight_decay)
    optimizer.init(model.trainable_parameters())

    config = dict(args.to_dict(), **(extra_config or {}), total_steps=total, batches_per_epoch=per_epoch,
                  train_records=len(train_set), valid_records=len(valid_set) if valid_set else 0)
    if not resume_from:
        write_json_atomic(out / "train_config.json", config)

    start = 0
    metrics: list = []
    if resume_from:
        state = load_checkpoint(resume_from, model, optimizer)
        start = int(state["step"])
        if (out / "metrics.jsonl").exists():
            for line in (out / "metrics.jsonl").read_text().splitlines():
                rec = json.loads(line)
                if rec["step"] <= start:
                    metrics.append(rec)
    log = open(out / "metrics.jsonl", "w")
    for rec in metrics:
        log.write(json.dumps(rec) + "\n")
    log.flush()

    def record(rec: dict) -> None:
        metrics.append(rec)
        log.write(json.dumps(rec) + "\n")
        log.flush()

    # -- compiled functions: model, optimizer and RNG state go in and come out
    batch_loss_and_grad = loss_and_grad(model, args.loss_chunk)
    state_io = [model.state, optimizer.state, mx.random.state]

    def clip_and_update(grads, ntok):
        grads = tree_map(lambda g: g / ntok, grads)  # sum of token losses -> mean
        if args.max_grad_norm:
            grads, _ = optim.clip_grad_norm(grads, args.max_grad_norm)
        optimizer.update(model, grads)

    # On the CPU the LM-head loss runs in numpy between the forward and the backward half
    # (train/loss.py), which mx.compile cannot trace: there only the update is compiled.
    compiled = partial(mx.compile, inputs=state_io, outputs=state_io)
    host_head = policy().host_loss
    whole_step = (lambda fn: fn) if host_head else compiled

    def micro_step(inputs, targets, idx, w, seg):
        (loss, n), grads = batch_loss_and_grad(inputs, targets, idx, w, seg)
        return loss, n, grads

    @compiled
    def apply_update(grads, ntok):
        clip_and_update(grads, ntok)

    @whole_step
    def step_fused(inputs, targets, idx, w, seg):
        (loss, n), grads = batch_loss_and_grad(inputs, targets, idx, w, seg)
        if host_head:
            apply_update(grads, n)
        else:
            clip_and_update(grads, n)
        return loss, n

    micro_step = whole_step(micro_step)
    eval_fn = eval_loss_fn(model, args.loss_chunk)

    def validate(step: int) -> Optional[float]:
        if not valid_set:
            return None
        res = evaluate_dataset(model, tokenizer, valid_set, args.batch_size, args.max_seq_len, args.eval_batches,
                               args.loss_chunk, _fn=eval_fn)
        record({"step": step, "val_loss": res["loss"], "val_perplexity": res["perplexity"],
                "val_tokens": res["tokens"]})
        bar.message(f"step {step}: validation loss {res['loss']:.4f} (perplexity {res['perplexity']:.2f})")
        return res["loss"]

    def checkpoint(step: int) -> Path:
        return save_checkpoint(out, model, adapter_config, optimizer, {"step": step, "total_steps": total})

    bar = Progress(total, progress)
    params = count_parameters(model)
    bar.message(f"training {params['trainable']:,} of {params['total']:,} parameters ({params['percent']:.3f}%), "
                f"{total} steps x {args.batch_size * args.grad_accum} rows, {per_epoch} batches per epoch"
                + (f", resuming at step {start}" if start else ""))
    batches = data_lib.iterate_batches(train_set, args.batch_size, args.max_seq_len, pad, args.seed, args.pack,
                                       start=start * args.grad_accum)
    result = TrainResult(out=str(out), steps=start, total_steps=total, trainable=params["trainable"])
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    step = start
    val_loss = None
    try:
        if start == 0 and args.eval_every and valid_set:
            validate(0)
        while step < total:
            t_step = time.perf_counter()
            loss_sum = ntok = 0.0
            tokens = 0
            epoch = 0
            grads = None
            for k in range(args.grad_accum):
                epoch, _, batch = next(batches)
                micro = step * args.grad_accum + k
                mx.random.seed((args.seed * 1_000_003 + micro) % (2 ** 32))  # dropout: same masks on resume
                arrays = _device_batch(batch)
                if args.grad_accum == 1:
                    loss, n = step_fused(*arrays)
                else:
                    loss, n, g = micro_step(*arrays)
                    grads = g if grads is None else tree_map(mx.add, grads, g)
                    mx.eval(loss, n, grads)
                loss_sum, ntok, tokens = loss_sum + loss, ntok + n, tokens + batch["tokens"]
            if args.grad_accum > 1:
                apply_update(grads, ntok)
            mx.eval(state_io, loss_sum, ntok)
            step += 1
            value = (loss_sum / ntok).item()
            if not math.isfinite(value):
                last = _checkpoints(out)
                where = f"the last good checkpoint, {last[-1]}, is kept" if last else "no checkpoint was saved yet"
                raise NonFiniteLoss(f"the training loss became {value} at step {step}; training stopped and "
                                    f"{where}. Lower --lr (now {args.lr:g}) or check the data")
            dt = time.perf_counter() - t_step
            result.tokens += tokens
            elapsed = time.perf_counter() - t0
            lr = optimizer.learning_rate.item()
            peak = mx.get_peak_memory() / 1e9
            rec = {"step": step, "epoch": epoch, "loss": value, "lr": lr, "loss_tokens": int(ntok.item()),
                   "tokens": tokens, "tok_s": tokens / dt, "peak_memory_gb": peak, "time": elapsed}
            record(rec)
            result.train_loss = value
            result.steps = step
            bar.update(step, value, lr, result.tokens / elapsed, peak, elapsed / (step - start) * (total - step))
            if args.eval_every and step % args.eval_every == 0 and step < total:
                val_loss = validate(step)
            if args.save_every and step % args.save_every == 0 and step < total:
                checkpoint(step)
            if on_step is not None:
                on_step(step, rec)
    except KeyboardInterrupt:
        result.interrupted = True
        if step > start:
            checkpoint(step)
        bar.message(f"interrupted at step {step}; checkpoint saved in {out}/checkpoints")
    except BaseException:
        log.close()
        raise
    finally:
        bar.close()
        result.seconds = time.perf_counter() - t0
        result.peak_memory_gb = mx.get_peak_memory() / 1e9
    if not result.interrupted:
        if valid_set:
            val_loss = validate(step) if not (metrics and "val_loss" in metrics[-1] and metrics[-1]["step"] == step) \
                else metrics[-1]["val_loss"]
        checkpoint(step)
        if args.test and test_set:
            res = evaluate_dataset(model, tokenizer, test_set, args.batch_size, args.max_seq_len,
                                   loss_chunk=args.loss_chunk, _fn=eval_fn)
            result.test_loss, result.test_perplexity = res["loss"], res["perplexity"]
            record({"step": step, "test_loss": res["loss"], "test_perplexity": res["perplexity"],
                    "test_tokens": res["tokens"]})
    result.val_loss = val_loss
    log.close()
    result.metrics = metrics
    _plot(out, metrics)
    return result


def _plot(out: Path, metrics: list) -> None:
    from .plot import write_loss_curve

    train_pts = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val_pts = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    if train_pts or val_pts:
        write_loss_curve(out / "loss.png", train_pts, val_pts)


# ---- the whole job, for the CLI ---------------------------------------------------------------


def default_data_dir() -> Path:
    from .. import data as bundled

    return Path(bundled.DATA_DIR) / "zh_baike"


def load_training_data(args: TrainArgs, tokenizer) -> dict:
    """{split: Dataset or None} for args.data (default: the bundled zh_baike splits)."""
    path = Path(args.data).expanduser() if args.data else default_data_dir()
    return data_lib.load_splits(path, tokenizer, args.max_seq_len, args.drop_long, args.train_on_prompt)


def run_training(args: TrainArgs, progress: bool = True, echo=print) -> TrainResult:
    """Load the model and data named by `args`, train, and return the result (the CLI's `train`)."""
    from ..loading import load

    args = resolve_defaults(args)
    check_args(args)
    prepare_out_dir(args)  # fail before the slow model load
    model, tokenizer = load(args.model, dtype=args.dtype)
    splits = load_training_data(args, tokenizer)
    for split in data_lib.SPLITS:
        if splits[split] is not None:
            echo(splits[split].summary())
    extra = {"data_resolved": str(Path(args.data).expanduser() if args.data else default_data_dir()),
             "data_summary": {k: v.summary() for k, v in splits.items() if v is not None}}
    return train(model, tokenizer, args, splits["train"], splits["valid"], splits["test"], progress=progress,
                 extra_config=extra)
