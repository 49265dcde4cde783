"""fastmath: the CPU float32 exp / tanh / GELU / softmax against float64 numpy references.

The polynomial path is what the backend policy turns on where the CPU calibration chose it
(mlx_gemma.cpu.calibrate; tests/test_cpu_paths.py tests the choice); a GPU keeps MLX's own kernels.
These tests force the polynomial on (`backend.override(fast_math=True)`), so they test it on every
device.
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_gemma import backend
from mlx_gemma.cpu import fastmath

X = np.concatenate([np.linspace(-90, 90, 20001), np.linspace(-3, 3, 4001)]).astype(np.float32)


def _ref_gelu(x):
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


@pytest.fixture(autouse=True)
def polynomial():
    with backend.override(fast_math=True):
        yield


def test_the_polynomial_runs_where_the_policy_has_it_for_float32_only():
    """The fixture forces the path on: float32 takes the polynomial, other dtypes never do; with
    the path off (a GPU, or a CPU whose calibration chose MLX's kernels) the functions are MLX's
    own, bit for bit."""
    x = mx.array(X[::10])
    assert fastmath._use_fast(x)
    assert not fastmath._use_fast(x.astype(mx.bfloat16))
    assert not np.array_equal(np.array(fastmath.exp(x)), np.array(mx.exp(x)))  # the polynomial differs in ulps
    s = mx.array(X[:600].reshape(2, 300))
    with backend.override(fast_math=False):
        assert not fastmath._use_fast(x)
        for ours, theirs in ((fastmath.exp(x), mx.exp(x)), (fastmath.tanh(x), mx.tanh(x)),
                             (fastmath.gelu_tanh(x), nn.gelu_approx(x)),
                             (fastmath.softmax(s, axis=-1), mx.softmax(s, axis=-1))):
            np.testing.assert_array_equal(np.array(ours), np.array(theirs))


def test_exp_relative_error():
    x = X[X < 88]
    ours = np.array(fastmath.exp(mx.array(x))).astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    normal = ref > 1e-37  # below that float32 is denormal; clamped to ~1e-38 by design
    # the polynomial is good to ~1e-7; rounding x / ln 2 to float32 adds up to ~|x| * 2^-24 * 1.5
    bound = 2e-7 + 1e-7 * np.abs(x[normal])
    assert np.all(np.abs(ours[normal] / ref[normal] - 1) < bound)
    assert np.all(ours[~normal] < 1e-37)


def test_tanh_and_gelu_absolute_error():
    t = np.array(fastmath.tanh(mx.array(X))).astype(np.float64)
    assert np.max(np.abs(t - np.tanh(X.astype(np.float64)))) < 3e-7
    g = np.array(fastmath.gelu_tanh(mx.array(X))).astype(np.float64)
    ref = _ref_gelu(X)
    assert np.max(np.abs(g - ref) / np.maximum(1.0, np.abs(ref))) < 1e-6


def test_softmax_matches_and_masked_entries_vanish():
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((8, 300)) * 10).astype(np.float32)
    z[:, :7] = -np.inf  # a causal mask's hidden keys
    ours = np.array(fastmath.softmax(mx.array(z), axis=-1)).astype(np.float64)
    zz = z.astype(np.float64)
    ref = np.exp(zz - zz.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)
    assert np.all(ours[:, :7] < 1e-30)


@pytest.mark.parametrize("name, derivative", [
    ("exp", lambda x: np.exp(x)),
    ("tanh", lambda x: 1 - np.tanh(x) ** 2),
    ("gelu_tanh", None),
])
def test_gradients_match_the_analytic_derivative(name, derivative):
    x = np.linspace(-6, 6, 2001).astype(np.float32)
    grad = np.array(mx.grad(lambda a: getattr(fastmath, name)(a).sum())(mx.array(x))).astype(np.float64)
    xd = x.astype(np.float64)
    if derivative is None:  # central difference of the float64 reference
        h = 1e-5
        ref = (_ref_gelu(xd + h) - _ref_gelu(xd - h)) / (2 * h)
    else:
        ref = derivative(xd)
    assert np.max(np.abs(grad - ref) / np.maximum(1.0, np.abs(ref))) < 2e-6
