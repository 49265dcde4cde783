"""The Gemma network (Gemma 1, 2 and 3 text) in MLX: one implementation, switched by GemmaConfig.

Module attributes carry Hugging Face's parameter names (`model.layers.0.self_attn.q_proj`),
so an HF checkpoint loads with an identity name map. Numerics follow transformers'
Gemma classes, which is what the parity tests compare against:
- RMSNorm scales by (1 + w) (the checkpoint stores w, zero-centred);
- embeddings are multiplied by sqrt(hidden_size) rounded to the activation dtype
  (bf16: 45.25 for 2048, not 45.2548);
- the GeGLU uses the tanh approximation of GELU in every version;
- Gemma 2 soft-caps attention scores and final logits with tanh;
- Gemma 3 RMS-normalises q and k per head and uses a separate RoPE base on
  sliding-window layers; linear RoPE scaling applies to global layers only.

Shapes in comments: B batch, L new tokens, S keys (cached + new), H query heads,
K key/value heads, D head_dim, E hidden size, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import fastmath
from .backend import policy
from .cache import make_cache
from .config import GemmaConfig
from .masks import causal_mask


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))  # stored zero-centred, as in the checkpoints
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        # mx.fast.rms_norm accumulates in float32, like HF's x.float() upcast.
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


def residual_add(x: mx.array, y: mx.array) -> mx.array:
    """x + y; in float16 the sum is clipped, since Gemma activations exceed its ±65504 range."""
    if x.dtype != mx.float16:
        return x + y
    limit = 65504.0
    return mx.clip(x.astype(mx.float32) + y.astype(mx.float32), -limit, limit).astype(mx.float16)


def softcap(x: mx.array, cap: float) -> mx.array:
    return fastmath.tanh(x / cap) * cap


def attention(q, k, v, *, scale: float, mask, logit_cap: Optional[float], fused: bool = True):
    """softmax(q k^T * scale [soft-capped] + mask) v with grouped KV heads.

    q: (B, H, L, D); k, v: (B, K, S, D); mask: None, "causal", or bool broadcastable to (B, 1, L, S).
    fused=False computes the scores explicitly even without a cap: on MLX's CPU backend, with
    fastmath's softmax, that is ~1.6x faster than its scaled_dot_product_attention (8.3 vs 13.5 ms
    for 4 heads x 511 x 511 x 256), whose softmax runs a scalar exp.
    """
    if logit_cap is None and fused:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    # Gemma 2: no fused kernel caps the scores, so compute them; group the H query
    # heads by their KV head instead of repeating K and V.
    B, H, L, D = q.shape
    K, S = k.shape[1], k.shape[2]
    q = q.reshape(B, K, H // K, L, D)
    scores = (q * scale) @ k[:, :, None].swapaxes(-1, -2)  # (B, K, H/K, L, S)
    if logit_cap is not None:
        scores = softcap(scores, logit_cap)
    if isinstance(mask, str):
        mask = causal_mask(mx.arange(S - L, S), mx.arange(S))
    if mask is not None:
        mask = mask.reshape(mask.shape[0] if mask.ndim == 4 else 1, 1, 1, L, S)
        scores = mx.where(mask, scores, mx.array(-math.inf, scores.dtype))
    probs = fastmath.softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype)
    out = probs @ v[:, :, None]  # (B, K, H/K, L, D)
    return out.reshape(B, H, L, D)


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        E, D = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.logit_cap = config.attn_logit_softcapping
        self.rope_base = config.rope_base(layer)
        self.rope_scale = config.rope_scale(layer)
        self.q_proj = nn.Linear(E, self.n_heads * D, bias=False)
        self.k_proj = nn.Linear(E, self.n_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(E, self.n_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(self.n_heads * D, E, bias=False)
        if config.has_qk_norm:
            self.q_norm = RMSNorm(D, config.rms_norm_eps)
            self.k_norm = RMSNorm(D, config.rms_norm_eps)

    def __call__(self, x: mx.array, mask, cache=None, pos: Optional[mx.array] = None, fresh: bool = False) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, D)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, K, L, D)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        offset = 0 if pos is None else pos  # (B,): each row's position of its first new token
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_base, scale=self.rope_scale, offset=offset)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_base, scale=self.rope_scale, offset=offset)
        if cache is not None:
            k, v = cache.update(k, v, pos, fresh)
        # Cached forwards (prefill, batched decoding) on the CPU take the explicit path; training
        # (no cache) keeps the fused kernel and its gradient.
        fused = cache is None or not policy().fast_math
        out = attention(q, k, v, scale=self.scale, mask=mask, logit_cap=self.logit_cap, fused=fused)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(fastmath.gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        self.is_sliding = config.is_sliding(layer)
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        # Gemma 1 calls its pre-MLP norm post_attention_layernorm; Gemma 2/3 use that name
        # for a norm on the attention output and add two norms around the MLP.
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        if config.has_ffw_norms:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def __call__(self, x: mx.array, mask, cache=None, pos: Optional[mx.array] = None, fresh: bool = False) -> mx.array:
        attn = self.self_attn(self.input_layernorm(x), mask, cache, pos, fresh)
        if "pre_feedforward_layernorm" not in self:  # Gemma 1
            h = residual_add(x, attn)
            return residual_add(h, self.mlp(self.post_attention_layernorm(h)))
        h = residual_add(x, self.post_attention_layernorm(attn))
        return residual_add(h, self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))))


def embedding_scale(hidden_size: int, dtype) -> mx.array:
    """sqrt(hidden_size) rounded to the activation dtype, as HF multiplies by a tensor of that dtype."""
    return mx.array(math.sqrt(hidden_size), dtype=dtype)


class GemmaModel(nn.Module):
    """Embedding, decoder layers and final norm: token ids (B, L) -> hidden states (B, L, E)."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, pos: Optional[mx.array] = None, pad=None,
                 segment_ids=None, fresh: bool = False) -> mx.array:
        """inputs (B, L) -> hidden states (B, L, E).

        With a cache (one per layer, `Gemma.make_cache`), pos (B,) is where each row's first new
        token goes; the caches must have room for pos + L (`reserve`). fresh=True says no row
        holds positions before pos (a prompt's first chunk), so sliding layers attend over the
        new keys only. Without a cache, pad (B,) hides left padding and segment_ids (B, L) keeps
        packed rows apart.
        """
        if cache is not None and pos is None:
            raise ValueError("a cached forward needs pos (B,): the position of each row's first new token")
        h = self.embed(inputs)
        masks = self.masks(h.shape[1], cache, pos, pad, segment_ids, fresh)
        for i, layer in enumerate(self.layers):
            h = layer(h, masks[layer.is_sliding], cache[i] if cache is not None else None, pos, fresh)
        return self.norm(h)

    def embed(self, inputs: mx.array) -> mx.array:
        """Token ids (B, L) -> scaled embeddings (B, L, E), the first decoder layer's input."""
        h = self.embed_tokens(inputs)
        return h * embedding_scale(self.config.hidden_size, h.dtype)

    def masks(self, L: int, cache=None, pos=None, pad=None, segment_ids=None, fresh: bool = False) -> dict:
        """One mask per attention kind (key False: global, True: sliding window)."""
        window = self.config.sliding_window
        masks = {}
        for sliding in {layer.is_sliding for layer in self.layers}:
            if cache is not None:
                layer_cache = next(c for c, l in zip(cache, self.layers) if l.is_sliding == sliding)
                masks[sliding] = layer_cache.mask(pos, L, fresh)
            elif pad is None and segment_ids is None and (not sliding or L <= window):
                masks[sliding] = "causal" if L > 1 else None
            else:
                positions = mx.arange(L)
                masks[sliding] = causal_mask(positions, positions, window if sliding else None, pad, segment_ids)
        return masks


class Gemma(nn.Module):
    """Gemma causal LM: token ids (B, L) -> logits (B, L, V). Use `model.model(...)` for hidden states."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.model = GemmaModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, pos: Optional[mx.array] = None, pad=None,
                 segment_ids=None) -> mx.array:
        return self.logits(self.model(inputs, cache, pos, pad, segment_ids))

    def logits(self, hidden: mx.array) -> mx.array:
        """LM head on final hidden states (..., E) -> (..., V), soft-capped where the config says."""
        if "lm_head" in self:
            out = self.lm_head(hidden)
        else:
            out = self.model.embed_tokens.as_linear(hidden)
        cap = self.config.final_logit_softcapping
        return softcap(out, cap) if cap else out

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self) -> list:
        """A fresh, empty KV cache per layer (`GemmaConfig.layer_cache_specs`): full for global
        layers, a window-bounded ring for sliding ones."""
        return make_cache(self.config.layer_cache_specs())
