"""What the training loop minimises: an Objective turns a split into batches, a batch into device
arrays, and arrays into (sum of losses, count, {metric: sum}) with or without gradients.

    SFT()                 token cross-entropy on the loss-masked tokens (count: loss tokens)
    SFT(loss=fn)          a custom fn(model, inputs, targets, idx, w, segment_ids) -> (sum, count)
    preference.DPO(...)   / preference.ORPO(...)  (training/preference.py; count: pairs)

The loop (training/loop.py) and the step (training/step.py) only call these methods, so SFT,
DPO and ORPO share one loop, one step, checkpoints, resume and data parallelism.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from ..backend import policy
from . import data as data_lib
from .loss import DEFAULT_CHUNK, batch_loss, loss_and_grad, loss_positions


class Objective:
    """The interface the loop and the step use; SFT below is the plain implementation."""

    name = "sft"
    metric_names: tuple = ()  # the {name: sum} each batch reports besides the loss (divided by count)

    def plan(self, dataset, batch_size: int, seed: int, epoch: int, max_seq_len: int, pack: bool = False,
             shuffle: bool = True) -> list:
        """The batches of one epoch: lists of units (rows of record indices; pairs for preference)."""
        return data_lib.plan_batches(dataset, batch_size, seed, epoch, max_seq_len, pack, shuffle)

    def make_batch(self, dataset, units: list, pad_id: int, max_seq_len: int) -> dict:
        """numpy arrays for one batch; "tokens" holds its real (unpadded) input tokens."""
        return data_lib.make_batch(dataset, units, pad_id, max_seq_len)

    def device_batch(self, model, batch: dict) -> tuple:
        """The arguments of grad_fn / eval_fn for one batch, as device arrays."""
        idx, w = loss_positions(batch["weights"])
        seg = batch["segment_ids"]
        return (mx.array(batch["inputs"]), mx.array(batch["targets"]), mx.array(idx), mx.array(w),
                None if seg is None else mx.array(seg))

    def grad_fn(self, model, chunk: int = DEFAULT_CHUNK) -> Callable:
        """fn(*arrays) -> ((sum of losses, count, {metric: sum}), grads of the trainable parameters)."""
        raise NotImplementedError

    def eval_fn(self, model, chunk: int = DEFAULT_CHUNK) -> Callable:
        """fn(*arrays) -> (sum of losses, count), forward only."""
        raise NotImplementedError

    def progress_text(self, record: dict) -> str:
        """The objective's metrics for the progress bar (after the loss), e.g. "margin 0.12 acc 0.75 "."""
        return ""

    def prepare(self, model, dataset, pad_id: int, max_seq_len: int) -> None:
        """Work done once before training (DPO: the cached reference log-probs). Default: none."""


class SFT(Objective):
    """Supervised fine-tuning: the chunked LM-head cross-entropy (numpy head on the CPU), or `loss`."""

    def __init__(self, loss: Optional[Callable] = None):
        self.loss = loss

    def grad_fn(self, model, chunk: int = DEFAULT_CHUNK) -> Callable:
        inner = loss_and_grad(model, chunk) if self.loss is None else partial(nn.value_and_grad(model, self.loss),
                                                                               model)

        def fn(*arrays):
            (loss_sum, count), grads = inner(*arrays)
            return (loss_sum, count, {}), grads

        return fn

    def eval_fn(self, model, chunk: int = DEFAULT_CHUNK) -> Callable:
        if self.loss is not None:
            return partial(self.loss, model)
        fn = partial(batch_loss, model, chunk=chunk, differentiable=False)
        return fn if policy().host_loss else mx.compile(fn, inputs=[model.state])
