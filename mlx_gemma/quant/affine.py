"""The affine grid fit: MLX's quantized format (w ≈ scale * q + bias per group) and its packing.

Each group of `group_size` consecutive inputs of a weight row gets one (scale, bias) pair and
`bits`-bit codes q; the codes are packed 32 / bits to a uint32, the first code in the lowest
bits (MLX's layout, so `mx.dequantize` and mlx-lm read them). `quantize_affine` fits the grid
to minimise each group's squared error instead of mapping [min, max] onto the codes.
"""

from __future__ import annotations

import mlx.core as mx

# Candidate clipping of each group's [min, max] range: a slightly narrower range trades an error
# on the extreme weights for a finer grid everywhere else, which usually wins at 4 bits.
_RANGE_SHRINK = (1.0, 0.96, 0.92, 0.88, 0.84, 0.8)
_REFITS = 2
_ROWS_AT_ONCE = 8192  # bounds the float32 temporaries for a 262k-row embedding


def quantize_weight(weight: mx.array, group_size: int, bits: int, mode: str = "affine"):
    """(packed weight, scales, biases or None) of a 2-D weight: `quantize_affine` for the affine
    mode, `mx.quantize` for MLX's other modes (which have no biases)."""
    if mode == "affine":
        return quantize_affine(weight, group_size, bits)
    weight, scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
    return weight, scales, (biases[0] if biases else None)


def quantize_affine(weight: mx.array, group_size: int, bits: int):
    """Error-minimising affine quantization in MLX's format: (packed uint32 weight, scales, biases).

    `mx.quantize` maps each group's [min, max] onto the 2^bits levels (round to nearest). Here,
    per group of `group_size` inputs, several starting grids are tried (mx.quantize's own and
    clipped ranges); from each, (scale, bias) is refitted by least squares to
    min ||scale * q + bias - w||^2 for the current codes q and the codes re-rounded, twice (each
    move can only lower the error); the candidate with the smallest squared error wins, so no
    group is worse than with mx.quantize. Dequantizes with mx.dequantize.
    """
    rows, cols = weight.shape
    parts = [_fit_rows(weight[a:a + _ROWS_AT_ONCE], group_size, bits) for a in range(0, rows, _ROWS_AT_ONCE)]
    packed, scales, biases = (mx.concatenate([p[i] for p in parts]) if len(parts) > 1 else parts[0][i]
                              for i in range(3))
    dtype = weight.dtype if weight.dtype in (mx.float16, mx.bfloat16, mx.float32) else mx.float32
    return packed, scales.astype(dtype), biases.astype(dtype)


def _fit_rows(weight: mx.array, group_size: int, bits: int):
    rows, cols = weight.shape
    top = float(2 ** bits - 1)
    w = weight.astype(mx.float32).reshape(rows, cols // group_size, group_size)  # (R, G, gs)
    lo, hi = w.min(-1, keepdims=True), w.max(-1, keepdims=True)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    # starting grids: mx.quantize's own (so the result is never worse than it), then clipped ranges
    packed, scales, biases = mx.quantize(weight, group_size, bits)
    starts = [(unpack(packed, bits).reshape(w.shape).astype(mx.float32), scales[..., None].astype(mx.float32),
               biases[..., None].astype(mx.float32))]
    starts += [(None, 2 * half * shrink / top, mid - half * shrink) for shrink in _RANGE_SHRINK]
    starts.append((None, _lattice_step(w, hi - lo), lo))
    best = None
    for q, scale, bias in starts:
        for _ in range(_REFITS):
            q = _codes(w, scale, bias, top) if q is None else q
            scale, bias = _least_squares(w, q, scale, bias)
            q = None
        q = _codes(w, scale, bias, top)
        err = mx.square(scale * q + bias - w).sum(-1, keepdims=True)  # (R, G, 1)
        if best is None:
            best = (err, q, scale, bias)
        else:
            better = err < best[0]
            best = tuple(mx.where(better, new, old) for new, old in zip((err, q, scale, bias), best))
        mx.eval(best)
    _, q, scale, bias = best
    return pack(q.reshape(rows, cols).astype(mx.uint32), bits), scale.reshape(rows, -1), bias.reshape(rows, -1)


def _lattice_step(w, span):
    """Per group, the smallest gap between distinct sorted values (the span where there is none).

    Weights dequantized from a coarser format (a Q4_0 / Q4_1 / Q4_K GGUF, whose 32-wide blocks
    are each an affine grid) sit on a lattice min + k * step: with this step as the scale, the
    codes reproduce them exactly, which the min/max grid misses whenever a block does not use
    its extreme codes. For weights on no lattice it is one more candidate the error check drops.
    """
    ordered = mx.sort(w, axis=-1)
    gaps = ordered[..., 1:] - ordered[..., :-1]
    tiny = 1e-5 * span  # float rounding of dequantized values: not a gap
    step = mx.where(gaps > tiny, gaps, mx.inf).min(-1, keepdims=True)
    return mx.where(mx.isinf(step), span, step)


def _codes(w, scale, bias, top):
    safe = mx.where(scale == 0, 1.0, scale)
    return mx.clip(mx.round((w - bias) / safe), 0.0, top)


def _least_squares(w, q, scale, bias):
    """(scale, bias) minimising ||scale * q + bias - w||^2 per group; unchanged where q is constant."""
    n = w.shape[-1]
    sq, sw = q.sum(-1, keepdims=True), w.sum(-1, keepdims=True)
    sqq, sqw = (q * q).sum(-1, keepdims=True), (q * w).sum(-1, keepdims=True)
    det = n * sqq - sq * sq
    ok = det > 0
    safe = mx.where(ok, det, 1.0)
    new_scale = (n * sqw - sq * sw) / safe
    new_bias = (sw - new_scale * sq) / n
    return mx.where(ok, new_scale, scale), mx.where(ok, new_bias, bias)


def unpack(packed: mx.array, bits: int) -> mx.array:
    """(R, W) uint32 -> (R, W * 32 / bits) codes, the inverse of `pack`."""
    per = 32 // bits
    shifts = mx.arange(per, dtype=mx.uint32) * bits
    codes = (packed[..., None] >> shifts) & (2 ** bits - 1)
    return codes.reshape(packed.shape[0], -1)


def pack(q: mx.array, bits: int) -> mx.array:
    """(R, C) integer codes -> (R, C * bits / 32) uint32, the first code in the lowest bits (MLX's layout)."""
    per = 32 // bits
    rows, cols = q.shape
    shifts = (mx.arange(per, dtype=mx.uint32) * bits)
    return (q.reshape(rows, cols // per, per) << shifts).sum(-1).astype(mx.uint32)
