"""Memory-efficient LM loss: the LM head only where labels are, cross-entropy in vocabulary chunks.

A Gemma 3 vocabulary has 262,144 entries: B x L x V float32 logits for a batch of 4 x 512 are
2 GiB, and on the CPU the exp/log over them dominates a step. Instead:

1. `model.model(...)` gives the final hidden states (B, L, E);
2. only the N positions whose target carries loss are gathered: (N, E);
3. the LM head (tied embedding or lm_head, final soft-cap included) is applied one vocabulary
   chunk at a time with a streaming logsumexp, so at most N x chunk logits exist at once;
4. a custom VJP recomputes each chunk's logits in the backward pass instead of keeping them
   (d hidden = sum over chunks of (softmax - onehot) * softcap' @ W_chunk).

That is the MLX path, compiled into the training step on a GPU. On the CPU the same loss and
its gradient run in numpy (see "the CPU path" below and `loss_and_grad`).

The gathered position count N is padded up to a bucket (zero-weight rows), so a compiled step
sees few distinct shapes; on the CPU path, where nothing traced depends on N, it is not padded.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..backend import policy
from ..cpu import fastmath
from ..cpu.hostloss import host_cross_entropy
from ..quant.layers import dequantize_weight

DEFAULT_CHUNK = 8192  # smaller chunks stay in cache: 8192 runs the 270M loss ~1.7x faster than 32768 on the CPU


def head_weights(model):
    """The LM head as three functions and the vocabulary size V:

    project(h, a, b): (N, E) -> (N, b - a) raw logits of vocabulary rows [a, b);
    rows(ids): (N,) -> (N, E) the head rows of those ids; block(a, b): (b - a, E) rows [a, b).
    Works for a tied float embedding, an untied lm_head, and their quantized forms.
    """
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens
    if isinstance(head, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
        def block(a, b):
            return dequantize_weight(head, slice(a, b))

        def project(h, a, b):
            # dequantize a (chunk, E) slice and use the dense matmul: on the CPU
            # quantized_matmul is ~20x slower for many rows, on a GPU the slice is small
            return h @ block(a, b).astype(h.dtype).T

        def rows(ids):
            return dequantize_weight(head, ids)
    else:
        weight = head.weight

        def project(h, a, b):
            return h @ weight[a:b].T

        def rows(ids):
            return weight[ids]

        def block(a, b):
            return weight[a:b]
    return project, rows, block, head.weight.shape[0]


def streaming_logsumexp(chunks, eval_each: bool = False) -> mx.array:
    """logsumexp over the vocabulary of logits given as (N, C) chunks along it -> (N,).

    Keeps a running max and sum, so only one chunk of logits is needed at a time; with
    eval_each the running values are evaluated per chunk (forward-only use, bounded memory).
    """
    m = s = None
    for z in chunks:
        cm = z.max(-1)
        if m is None:
            m, s = cm, fastmath.exp(z - cm[:, None]).sum(-1)
        else:
            new = mx.maximum(m, cm)
            s = s * fastmath.exp(m - new) + fastmath.exp(z - new[:, None]).sum(-1)
            m = new
        if eval_each:
            mx.eval(m, s)
    return m + mx.log(s)


# ---- the CPU path: the LM head's loss in numpy (mlx_gemma.cpu.hostloss), where the CPU
# calibration chose it (`policy().host_loss`). In training (`loss_and_grad`) the forward and
# backward graph is built with mx.vjp around a cotangent buffer that numpy fills in once the
# forward half is evaluated; such a step cannot be mx.compile'd as a whole.


class HostHead:
    """numpy access to the LM head's rows (float32), for a float or quantized, tied or untied head."""

    def __init__(self, model):
        _, self._rows, self._block, self.V = head_weights(model)
        head = model.lm_head if "lm_head" in model else model.model.embed_tokens
        self.cap = model.config.final_logit_softcapping
        w = head.weight
        # a float32 head is read in place (zero-copy); others are converted chunk by chunk
        self.dense = np.array(w, copy=False) if w.dtype == mx.float32 and not hasattr(head, "scales") else None

    def block(self, a: int, b: int) -> np.ndarray:
        if self.dense is not None:
            return self.dense[a:b]
        return np.array(self._block(a, b).astype(mx.float32))

    def rows(self, ids: np.ndarray) -> np.ndarray:
        if self.dense is not None:
            return self.dense[ids]
        return np.array(self._rows(mx.array(ids)).astype(mx.float32))


