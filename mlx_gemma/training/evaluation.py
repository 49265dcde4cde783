"""Evaluation of a model on a tokenized split: the mean loss of an Objective (default SFT: token
cross-entropy and perplexity), used by `mlx-gemma evaluate`, by the trainer's validation and test
passes and by the main job's report; and the tqdm bar every evaluation phase shows."""

from __future__ import annotations

import math
import sys
from typing import Optional

import mlx.core as mx

from . import distributed as dist
from .loss import DEFAULT_CHUNK
from .objectives import SFT, Objective


def progress_bar(total: int, desc: Optional[str], unit: str, enabled: bool, stream=None, leave: bool = False,
                 **tqdm_options):
    """A tqdm bar on stderr (or `stream`), refreshed every 10 s when it is a file: the evaluation
    phases' bars and, through loop.Progress, the training bar."""
    from tqdm.auto import tqdm

    stream = stream or sys.stderr
    tty = getattr(stream, "isatty", lambda: False)()
    return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5 if tty else 10.0, leave=leave, **tqdm_options)


def eval_loss_fn(model, loss_chunk: int = DEFAULT_CHUNK):
    """batch_loss without gradients: compiled, except on the CPU where the head runs in numpy."""
    return SFT().eval_fn(model, loss_chunk)


def evaluate_dataset(model, tokenizer, dataset, batch_size: int = 4, max_seq_len: Optional[int] = None,
                     max_batches: Optional[int] = None, loss_chunk: int = DEFAULT_CHUNK, _fn=None,
                     progress: bool = False, objective: Optional[Objective] = None) -> dict:
    """Mean loss over a tokenized Dataset (loss positions as in training), in eval mode.

    objective: what the loss is (default SFT: token cross-entropy; a preference objective gives
    the mean pair loss). In a data-parallel run each rank evaluates every world_size-th batch; the
    per-batch sums are gathered and added in batch order on every rank, so the result is exactly
    one process's. Returns {"loss", "perplexity", "tokens"} (tokens: the count the loss is divided
    by: loss-carrying tokens, or pairs). progress: a tqdm bar of batches on stderr (rank 0).
    """
    objective = objective or SFT()
    was_training = model.training
    model.eval()
    max_seq_len = max_seq_len or int(dataset.lengths.max())
    fn = _fn or objective.eval_fn(model, loss_chunk)
    plan = objective.plan(dataset, batch_size, 0, 0, max_seq_len, shuffle=False)
    if max_batches:
        plan = plan[:max_batches]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    mine = {}
    mine_idx = range(dist.rank(), len(plan), dist.world_size())
    with progress_bar(len(mine_idx), "loss", "batch", progress and dist.rank() == 0) as bar:
        for i in mine_idx:
            loss, n = fn(*objective.device_batch(model, objective.make_batch(dataset, plan[i], pad, max_seq_len)))[:2]
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
