"""The Gemma network (Gemma 1, 2, 3, 3n and 4 text) in MLX: one implementation, switched by GemmaConfig.

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
- Gemma 4 and 3n (transformers' Gemma4Text* / Gemma3nText* classes) scale norms by w itself,
  RMS-normalise v without a scale, use attention scale 1, and let the last layers reuse the
  keys/values of an earlier layer (`kv_source`); both feed every layer a per-layer embedding.
  Gemma 4 adds per-kind head sizes, k == v, proportional partial RoPE on global layers, a
  `layer_scalar`, a double-wide MLP on shared layers and the MoE block (moe.py). Gemma 3n adds
  AltUp (several hidden streams: predict before a layer, correct after), LAuReL (a low-rank
  side path) and Gaussian top-k activation sparsity. These are modules switched on by config
  fields, so one DecoderLayer still describes every version.

Shapes in comments: B batch, L new tokens, S keys (cached + new), H query heads,
K key/value heads, D head_dim, E hidden size, V vocabulary.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .backend import policy
from .cache import make_cache
from .config import GemmaConfig
from .cpu import fastmath
from .masks import causal_mask
from .moe import Experts, Router
from .numerics import norm_scale


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x²) + eps) * (1 + w) for Gemma 1-3 (w stored zero-centred, as in their
    checkpoints); * w for Gemma 4 / 3n (unit=True: w starts at 1)."""

    def __init__(self, dims: int, eps: float, unit: bool = False):
        super().__init__()
        self.weight = mx.ones((dims,)) if unit else mx.zeros((dims,))
        self.offset = 0.0 if unit else 1.0
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        # mx.fast.rms_norm accumulates in float32, like HF's x.float() upcast.
        # Gemma 1-3 store w zero-centred and scale by (1 + w); Gemma 3n / 4 store the scale itself.
        weight = self.weight if self.offset == 0.0 else norm_scale(self.weight)
        return mx.fast.rms_norm(x, weight, self.eps)


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
    fused=False computes the scores explicitly even without a cap: on some CPUs, with fastmath's
    softmax, that beats MLX's scaled_dot_product_attention, whose softmax runs a scalar exp
    (mlx_gemma.cpu.calibrate measures it per machine).
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