def token_losses(model, hidden: mx.array, targets: mx.array, chunk: int = DEFAULT_CHUNK,
                 eval_each: bool = False) -> mx.array:
    """Cross-entropy (N,) of the LM head on `hidden` (N, E) against `targets` (N,), forward only
    (evaluation): numpy on the CPU, vocabulary chunks elsewhere (with eval_each, evaluated one
    at a time: bounded memory, but not usable inside mx.compile)."""
    if policy().host_loss:
        mx.eval(hidden, targets)
        h = np.array(hidden.astype(mx.float32))
        loss, _ = host_cross_entropy(h, np.array(targets), HostHead(model), chunk, grad=False)
        return mx.array(loss)
    project, rows, block, V = head_weights(model)
    cap = model.config.final_logit_softcapping
    h = hidden.astype(mx.float32)

    def chunks():
        for a in range(0, V, chunk):
            z = project(hidden, a, min(a + chunk, V)).astype(mx.float32)
            yield mx.tanh(z / cap) * cap if cap else z

    lse = streaming_logsumexp(chunks(), eval_each=eval_each)
    zt = (h * rows(targets).astype(mx.float32)).sum(-1)  # the target logits without a one-hot over V
    return lse - (mx.tanh(zt / cap) * cap if cap else zt)


def chunked_cross_entropy(hidden: mx.array, targets: mx.array, model, chunk: int = DEFAULT_CHUNK) -> mx.array:
    """Per-row cross-entropy (N,) of the LM head on `hidden` (N, E) against `targets` (N,).

    Equal to `nn.losses.cross_entropy(model.logits(hidden), targets, reduction="none")` without the
    (N, V) logits ever existing in full, forward or backward. The head weights are treated as
    constants (frozen under LoRA): no gradient flows into them.
    """
    project, rows, block, V = head_weights(model)
    cap = model.config.final_logit_softcapping
    bounds = [(a, min(a + chunk, V)) for a in range(0, V, chunk)]

    def capped(z):
        return fastmath.tanh(z / cap) * cap if cap else z

    def chunk_logits(h, a, b):
        return capped(project(h, a, b).astype(mx.float32))

    def target_logit(h, t):
        # (N, E) . (N, E) -> (N,): the target's logit without a one-hot over V
        w = rows(t).astype(mx.float32)
        return (h.astype(mx.float32) * w).sum(-1), w

    def forward(h):
        return streaming_logsumexp(chunk_logits(h, a, b) for a, b in bounds)  # (N,)

    @mx.custom_function
    def ce(h, t):
        lse = forward(h)
        zt, _ = target_logit(h, t)
        return lse - capped(zt), lse

    @ce.vjp
    def ce_vjp(primals, cotangents, outputs):
        h, t = primals
        g = cotangents[0].astype(mx.float32)  # (N,)
        lse = outputs[1]
        dh = mx.zeros(h.shape, mx.float32)
        for a, b in bounds:
            raw = project(h, a, b).astype(mx.float32)
            if cap:
                tz = fastmath.tanh(raw / cap)
                p = fastmath.exp(tz * cap - lse[:, None]) * (1 - tz * tz)
            else:
                p = fastmath.exp(raw - lse[:, None])
            dz = (g[:, None] * p).astype(h.dtype)  # d loss / d raw logits, softmax part
            dh = dh + dz @ block(a, b).astype(dz.dtype)  # (N, chunk) @ (chunk, E)
        # minus the target's one-hot part: d(-capped(zt))/dh = -capped'(zt) * w_t
        zt, wt = target_logit(h, t)
        d_cap = (1 - fastmath.tanh(zt / cap) ** 2) if cap else 1.0
        dh = dh - (g * d_cap)[:, None] * wt
        return dh.astype(h.dtype), mx.zeros_like(t)

    return ce(hidden, targets)[0]


