"""fastmath: the CPU float32 exp / tanh / GELU / softmax against float64 numpy references.

The polynomial path is what the backend policy turns on for MLX's CPU backend; a GPU keeps MLX's
own kernels. The accuracy tests force the polynomial on (`backend.override(fast_math=True)`), so
they test it on every device; the first test checks which path the policy picks here.
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma import backend, fastmath

X = np.concatenate([np.linspace(-90, 90, 20001), np.linspace(-3, 3, 4001)]).astype(np.float32)


def _ref_gelu(x):
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


@pytest.fixture(autouse=True)
def polynomial():
    with backend.override(fast_math=True):
        yield


def test_the_policy_picks_the_polynomial_on_the_cpu_only():
    cpu = mx.default_device().type == mx.DeviceType.cpu
    with backend.override(**{f: getattr(backend._detect(), f) for f in ("fast_math", "device")}):
        assert backend.policy().fast_math is cpu
        assert fastmath._use_fast(mx.array(X)) is cpu
        assert not fastmath._use_fast(mx.array(X).astype(mx.bfloat16))  # float32 only, everywhere
        x = mx.array(X[:100])
        # Off the polynomial path the functions are MLX's own, bit for bit.
        if not cpu:
            np.testing.assert_array_equal(np.array(fastmath.exp(x)), np.array(mx.exp(x)))


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
