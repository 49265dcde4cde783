"""Gemma 4's mixture-of-experts block: a router and GeGLU experts stored as 3-D tensors.

Numerics follow transformers' Gemma4TextRouter / Gemma4TextExperts:
- the router RMS-normalises the residual without a learned scale, multiplies by its `scale`
  vector and by hidden_size ** -0.5, projects to one score per expert, softmaxes in float32,
  keeps the top k, renormalises them to sum to 1 and multiplies each by its expert's
  `per_expert_scale`;
- expert e computes down_e(gelu_tanh(gate_e x) * up_e x), with gate and up stacked in
  `gate_up_proj` (experts, 2 * I, E) and `down_proj` (experts, E, I), HF's layout.

The experts run as gathered matmuls (`mx.gather_mm`, or `mx.gather_qmm` once quantized by
quant.layers): each token multiplies only its k experts' matrices, with no Python loop over
experts, so the work is k / experts of a dense pass whatever the routing. Three choices keep those
products fast (on the benchmark's MoE shape they brought our block's forward and backward to
mlx-lm's SwitchGLU speed; README's Gemma 4 section has the measurements):
- the (token, expert) pairs are sorted by expert once there are SORT_MIN_PAIRS of them. MLX's
  CPU gather_mm is one matrix-vector product per pair, so consecutive pairs of one expert reuse
  its matrix from cache instead of re-reading it from memory; GPU kernels group by expert
  (`sorted_indices`); and the gradient of a sorted, unbroadcast product needs no scatter-add.
  A decode step's few pairs stay unsorted (the same 64-pair line as mlx-lm's SwitchGLU);
- gate and up are two products over row views of `gate_up_proj` (no copy), each half the size
  of the stacked matrix (here 2 MiB instead of 4 MiB, so it stays in L2);
- the token rows are reshaped, never indexed with None (see Experts.__call__).
Every output element is the same dot product either way: sorting changes speed, not numerics.

Shapes: N tokens, E hidden size, X experts, k experts per token, I expert width.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cpu import fastmath


class Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, eps: float):
        super().__init__()
        self.proj = nn.Linear(hidden_size, num_experts, bias=False)
        self.scale = mx.ones((hidden_size,))
        self.per_expert_scale = mx.ones((num_experts,))
        self.top_k, self.eps = top_k, eps
        self.root = hidden_size ** -0.5

    def __call__(self, x: mx.array):
        """x (N, E) -> (weights (N, k), expert indices (N, k))."""
        h = mx.fast.rms_norm(x, None, self.eps) * self.scale * self.root
        probs = mx.softmax(self.proj(h).astype(mx.float32), axis=-1)
        k = self.top_k
        # indices carry no gradient (the weights do, through take_along_axis)
        idx = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
        weights = mx.take_along_axis(probs, idx, axis=-1)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        return weights * self.per_expert_scale[idx], idx


# (token, expert) pairs from which the experts' products run sorted by expert: fewer pairs (a
# decode step's k per row) are cheaper to multiply in routing order than to sort and unsort
SORT_MIN_PAIRS = 64


class Experts(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, width: int):
        super().__init__()
        self.gate_up_proj = mx.zeros((num_experts, 2 * width, hidden_size))
        self.down_proj = mx.zeros((num_experts, hidden_size, width))

    def __call__(self, x: mx.array, weights: mx.array, idx: mx.array, sort: bool | None = None) -> mx.array:
        """x (N, E), weights and idx (N, k) -> sum over the k chosen experts of weight * expert(x), (N, E).
        sort: multiply the pairs in expert order (None: when there are SORT_MIN_PAIRS or more)."""
        n, k = idx.shape
        if sort is None:
            sort = idx.size >= SORT_MIN_PAIRS
        # rows by reshape, not x[:, None]: a None axis gets a stride that MLX's CPU gather_mm reads as a
        # transposed operand, a BLAS path 2-4x slower here (0.2 vs 0.8 ms for one token)
        if sort:
            order = mx.argsort(idx.flatten())
            rows, idx = x.reshape(n, 1, -1)[order // k], idx.flatten()[order]  # (N k, 1, E), (N k,): by expert
        else:
            rows = x.reshape(n, 1, 1, -1)  # (N, 1, 1, E), broadcast over each token's k experts
        width = self.gate_up_proj.shape[1] // 2
        gate = expert_matmul(self, "gate_up_proj", rows, idx, sort, slice(0, width))  # (..., 1, I)
        up = expert_matmul(self, "gate_up_proj", rows, idx, sort, slice(width, 2 * width))
        h = expert_matmul(self, "down_proj", fastmath.gelu_tanh(gate) * up, idx, sort).squeeze(-2)
        if sort:
            h = h[inverse_permutation(order)].reshape(n, k, -1)  # back to (N, k, E), routing order
        return (h * weights[..., None].astype(h.dtype)).sum(axis=-2)


def inverse_permutation(order: mx.array) -> mx.array:
    """inv with inv[order[i]] = i: one scatter, where a second argsort would sort again."""
    inv = mx.zeros(order.shape, dtype=order.dtype)
    inv[order] = mx.arange(order.size, dtype=order.dtype)
    return inv


def expert_matmul(experts: nn.Module, name: str, x: mx.array, idx: mx.array, sort: bool = False,
                  rows: slice = slice(None)) -> mx.array:
    """x (..., 1, in) times the transposed (out, in) matrix `name` of expert idx[...] (its `rows`
    of out only) -> (..., 1, out); sort: idx is sorted. A quantized block (quant.layers) stores
    name + "_scales" / "_biases" beside the packed weight and multiplies with gather_qmm."""
    w = experts[name][:, rows]
    scales = experts.get(name + "_scales")
    if scales is None:
        return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sort)
    biases = experts.get(name + "_biases")
    return mx.gather_qmm(x, w, scales[:, rows], None if biases is None else biases[:, rows], rhs_indices=idx,
                         transpose=True, group_size=experts.group_size, bits=experts.bits, mode=experts.mode,
                         sorted_indices=sort)


EXPERT_MATRICES = ("gate_up_proj", "down_proj")
