"""Preference tuning as Objectives over the one training loop: DPO and ORPO, as TRL 1.16 defines
them (`DPOTrainer`, `ORPOTrainer`), on PairDatasets (training/data.py).

A batch holds the B chosen answers then the B rejected ones, so one forward covers both, with the
same chunked LM-head loss as SFT (the 262k-word logits never exist in full). A sequence's
log-prob is minus the sum of its answer tokens' cross-entropies.

DPO (loss per pair, averaged over the pairs; count = pairs):
    delta = (logp_c - ref_c) - (logp_r - ref_r)
    sigmoid: -log sigmoid(beta * delta)      hinge: relu(1 - beta * delta)
    ipo: ((logp_c - ref_c) / n_c - (logp_r - ref_r) / n_r - 1 / (2 beta))^2   (n: answer tokens)
The reference is the same model with its LoRA switched off (scale 0: the base weights, no second
copy), computed in each step without gradient; or, when training starts from an adapter
(`cached_reference`), that starting model's log-probs, computed once per split before training.

ORPO (per micro-batch, as TRL): NLL of the chosen rows (mean over their tokens, prompt included,
as TRL's ORPOTrainer does) - alpha * mean(log sigmoid(log odds)), where the log odds use each
answer's mean token log-prob: log(p / (1 - p)) for chosen minus rejected. The pair count weights
micro-batches, so with --grad-accum / --ranks the NLL term is each micro-batch's token mean.

Metrics, TRL's names, summed per batch (the loop divides by the pair count): rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected (ORPO also
nll_loss, log_odds_ratio, log_odds_chosen).
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..lora import lora_layers
from . import data as data_lib
from .loss import DEFAULT_CHUNK, loss_positions, reduced_loss, reduced_loss_and_grad
from .objectives import Objective

REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                  "logps/rejected")
LN2 = 0.6931471805599453


@contextmanager
def adapter_off(model):
    """The model without its LoRA updates (each layer's scale 0) inside the block."""
    layers = [layer for _, layer in lora_layers(model)]
    scales = [layer.scale for layer in layers]
    try:
        for layer in layers:
            layer.scale = 0.0
        yield model
    finally:
        for layer, scale in zip(layers, scales):
            layer.scale = scale


def _per_row(values, row, rows: int):
    """Sums of `values` (N,) by sequence: (rows,), through a one-hot (differentiable, no scatter)."""
    onehot = (row[:, None] == mx.arange(rows)[None, :]).astype(values.dtype)
    return values @ onehot


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, without cancellation (the same branch point as TRL's)."""
    return mx.where(x < -LN2, mx.log1p(-mx.exp(mx.minimum(x, -LN2))), mx.log(-mx.expm1(mx.maximum(x, -LN2))))


def sequence_logps(model, arrays: tuple, chunk: int = DEFAULT_CHUNK) -> mx.array:
    """Forward only, dropout off: the log-probs (2B,) of a pair batch's answers under `model` as
    it is now, computed as the training step computes them with vocabulary chunks of `chunk`;
    arrays: `_Pairs.answer_arrays`."""
    was_training = model.training
    model.eval()
    rows = 2 * int(arrays[-1].item())
    out = reduced_loss(model, lambda ce, w, nll, row, pairs: _per_row(-ce * w, row, rows), chunk,
                       as_training=True)(*arrays)
    mx.eval(out)
    model.train(was_training)
    return out


class _Pairs(Objective):
    """What DPO and ORPO share: pair batches, answer positions, per-sequence log-probs."""

    metric_names = REWARD_METRICS
    whole_chosen = False  # ORPO: also the chosen rows' prompt positions (its NLL term)

    def make_batch(self, dataset, units, pad_id, max_seq_len):
        batch = data_lib.make_pair_batch(dataset, units, pad_id, max_seq_len)
        if getattr(dataset, "reference", None) is not None:
            pairs = [row[0] for row in units]
            batch["reference"] = np.concatenate([dataset.reference[pairs, 0], dataset.reference[pairs, 1]])
        return batch

    def device_batch(self, model, batch):
        arrays = self.answer_arrays(batch)
        return arrays + (self.reference(model, arrays, batch),)

    def answer_arrays(self, batch) -> tuple:
        """(inputs, targets, idx, w, nll, row, pairs): the positions whose cross-entropy is needed,
        their answer weight w, ORPO's NLL weight, their row, and the pair count."""
        w, real = batch["weights"], batch["real"]
        rows, L = w.shape
        nll = np.zeros_like(real)
        nll[:rows // 2] = real[:rows // 2]  # the chosen rows
        idx, valid = loss_positions(np.maximum(w, nll) if self.whole_chosen else w)
        valid = (valid > 0).astype(np.float32)  # bucket padding: 0
        arrays = (mx.array(batch["inputs"]), mx.array(batch["targets"]), mx.array(idx),
                  mx.array(w.reshape(-1)[idx] * valid), mx.array(nll.reshape(-1)[idx] * valid),
                  mx.array(idx // L), mx.array(float(rows // 2)))
        return arrays

    def reference(self, model, arrays, batch):
        """The reference log-probs of the batch's 2B answers (ORPO has none: zeros, unused)."""
        return mx.zeros((batch["inputs"].shape[0],))

    def progress_text(self, record):
        return f"margin {record['rewards/margins']:.3f} acc {record['rewards/accuracies']:.2f} "

    def grad_fn(self, model, chunk=DEFAULT_CHUNK):
        inner = reduced_loss_and_grad(model, self.reduce, chunk)

        def fn(*arrays):
            outputs, grads = inner(*arrays)
            return (outputs[0], outputs[1], dict(zip(self.metric_names, outputs[2:]))), grads

        return fn

    def eval_fn(self, model, chunk=DEFAULT_CHUNK):
        return reduced_loss(model, self.reduce, chunk)

    def sequences(self, ce, w, row, rows: int):
        """(log-probs of the `rows` answers, their answer-token counts), each (rows,)."""
        return _per_row(-ce * w, row, rows), _per_row(w, row, rows)

    def rewards(self, c, r, logp_c, logp_r):
        """TRL's reward metrics as sums over the pairs (no gradient)."""
        c, r = mx.stop_gradient(c), mx.stop_gradient(r)
        return (c.sum(), r.sum(), (c - r).sum(), (c > r).astype(mx.float32).sum(),
                mx.stop_gradient(logp_c).sum(), mx.stop_gradient(logp_r).sum())


class DPO(_Pairs):
    """Direct preference optimisation (TRL's DPOTrainer loss), `loss_types` added as TRL adds its list."""

    name = "dpo"

    def __init__(self, beta: float = 0.1, loss_types=("sigmoid",), cached_reference: bool = False,
                 loss_chunk: int = DEFAULT_CHUNK):
        """loss_chunk: the training step's vocabulary chunk (the reference is computed alike, so a
        policy equal to its reference gets rewards of exactly 0)."""
        self.beta, self.loss_types, self.cached = float(beta), tuple(loss_types), bool(cached_reference)
        self.chunk = int(loss_chunk)

    def prepare(self, model, dataset, pad_id, max_seq_len):
        """With a cached reference: every pair's (chosen, rejected) log-probs under the model as it
        is now (the starting adapter), once, into dataset.reference (P, 2)."""
        if not self.cached:
            return
        ref = np.zeros((len(dataset), 2), np.float32)
        for start in range(0, len(dataset), 8):
            units = [[p] for p in range(start, min(start + 8, len(dataset)))]
            batch = data_lib.make_pair_batch(dataset, units, pad_id, max_seq_len)
            logps = sequence_logps(model, self.answer_arrays(batch), self.chunk)
            ref[start:start + len(units)] = np.array(logps).reshape(2, -1).T
        dataset.reference = ref

    def reference(self, model, arrays, batch):
        if "reference" in batch:
            return mx.array(batch["reference"])
        if self.cached:
            raise ValueError("DPO(cached_reference=True): call prepare(model, dataset, ...) on this split first")
        with adapter_off(model):
            return sequence_logps(model, arrays, self.chunk)

    def reduce(self, ce, w, nll, row, pairs, ref):
        seq, n = self.sequences(ce, w, row, ref.shape[0])
        B = seq.shape[0] // 2
        c, r = seq[:B] - ref[:B], seq[B:] - ref[B:]
        delta = c - r
        loss = mx.array(0.0)
        for kind in self.loss_types:
            if kind == "sigmoid":
                per_pair = -nn.log_sigmoid(self.beta * delta)
            elif kind == "hinge":
                per_pair = nn.relu(1 - self.beta * delta)
            else:  # ipo: per answer token, as TRL normalises it
                per_pair = (c / mx.maximum(n[:B], 1.0) - r / mx.maximum(n[B:], 1.0) - 1 / (2 * self.beta)) ** 2
            loss = loss + per_pair.sum()
        return (loss, pairs) + self.rewards(self.beta * c, self.beta * r, seq[:B], seq[B:])


class ORPO(_Pairs):
    """Odds-ratio preference optimisation (TRL's ORPOTrainer loss); no reference model."""

    name = "orpo"
    whole_chosen = True
    metric_names = REWARD_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")

    def __init__(self, alpha: float = 0.1):
        self.alpha = float(alpha)

    def reduce(self, ce, w, nll, row, pairs, ref):
        seq, n = self.sequences(ce, w, row, ref.shape[0])
        B = seq.shape[0] // 2
        mean = seq / mx.maximum(n, 1.0)  # mean token log-prob of each answer
        c, r = mean[:B], mean[B:]
        log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
        ratio = nn.log_sigmoid(log_odds)
        nll_loss = (ce * nll).sum() / mx.maximum(nll.sum(), 1.0)
        loss = (nll_loss - self.alpha * ratio.mean()) * pairs
        extra = (mx.stop_gradient(nll_loss) * pairs, mx.stop_gradient(ratio).sum(), mx.stop_gradient(log_odds).sum())
        return (loss, pairs) + self.rewards(self.alpha * c, self.alpha * r, c, r) + extra
