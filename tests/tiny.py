"""Tiny random Gemma checkpoints written as HF dirs by transformers itself (test fixtures)."""

from pathlib import Path

import numpy as np

TINY = {
    # Gemma 1: GQA (4 query heads over 2 KV heads), head_dim != hidden / heads.
    "gemma": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256),
    # Gemma 2: both soft-caps on, sliding window 8 < sequence length, query_pre_attn_scalar != head_dim.
    "gemma2": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                   sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   max_position_embeddings=256),
    # Gemma 3: q/k norm, two RoPE bases, pattern 3 (two local layers, one global), window 8, MQA.
    "gemma3_text": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=8, sliding_window_pattern=3, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, max_position_embeddings=256),
}


def hf_classes(model_type):
    import transformers as tf

    return {
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
        "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
    }[model_type]


def make_hf_model(model_type, seed=0, **overrides):
    """A transformers Gemma with random weights, norm weights included (they init to 0 or 1)."""
    import torch

    cfg_cls, model_cls = hf_classes(model_type)
    kwargs = {**TINY[model_type], **overrides}
    if model_type == "gemma3_text":
        pattern = kwargs.pop("sliding_window_pattern")
        n = kwargs["num_hidden_layers"]
        kwargs["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
        kwargs["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta")},
            "sliding_attention": {"rope_type": "default", "rope_theta": kwargs.pop("rope_local_base_freq")},
        }
        if "rope_scaling" in kwargs:
            kwargs["rope_parameters"]["full_attention"] = {
                **kwargs.pop("rope_scaling"), "rope_theta": kwargs["rope_parameters"]["full_attention"]["rope_theta"]}
    config = cfg_cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3)
            else:
                p.copy_(torch.randn_like(p) * 0.08)
    return model


def save_hf_model(model, path: Path, dtype=None, max_shard_size="5GB"):
    import torch

    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(path), safe_serialization=True, max_shard_size=max_shard_size)
    return path


def random_ids(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, size=shape).astype(np.int64)


def random_lora_adapter(model, out, *, seed, rank, alpha, scale, base_model=None):
    """Wrap `model` in LoRA (q/k/v/o) with B ~ N(0, scale²) instead of PEFT's zeros, so the adapter
    really changes the answers, and save it to `out` (PEFT format); returns the dir."""
    import mlx.core as mx

    from mlx_gemma.lora import apply_lora, save_adapter

    mx.random.seed(seed)
    config = apply_lora(model, rank=rank, alpha=alpha, dropout=0.0, base_model=base_model)
    for _, m in model.named_modules():
        if hasattr(m, "lora_B"):
            m.lora_B = mx.random.normal(m.lora_B.shape) * scale
    return save_adapter(model, out, config)


def randomize_peft_lora_b(peft_model, seed: int, std: float = 0.05):
    """Give a PEFT model's lora_B random values instead of PEFT's zeros (the adapter then changes
    the answers, and gradients reach lora_A too); returns the model."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * std)
    return peft_model


def greedy_alone(model, ids, n):
    """Reference: greedy ids from uncached full forward passes (no cache, no batching)."""
    import mlx.core as mx

    seq = list(ids)
    for _ in range(n):
        seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1]).item()))
    return seq[len(ids):]


class NoStops:
    """A stand-in tokenizer for tiny random models, whose vocabularies have no text: no stop ids
    (every answer runs to max_tokens), one byte per token, prompts given as token ids."""

    stop_ids = ()

    def token_bytes(self, token_id, skip_special=False):
        return b"x"

    def is_special(self, token_id):
        return False