def bucketed() -> bool:
    """Whether the gathered loss positions are rounded up to buckets: where the gradient is
    compiled (a new shape is a new trace). On the CPU path (`policy().host_loss`) the head runs in
    numpy, where padded positions are only wasted rows of its two products. (Rows stay padded to
    32 tokens on both paths: LoRA dropout draws its masks over the padded shape, so a row length
    that depended on the path would change the training run, not only its speed.)"""
    return not policy().host_loss


def loss_positions(weights: np.ndarray, multiple: Optional[int] = None):
    """Flat indices of the positions that carry loss, padded to a bucket, and their weights.

    weights (B, L) -> (idx (N',) int32, w (N',) float32) with N' >= N rounded up so that the
    padding wastes at most 1/8 (and N' is a multiple of `multiple`: default 64 where shapes are
    `bucketed()`, else 1: no padding).
    """
    flat = weights.reshape(-1)
    idx = np.nonzero(flat)[0].astype(np.int32)
    n = max(len(idx), 1)
    multiple = multiple or (64 if bucketed() else 1)
    step = 1 if multiple == 1 else max(multiple, 2 ** max(0, int(math.floor(math.log2(n))) - 3))
    size = int(math.ceil(n / step) * step)
    out_idx = np.zeros(size, np.int32)
    out_w = np.zeros(size, np.float32)
    out_idx[:len(idx)] = idx
    out_w[:len(idx)] = flat[idx]
    return out_idx, out_w


def batch_loss(model, inputs, targets, idx, w, segment_ids=None, chunk: int = DEFAULT_CHUNK,
               differentiable: bool = True):
    """(sum of token losses, number of loss tokens) for one batch.

    inputs/targets (B, L) int; idx (N,) flat positions that carry loss; w (N,) their weights
    (0 for bucket padding); segment_ids (B, L) or None for packed rows. differentiable=False
    (evaluation) skips the gradient work of the CPU path.
    """
    hidden = model.model(inputs, segment_ids=segment_ids)  # (B, L, E)
    h = hidden.reshape(-1, hidden.shape[-1])[idx]  # (N, E)
    t = targets.reshape(-1)[idx]
    losses = chunked_cross_entropy(h, t, model, chunk) if differentiable else token_losses(model, h, t, chunk)
    return (losses * w).sum(), w.sum()


def full_batch_loss(model, inputs, targets, weights, segment_ids=None):
    """The plain reference: full (B, L, V) logits and cross-entropy, weighted sum and count."""
    logits = model(inputs, segment_ids=segment_ids).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets, reduction="none")
    return (losses * weights).sum(), weights.sum()


def loss_and_grad(model, chunk: int = DEFAULT_CHUNK):
    """fn(inputs, targets, idx, w, segment_ids) -> ((sum of token losses, loss tokens), grads of
    the model's trainable parameters) for one batch; `batch_loss` under nn.value_and_grad.

    On the CPU the head runs in numpy (see above) with a single forward: mx.vjp builds the
    forward and backward graph lazily around a cotangent buffer (N, E); the forward half (the
    hidden states at the loss positions) is evaluated, numpy computes the loss and d loss / d h
    into that buffer in place, and then the backward half is evaluated.
    """
    if not policy().host_loss:
        return partial(nn.value_and_grad(model, partial(batch_loss, chunk=chunk)), model)

    def fn(inputs, targets, idx, w, segment_ids=None):
        h, cotangent, grads = _hidden_and_backward(model, inputs, idx, segment_ids)
        mx.eval(targets, w)
        flat_t = np.array(targets).reshape(-1)[np.array(idx)]
        weights = np.array(w)
        losses, dh = host_cross_entropy(h, flat_t, HostHead(model), chunk, grad=True)
        cotangent[:] = dh * weights[:, None]  # d (sum of w * loss) / d h
        loss_sum = float((losses * weights).sum())
        return (mx.array(loss_sum), mx.array(float(weights.sum()))), grads()

    return fn


