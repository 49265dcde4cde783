"""One-row decoding on the host: a decode step of a float32 model as llama.cpp runs it on a CPU.

A decode step for one sequence multiplies one activation row by every weight matrix. MLX's CPU
backend sends those products to `cblas_sgemm`, which for one row runs near half the machine's
read bandwidth (measured on a 2-core x86: 19-21 GB/s over the 270M's 400 MB of layer weights,
against 37 GB/s for `cblas_sgemv` in the same OpenBLAS). Between the products a decode step has
only vector work on a few thousand numbers, which numpy does in microseconds. So `HostDecoder`
runs the whole step on the host: every weight product is a `cblas_sgemv` in the OpenBLAS MLX
itself uses (`runtime.blas_sgemv_raw`; a second BLAS, numpy's, would keep a second pool of
spinning threads), over zero-copy views of the model's weights, and the norms, RoPE, attention
and GeGLU are numpy on preallocated vectors. The keys and values are written in place into the
model's own KV-cache buffers, so the MLX paths (prefill, batched decoding, speculative
verification) keep working on the same cache before and after.

It covers what the MLX path computes for a plain float32 Gemma 1/2/3 (GQA, soft-caps, q/k norms,
sliding-window rings, per-layer RoPE bases and linear scaling) and declines (`HostDecoder.of`
returns None) anything else: quantized or LoRA-wrapped layers, other dtypes, non-CPU policies.
The logits equal the MLX path's up to float32 summation order (tests compare them, and greedy
token ids, on every Gemma variant).
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .runtime import blas_sgemv_raw

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enums
_GELU_C = math.sqrt(2.0 / math.pi)


def _view(a: mx.array) -> np.ndarray:
    """A zero-copy float32 numpy view of an evaluated MLX array (C-contiguous, checked)."""
    mx.eval(a)
    v = np.array(a, copy=False)
    if v.dtype != np.float32 or not v.flags.c_contiguous:
        raise ValueError("host decoding needs C-contiguous float32 weights")
    return v


def _dense_weight(module) -> Optional[mx.array]:
    """The weight of a plain bias-free float32 nn.Linear; None for anything else (LoRA, quantized)."""
    if type(module) is not nn.Linear or "bias" in module or "scales" in module:
        return None
    w = module.weight
    return w if w.dtype == mx.float32 else None


class _Layer:
    """Views of one decoder layer's weights and what its attention needs."""

    def __init__(self, layer, config):
        attn, mlp = layer.self_attn, layer.mlp
        self.q, self.k, self.v, self.o = (_view(getattr(attn, n).weight) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.gate, self.up, self.down = (_view(getattr(mlp, n).weight) for n in ("gate_proj", "up_proj", "down_proj"))
        self.norm_in = 1.0 + _view(layer.input_layernorm.weight)
        self.norm_post_attn = 1.0 + _view(layer.post_attention_layernorm.weight)
        self.ffw_norms = "pre_feedforward_layernorm" in layer
        if self.ffw_norms:
            self.norm_pre_ffw = 1.0 + _view(layer.pre_feedforward_layernorm.weight)
            self.norm_post_ffw = 1.0 + _view(layer.post_feedforward_layernorm.weight)
        self.qk_norm = "q_norm" in attn
        if self.qk_norm:
            self.q_norm, self.k_norm = 1.0 + _view(attn.q_norm.weight), 1.0 + _view(attn.k_norm.weight)
        self.window = config.sliding_window if layer.is_sliding else None
        self.rope = (attn.rope_base, attn.rope_scale)


class HostDecoder:
    """The body of a one-row decode step on the host (see the module docstring).

    `decoder(cache, token, pos)` feeds `token` at position `pos` (the caches already hold
    positions < pos and have room for pos: `KVCache.reserve`), writes its keys and values into
    `cache`, and returns the final-norm hidden state, a float32 vector (E,)."""

    def __init__(self, model):
        cfg = model.config
        self.config = cfg
        self.eps = cfg.rms_norm_eps
        self.H, self.K, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.logit_cap = cfg.attn_logit_softcapping
        self.embed = _view(model.model.embed_tokens.weight)
        self.embed_scale = np.float32(math.sqrt(cfg.hidden_size))  # rounded to float32, as the MLX path
        self.layers = [_Layer(layer, cfg) for layer in model.model.layers]
        self.final_norm = 1.0 + _view(model.model.norm.weight)
        self._gemv = blas_sgemv_raw()
        self._owned: list = []  # per layer: (keys array, values array, their numpy views)
        self._inv_freq = {}
        E, H, K, D, I = cfg.hidden_size, self.H, self.K, self.D, cfg.intermediate_size
        self.buf = {n: np.empty(size, np.float32) for n, size in (
            ("x", E), ("q", H * D), ("k", K * D), ("v", K * D), ("attn", H * D), ("o", E),
            ("gate", I), ("up", I), ("down", E))}
        self.scores = np.empty(0, np.float32)

    @classmethod
    def of(cls, model) -> Optional["HostDecoder"]:
        """A HostDecoder for a model whose every layer product is a plain float32 matrix, with a
        float32 embedding; None otherwise (the caller keeps the MLX path)."""
        if blas_sgemv_raw() is None or model.model.embed_tokens.weight.dtype != mx.float32:
            return None
        if "scales" in model.model.embed_tokens:
            return None
        for layer in model.model.layers:
            mods = [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            mods += [getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
            if any(_dense_weight(m) is None for m in mods):
                return None
        return cls(model)

    # ---- pieces -------------------------------------------------------------------------------

    def _mv(self, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out = w @ x for a C-contiguous (M, N) weight (one cblas_sgemv, no copies)."""
        M, N = w.shape
        self._gemv(_ROW_MAJOR, _NO_TRANS, M, N, 1.0, w.ctypes.data, N, x.ctypes.data, 1, 0.0, out.ctypes.data, 1)
        return out

    def _rms(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """mx.fast.rms_norm over the last axis: x / sqrt(mean(x^2) + eps) * w."""
        ms = np.mean(np.square(x), axis=-1, keepdims=True)
        return x * (1.0 / np.sqrt(ms + np.float32(self.eps))) * w

    def _rope_tables(self, base: float, scale: float, pos: int):
        """cos, sin (D/2,) of mx.fast.rope's non-traditional rotation at one position."""
        inv = self._inv_freq.get(base)
        if inv is None:
            half = self.D // 2
            inv = self._inv_freq[base] = (base ** (-np.arange(half, dtype=np.float64) / half)).astype(np.float32)
        theta = np.float32(pos * scale) * inv
        return np.cos(theta), np.sin(theta)

    @staticmethod
    def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Rotate (heads, D) by the half-split RoPE (x[:D/2], x[D/2:] are the pairs)."""
        half = x.shape[-1] // 2
        a, b = x[:, :half], x[:, half:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def _cache_views(self, i: int, c) -> tuple:
        """Writable views of layer i's cache buffers (1, K, S, D). The first time a buffer is seen
        (after a reserve that grew it, or after an MLX step made new arrays) it is replaced by a
        private copy, so no other MLX array shares the memory written in place."""
        owned = self._owned[i] if i < len(self._owned) else None
        if owned is None or owned[0] is not c.keys or owned[1] is not c.values:
            keys, values = mx.array(np.array(c.keys)), mx.array(np.array(c.values))
            kv, vv = np.array(keys, copy=False), np.array(values, copy=False)
            if not (kv.flags.writeable and kv.flags.c_contiguous and vv.flags.writeable and vv.flags.c_contiguous):
                raise RuntimeError("MLX did not give a writable contiguous view of a cache buffer")
            c.keys, c.values = keys, values
            owned = (keys, values, kv, vv)
            if i < len(self._owned):
                self._owned[i] = owned
            else:
                self._owned.append(owned)
        return owned[2], owned[3]

    def _attend(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, n: int, out: np.ndarray) -> None:
        """out (H*D,) = softmax(q k^T * scale [capped]) v over the first n slots of (K, S, D)."""
        H, K, D = self.H, self.K, self.D
        group = H // K
        if self.scores.shape[0] < n:
            self.scores = np.empty(n, np.float32)
        scores = self.scores[:n]
        for h in range(H):
            kv = h // group
            k_rows = keys[kv]  # (S, D), C-contiguous
            v_rows = values[kv]
            qh = q[h]
            self._gemv(_ROW_MAJOR, _NO_TRANS, n, D, self.scale, k_rows.ctypes.data, D, qh.ctypes.data, 1, 0.0,
                       scores.ctypes.data, 1)
            s = scores
            if self.logit_cap is not None:
                s = np.tanh(s / np.float32(self.logit_cap)) * np.float32(self.logit_cap)
            p = np.exp(s - s.max())
            p /= p.sum()
            p = np.ascontiguousarray(p, np.float32)
            oh = out[h * D:(h + 1) * D]
            self._gemv(_ROW_MAJOR, _TRANS, n, D, 1.0, v_rows.ctypes.data, D, p.ctypes.data, 1, 0.0, oh.ctypes.data, 1)

    # ---- the step -----------------------------------------------------------------------------

    def __call__(self, cache: list, token: int, pos: int) -> np.ndarray:
        b = self.buf
        H, K, D = self.H, self.K, self.D
        x = self.embed[token] * self.embed_scale
        tables = {}
        for i, (L, c) in enumerate(zip(self.layers, cache)):
            keys, values = self._cache_views(i, c)
            keys, values = keys[0], values[0]  # (K, S, D)
            n = pos + 1 if L.window is None else min(pos + 1, L.window)
            slot = pos if L.window is None else pos % L.window
            if slot >= keys.shape[1]:
                raise ValueError(f"the cache holds {keys.shape[1]} slots, position {pos} needs a reserve first")

            h = np.ascontiguousarray(self._rms(x, L.norm_in), np.float32)
            q = self._mv(L.q, h, b["q"]).reshape(H, D)
            k = self._mv(L.k, h, b["k"]).reshape(K, D)
            v = self._mv(L.v, h, b["v"]).reshape(K, D)
            if L.qk_norm:
                q, k = self._rms(q, L.q_norm), self._rms(k, L.k_norm)
            if L.rope not in tables:
                tables[L.rope] = self._rope_tables(L.rope[0], L.rope[1], pos)
            cos, sin = tables[L.rope]
            q = np.ascontiguousarray(self._rotate(q, cos, sin), np.float32)
            keys[:, slot] = self._rotate(k, cos, sin)
            values[:, slot] = v
            self._attend(q, keys, values, n, b["attn"])
            attn = self._mv(L.o, b["attn"], b["o"])

            if not L.ffw_norms:  # Gemma 1: the post-attention norm is the pre-MLP norm
                x = x + attn
                m = np.ascontiguousarray(self._rms(x, L.norm_post_attn), np.float32)
                x = x + self._mlp(L, m)
            else:
                x = x + self._rms(attn, L.norm_post_attn)
                m = np.ascontiguousarray(self._rms(x, L.norm_pre_ffw), np.float32)
                x = x + self._rms(self._mlp(L, m), L.norm_post_ffw)
        return np.ascontiguousarray(self._rms(x, self.final_norm), np.float32)

    def _mlp(self, L: _Layer, m: np.ndarray) -> np.ndarray:
        b = self.buf
        gate = self._mv(L.gate, m, b["gate"])
        up = self._mv(L.up, m, b["up"])
        act = np.ascontiguousarray(0.5 * gate * (1.0 + np.tanh(np.float32(_GELU_C) * (gate + np.float32(0.044715) * gate ** 3))) * up,
                                   np.float32)
        return self._mv(L.down, act, b["down"])
