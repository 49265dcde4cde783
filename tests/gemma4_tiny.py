"""Tiny random Gemma 4 / Gemma 3n checkpoints built and saved by transformers (test fixtures).

Every configuration exercises what differs from Gemma 3: the sequences the tests feed (20+ tokens)
are longer than the sliding window (8); the unshared layers hold both attention kinds; norms,
`layer_scalar`, the router scale and `per_expert_scale` are set away from their defaults, so a
wrong convention (x·(1+w) for x·w, a dropped scalar) cannot pass unseen.
"""

from pathlib import Path

import numpy as np

S, F = "sliding_attention", "full_attention"

_ROPE = {
    S: {"rope_type": "default", "rope_theta": 10_000.0},
    F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}

# E2B-like: per-layer embeddings, the last 3 layers reuse KV (one of each kind), double-wide MLP on
# them, a global head size twice the local one, final soft-cap on.
E2B = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=8,
           layer_types=[S, S, F, S, S, S, F, F], num_kv_shared_layers=3, hidden_size_per_layer_input=16,
           vocab_size_per_layer_input=256, use_double_wide_mlp=True, final_logit_softcapping=30.0,
           max_position_embeddings=256, rope_parameters=_ROPE)
# MoE: experts beside the dense MLP on every layer, k == v on global layers with their own KV-head count.
MOE = dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
           attention_k_eq_v=True, sliding_window=8, layer_types=[S, S, F, S, S, F],
           hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=4, top_k_experts=2,
           moe_intermediate_size=32, max_position_embeddings=256, rope_parameters=_ROPE)
# Gemma 3n: AltUp (4 streams), LAuReL, Gaussian top-k sparsity on the first two layers, per-layer
# MLP widths, KV sharing of the last two layers, a per-layer vocabulary smaller than the main one.
GEMMA3N = dict(vocab_size=256, hidden_size=64, intermediate_size=[96, 96, 128, 128, 96, 96], num_hidden_layers=6,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
               layer_types=[S, F, S, S, F, S], num_kv_shared_layers=2, hidden_size_per_layer_input=8,
               vocab_size_per_layer_input=200, laurel_rank=8, altup_num_inputs=4,
               activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0], final_logit_softcapping=30.0,
               max_position_embeddings=256,
               rope_parameters={S: {"rope_type": "default", "rope_theta": 10_000.0},
                                F: {"rope_type": "default", "rope_theta": 1_000_000.0}})

# The 12B "unified" model's text stack: no per-layer embeddings, no MoE; here with k == v and KV sharing.
UNIFIED = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
               attention_k_eq_v=True, sliding_window=8, layer_types=[S, S, F, S, S, F], num_kv_shared_layers=2,
               use_double_wide_mlp=True, final_logit_softcapping=30.0, max_position_embeddings=256,
               rope_parameters=_ROPE)

KINDS = ("gemma4_e2b", "gemma4_moe", "gemma4_multimodal", "gemma4_unified", "gemma3n")


def make_hf_model(kind, seed=0, **overrides):
    """A transformers model of one of KINDS with random weights (eval mode, eager attention);
    overrides replace fields of the text config (e.g. vocab_size)."""
    import torch
    import transformers as tf

    if kind == "gemma4_e2b":
        config = tf.Gemma4TextConfig(**{**E2B, **overrides})
        cls = tf.Gemma4ForCausalLM
    elif kind == "gemma4_moe":
        config = tf.Gemma4TextConfig(**{**MOE, **overrides})
        cls = tf.Gemma4ForCausalLM
    elif kind == "gemma4_multimodal":
        text = {**E2B, "num_hidden_layers": 6, "layer_types": [S, S, F, S, S, F], "num_kv_shared_layers": 2,
                **overrides}
        config = tf.Gemma4Config(text_config=text, vision_config=None, audio_config=None)
        cls = tf.Gemma4ForConditionalGeneration
    elif kind == "gemma4_unified":
        config = tf.Gemma4UnifiedConfig(text_config={**UNIFIED, **overrides}, vision_config=None, audio_config=None)
        cls = tf.Gemma4UnifiedForConditionalGeneration
    elif kind == "gemma3n":
        config = tf.Gemma3nTextConfig(**{**GEMMA3N, **overrides})
        cls = tf.Gemma3nForCausalLM
    else:
        raise ValueError(kind)
    config._attn_implementation = "eager"
    if hasattr(config, "text_config") and config.text_config is not None:
        config.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize(model)
    return model


def _scale_like(name):
    """Parameters that multiply activations (norm weights, scalars): random around 1, not at 1."""
    return (name.endswith("norm.weight") or name.endswith("layer_scalar") or name.endswith("router.scale")
            or name.endswith("per_expert_scale") or name.endswith("correct_output_scale"))


def randomize(model):
    import torch

    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or "rotary" in name or name.endswith(("embed_scale", "inv_freq")):
                continue
            if name.endswith(("input_scale", "projection_scale")):
                continue  # constant buffers of 3n (not saved)
            if _scale_like(name):
                p.copy_(1.0 + torch.randn_like(p) * 0.3)
            else:
                p.copy_(torch.randn_like(p) * 0.08)


def save(model, path: Path):
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def random_ids(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, size=shape).astype(np.int64)


def vocab_of(model):
    cfg = model.config.get_text_config()
    return cfg.vocab_size