def proportional_rope_periods(head_dim: int, rotated: int, base: float, factor: float) -> mx.array:
    """Gemma 4's proportional RoPE as mx.fast.rope periods (head_dim / 2 of them): the first
    rotated / 2 frequency pairs use exponents over the *full* head size, the rest do not rotate
    (an infinite period: cos 1, sin 0). Not the same as rope(dims=rotated), whose exponents run
    over the rotated dims only."""
    exponents = mx.arange(0, rotated, 2, dtype=mx.float32) / head_dim
    still = mx.full(((head_dim - rotated) // 2,), mx.inf)
    return mx.concatenate([factor * base ** exponents, still])


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        E, D, K = config.hidden_size, config.layer_head_dim(layer), config.layer_kv_heads(layer)
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, K, D
        self.layer, self.kv_source = layer, config.kv_source(layer)
        # Keys/values that leave this layer for a later one, or come from an earlier one: such a
        # layer cannot be recomputed in isolation (gradient checkpointing would drop that path).
        self.kv_crosses_layers = self.kv_source != layer or any(
            config.kv_source(j) == layer for j in range(layer + 1, config.num_hidden_layers))
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.logit_cap = config.attn_logit_softcapping
        self.rope_base = config.rope_base(layer)
        self.rope_scale = config.rope_scale(layer)
        rotated = config.rope_rotated_dims(layer)
        # a leading underscore keeps the periods out of the parameters
        self._rope_periods = None if rotated is None else proportional_rope_periods(
            D, rotated, self.rope_base, config.rope_factor(layer))
        self.eps, self.v_norm = config.rms_norm_eps, config.unit_norms
        self.q_proj = nn.Linear(E, self.n_heads * D, bias=False)
        if self.kv_source == layer:  # a KV-shared layer has no key/value projections
            self.k_proj = nn.Linear(E, K * D, bias=False)
            if not config.k_eq_v(layer):
                self.v_proj = nn.Linear(E, K * D, bias=False)
        self.o_proj = nn.Linear(self.n_heads * D, E, bias=False)
        if config.has_qk_norm:
            self.q_norm = RMSNorm(D, config.rms_norm_eps, config.unit_norms)
            if self.kv_source == layer:
                self.k_norm = RMSNorm(D, config.rms_norm_eps, config.unit_norms)

    def rope(self, x: mx.array, offset) -> mx.array:
        if self._rope_periods is not None:
            return mx.fast.rope(x, self.head_dim, traditional=False, base=None, scale=1.0, offset=offset,
                                freqs=self._rope_periods)
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_base, scale=self.rope_scale,
                            offset=offset)

    def __call__(self, x: mx.array, mask, cache=None, pos: Optional[mx.array] = None, fresh: bool = False,
                 kv_store: Optional[dict] = None) -> mx.array:
        """kv_store: this forward's keys/values by layer; a KV-shared layer reads its source's
        entry (written earlier in the same forward) and owns no cache."""
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, D)
        if "q_norm" in self:
            q = self.q_norm(q)
        offset = 0 if pos is None else pos  # (B,): each row's position of its first new token
        q = self.rope(q, offset)
        if self.kv_source != self.layer:
            k, v = kv_store[self.kv_source]
        else:
            k, v = self._keys_values(x, cache, pos, fresh, offset)
            if kv_store is not None:
                kv_store[self.layer] = (k, v)
        # Cached forwards (prefill, batched decoding) take the explicit path where the CPU
        # calibration chose it; training (no cache) keeps the fused kernel and its gradient.
        fused = cache is None or not policy().explicit_attention
        out = attention(q, k, v, scale=self.scale, mask=mask, logit_cap=self.logit_cap, fused=fused)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _keys_values(self, x, cache, pos, fresh, offset):
        """This layer's keys and values (B, K, S, D), written to its cache when there is one."""
        B, L, _ = x.shape
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, K, L, D)
        # k == v (Gemma 4 global layers): the values are the keys' projection, before norm and RoPE
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3) if "v_proj" in self else k
        if "k_norm" in self:
            k = self.k_norm(k)
        if self.v_norm:  # Gemma 4 / 3n: v is RMS-normalised without a learned scale
            v = mx.fast.rms_norm(v, None, self.eps)
        k = self.rope(k, offset)
        if cache is not None:
            k, v = cache.update(k, v, pos, fresh)
        return k, v


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate x) * up x). Gemma 3n's first layers keep only the gate values
    above mean + std * Φ⁻¹(sparsity) of each token (its Gaussian top-k: `sparsity` > 0)."""

    def __init__(self, hidden_size: int, intermediate_size: int, sparsity: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.std_multiplier = NormalDist().inv_cdf(sparsity) if sparsity > 0 else None

    def __call__(self, x: mx.array) -> mx.array:
        gate = self.gate_proj(x)
        if self.std_multiplier is not None:
            mean = gate.mean(axis=-1, keepdims=True)
            std = mx.sqrt(gate.var(axis=-1, keepdims=True))  # population std, as torch's unbiased=False
            gate = nn.relu(gate - (mean + std * self.std_multiplier))
        return self.down_proj(fastmath.gelu_tanh(gate) * self.up_proj(x))


class Laurel(nn.Module):
    """Gemma 3n's learned augmented residual: x + norm(right(left(x))), a rank-r side path."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        E, r = config.hidden_size, config.laurel_rank
        self.linear_left = nn.Linear(E, r, bias=False)
        self.linear_right = nn.Linear(r, E, bias=False)
        self.post_laurel_norm = RMSNorm(E, config.rms_norm_eps, unit=True)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class AltUp(nn.Module):
    """Gemma 3n's alternating updates over n hidden streams (n, B, L, E): before a layer every
    stream is predicted from all of them (coefficients routed per token from the active stream);
    the layer runs on the active stream only; after it, each stream is corrected by the layer's
    innovation on the active one."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        E, n = config.hidden_size, config.altup_num_inputs
        self.n, self.active = n, config.altup_active_idx
        self.correct_output_scale = mx.zeros((E,))
        self.correction_coefs = nn.Linear(n, n, bias=False)
        self.prediction_coefs = nn.Linear(n, n * n, bias=False)
        self.modality_router = nn.Linear(E, n, bias=False)
        self.router_norm = RMSNorm(E, config.rms_norm_eps, unit=True)
        self.router_input_scale = 1.0 / E

    def modalities(self, x: mx.array) -> mx.array:
        """(B, L, E) -> (B, L, n) routing values in (-1, 1)."""
        routed = self.modality_router(self.router_norm(x) * self.router_input_scale)
        return mx.tanh(routed.astype(mx.float32)).astype(x.dtype)

    def predict(self, h: mx.array) -> mx.array:
        """streams (n, B, L, E) -> predicted streams: h_j + sum_i c[j, i] h_i."""
        mods = self.modalities(h[self.active])
        B, L = mods.shape[:2]
        coefs = self.prediction_coefs(mods).reshape(B, L, self.n, self.n)  # [j, i]
        mixed = h.transpose(1, 2, 3, 0) @ coefs.swapaxes(-1, -2)  # (B, L, E, n)
        return mixed.transpose(3, 0, 1, 2) + h

    def correct(self, predictions: mx.array, activated: mx.array) -> mx.array:
        """predictions (n, B, L, E) + the layer's output on the active stream -> corrected streams."""
        innovation = activated - predictions[self.active]
        coefs = self.correction_coefs(self.modalities(activated)) + 1.0  # (B, L, n)
        return predictions + innovation[None] * coefs.transpose(2, 0, 1)[..., None]


class DecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        self.is_sliding = config.is_sliding(layer)
        self.self_attn = Attention(config, layer)
        E, eps, unit = config.hidden_size, config.rms_norm_eps, config.unit_norms
        self.mlp = MLP(E, config.mlp_width(layer), config.activation_sparsity(layer))
        self.input_layernorm = RMSNorm(E, eps, unit)
        # Gemma 1 calls its pre-MLP norm post_attention_layernorm; Gemma 2/3 use that name
        # for a norm on the attention output and add two norms around the MLP.
        self.post_attention_layernorm = RMSNorm(E, eps, unit)
        if config.has_ffw_norms:
            self.pre_feedforward_layernorm = RMSNorm(E, eps, unit)
            self.post_feedforward_layernorm = RMSNorm(E, eps, unit)
        if config.enable_moe_block:
            self.router = Router(E, config.num_experts, config.top_k_experts, eps)
            self.experts = Experts(E, config.num_experts, config.moe_intermediate_size)
            self.pre_feedforward_layernorm_2 = RMSNorm(E, eps, unit)
            self.post_feedforward_layernorm_1 = RMSNorm(E, eps, unit)
            self.post_feedforward_layernorm_2 = RMSNorm(E, eps, unit)
        if config.per_layer_input_size:
            self.per_layer_input_gate = nn.Linear(E, config.per_layer_input_size, bias=False)
            self.per_layer_projection = nn.Linear(config.per_layer_input_size, E, bias=False)
            self.post_per_layer_input_norm = RMSNorm(E, eps, unit)
        if config.has_layer_scalar:
            self.layer_scalar = mx.ones((1,))
        if config.altup_num_inputs:
            self.altup = AltUp(config)
            self.laurel = Laurel(config)
            self.altup_correct_scale = config.altup_correct_scale

    def __call__(self, x: mx.array, mask, cache=None, pos: Optional[mx.array] = None, fresh: bool = False,
                 per_layer_input: Optional[mx.array] = None, kv_store: Optional[dict] = None) -> mx.array:
        """x (B, L, E) -> (B, L, E); with AltUp, streams (n, B, L, E) -> (n, B, L, E).
        per_layer_input (B, L, P): this layer's per-layer embedding (Gemma 4 / 3n)."""
        if "altup" in self:
            return self._altup_call(x, mask, cache, pos, fresh, per_layer_input, kv_store)
        attn = self.self_attn(self.input_layernorm(x), mask, cache, pos, fresh, kv_store)
        if "pre_feedforward_layernorm" not in self:  # Gemma 1
            h = residual_add(x, attn)
            return residual_add(h, self.mlp(self.post_attention_layernorm(h)))
        h = residual_add(x, self.post_attention_layernorm(attn))
        h = residual_add(h, self.post_feedforward_layernorm(self.feed_forward(h)))
        if "per_layer_input_gate" in self:
            h = residual_add(h, self.per_layer(h, per_layer_input))
        if "layer_scalar" in self:
            h = h * self.layer_scalar.astype(h.dtype)
        return h

    def feed_forward(self, h: mx.array) -> mx.array:
        """The MLP on the normed residual; with MoE, plus the experts' output (routed on the residual)."""
        out = self.mlp(self.pre_feedforward_layernorm(h))
        if "router" not in self:
            return out
        flat = h.reshape(-1, h.shape[-1])
        experts = self.experts(self.pre_feedforward_layernorm_2(flat), *self.router(flat)).reshape(h.shape)
        return self.post_feedforward_layernorm_1(out) + self.post_feedforward_layernorm_2(experts)

    def per_layer(self, h: mx.array, per_layer_input: mx.array) -> mx.array:
        """The per-layer embedding's contribution: norm(proj(gelu(gate h) * input))."""
        gated = fastmath.gelu_tanh(self.per_layer_input_gate(h)) * per_layer_input
        return self.post_per_layer_input_norm(self.per_layer_projection(gated))

    def _altup_call(self, streams, mask, cache, pos, fresh, per_layer_input, kv_store):
        """Gemma 3n: predict the streams, run attention + LAuReL + MLP on the active one, correct,
        then add the per-layer embedding's contribution to every other stream."""
        predictions = self.altup.predict(streams)
        active = predictions[self.altup.active]
        normed = self.input_layernorm(active)
        attn = self.post_attention_layernorm(self.self_attn(normed, mask, cache, pos, fresh, kv_store))
        h = (active + attn + self.laurel(normed)) * (2.0 ** -0.5)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        corrected = self.altup.correct(predictions, h)
        first = corrected[self.altup.active]
        if self.altup_correct_scale:
            first = first * self.altup.correct_output_scale
        extra = self.per_layer(first, per_layer_input)
        return mx.concatenate([corrected[:1], corrected[1:] + extra[None]], axis=0)


