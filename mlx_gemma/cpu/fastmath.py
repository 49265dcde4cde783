"""exp, tanh, softmax and the tanh GELU as polynomials in MLX ops, where the CPU calibration chose them.

MLX's CPU kernels evaluate transcendental functions one scalar at a time on some builds and CPUs
(measured on the AMD EPYC build machine: exp over 1M floats ~35 ms, tanh ~50 ms, a multiply ~1 ms),
and are fast on others (an Intel Xeon with AVX-512/AMX, where this module made a 512-token prefill
3.6x slower). So `policy().fast_math` is decided per machine by mlx_gemma.cpu.calibrate, and only
for float32. These functions use only multiply-add, floor and an exponent-bit shift, fused into
one kernel by mx.compile:

    exp(x) = 2^t, t = x / ln 2 = n + f with n = floor(t), f in [0, 1)
    2^n    = the float whose exponent bits are n + 127
    2^f    = a degree-6 polynomial, least-squares fitted to 2^f on [0, 1] for this module
             (relative error < 1.1e-7 in float32, about one ulp; rounding x / ln 2 to
             float32 adds up to ~|x| * 1e-7, so ~4e-6 near the ends of the range)
    tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|)  (absolute error ~1e-7)

t is clamped to [-126, 127]: exp underflows to ~1e-38 below and saturates at ~3.4e38 above
(inputs above ~88 give a large finite number instead of inf). On a GPU, or for other dtypes,
MLX's own exact ops run instead (mlx_gemma.backend decides).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..backend import policy
from ..numerics import GELU_C, GELU_CUBIC

_LOG2E = 1.0 / math.log(2.0)
# 2^f ~ sum_k c_k f^k on [0, 1]: Chebyshev-weighted least squares on the relative error.
_EXP2_POLY = (1.0000000044241029, 0.6931469138750275, 0.2402303088734932, 0.05548214868420111,
              0.009679987191334302, 0.0012437937100327036, 0.00021683439317141747)


def _use_fast(x: mx.array) -> bool:
    return x.dtype == mx.float32 and policy().fast_math


def _exp2_parts(x: mx.array) -> mx.array:
    t = mx.clip(x * _LOG2E, -126.0, 127.0)
    n = mx.floor(t)
    f = t - n
    poly = mx.array(_EXP2_POLY[-1], mx.float32)
    for c in reversed(_EXP2_POLY[:-1]):
        poly = poly * f + c
    scale = mx.view((n.astype(mx.int32) + 127) << 23, mx.float32)  # 2^n from its exponent bits
    return poly * scale


# mx.view has no gradient, so each function carries its derivative (compiled as well).


@mx.custom_function
@mx.compile
def _exp_compiled(x):
    return _exp2_parts(x)


@_exp_compiled.vjp
@mx.compile
def _exp_vjp(primals, cotangent, output):
    return cotangent * output


@mx.custom_function
@mx.compile
def _tanh_compiled(x):
    e = _exp2_parts(-2.0 * mx.abs(x))
    return mx.sign(x) * (1.0 - e) / (1.0 + e)


@_tanh_compiled.vjp
@mx.compile
def _tanh_vjp(primals, cotangent, output):
    return cotangent * (1.0 - output * output)


def _gelu_parts(x):
    u = GELU_C * (x + GELU_CUBIC * x * x * x)
    e = _exp2_parts(-2.0 * mx.abs(u))
    return mx.sign(u) * (1.0 - e) / (1.0 + e)  # tanh(u)


@mx.custom_function
@mx.compile
def _gelu_compiled(x):
    return 0.5 * x * (1.0 + _gelu_parts(x))


@_gelu_compiled.vjp
@mx.compile
def _gelu_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (list, tuple)) else primals
    t = _gelu_parts(x)
    du = GELU_C * (1.0 + 3 * GELU_CUBIC * x * x)
    return cotangent * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)


def exp(x: mx.array) -> mx.array:
    """e^x (see the module doc for range and accuracy on the CPU)."""
    return _exp_compiled(x) if _use_fast(x) else mx.exp(x)


def tanh(x: mx.array) -> mx.array:
    return _tanh_compiled(x) if _use_fast(x) else mx.tanh(x)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """softmax along `axis`; masked (-inf) entries get ~1e-38 on the CPU path, 0 elsewhere."""
    if not _use_fast(x):
        return mx.softmax(x, axis=axis)
    e = _exp_compiled(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (PyTorch's gelu(approximate="tanh"), HF's gelu_pytorch_tanh)."""
    return _gelu_compiled(x) if _use_fast(x) else nn.gelu_approx(x)
