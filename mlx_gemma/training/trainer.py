"""LoRA / QLoRA fine-tuning: set-up, the training step, evaluation and the loop.

    adapter_config = setup(model, args)          # QLoRA quantization, LoRA layers, grad checkpointing
    result = train(model, tokenizer, args, train_set, valid_set, test_set,
                   adapter_config=adapter_config, optimizer=None, loss=None)

`train` takes its parts as mlx-lm's trainer does: the optimizer (default: AdamW with linear
warmup + cosine decay, `make_optimizer`) and the loss (default: the chunked LM-head loss of
training/loss.py). `run_training(args)` is the whole job for the CLI: load, set up, train.

The step (`make_step`, one function for every variant): each of the `grad_accum` micro-batches
gives the gradient of the *sum* of its token losses; the sums are added, summed over the ranks of
a data-parallel run (training/distributed.py), divided by the global number of loss tokens, clipped
and applied. So batch 4 == batch 2 x accumulation 2 == 2 ranks x batch 2. On a GPU the gradient
and the update are `mx.compile`d with the model / optimizer / RNG state as inputs and outputs; on
the CPU (`policy().host_loss`) the LM-head loss runs in numpy between the forward and backward
halves, which cannot be traced, so only the update is compiled.

Reproducibility and resume: the batch order is a function of (seed, epoch) and the dropout RNG is
reseeded from (seed, micro-batch index) before every micro-batch, so a run resumed from a
checkpoint (adapter + optimizer state + step) replays exactly the steps the uninterrupted run
would have taken. A Ctrl-C that lands inside a step (Python raises it once the step's `mx.eval`
returns) rolls the weights and optimizer state back to the step's start, so the checkpoint never
holds an update under the previous step's number. The run directory is training/run_dir.py.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
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
from mlx.utils import tree_map

from ..backend import policy
from ..errors import UserError
from . import data as data_lib
from . import distributed as dist
from .args import DEFAULT_OUT, TrainArgs, check_args, resolve_defaults, train_fields
from .args import load_config_file  # noqa: F401  (the CLI's entry point to config files)
from .loss import DEFAULT_CHUNK, batch_loss, loss_and_grad, loss_positions
from .run_dir import RunDir

# ---- set-up -----------------------------------------------------------------------------------


def setup(model, args: TrainArgs) -> dict:
    """Make `model` trainable as `args` says: quantize the base (QLoRA, when args.quantize_bits),
    wrap the targets in LoRA (MLX's RNG seeded with args.seed first, so the init is reproducible),
    and turn on per-layer gradient checkpointing (args.grad_checkpoint). Returns the adapter config."""
    from ..lora import apply_lora

    if args.quantize_bits:
        from ..quant import quantize_model

        quantize_model(model, bits=int(args.quantize_bits), group_size=int(args.quantize_group_size))
    mx.random.seed(args.seed)
    targets = args.targets if args.targets == "all-linear" else tuple(t.strip() for t in args.targets.split(","))
    config = apply_lora(model, targets=targets, rank=int(args.rank), alpha=float(args.alpha),
                        dropout=float(args.dropout), num_layers=args.num_layers, base_model=str(args.model))
    if args.grad_checkpoint:
        enable_grad_checkpoint(model)
    return config



def _checkpointed_class(cls):
    """A subclass of a decoder-layer class whose call recomputes its activations in the backward pass."""
    if getattr(cls, "_grad_checkpointed", False):
        return cls

    def __call__(self, x, *rest):  # rest: the layer's other arguments (mask, cache, pos, ...), as given
        def inner(params, x):
            self.update(params)
            return cls.__call__(self, x, *rest)

        return mx.checkpoint(inner)(self.trainable_parameters(), x)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__, "_grad_checkpointed": True})


def enable_grad_checkpoint(model) -> None:
    """Per layer instance (not class-wide, so other models in the process are untouched)."""
    for layer in model.layers:
        layer.__class__ = _checkpointed_class(type(layer))


WSD_DECAY = 0.2  # share of the steps the wsd schedule spends decaying


def make_schedule(args: TrainArgs, total_steps: int):
    """Linear warmup to args.lr (default 5% of the steps), then args.lr_schedule: a cosine decay to
    args.min_lr; wsd: args.lr held, then a linear decay to args.min_lr over the last WSD_DECAY of
    the steps (warmup-stable-decay: most steps at the peak rate); or args.lr held to the end."""
    warmup = args.warmup if args.warmup is not None else max(1, round(0.05 * total_steps))
    warmup = min(int(warmup), total_steps)
    rest = max(total_steps - warmup, 1)
    kind = args.lr_schedule or "cosine"
    if kind == "cosine":
        pieces, bounds = [optim.cosine_decay(args.lr, rest, end=args.min_lr)], []
    elif kind == "constant":
        pieces, bounds = [lambda s: mx.array(args.lr, mx.float32)], []
    else:  # wsd
        decay = min(max(1, round(WSD_DECAY * total_steps)), rest)
        pieces = [lambda s: mx.array(args.lr, mx.float32),
                  optim.linear_schedule(args.lr, args.min_lr, max(decay - 1, 1))]
        bounds = [rest - decay]
        if bounds[0] <= 0:
            pieces, bounds = pieces[1:], []
    if warmup > 0:
        ramp = optim.linear_schedule(args.lr / warmup, args.lr, warmup - 1) if warmup > 1 else \
            (lambda s: mx.array(args.lr, mx.float32))
        pieces, bounds = [ramp] + pieces, [warmup] + [warmup + b for b in bounds]
    return pieces[0] if len(pieces) == 1 else optim.join_schedules(pieces, bounds)


def make_optimizer(args: TrainArgs, total_steps: int) -> optim.Optimizer:
    """The default optimizer: AdamW with `make_schedule` and args.weight_decay."""
    return optim.AdamW(learning_rate=make_schedule(args, total_steps), weight_decay=args.weight_decay)


# ---- the step ---------------------------------------------------------------------------------


def _device_batch(batch: dict):
    idx, w = loss_positions(batch["weights"])
    seg = batch["segment_ids"]
    return (mx.array(batch["inputs"]), mx.array(batch["targets"]), mx.array(idx), mx.array(w),
            None if seg is None else mx.array(seg))


def make_step(model, optimizer, loss: Optional[Callable] = None, *, loss_chunk: int = DEFAULT_CHUNK,
              max_grad_norm: float = 0.0) -> Callable:
    """The training step: `step(micro_batches) -> (sum of token losses, loss tokens)`, both summed
    over the ranks, after applying one optimizer update.

    micro_batches: (dropout seed, arrays from `_device_batch`, or None when this rank holds no
    row of that micro-batch). loss: fn(model, inputs, targets, idx, w, segment_ids) -> (sum of
    token losses, number of loss tokens); default the chunked LM-head loss (numpy head on the CPU).
    """
    if loss is None:
        grad_fn = loss_and_grad(model, loss_chunk)
    else:
        grad_fn = partial(nn.value_and_grad(model, loss), model)
    state = [model.state, optimizer.state, mx.random.state]
    compiled = partial(mx.compile, inputs=state, outputs=state)
    if not policy().host_loss:
        grad_fn = compiled(grad_fn)

    @compiled
    def update(grads, ntok):
        grads = tree_map(lambda g: g / ntok, grads)  # sum of token losses -> mean
        if max_grad_norm:
            grads, _ = optim.clip_grad_norm(grads, max_grad_norm)
        optimizer.update(model, grads)

    def step(micro_batches):
        grads, loss_sum, ntok = None, mx.array(0.0), mx.array(0.0)
        for seed, arrays in micro_batches:
            mx.random.seed(seed)  # dropout: the same masks on resume
            if arrays is None:
                g = tree_map(mx.zeros_like, model.trainable_parameters())
            else:
                (l, n), g = grad_fn(*arrays)
                loss_sum, ntok = loss_sum + l, ntok + n
            grads = g if grads is None else tree_map(mx.add, grads, g)
            if len(micro_batches) > 1:
                mx.eval(grads, loss_sum, ntok)  # one micro-batch's activations alive at a time
        grads, loss_sum, ntok = dist.all_sum_tree(grads), dist.all_sum(loss_sum), dist.all_sum(ntok)
        update(grads, ntok)
        mx.eval(state, loss_sum, ntok)
        return loss_sum, ntok

    return step


def _snapshot(model, optimizer):
    """The trainable weights and the optimizer state (arrays are immutable: copying the trees is enough)."""
    return model.trainable_parameters(), tree_map(lambda x: x, optimizer.state)


def _restore(model, optimizer, snapshot) -> None:
    params, opt_state = snapshot
    model.update(params)
    _replace_state(optimizer, opt_state)


def _replace_state(optimizer, state: dict) -> None:
    """Put `state` into the optimizer's own state dict: a compiled step captured that dict object,
    so assigning a new one would leave the step reading the old."""
    optimizer.state.clear()
    optimizer.state.update(state)


# ---- evaluation -------------------------------------------------------------------------------


def eval_loss_fn(model, loss_chunk: int = DEFAULT_CHUNK):
    """batch_loss without gradients: compiled, except on the CPU where the head runs in numpy."""
    fn = partial(batch_loss, model, chunk=loss_chunk, differentiable=False)
    return fn if policy().host_loss else mx.compile(fn, inputs=[model.state])


def evaluate_dataset(model, tokenizer, dataset, batch_size: int = 4, max_seq_len: Optional[int] = None,
                     max_batches: Optional[int] = None, loss_chunk: int = DEFAULT_CHUNK, _fn=None,
                     progress: bool = False) -> dict:
    """Mean token loss over a tokenized Dataset (loss positions as in training), in eval mode.

    In a data-parallel run each rank evaluates every world_size-th batch; the per-batch sums are
    gathered and added in batch order on every rank, so the result is exactly one process's.
    Returns {"loss", "perplexity", "tokens"} (tokens: loss-carrying tokens counted).
    progress: a tqdm bar of batches on stderr (rank 0).
    """
    was_training = model.training
    model.eval()
    max_seq_len = max_seq_len or int(dataset.lengths.max())
    fn = _fn or eval_loss_fn(model, loss_chunk)
    plan = data_lib.plan_batches(dataset, batch_size, 0, 0, max_seq_len, shuffle=False)
    if max_batches:
        plan = plan[:max_batches]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    mine = {}
    mine_idx = range(dist.rank(), len(plan), dist.world_size())
    with progress_bar(len(mine_idx), "loss", "batch", progress and dist.rank() == 0) as bar:
        for i in mine_idx:
            loss, n = fn(*_device_batch(data_lib.make_batch(dataset, plan[i], pad, max_seq_len)))
            mx.eval(loss, n)
            mine[i] = (loss.item(), n.item())
            bar.update(1)
    total, count = 0.0, 0.0
    for loss, n in dist.sum_rows(mine, len(plan), 2).tolist():  # float32 values, added in float64
        total += loss
        count += n
    model.train(was_training)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count)}


# ---- results and progress ---------------------------------------------------------------------


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
    checkpoint: Optional[str] = None  # the latest checkpoint dir, None when none was saved
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
                 + (f" (perplexity {self.test_perplexity:.2f})" if self.test_perplexity else "")]
        if self.interrupted and self.checkpoint is None:
            lines.append("no step finished, nothing was saved; run the command again to start")
        elif self.interrupted:
            lines.append(f"checkpoint: {self.checkpoint}")
            lines.append(f"continue with: mlx-gemma train --out {self.out} --resume")
        else:
            lines.append(f"adapter: {self.out}")
        return "\n".join(lines)


def progress_bar(total: int, desc: Optional[str], unit: str, enabled: bool, stream=None, leave: bool = False,
                 **tqdm_options):
    """A tqdm bar on stderr (or `stream`), refreshed every 10 s when it is a file: the evaluation
    phases' bars and, through Progress, the training bar."""
    from tqdm.auto import tqdm

    stream = stream or sys.stderr
    tty = getattr(stream, "isatty", lambda: False)()
    return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5 if tty else 10.0, leave=leave, **tqdm_options)