def matched_rms(x: mx.array, target: mx.array) -> mx.array:
    """x rescaled to the per-token root-mean-square of target (Gemma 3n's AltUp streams)."""
    target_rms = mx.sqrt(mx.mean(target * target, axis=-1, keepdims=True))
    rms = mx.sqrt(mx.maximum(mx.mean(x * x, axis=-1, keepdims=True), 1e-5))
    return x * target_rms / rms


def embedding_scale(hidden_size: int, dtype) -> mx.array:
    """sqrt(hidden_size) rounded to the activation dtype, as HF multiplies by a tensor of that dtype."""
    return mx.array(math.sqrt(hidden_size), dtype=dtype)


class GemmaModel(nn.Module):
    """Embedding, decoder layers and final norm: token ids (B, L) -> hidden states (B, L, E)."""

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        E, N, P = config.hidden_size, config.num_hidden_layers, config.per_layer_input_size
        self.embed_tokens = nn.Embedding(config.vocab_size, E)
        self.layers = [DecoderLayer(config, i) for i in range(N)]
        self.norm = RMSNorm(E, config.rms_norm_eps, config.unit_norms)
        if P:  # per-layer embeddings: one table packs every layer's P-wide slice
            self.embed_tokens_per_layer = nn.Embedding(config.vocab_size_per_layer_input, N * P)
            self.per_layer_model_projection = nn.Linear(E, N * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, config.rms_norm_eps, unit=True)
        if config.altup_num_inputs:  # Gemma 3n: streams 1..n-1 made from (and folded back into) the embedding
            self.altup_projections = [nn.Linear(E, E, bias=False) for _ in range(config.altup_num_inputs - 1)]
            self.altup_unembed_projections = [nn.Linear(E, E, bias=False) for _ in range(config.altup_num_inputs - 1)]

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
        per_layer = self.per_layer_inputs(inputs, h) if "embed_tokens_per_layer" in self else None
        masks = self.masks(h.shape[1], cache, pos, pad, segment_ids, fresh)
        if "altup_projections" in self:
            h = mx.stack([h] + [matched_rms(p(h), h) for p in self.altup_projections])  # (n, B, L, E)
        kv_store = {}  # keys/values of this forward by layer, for the KV-shared layers
        for i, layer in enumerate(self.layers):
            h = layer(h, masks[layer.is_sliding], cache[i] if cache is not None else None, pos, fresh,
                      None if per_layer is None else per_layer[:, :, i], kv_store)
        if "altup_projections" in self:
            h = mx.stack([h[0]] + [matched_rms(p(s), h[0]) for p, s in zip(self.altup_unembed_projections, h[1:])])
            h = h.mean(axis=0)
        return self.norm(h)

    def per_layer_inputs(self, inputs: mx.array, h: mx.array) -> mx.array:
        """Gemma 4 / 3n per-layer embeddings (B, L, layers, P): the token's row of the per-layer
        table (scaled by sqrt(P)) plus a normed projection of the embedding h (scaled by
        E ** -0.5), times 2 ** -0.5. Ids beyond the per-layer vocabulary read row 0 (3n's rule)."""
        B, L = inputs.shape
        N = len(self.layers)
        table = self.embed_tokens_per_layer
        ids = mx.where(inputs < table.weight.shape[0], inputs, 0)
        tokens = table(ids)
        tokens = (tokens * embedding_scale(tokens.shape[-1] // N, tokens.dtype)).reshape(B, L, N, -1)
        projected = self.per_layer_model_projection(h) * (h.shape[-1] ** -0.5)
        projected = self.per_layer_projection_norm(projected.reshape(B, L, N, -1))
        return (projected + tokens) * (2.0 ** -0.5)

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
