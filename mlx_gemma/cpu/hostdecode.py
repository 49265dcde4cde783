"""One-row decoding on the host: a decode step of a float32 model as llama.cpp runs it on a CPU.

A decode step for one sequence multiplies one activation row by every weight matrix. MLX's CPU
backend sends those products to `cblas_sgemm`, which for one row runs near half the machine's
read bandwidth (measured on a 2-core x86: 19-21 GB/s over the 270M's 400 MB of layer weights,
against 37 GB/s for `cblas_sgemv` in the same OpenBLAS). Between the products a decode step has
only vector work on a few thousand numbers, which numpy does in microseconds. So `HostDecoder`
runs the whole step on the host: every weight product is a `cblas_sgemv` in the OpenBLAS MLX
itself uses (`runtime.blas_sgemv`; a second BLAS, numpy's, would keep a second pool of
spinning threads), over zero-copy views of the model's weights, and the norms, RoPE, attention
and GeGLU are numpy on preallocated vectors. The keys and values are written in place into the
model's own KV-cache buffers (`KVCache.host_buffers`: the cache owns when they must be private
copies), so the MLX paths (prefill, batched decoding, speculative verification) keep working on
the same cache before and after.

Quantized weights (MLX's affine 4/8-bit format, what `mlx-gemma quantize` writes) go through
`native.qgemv`, a small C kernel compiled for the machine at first use: it reads the codes once
and converts them in registers, where MLX's CPU `quantized_matmul` loops one scalar at a time.

`host_paths(model)` is the seam the decode step asks: a HostDecoder where the backend policy has
the host step on (mlx_gemma.cpu.calibrate measured it faster here, or a test forced it) and the
model is one this module covers exactly, else None (and the same for the one-row LM head).

It covers what the MLX path computes for a float32 Gemma 1/2/3 (GQA, soft-caps, q/k norms,
sliding-window rings, per-layer RoPE bases and linear scaling; dense or affine-quantized
products, LoRA adapters applied unfused) and declines (`HostDecoder.of` returns None) anything
else: per-row adapters (the server's), LoRA in training mode, biases, other dtypes or
quantization modes, no native kernel for a quantized model, and any model whose config or modules
carry what Gemma 3n / 4 add (per-layer inputs, shared KV layers, per-layer head sizes, MoE,
AltUp, LAuReL, layer scalars, `x * w` norms): it checks those fields and the module tree, not
the model type's name.
The logits equal the MLX path's up to float32 summation order (tests compare them, and greedy
token ids, on every Gemma variant).
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..backend import policy
from ..model import softcap
from ..numerics import GELU_C, GELU_CUBIC, norm_scale, rope_inv_freq
from .native import qgemv
from .runtime import NO_TRANS, ROW_MAJOR, TRANS, blas_sgemv

# Config fields of Gemma 3n / 4 (transformers' names) that change the computation when set: a
# model with any of them truthy is not the network this decoder computes.
FOREIGN_FIELDS = ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "num_kv_shared_layers",
                  "global_head_dim", "attention_k_eq_v", "enable_moe_block", "num_experts", "altup_num_inputs",
                  "laurel_rank", "activation_sparsity_pattern", "use_double_wide_mlp")
# The module tree this decoder reads, by parent; any other child (a layer_scalar, a router, a
# per-layer input gate, an AltUp block) means a network it does not compute.
KNOWN_CHILDREN = {
    "model": {"model", "lm_head"},
    "body": {"embed_tokens", "layers", "norm"},
    "layer": {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
              "post_feedforward_layernorm"},
    "attn": {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"},
    "mlp": {"gate_proj", "up_proj", "down_proj"},
}


def covers(model) -> bool:
    """True when `model` is exactly the Gemma 1/2/3 network this decoder computes: none of the
    Gemma 3n / 4 config fields set, one cache per layer of uniform shape, no unknown modules."""
    cfg = model.config
    if any(getattr(cfg, name, None) for name in FOREIGN_FIELDS):
        return False
    if hasattr(cfg, "layer_cache_specs"):
        specs = cfg.layer_cache_specs()
        if any(s.source != i or s.kv_heads != cfg.num_key_value_heads or s.head_dim != cfg.head_dim
               for i, s in enumerate(specs)):
            return False
    trees = [("model", model), ("body", model.model)]
    for layer in model.model.layers:
        trees += [("layer", layer), ("attn", layer.self_attn), ("mlp", layer.mlp)]
    return all(set(module.keys()) <= KNOWN_CHILDREN[kind] for kind, module in trees)


def host_paths(model) -> tuple:
    """The seam of the decode step: (row decoder, one-row LM head) for `model`, each None where the
    backend policy has that path off (MLX's step and head run) or it does not cover the model."""
    p = policy()
    return (HostDecoder.of(model) if p.host_decode else None), (OneRowHead.of(model) if p.host_gemv else None)


def _view(a: mx.array) -> np.ndarray:
    """A zero-copy float32 numpy view of an evaluated MLX array (C-contiguous, checked)."""
    mx.eval(a)
    v = np.array(a, copy=False)
    if v.dtype != np.float32 or not v.flags.c_contiguous:
        raise ValueError("host decoding needs C-contiguous float32 weights")
    return v


class _Dense:
    """A float32 (M, N) weight: products are cblas_sgemv."""

    def __init__(self, weight: mx.array):
        self.w = _view(weight)
        self.shape = self.w.shape

    def row(self, i: int) -> np.ndarray:
        return self.w[i]


class _Affine:
    """An MLX affine-quantized (M, N) weight, 4 or 8 bits: products are native.qgemv (qgemv.c)."""

    def __init__(self, module):
        self.bits, self.group = module.bits, module.group_size
        mx.eval(module.weight)
        self.codes = np.array(module.weight, copy=False).view(np.uint8)  # little-endian: codes in order
        if not self.codes.flags.c_contiguous:
            raise ValueError("host decoding needs C-contiguous quantized weights")
        self.scales, self.biases = _view(module.scales), _view(module.biases)
        self.shape = (self.codes.shape[0], self.codes.shape[1] * 8 // self.bits)

    def row(self, i: int) -> np.ndarray:
        """Row i dequantized (an embedding lookup)."""
        b = self.codes[i]
        q = b if self.bits == 8 else np.stack([b & 15, b >> 4], axis=-1).reshape(-1)
        q = q.astype(np.float32).reshape(-1, self.group)
        return (q * self.scales[i][:, None] + self.biases[i][:, None]).reshape(-1)


class _LoRA:
    """A LoRA-wrapped linear (lora.LoRALinear, in eval mode): base product + scale * B (A x)."""

    def __init__(self, module, base):
        self.base, self.scale = base, np.float32(module.scale)
        self.a, self.b = _Dense(module.lora_A), _Dense(module.lora_B)  # (r, in), (out, r)
        self.shape = base.shape
        self.t, self.d = np.empty(self.a.shape[0], np.float32), np.empty(self.b.shape[0], np.float32)


def _product(module):
    """_Dense / _Affine / _LoRA for a bias-free linear or embedding this path computes; None for
    anything else (biases, other dtypes or quantization modes, a forced quantized_path, LoRA in
    training mode or with per-row adapters)."""
    if "lora_A" in module and "lora_B" in module and "base" in module:  # lora.LoRALinear
        base = _product(module.base)
        ok = (base is not None and not module.training and module.lora_A.dtype == mx.float32
              and module.lora_B.dtype == mx.float32)
        return _LoRA(module, base) if ok else None
    if "bias" in module or not isinstance(module, (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return None
    if "scales" not in module:
        return _Dense(module.weight) if module.weight.dtype == mx.float32 else None
    # quantized_path "kernel" / "dequantize" force MLX's own paths (tests and benchmarks compare them)
    ok = (policy().native_kernel and policy().quantized_path == "auto" and getattr(module, "mode", "affine") == "affine" and module.bits in (4, 8) and module.group_size % 32 == 0
          and module.get("biases") is not None and module.scales.dtype == mx.float32
          and module.biases.dtype == mx.float32 and module.weight.dtype == mx.uint32 and sys.byteorder == "little"
          and qgemv() is not None)
    return _Affine(module) if ok else None


def _mv(w, x: np.ndarray, out: np.ndarray, work: np.ndarray) -> np.ndarray:
    """out = w @ x for a product w (no copies): cblas_sgemv or the native quantized kernel (work:
    its scratch, 2 * N floats), plus the low-rank update of a LoRA layer."""
    M, N = w.shape
    if isinstance(w, _LoRA):
        _mv(w.base, x, out, work)
        out += w.scale * _mv(w.b, _mv(w.a, x, w.t, work), w.d, work)
    elif isinstance(w, _Dense):
        blas_sgemv()(ROW_MAJOR, NO_TRANS, M, N, 1.0, w.w.ctypes.data, N, x.ctypes.data, 1, 0.0, out.ctypes.data, 1)
    else:
        qgemv()(w.codes.ctypes.data, w.scales.ctypes.data, w.biases.ctypes.data, x.ctypes.data, out.ctypes.data,
                M, N, w.group, w.bits, work.ctypes.data)
    return out


class OneRowHead:
    """The LM head for one row on the host (CPU only, see backend.host_gemv): a cblas_sgemv in the
    OpenBLAS MLX uses over a zero-copy view of a dense head (MLX's sgemm packs the whole (V, E)
    weight every call), or the native kernel for a quantized one, into a reused buffer. Same
    logits as `model.logits` (soft-cap included) up to float32 summation order."""

    def __init__(self, model, product):
        self.product, self.cap = product, model.config.final_logit_softcapping
        self.out = np.empty(product.shape[0], np.float32)
        self.work = np.empty(2 * product.shape[1], np.float32)

    @classmethod
    def of(cls, model) -> Optional["OneRowHead"]:
        """For a dense float32 head (tied embedding or lm_head); None for other heads (MLX's own
        matmul then; a quantized head takes this path inside HostDecoder only)."""
        head = model.lm_head if "lm_head" in model else model.model.embed_tokens
        if "scales" in head or blas_sgemv() is None:
            return None
        product = _product(head)
        return None if product is None else cls(model, product)

    def __call__(self, hidden) -> mx.array:
        """hidden (1, E) MLX array, or a float32 numpy vector (E,) -> logits (1, V)."""
        if isinstance(hidden, mx.array):
            hidden = np.array(hidden[0].astype(mx.float32))
        logits = mx.array(_mv(self.product, np.ascontiguousarray(hidden, np.float32), self.out, self.work))[None]
        return softcap(logits, self.cap) if self.cap else logits


class _Layer:
    """One decoder layer's products, norm weights and what its attention needs."""

    def __init__(self, layer, config, products: list):
        self.q, self.k, self.v, self.o, self.gate, self.up, self.down = products
        attn = layer.self_attn
        self.norm_in = norm_scale(_view(layer.input_layernorm.weight))
        self.norm_post_attn = norm_scale(_view(layer.post_attention_layernorm.weight))
        self.ffw_norms = "pre_feedforward_layernorm" in layer
        if self.ffw_norms:
            self.norm_pre_ffw = norm_scale(_view(layer.pre_feedforward_layernorm.weight))
            self.norm_post_ffw = norm_scale(_view(layer.post_feedforward_layernorm.weight))
        self.qk_norm = "q_norm" in attn
        if self.qk_norm:
            self.q_norm, self.k_norm = norm_scale(_view(attn.q_norm.weight)), norm_scale(_view(attn.k_norm.weight))
        self.window = config.sliding_window if layer.is_sliding else None
        self.rope = (attn.rope_base, attn.rope_scale)


class HostDecoder:
    """The body of a one-row decode step on the host (see the module docstring).

    `decoder(cache, token, pos)` feeds `token` at position `pos` (the caches already hold
    positions < pos and have room for pos: `KVCache.reserve`), writes its keys and values into
    `cache`, and returns the final-norm hidden state, a float32 vector (E,)."""

    PRODUCTS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))

    def __init__(self, model, embed, head, layers: list):
        cfg = model.config
        self.eps = cfg.rms_norm_eps
        self.H, self.K, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.logit_cap = cfg.attn_logit_softcapping
        self.embed, self.head = embed, OneRowHead(model, head)
        self.embed_scale = np.float32(math.sqrt(cfg.hidden_size))  # rounded to float32, as the MLX path
        self.layers = [_Layer(layer, cfg, products) for layer, products in zip(model.model.layers, layers)]
        self.final_norm = norm_scale(_view(model.model.norm.weight))
        self._gemv = blas_sgemv()
        self._inv_freq = {}
        E, H, K, D, I = cfg.hidden_size, self.H, self.K, self.D, cfg.intermediate_size
        self.buf = {n: np.empty(size, np.float32) for n, size in (
            ("q", H * D), ("k", K * D), ("v", K * D), ("attn", H * D), ("o", E),
            ("gate", I), ("up", I), ("down", E))}
        self.work = np.empty(2 * max(E, H * D, I), np.float32)  # qgemv's scratch
        self.scores = np.empty(0, np.float32)

    @classmethod
    def of(cls, model) -> Optional["HostDecoder"]:
        """A HostDecoder for a float32 model whose every product (layers, embedding, LM head) is a
        plain float32 matrix or an affine 4/8-bit one (when the native kernel builds); None
        otherwise (the caller keeps the MLX path)."""
        if blas_sgemv() is None or getattr(model.config, "unit_norms", False) or not covers(model):
            return None
        embed = _product(model.model.embed_tokens)
        head = _product(model.lm_head) if "lm_head" in model else embed
        layers = [[_product(getattr(getattr(layer, a), b)) for a, b in cls.PRODUCTS] for layer in model.model.layers]
        if embed is None or head is None or any(p is None for ps in layers for p in ps):
            return None
        if model.model.norm.weight.dtype != mx.float32:
            return None
        return cls(model, embed, head, layers)

    # ---- pieces -------------------------------------------------------------------------------

    def _mv(self, w, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        return _mv(w, x, out, self.work)

    def logits(self, hidden: np.ndarray) -> mx.array:
        """The LM head on a final hidden state (E,) -> logits (1, V), soft-capped as model.logits."""
        return self.head(hidden)

    def _rms(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """mx.fast.rms_norm over the last axis: x / sqrt(mean(x^2) + eps) * w."""
        ms = np.mean(np.square(x), axis=-1, keepdims=True)
        return x * (1.0 / np.sqrt(ms + np.float32(self.eps))) * w

    def _rope_tables(self, base: float, scale: float, pos: int):
        """cos, sin (D/2,) of mx.fast.rope's non-traditional rotation at one position."""
        inv = self._inv_freq.get(base)
        if inv is None:
            inv = self._inv_freq[base] = rope_inv_freq(base, self.D)
        theta = np.float32(pos * scale) * inv
        return np.cos(theta), np.sin(theta)

    @staticmethod
    def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Rotate (heads, D) by the half-split RoPE (x[:D/2], x[D/2:] are the pairs)."""
        half = x.shape[-1] // 2
        a, b = x[:, :half], x[:, half:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

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
            self._gemv(ROW_MAJOR, NO_TRANS, n, D, self.scale, k_rows.ctypes.data, D, qh.ctypes.data, 1, 0.0,
                       scores.ctypes.data, 1)
            s = scores
            if self.logit_cap is not None:
                s = np.tanh(s / np.float32(self.logit_cap)) * np.float32(self.logit_cap)
            p = np.exp(s - s.max())
            p /= p.sum()
            p = np.ascontiguousarray(p, np.float32)
            oh = out[h * D:(h + 1) * D]
            self._gemv(ROW_MAJOR, TRANS, n, D, 1.0, v_rows.ctypes.data, D, p.ctypes.data, 1, 0.0, oh.ctypes.data, 1)

    # ---- the step -----------------------------------------------------------------------------

    def __call__(self, cache: list, token: int, pos: int) -> np.ndarray:
        b = self.buf
        H, K, D = self.H, self.K, self.D
        x = self.embed.row(token) * self.embed_scale
        tables = {}
        for i, (L, c) in enumerate(zip(self.layers, cache)):
            keys, values = c.host_buffers()  # writable, private to the cache (see its docstring)
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
        inner = np.float32(GELU_C) * (gate + np.float32(GELU_CUBIC) * gate ** 3)
        act = np.ascontiguousarray(0.5 * gate * (1.0 + np.tanh(inner)) * up, np.float32)
        return self._mv(L.down, act, b["down"])
