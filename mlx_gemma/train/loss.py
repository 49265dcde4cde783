"""Memory-efficient LM loss: the LM head only where labels are, cross-entropy in vocabulary chunks.

A Gemma 3 vocabulary has 262,144 entries: B x L x V float32 logits for a batch of 4 x 512 are
2 GiB, and on the CPU the exp/log over them dominates a step. Instead:

1. `model.model(...)` gives the final hidden states (B, L, E);
2. only the N positions whose target carries loss are gathered: (N, E);
3. the LM head (tied embedding or lm_head, final soft-cap included) is applied one vocabulary
   chunk at a time with a streaming logsumexp, so at most N x chunk logits exist at once;
4. a custom VJP recomputes each chunk's logits in the backward pass instead of keeping them
   (d hidden = sum over chunks of (softmax - onehot) * softcap' @ W_chunk).

The gathered position count N is padded up to a bucket (zero-weight rows), so a compiled step
sees few distinct shapes.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import fastmath

DEFAULT_CHUNK = 8192  # smaller chunks stay in cache: 8192 runs the 270M loss ~1.7x faster than 32768 on the CPU


def head_weights(model):
    """The LM head as three functions and the vocabulary size V:

    project(h, a, b): (N, E) -> (N, b - a) raw logits of vocabulary rows [a, b);
    rows(ids): (N,) -> (N, E) the head rows of those ids; block(a, b): (b - a, E) rows [a, b).
    Works for a tied float embedding, an untied lm_head, and their quantized forms.
    """
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens
    if isinstance(head, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
        gs, bits, mode = head.group_size, head.bits, getattr(head, "mode", "affine")
        w, s, bias = head["weight"], head["scales"], head.get("biases")

        def deq(wq, sq, bq):
            return mx.dequantize(wq, sq, bq, group_size=gs, bits=bits, mode=mode)

        def block(a, b):
            return deq(w[a:b], s[a:b], None if bias is None else bias[a:b])

        def project(h, a, b):
            # dequantize a (chunk, E) slice and use the dense matmul: on the CPU
            # quantized_matmul is ~20x slower for many rows, on a GPU the slice is small
            return h @ block(a, b).astype(h.dtype).T

        def rows(ids):
            return deq(w[ids], s[ids], None if bias is None else bias[ids])
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


def loss_positions(weights: np.ndarray, multiple: int = 64):
    """Flat indices of the positions that carry loss, padded to a bucket, and their weights.

    weights (B, L) -> (idx (N',) int32, w (N',) float32) with N' >= N rounded up so that the
    padding wastes at most 1/8 (and N' is a multiple of `multiple`).
    """
    flat = weights.reshape(-1)
    idx = np.nonzero(flat)[0].astype(np.int32)
    n = max(len(idx), 1)
    step = max(multiple, 2 ** max(0, int(math.floor(math.log2(n))) - 3))
    size = int(math.ceil(n / step) * step)
    out_idx = np.zeros(size, np.int32)
    out_w = np.zeros(size, np.float32)
    out_idx[:len(idx)] = idx
    out_w[:len(idx)] = flat[idx]
    return out_idx, out_w


def batch_loss(model, inputs, targets, idx, w, segment_ids=None, chunk: int = DEFAULT_CHUNK):
    """(sum of token losses, number of loss tokens) for one batch.

    inputs/targets (B, L) int; idx (N,) flat positions that carry loss; w (N,) their weights
    (0 for bucket padding); segment_ids (B, L) or None for packed rows.
    """
    hidden = model.model(inputs, segment_ids=segment_ids)  # (B, L, E)
    h = hidden.reshape(-1, hidden.shape[-1])[idx]  # (N, E)
    t = targets.reshape(-1)[idx]
    losses = chunked_cross_entropy(h, t, model, chunk)
    return (losses * w).sum(), w.sum()


def full_batch_loss(model, inputs, targets, weights, segment_ids=None):
    """The plain reference: full (B, L, V) logits and cross-entropy, weighted sum and count."""
    logits = model(inputs, segment_ids=segment_ids).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets, reduction="none")
    return (losses * weights).sum(), weights.sum()
