"""Data-parallel training over `mx.distributed` ranks (processes started by `mlx.launch`).

Every rank builds the same batch plan (a function of the seed and epoch only) and, for every
micro-batch, takes its own contiguous share of the rows. A step sums each rank's gradient of the
*sum* of its token losses, and divides by the global number of loss tokens (itself summed over
the ranks): the update is the single-process step on the whole micro-batches, whatever the
ranks' token counts. (Averaging per-rank mean gradients, as a naive data-parallel loop does,
weights a short row on a rank with few tokens more than a long one.)

Without a launcher `mx.distributed.init()` gives a group of size 1: every function here returns
its input unchanged and the single-process path runs exactly as before.
"""

from __future__ import annotations

import os
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

_group = None


def group():
    """The process group (initialised on first use; size 1 without a launcher)."""
    global _group
    if _group is None:
        _group = mx.distributed.init()
    return _group


def launched() -> bool:
    """True when this process was started by a distributed launcher (mlx.launch, mpirun)."""
    return any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))


def rank() -> int:
    return group().rank() if launched() else 0


def world_size() -> int:
    return group().size() if launched() else 1


def share(rows: list, rank_: Optional[int] = None, size: Optional[int] = None) -> list:
    """This rank's contiguous share of a micro-batch's rows (sizes differ by at most one)."""
    rank_ = rank() if rank_ is None else rank_
    size = world_size() if size is None else size
    bounds = np.linspace(0, len(rows), size + 1).round().astype(int)
    return rows[bounds[rank_]:bounds[rank_ + 1]]


def all_sum(x):
    """Sum of `x` (an array) over the ranks; `x` itself on one process."""
    if world_size() == 1:
        return x
    return mx.distributed.all_sum(x, group=group())


def all_sum_tree(tree):
    """Sum a tree of arrays over the ranks with one collective: the leaves are flattened into one
    float32 vector (a ring reduction per small LoRA tensor would cost a round trip each)."""
    if world_size() == 1:
        return tree
    flat = tree_flatten(tree)
    vec = mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in flat])
    vec = mx.distributed.all_sum(vec, group=group())
    out, k = [], 0
    for name, v in flat:
        out.append((name, vec[k:k + v.size].reshape(v.shape).astype(v.dtype)))
        k += v.size
    return tree_unflatten(out)


def sum_scalars(*values: float) -> list:
    """Python floats summed over the ranks (loss sums, token counts for progress and metrics)."""
    if world_size() == 1:
        return list(values)
    total = all_sum(mx.array(np.array(values, np.float64).astype(np.float32)))
    return [float(v) for v in np.array(total)]


def describe() -> str:
    """'rank r of n (backend)' when launched, else 'single process'."""
    if not launched():
        return "single process"
    return f"rank {rank()} of {world_size()}"
