"""One optimizer step: `make_step`, and the snapshot / rollback that keeps a Ctrl-C inside a step
from leaving half an update in the weights.

Each of the `grad_accum` micro-batches gives the gradient of the *sum* of its losses (token
losses for SFT, pair losses for DPO / ORPO: see training/objectives.py); the sums are added,
summed over the ranks of a data-parallel run (training/distributed.py), divided by the global
count (loss tokens, or pairs), clipped and applied. So batch 4 == batch 2 x accumulation 2 == 2
ranks x batch 2. On a GPU the gradient and the update are `mx.compile`d with the model /
optimizer / RNG state as inputs and outputs; on the CPU (`policy().host_loss`) the LM-head loss
runs in numpy between the forward and backward halves, which cannot be traced, so only the update
is compiled.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map

from ..backend import policy
from . import distributed as dist
from .loss import DEFAULT_CHUNK


def make_step(model, optimizer, objective, *, loss_chunk: int = DEFAULT_CHUNK, max_grad_norm: float = 0.0) -> Callable:
    """The training step: `step(micro_batches) -> (sum of losses, count, {metric: sum})`, all
    summed over the ranks, after applying one optimizer update.

    micro_batches: (dropout seed, arrays from `objective.device_batch`, or None when this rank
    holds no row of that micro-batch). objective: an Objective (training/objectives.py).
    """
    grad_fn = objective.grad_fn(model, loss_chunk)
    state = [model.state, optimizer.state, mx.random.state]
    compiled = partial(mx.compile, inputs=state, outputs=state)
    if not policy().host_loss:
        grad_fn = compiled(grad_fn)

    @compiled
    def update(grads, count):
        grads = tree_map(lambda g: g / count, grads)  # sum of losses -> mean
        if max_grad_norm:
            grads, _ = optim.clip_grad_norm(grads, max_grad_norm)
        optimizer.update(model, grads)

    def step(micro_batches):
        grads, loss_sum, count = None, mx.array(0.0), mx.array(0.0)
        metrics = {name: mx.array(0.0) for name in objective.metric_names}
        for seed, arrays in micro_batches:
            mx.random.seed(seed)  # dropout: the same masks on resume
            if arrays is None:
                g = tree_map(mx.zeros_like, model.trainable_parameters())
            else:
                (l, n, m), g = grad_fn(*arrays)
                loss_sum, count = loss_sum + l, count + n
                metrics = {k: v + m[k] for k, v in metrics.items()}
            grads = g if grads is None else tree_map(mx.add, grads, g)
            if len(micro_batches) > 1:
                mx.eval(grads, loss_sum, count, metrics)  # one micro-batch's activations alive at a time
        grads, loss_sum, count = dist.all_sum_tree(grads), dist.all_sum(loss_sum), dist.all_sum(count)
        metrics = {k: dist.all_sum(v) for k, v in metrics.items()}
        update(grads, count)
        mx.eval(state, loss_sum, count, metrics)
        return loss_sum, count, metrics

    return step


def snapshot(model, optimizer):
    """The trainable weights and the optimizer state (arrays are immutable: copying the trees is enough)."""
    return model.trainable_parameters(), tree_map(lambda x: x, optimizer.state)


def rollback(model, optimizer, saved) -> None:
    """Put the weights and optimizer state of `snapshot` back (a step interrupted half-way)."""
    params, opt_state = saved
    model.update(params)
    replace_state(optimizer, opt_state)


def replace_state(optimizer, state: dict) -> None:
    """Put `state` into the optimizer's own state dict: a compiled step captured that dict object,
    so assigning a new one would leave the step reading the old."""
    optimizer.state.clear()
    optimizer.state.update(state)
