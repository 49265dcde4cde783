"""Gemma's numeric conventions, defined once for both executors of the network: model.py (MLX)
and cpu/hostdecode.py (numpy + BLAS on the host). A change here changes both, and
tests/test_hostdecode.py holds them to transformers and to each other.

`norm_scale` works on MLX and numpy arrays alike (plain arithmetic).
"""

from __future__ import annotations

import math

import numpy as np

# GeGLU's GELU is the tanh approximation in every Gemma version (HF's gelu_pytorch_tanh):
#   gelu(x) = 0.5 x (1 + tanh(GELU_C (x + GELU_CUBIC x^3)))
GELU_C = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


def norm_scale(weight):
    """The multiplier of Gemma 1-3's RMSNorm: checkpoints store w zero-centred, the norm scales
    by (1 + w) (computed in float32, as HF's upcast does)."""
    return 1.0 + weight


def rope_inv_freq(base: float, dims: int):
    """Inverse frequencies (dims/2,) float32 of RoPE with this base, as mx.fast.rope computes
    them for its non-traditional (half-split) rotation: base^(-i / (dims/2)), i = 0 .. dims/2 - 1."""
    half = dims // 2
    return (base ** (-np.arange(half, dtype=np.float64) / half)).astype(np.float32)
