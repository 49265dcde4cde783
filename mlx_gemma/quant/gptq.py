"""Calibrated quantization (GPTQ, Frantar et al. 2022) in MLX's affine format.

Rounding each weight to its nearest grid point minimises the error of the weights; what matters
is the error of the layer's outputs, `||X W^T - X Q^T||^2` over real inputs X. With
H = X^T X (inputs x inputs), GPTQ quantizes one input column at a time and spreads that
column's rounding error over the columns not yet quantized, weighted by H^-1, so the later
columns absorb what the earlier ones lost. Per group of `group_size` inputs, the scale and bias
come from `affine.quantize_affine` (the error-minimising grid) fitted on the group's weights
as they stand when the group is reached, so the result is an ordinary MLX quantized layer:
packed codes, scales and biases, loadable by MLX and mlx-lm with no extra parameters.

The model is processed layer by layer (as in the paper): the calibration windows run through
decoder layer i with the layers before it already quantized, each linear layer's H is
accumulated from the inputs it actually receives, the layer's linears are quantized, and the
windows move on to layer i + 1. The tied embedding is quantized last as the LM head, with H
from the final normed hidden states of the quantized stack.

The calibration windows come from `quant.calibration` (text files -> token ids).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import NAME_ONLY, UserError
from .affine import pack, quantize_affine
from .layers import quantize_layer, quantized_like, replace_layers

DAMP = 0.01  # H += DAMP * mean(diag H) * I: keeps H invertible where some inputs are (nearly) never active
_ROWS_AT_ONCE = 16384  # output rows solved together (rows are independent given H): bounds memory


class _Recorder(nn.Module):
    """Wraps a linear layer; accumulates H = sum x^T x over every input row it sees."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.hessian = None

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        h = rows.T @ rows
        self.hessian = h if self.hessian is None else self.hessian + h
        return self.inner(x)


def gptq_quantize(weight, hessian, group_size: int, bits: int, damp: float = DAMP):
    """One (out, in) weight -> (packed uint32, scales, biases) in MLX's affine layout, minimising
    the output error for inputs whose second moment is `hessian` (in x in)."""
    w = np.array(weight.astype(mx.float32))  # numpy has no bfloat16
    h = np.array(hessian.astype(mx.float32)).astype(np.float64)
    rows, cols = w.shape
    dead = np.diag(h) == 0  # inputs never active: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(cols)] += damp * np.mean(np.diag(h))
    try:
        # upper Cholesky factor U of H^-1 (H^-1 = U^T U): row i holds the error-spreading weights
        upper = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)
    except np.linalg.LinAlgError:
        raise UserError("calibration failed: the input statistics are singular even after damping; "
                        "raise {calibration_tokens} or pass {calibration}", calibration_tokens=NAME_ONLY,
                        calibration="none") from None
    codes = np.empty((rows, cols), dtype=np.uint8)
    scales = np.empty((rows, cols // group_size), dtype=np.float32)
    biases = np.empty_like(scales)
    for a in range(0, rows, _ROWS_AT_ONCE):
        b = min(a + _ROWS_AT_ONCE, rows)
        _solve_rows(w[a:b], upper, group_size, bits, codes[a:b], scales[a:b], biases[a:b])
    dtype = weight.dtype if weight.dtype in (mx.float16, mx.bfloat16, mx.float32) else mx.float32
    return (pack(mx.array(codes.astype(np.uint32)), bits), mx.array(scales).astype(dtype),
            mx.array(biases).astype(dtype))


def _solve_rows(w, upper, group_size, bits, codes, scales, biases):
    """GPTQ on a block of rows, in place: w (R, C) is consumed; codes/scales/biases filled."""
    top = 2 ** bits - 1
    cols = w.shape[1]
    for g, c0 in enumerate(range(0, cols, group_size)):
        c1 = c0 + group_size
        block = w[:, c0:c1]  # a view: updated in place as the group's columns are quantized
        _, s, bias = quantize_affine(mx.array(block), group_size, bits)
        s, bias = np.array(s.astype(mx.float32))[:, 0], np.array(bias.astype(mx.float32))[:, 0]
        scales[:, g], biases[:, g] = s, bias
        safe = np.where(s == 0, 1.0, s).astype(np.float32)
        err = np.empty_like(block)
        for i in range(group_size):
            col = block[:, i]
            q = np.clip(np.rint((col - bias) / safe), 0, top)
            codes[:, c0 + i] = q
            e = (col - (s * q + bias)) / upper[c0 + i, c0 + i]
            block[:, i + 1:] -= np.outer(e, upper[c0 + i, c0 + i + 1:c1])
            err[:, i] = e
        if c1 < cols:
            w[:, c1:] -= err @ upper[c0:c1, c1:]


def check_calibration(model, windows: mx.array) -> None:
    """Raise UserError unless `windows` are (N, L) token ids the model can embed."""
    vocab = model.model.embed_tokens.weight.shape[0]
    if windows.ndim != 2 or windows.size == 0:
        raise UserError(f"calibration windows must be a non-empty (N, L) array of token ids, got shape {windows.shape}")
    top = int(windows.max().item())
    if top >= vocab:
        raise UserError(f"calibration token id {top} is outside the model's vocabulary of {vocab}; "
                        "the tokenizer does not match the model")


def quantize_calibrated(model, windows: mx.array, plan: dict, progress=None) -> None:
    """Quantize `model` in place with GPTQ on the calibration `windows` (N, L) (see the module doc).

    plan: {module path: {"group_size", "bits", "mode"}} for every layer to quantize (from
    `quantize.quantize_model`, which has checked them); layers not in it stay dense."""
    say = progress or (lambda msg: None)
    body = model.model
    check_calibration(model, windows)
    h = body.embed(windows)
    masks = body.masks(windows.shape[1])
    for i, layer in enumerate(body.layers):
        prefix = f"model.layers.{i}."
        recorders = {prefix + path: _Recorder(m) for path, m in layer.named_modules()
                     if isinstance(m, nn.Linear) and prefix + path in plan}
        replace_layers(model, recorders)
        mx.eval([r.hessian for r in recorders.values()], layer(h, masks[layer.is_sliding]))
        replace_layers(model, {path: _gptq_layer(rec.inner, rec.hessian, plan[path]) for path, rec in recorders.items()})
        h = layer(h, masks[layer.is_sliding])  # the next layer sees this layer's quantized outputs
        mx.eval(h)
        say(f"calibrated layer {i + 1}/{len(body.layers)}")
    # the LM head: its inputs are the final normed hidden states; a tied embedding is quantized as
    # the head (its lookup side has no better-suited statistics)
    head = "lm_head" if "lm_head" in model else "model.embed_tokens"
    if head in plan:
        say(f"calibrating the LM head ({head})")
        hidden = body.norm(h).reshape(-1, body.config.hidden_size).astype(mx.float32)
        module = model.lm_head if head == "lm_head" else body.embed_tokens
        replace_layers(model, {head: _gptq_layer(module, hidden.T @ hidden, plan[head])})
    if head == "lm_head" and "model.embed_tokens" in plan:  # untied: the lookup table has no H
        replace_layers(model, {"model.embed_tokens": quantize_layer(body.embed_tokens, **plan["model.embed_tokens"])})


def _gptq_layer(dense: nn.Module, hessian: mx.array, params: dict) -> nn.Module:
    """The quantized layer replacing `dense`, its weight quantized by GPTQ for inputs with `hessian`."""
    tensors = gptq_quantize(dense.weight, hessian, params["group_size"], params["bits"])
    return quantized_like(dense, **params, tensors=tensors)