def _hidden_and_backward(model, inputs, idx, segment_ids=None):
    """The CPU path's two halves: (h (N, E) float32 numpy, the hidden states at positions idx,
    evaluated; the cotangent buffer d loss / d h (numpy, to fill in place); grads() -> the
    trainable parameters' gradients once the buffer is filled)."""
    params = model.trainable_parameters()
    names, values = zip(*tree_flatten(params))
    E = model.config.hidden_size

    def hidden_at_loss_positions(*values):
        model.update(tree_unflatten(list(zip(names, values))))
        hidden = model.model(inputs, segment_ids=segment_ids)  # (B, L, E)
        return [hidden.reshape(-1, E)[idx].astype(mx.float32)]  # (N, E)

    cotangent = mx.array(np.zeros((idx.shape[0], E), np.float32))  # a real buffer, filled by the caller
    (h,), grads = mx.vjp(hidden_at_loss_positions, list(values), [cotangent])
    model.update(params)
    mx.eval(h, idx)
    return np.array(h), np.array(cotangent, copy=False), lambda: tree_unflatten(list(zip(names, grads)))


def hidden_at(model, inputs, idx):
    """The final hidden states (N, E) at flat positions idx of a (B, L) batch."""
    hidden = model.model(inputs)
    return hidden.reshape(-1, hidden.shape[-1])[idx]


def reduced_loss_and_grad(model, reduce, chunk: int = DEFAULT_CHUNK):
    """fn(inputs, targets, idx, *rest) -> (reduce(token losses (N,), *rest), grads): a loss that is
    a differentiable function `reduce` of the token cross-entropies at positions idx (DPO, ORPO:
    sums per sequence), whose first output is minimised. The 262k-word head stays chunked (numpy
    on the CPU: d loss / d h = d reduce / d ce * d ce / d h, per position)."""
    if not policy().host_loss:
        def loss(model, inputs, targets, idx, *rest):
            return reduce(chunked_cross_entropy(hidden_at(model, inputs, idx), targets.reshape(-1)[idx], model,
                                                chunk), *rest)

        return partial(nn.value_and_grad(model, loss), model)

    def fn(inputs, targets, idx, *rest):
        h, cotangent, grads = _hidden_and_backward(model, inputs, idx)
        flat_t = np.array(targets).reshape(-1)[np.array(idx)]
        ce, dh = host_cross_entropy(h, flat_t, HostHead(model), chunk, grad=True)
        outputs, dce = mx.value_and_grad(lambda c: reduce(c, *rest))(mx.array(ce))
        mx.eval(outputs, dce)
        cotangent[:] = dh * np.array(dce)[:, None]
        return outputs, grads()

    return fn


def reduced_loss(model, reduce, chunk: int = DEFAULT_CHUNK, as_training: bool = False):
    """`reduced_loss_and_grad` without gradients: fn(inputs, targets, idx, *rest) -> reduce(...).
    as_training: the cross-entropy the training step computes, to the last bit (a DPO reference
    equal to the policy must give rewards of exactly 0), rather than the lighter evaluation one."""
    losses = chunked_cross_entropy if as_training and not policy().host_loss else \
        (lambda h, t, model, chunk: token_losses(model, h, t, chunk))

    def fn(inputs, targets, idx, *rest):
        return reduce(losses(hidden_at(model, inputs, idx), targets.reshape(-1)[idx], model, chunk), *rest)

    return fn
