"""The training loop: `train` runs an Objective's batches through the step, validates, checkpoints,
resumes, and stops cleanly on Ctrl-C or a lost rank.

    result = train(model, tokenizer, args, train_set, valid_set, test_set,
                   adapter_config=adapter_config, optimizer=None, loss=None)

`train` takes its parts as mlx-lm's trainer does: the optimizer (default: AdamW with linear
warmup + cosine decay, setup.make_optimizer) and the loss: an Objective (training/objectives.py:
SFT, or preference.DPO / preference.ORPO) or a plain SFT loss function; default SFT.

Reproducibility and resume: the batch order is a function of (seed, epoch) and the dropout RNG is
reseeded from (seed, micro-batch index) before every micro-batch, so a run resumed from a
checkpoint (adapter + optimizer state + step) replays exactly the steps the uninterrupted run
would have taken. A Ctrl-C that lands inside a step (Python raises it once the step's `mx.eval`
returns) rolls the weights and optimizer state back to the step's start (step.rollback), so the
checkpoint never holds an update under the previous step's number. The run directory is
training/run_dir.py.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from ..errors import UserError
from ..lora import count_parameters, lora_layers
from . import distributed as dist
from .args import TrainArgs, check_args, resolve_defaults
from .evaluation import evaluate_dataset, progress_bar
from .objectives import SFT, Objective
from .run_dir import RunDir
from .setup import make_optimizer
from .step import make_step, rollback, snapshot


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


class Progress:
    """A tqdm bar on stderr (steps, loss, learning rate, tok/s, peak memory, rate and ETA) and
    messages printed above it. Off on ranks other than 0."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.bar = progress_bar(total, None, "step", enabled, stream, leave=True, initial=start, smoothing=0.1)

    def update(self, step: int, loss: float, lr: float, tok_s: float, peak_gb: float, extra: str = "") -> None:
        """extra: the objective's own metrics (DPO: rewards/margins and rewards/accuracies)."""
        with self._quiet_if_gone():
            self.bar.set_postfix_str(f"loss {loss:.4f} {extra}lr {lr:.2e} {tok_s:.0f} tok/s peak {peak_gb:.2f} GB",
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


def batches_per_epoch(objective: Objective, dataset, args: TrainArgs) -> int:
    return len(objective.plan(dataset, args.batch_size, 0, 0, args.max_seq_len, args.pack, shuffle=False))


def _rank_batches(objective: Objective, dataset, args: TrainArgs, pad: int, start: int):
    """(epoch, this rank's share of the micro-batch or None) from global micro-batch `start` on.

    Every rank plans the same batches (a function of the seed and epoch), so the rows split the
    same way whatever the number of ranks, and a resumed run continues exactly."""
    epoch, pos = divmod(start, batches_per_epoch(objective, dataset, args))
    while True:
        plan = objective.plan(dataset, args.batch_size, args.seed, epoch, args.max_seq_len, args.pack)
        for k in range(pos, len(plan)):
            units = dist.share(plan[k])
            yield epoch, (objective.make_batch(dataset, units, pad, args.max_seq_len) if units else None)
        epoch, pos = epoch + 1, 0


def _dropout_seed(args: TrainArgs, micro: int) -> int:
    # rank 0 (and a single process) keeps the seed it always had; other ranks draw other masks
    return (args.seed * 1_000_003 + micro + 104_729 * dist.rank()) % (2 ** 32)


class _Run:
    """One training run's moving parts: the run dir, optimizer, step function, progress and result.
    `train` below is the loop that drives it."""

    def __init__(self, model, tokenizer, args: TrainArgs, run: RunDir, adapter_config: dict, train_set, valid_set,
                 optimizer, objective: Objective, progress: bool):
        self.model, self.tokenizer, self.args, self.dir = model, tokenizer, args, run
        self.adapter_config, self.train_set, self.valid_set = adapter_config, train_set, valid_set
        self.objective = objective
        self.per_epoch = batches_per_epoch(objective, train_set, args)
        self.total = _total_steps(args, self.per_epoch)
        self.optimizer = optimizer if optimizer is not None else make_optimizer(args, self.total)
        self.optimizer.init(model.trainable_parameters())
        self.step_fn = make_step(model, self.optimizer, objective, loss_chunk=args.loss_chunk,
                                 max_grad_norm=args.max_grad_norm)
        self.eval_fn = objective.eval_fn(model, args.loss_chunk)
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
        saved = snapshot(self.model, self.optimizer)
        try:
            loss_sum, ntok, sums = self.step_fn([
                (_dropout_seed(args, k), None if b is None else self.objective.device_batch(self.model, b))
                for k, (_, b) in micro])
            self.done = step
        except (KeyboardInterrupt, RuntimeError):
            if self.done != step:  # the update may be half-applied: back to the step's start
                rollback(self.model, self.optimizer, saved)
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
        rec.update({k: v.item() / max(ntok.item(), 1.0) for k, v in sums.items()})  # sums -> means (TRL's names)
        self.dir.record(rec)
        self.bar.update(step, value, lr, res.tokens / (now - self.t0), peak, self.objective.progress_text(rec))
        return rec, bool(stop)

    def validate(self, step: int) -> None:
        if not self.valid_set:
            return
        args = self.args
        res = evaluate_dataset(self.model, self.tokenizer, self.valid_set, args.batch_size, args.max_seq_len,
                               args.eval_batches, args.loss_chunk, _fn=self.eval_fn, objective=self.objective)
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
                                      loss_chunk=args.loss_chunk, _fn=self.eval_fn, objective=self.objective)
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
          loss=None, on_step: Optional[Callable] = None, progress: bool = True,
          extra_config: Optional[dict] = None) -> TrainResult:
    """Fine-tune a LoRA model (made by `setup`, whose adapter config is `adapter_config`) on
    tokenized datasets (training/data.py `Dataset`s, or `PairDataset`s for a preference loss),
    writing the run dir `args.out`.

    optimizer: default `make_optimizer(args, total_steps)`. loss: an Objective (SFT, DPO, ORPO),
    or fn(model, inputs, targets, idx, w, segment_ids) -> (sum of token losses, loss tokens) as an
    SFT loss; default SFT with the chunked LM-head loss. `on_step(step, record)` is called after
    every optimizer step (a KeyboardInterrupt raised there acts like Ctrl-C: checkpoint and return
    with `interrupted=True`). Raises NonFiniteLoss (a UserError) when the loss becomes NaN/inf;
    the last checkpoint is kept as it was.
    """
    args = resolve_defaults(args)
    check_args(args)
    if adapter_config is None or not lora_layers(model):
        raise UserError("train() needs a LoRA model and its adapter config: adapter_config = setup(model, args)")
    objective = loss if isinstance(loss, Objective) else SFT(loss)
    run_dir = RunDir(args.out, writer=dist.rank() == 0)
    created_dir = not run_dir.path.exists()
    resume_from = run_dir.check(args.resume, args.force, args.to_dict())
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    for split in (train_set, valid_set, test_set):  # before a checkpoint is restored: the reference is the start
        if split is not None:
            objective.prepare(model, split, pad, args.max_seq_len)
    model.train()
    run = _Run(model, tokenizer, args, run_dir, adapter_config, train_set, valid_set, optimizer, objective, progress)
    run.begin(resume_from, extra_config)
    batches = _rank_batches(objective, train_set, args, pad, run.start * args.grad_accum)
    ctrl_c = dist.deferred_interrupt()
    try:
        _run_steps(run, batches, ctrl_c, on_step)
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


def _run_steps(run: _Run, batches, ctrl_c, on_step: Optional[Callable]) -> None:
    """The optimizer steps from the run's start to its end, with validations and checkpoints."""
    args = run.args
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