class Progress:
    """A tqdm bar on stderr (steps, loss, learning rate, tok/s, peak memory, rate and ETA) and
    messages printed above it. Off on ranks other than 0."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.bar = progress_bar(total, None, "step", enabled, stream, leave=True, initial=start, smoothing=0.1)

    def update(self, step: int, loss: float, lr: float, tok_s: float, peak_gb: float) -> None:
        with self._quiet_if_gone():
            self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tok_s:.0f} tok/s peak {peak_gb:.2f} GB",
                                     refresh=False)
            self.bar.update(step - self.bar.n)

    def message(self, text: str) -> None:
        if self.enabled:
            with self._quiet_if_gone():
                self.bar.write(text, file=self.bar.fp)

    def close(self) -> None:
        with self._quiet_if_gone():
            self.bar.close()

    @contextmanager
    def _quiet_if_gone(self):
        """A closed stderr (the launcher that piped it ended on Ctrl-C) must not cost the checkpoint."""
        try:
            yield
        except OSError:
            self.enabled = False
            self.bar.disable = True


# ---- the loop ---------------------------------------------------------------------------------


def _total_steps(args: TrainArgs, batches: int) -> int:
    if args.iters:
        return int(args.iters)
    return max(1, math.ceil((args.epochs or 1) * batches / args.grad_accum))


def data_fingerprint(dataset) -> str:
    """sha256 of a tokenized split (ids and loss masks): what --resume compares."""
    h = hashlib.sha256()
    for ids, mask in dataset.examples:
        h.update(np.int64(len(ids)).tobytes())
        h.update(np.ascontiguousarray(ids, np.int32).tobytes())
        h.update(np.ascontiguousarray(mask, np.int32).tobytes())
    return h.hexdigest()


def _rank_batches(dataset, args: TrainArgs, pad: int, start: int):
    """(epoch, this rank's share of the micro-batch or None) from global micro-batch `start` on.

    Every rank plans the same batches (a function of the seed and epoch), so the rows split the
    same way whatever the number of ranks, and a resumed run continues exactly."""
    per_epoch = data_lib.batches_per_epoch(dataset, args.batch_size, args.max_seq_len, args.pack)
    epoch, pos = divmod(start, per_epoch)
    while True:
        plan = data_lib.plan_batches(dataset, args.batch_size, args.seed, epoch, args.max_seq_len, args.pack)
        for k in range(pos, len(plan)):
            rows = dist.share(plan[k])
            yield epoch, (data_lib.make_batch(dataset, rows, pad, args.max_seq_len) if rows else None)
        epoch, pos = epoch + 1, 0


def _dropout_seed(args: TrainArgs, micro: int) -> int:
    # rank 0 (and a single process) keeps the seed it always had; other ranks draw other masks
    return (args.seed * 1_000_003 + micro + 104_729 * dist.rank()) % (2 ** 32)


class _Run:
    """One training run's moving parts: the run dir, optimizer, step function, progress and result.
    `train` below is the loop that drives it."""

    def __init__(self, model, tokenizer, args: TrainArgs, run: RunDir, adapter_config: dict, train_set, valid_set,
                 optimizer, loss, progress: bool):
        from ..lora import count_parameters

        self.model, self.tokenizer, self.args, self.dir = model, tokenizer, args, run
        self.adapter_config, self.train_set, self.valid_set = adapter_config, train_set, valid_set
        self.per_epoch = data_lib.batches_per_epoch(train_set, args.batch_size, args.max_seq_len, args.pack)
        self.total = _total_steps(args, self.per_epoch)
        self.optimizer = optimizer if optimizer is not None else make_optimizer(args, self.total)
        self.optimizer.init(model.trainable_parameters())
        self.step_fn = make_step(model, self.optimizer, loss, loss_chunk=args.loss_chunk,
                                 max_grad_norm=args.max_grad_norm)
        self.eval_fn = partial(loss, model) if loss is not None else eval_loss_fn(model, args.loss_chunk)
        self.params = count_parameters(model)
        self.progress = progress and run.writer
        self.done = self.start = 0  # done: the last step whose update is in the weights
        self.validated, self.val_loss = None, None

    def begin(self, resume_from: Optional[Path], extra_config: Optional[dict]) -> None:
        """Restore the checkpoint (refusing other data), write the run's config, start the clock."""
        args, fingerprint = self.args, data_fingerprint(self.train_set)
        if resume_from:
            previous = self.dir.read_config() or {}
            if previous.get("data_sha256", fingerprint) != fingerprint:
                raise UserError(f"--resume: the training data differs from the run in {self.dir.path} (its train "
                                "split hashed differently); pass the same --data and tokenization options, or "
                                "--force to start over")
            state = self.dir.load_checkpoint(resume_from, self.model, self.optimizer)
            self.start = self.done = int(state["step"])
            # a validation at the checkpoint's step is not repeated (read from the checkpoint, which
            # every rank reads alike: the decision to validate must be the same on all of them)
            if state.get("validated_at") == self.start:
                self.validated, self.val_loss = self.start, state.get("val_loss")
        config = dict(args.to_dict(), **(extra_config or {}), total_steps=self.total,
                      batches_per_epoch=self.per_epoch, train_records=len(self.train_set),
                      valid_records=len(self.valid_set) if self.valid_set else 0, data_sha256=fingerprint,
                      world_size=dist.world_size())
        self.dir.start(config, self.start if resume_from else None)
        self.bar = Progress(self.total, self.start, self.progress)
        self.result = TrainResult(out=str(self.dir.path), steps=self.start, total_steps=self.total,
                                  trainable=self.params["trainable"],
                                  checkpoint=str(resume_from) if resume_from else None)
        p = self.params
        self.bar.message(f"training {p['trainable']:,} of {p['total']:,} parameters ({p['percent']:.3f}%), "
                         f"{self.total} steps x {args.batch_size * args.grad_accum} rows, {self.per_epoch} batches "
                         "per epoch" + (f", {dist.world_size()} ranks" if dist.world_size() > 1 else "")
                         + (f", resuming at step {self.start}" if self.start else ""))
        mx.reset_peak_memory()
        self.t0 = time.perf_counter()

    def step(self, step: int, micro: list, ctrl_c) -> tuple[dict, bool]:
        """Run optimizer step `step` on micro = [(global micro-batch index, (epoch, batch or None))];
        record its metrics. Returns (record, whether some rank asked to stop)."""
        args, t_step = self.args, time.perf_counter()
        snapshot = _snapshot(self.model, self.optimizer)
        try:
            loss_sum, ntok = self.step_fn([(_dropout_seed(args, k), None if b is None else _device_batch(b))
                                           for k, (_, b) in micro])
            self.done = step
        except (KeyboardInterrupt, RuntimeError):
            if self.done != step:  # the update may be half-applied: back to the step's start
                _restore(self.model, self.optimizer, snapshot)
            raise
        value = (loss_sum / ntok).item()
        if not math.isfinite(value):
            last = self.dir.latest_checkpoint()
            where = f"the last good checkpoint, {last}, is kept" if last else "no checkpoint was saved yet"
            raise NonFiniteLoss(f"the training loss became {value} at step {step}; training stopped and "
                                f"{where}. Lower --lr (now {args.lr:g}) or check the data")
        tokens, stop = dist.sum_scalars(sum(b["tokens"] for _, (_, b) in micro if b is not None), ctrl_c())
        res, now = self.result, time.perf_counter()
        res.tokens += int(tokens)
        res.train_loss, res.steps = value, step
        lr, peak = self.optimizer.learning_rate.item(), mx.get_peak_memory() / 1e9
        rec = {"step": step, "epoch": micro[-1][1][0], "loss": value, "lr": lr, "loss_tokens": int(ntok.item()),
               "tokens": int(tokens), "tok_s": tokens / (now - t_step), "peak_memory_gb": peak, "time": now - self.t0}
        self.dir.record(rec)
        self.bar.update(step, value, lr, res.tokens / (now - self.t0), peak)
        return rec, bool(stop)

    def validate(self, step: int) -> None:
        if not self.valid_set:
            return
        args = self.args
        res = evaluate_dataset(self.model, self.tokenizer, self.valid_set, args.batch_size, args.max_seq_len,
                               args.eval_batches, args.loss_chunk, _fn=self.eval_fn)
        self.dir.record({"step": step, "val_loss": res["loss"], "val_perplexity": res["perplexity"],
                         "val_tokens": res["tokens"]})
        self.bar.message(f"step {step}: validation loss {res['loss']:.4f} (perplexity {res['perplexity']:.2f})")
        self.validated, self.val_loss = step, res["loss"]

    def checkpoint(self, step: int) -> None:
        state = {"step": step, "total_steps": self.total}
        if self.validated == step:
            state.update(validated_at=step, val_loss=self.val_loss)
        saved = self.dir.save_checkpoint(self.model, self.adapter_config, self.optimizer, state)
        self.result.checkpoint = str(saved)

    def interrupted(self, created_dir: bool) -> None:
        """Ctrl-C: checkpoint the last finished step (if one finished in this run)."""
        self.result.interrupted = True
        if self.done > self.start:
            self.checkpoint(self.done)
        if self.result.checkpoint:
            self.bar.message(f"interrupted after step {self.done}; checkpoint {self.result.checkpoint}")
        else:
            self.bar.message("interrupted before the first step finished; nothing was saved")
            self.dir.abandon(created_dir)

    def stop_clock(self) -> None:
        self.bar.close()
        self.result.seconds = time.perf_counter() - self.t0
        self.result.peak_memory_gb = mx.get_peak_memory() / 1e9

    def finish(self, test_set) -> TrainResult:
        """The final validation, checkpoint and test evaluation (unless interrupted), the figure."""
        args, res = self.args, self.result
        if not res.interrupted:
            if self.valid_set and self.validated != self.done:  # decided alike on every rank (collective)
                self.validate(self.done)
            self.checkpoint(self.done)
            if args.test and test_set:
                ev = evaluate_dataset(self.model, self.tokenizer, test_set, args.batch_size, args.max_seq_len,
                                      loss_chunk=args.loss_chunk, _fn=self.eval_fn)
                res.test_loss, res.test_perplexity = ev["loss"], ev["perplexity"]
                self.dir.record({"step": self.done, "test_loss": ev["loss"], "test_perplexity": ev["perplexity"],
                                 "test_tokens": ev["tokens"]})
        res.val_loss = self.val_loss
        self.dir.close()
        res.metrics = self.dir.metrics
        if self.dir.writer and (res.checkpoint or not res.interrupted):
            from .plot import write_metrics_figure

            write_metrics_figure(self.dir.path / "loss.png", self.dir.metrics, args.plot_log_scale)
        return res


def train(model, tokenizer, args: TrainArgs, train_set, valid_set=None, test_set=None, *,
          adapter_config: Optional[dict] = None, optimizer: Optional[optim.Optimizer] = None,
          loss: Optional[Callable] = None, on_step: Optional[Callable] = None, progress: bool = True,
          extra_config: Optional[dict] = None) -> TrainResult:
    """Fine-tune a LoRA model (made by `setup`, whose adapter config is `adapter_config`) on
    tokenized datasets (training/data.py `Dataset`s), writing the run dir `args.out`.

    optimizer: default `make_optimizer(args, total_steps)`. loss: fn(model, inputs, targets, idx,
    w, segment_ids) -> (sum of token losses, loss tokens); default the chunked LM-head loss.
    `on_step(step, record)` is called after every optimizer step (a KeyboardInterrupt raised
    there acts like Ctrl-C: checkpoint and return with `interrupted=True`). Raises NonFiniteLoss
    (a UserError) when the loss becomes NaN/inf; the last checkpoint is kept as it was.
    """
    from ..lora import lora_layers

    args = resolve_defaults(args)
    check_args(args)
    if adapter_config is None or not lora_layers(model):
        raise UserError("train() needs a LoRA model and its adapter config: adapter_config = setup(model, args)")
    run_dir = RunDir(args.out, writer=dist.rank() == 0)
    created_dir = not run_dir.path.exists()
    resume_from = run_dir.check(args.resume, args.force, args.to_dict())
    model.train()
    run = _Run(model, tokenizer, args, run_dir, adapter_config, train_set, valid_set, optimizer, loss, progress)
    run.begin(resume_from, extra_config)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    batches = _rank_batches(train_set, args, pad, run.start * args.grad_accum)
    ctrl_c = dist.deferred_interrupt()
    try:
        if run.start == 0 and args.eval_every:
            run.validate(0)
        for step in range(run.start + 1, run.total + 1):
            micro = [(k, next(batches)) for k in range((step - 1) * args.grad_accum, step * args.grad_accum)]
            rec, stop = run.step(step, micro, ctrl_c)
            if args.eval_every and step % args.eval_every == 0 and step < run.total:
                run.validate(step)
            if args.save_every and step % args.save_every == 0 and step < run.total:
                run.checkpoint(step)
            if on_step is not None:
                on_step(step, rec)
            if stop:  # a rank got Ctrl-C: every rank stops after the same step
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        run.interrupted(created_dir)
    except RuntimeError as exc:
        if not dist.peer_lost(exc):
            run_dir.close()
            raise
        run.interrupted(created_dir)  # the weights are the last finished step's: save them
        kept = f"checkpoint {run.result.checkpoint} is kept" if run.result.checkpoint else "no checkpoint was saved"
        raise UserError(f"another rank stopped ({exc}); {kept}") from None
    except BaseException:
        run_dir.close()
        raise
    finally:
        ctrl_c.release()
        run.stop_clock()
    return run.finish(test_set)


# ---- the whole job, for the CLI ---------------------------------------------------------------


def default_data_dir() -> Path:
    from .. import data as bundled

    return Path(bundled.DATA_DIR) / "zh_baike"


def load_training_data(args: TrainArgs, tokenizer) -> dict:
    """{split: Dataset or None} for args.data (default: the bundled zh_baike splits)."""
    path = Path(args.data).expanduser() if args.data else default_data_dir()
    return data_lib.load_splits(path, tokenizer, args.max_seq_len, args.drop_long, args.train_on_prompt)


def prepare_out_dir(args: TrainArgs) -> Optional[Path]:
    """Check --out before slow work; the checkpoint to resume from, or None (see RunDir.check)."""
    return RunDir(args.out, writer=dist.rank() == 0).check(args.resume, args.force, args.to_dict())


def restore_options(values: dict, given: set) -> dict:
    """--resume: the options of the run in values["out"] (its train_config.json) for every field
    not in `given` (what the user typed or a config file set); `values` otherwise unchanged."""
    previous = RunDir(values.get("out") or DEFAULT_OUT).read_config()
    if previous is None:
        return values
    merged = dict(values)
    for f in train_fields():
        if f.name in previous and f.name not in given and f.name not in TrainArgs.PER_RUN_KEYS:
            merged[f.name] = previous[f.name]
    return merged


def train_argv(args: TrainArgs) -> list:
    """`args` as `mlx-gemma train` options (what each rank of `--ranks N` is started with)."""
    argv = []
    for f in train_fields():
        value, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else ([f"--no-{flag[2:]}"] if f.default else [])
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def run_training(args: TrainArgs, progress: bool = True, echo=print) -> TrainResult:
    """Load the model and data named by `args`, set up LoRA, train, and return the result (the CLI's `train`)."""
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
    adapter_config = setup(model, args)
    return train(model, tokenizer, args, splits["train"], splits["valid"], splits["test"], progress=progress,
                 adapter_config=adapter_config, extra_config=extra)
