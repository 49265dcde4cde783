"""Gemma 4's mixture-of-experts block: a router and GeGLU experts stored as 3-D tensors.

Numerics follow transformers' Gemma4TextRouter / Gemma4TextExperts:
- the router RMS-normalises the residual without a learned scale, multiplies by its `scale`
  vector and by hidden_size ** -0.5, projects to one score per expert, softmaxes in float32,
  keeps the top k, renormalises them to sum to 1 and multiplies each by its expert's
  `per_expert_scale`;
- expert e computes down_e(gelu_tanh(gate_e x) * up_e x), with gate and up stacked in
  `gate_up_proj` (experts, 2 * I, E) and `down_proj` (experts, E, I), HF's layout.

The experts run as two gathered matmuls (`mx.gather_mm`, or `mx.gather_qmm` once quantized by
quant.layers): each token multiplies only its k experts' matrices, with no Python loop over
experts, so the work is k / experts of a dense pass whatever the routing.

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


class Experts(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, width: int):
        super().__init__()
        self.gate_up_proj = mx.zeros((num_experts, 2 * width, hidden_size))
        self.down_proj = mx.zeros((num_experts, hidden_size, width))

    def __call__(self, x: mx.array, weights: mx.array, idx: mx.array) -> mx.array:
        """x (N, E), weights and idx (N, k) -> sum over the k chosen experts of weight * expert(x), (N, E)."""
        h = expert_matmul(self, "gate_up_proj", x[:, None, None, :], idx)  # (N, k, 1, 2I)
        gate, up = mx.split(h, 2, axis=-1)
        h = expert_matmul(self, "down_proj", fastmath.gelu_tanh(gate) * up, idx)  # (N, k, 1, E)
        return (h.squeeze(-2) * weights[..., None].astype(h.dtype)).sum(axis=-2)


def expert_matmul(experts: nn.Module, name: str, x: mx.array, idx: mx.array) -> mx.array:
    """x (N, k or 1, 1, in) times the transposed (out, in) matrix `name` of each token's experts
    idx (N, k) -> (N, k, 1, out). A quantized block (quant.layers) stores name + "_scales" /
    "_biases" beside the packed weight and multiplies with gather_qmm."""
    w = experts[name]
    scales = experts.get(name + "_scales")
    if scales is None:
        return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=idx)
    return mx.gather_qmm(x, w, scales, experts.get(name + "_biases"), rhs_indices=idx, transpose=True,
                         group_size=experts.group_size, bits=experts.bits, mode=experts.mode)


EXPERT_MATRICES = ("gate_up_proj", "down_proj")
