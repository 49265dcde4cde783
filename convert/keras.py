"""Keras (KerasHub / KerasNLP) Gemma checkpoints -> HF parameter names and an HF config.json dict.

Two forms are read, with h5py only (neither Keras nor a backend is needed):
- a preset dir, as `save_to_preset` writes it and Kaggle ships it: config.json (the backbone's
  Keras config: class_name GemmaBackbone, Gemma3Backbone, Gemma3nBackbone or Gemma4Backbone),
  model.weights.h5 (or a sharded model.weights.json + model_NNNNN.weights.h5),
  assets/tokenizer/vocabulary.spm (the SentencePiece model; the preset's tokenizer.json is Keras'
  layer config, not HF's);
- a `.weights.h5` file as `model.save_weights` writes it (a backbone or a CausalLM task, LoRA
  already merged by Keras on save), with the vocabulary and the architecture given separately:
  a size from `SIZES` or a preset's config.json.

What the layout table below encodes (read from keras_hub 0.32's Gemma layers):
- h5 paths follow the Python objects, not the Keras layer names: decoder blocks are
  `gemma_decoder_block`, `gemma_decoder_block_1`, ... (`gemma3_decoder_block...` for Gemma 3,
  `gemma4_text_decoder_block...` for Gemma 4) in layer order, the embedding
  `reversible_embedding`, the final norm the last `rms_normalization[_N]`; each variable is
  `<object path>/vars/<index>`.
- attention kernels are einsum kernels per head: query (heads, hidden, head_dim), key / value
  (kv_heads, hidden, head_dim), output (heads, head_dim, hidden). HF's q_proj is
  (heads * head_dim, hidden), head-major, so q = kernel.transpose(0, 2, 1).reshape(-1, hidden).
- Gemma 1/2 rotate q and k with the half-split RoPE HF uses, then interleave the two halves; the
  same permutation on q and k leaves every score unchanged, so no weight permutation is needed.
- MLP kernels are (in, out); HF stores (out, in). Gemma 1/2's `intermediate_dim` counts gate and
  up together (twice HF's intermediate_size); Gemma 3's and 4's do not.
- norm scales are stored as HF stores them and copied as is: zero-centred, applied as
  x * (1 + scale), in Gemma 1-3; applied as x * scale (starting at 1) in Gemma 4.
- the embedding is tied (ReversibleEmbedding, tie_weights=True); its soft cap is the final
  logit soft cap.
- `query_head_dim_normalize=False` (Gemma 2 27B, Gemma 3 27B) means scores scaled by
  (hidden / heads) ** -0.5, as keras_hub's own HF exporter writes it (query_pre_attn_scalar);
  keras_hub 0.32's decoder blocks ignore the flag and always use head_dim. Gemma 4 scales by 1.
- Gemma 4 adds: a `layer_scalar` per block (a 0-d variable, HF (1,)); global layers with their own
  head size (`global_head_dim`) and, when `num_global_key_value_heads` is set, their own KV heads
  with k == v (no value kernel: keras_hub ties the two options together); KV-shared blocks (the
  last `num_kv_shared_layers`) without key / value / key-norm variables and, with
  `use_double_wide_mlp`, a 2x wide MLP; per-layer embeddings (`embedding`, `dense` and the first
  `rms_normalization` at the top, three variables per block); the MoE block, whose experts keep
  gate and up apart as (experts, hidden, inner) where HF stacks them as `gate_up_proj`
  (experts, 2 * inner, hidden).
- Gemma 3n (Gemma3nBackbone): keras_hub names the text model's variables after HF's, under
  `gemma3n_multimodal_embedding_processor/language_model/`, with Dense kernels (in, out); its
  config uses HF's field names but for `text_vocab_size` / `text_hidden_size`, a float
  `rope_scaling` and `final_logit_soft_cap`. KV-shared blocks keep unused k / v variables, which
  are dropped on load as for HF checkpoints.

`hf_config` and `hf_weights` are pure functions over dicts; `read_checkpoint` does the I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..config import FULL, SLIDING, GemmaConfig
from ..errors import UserError

# Kaggle's / KerasHub's Gemma text architectures, as Keras backbone configs, for a bare
# .weights.h5 file (`size=`). vocabulary_size comes from the embedding in the file. The guide's
# export script calls Gemma 1's sizes plain "2b" / "7b".
_GEMMA2 = dict(use_post_ffw_norm=True, use_post_attention_norm=True, attention_logit_soft_cap=50.0,
               final_logit_soft_cap=30.0, use_sliding_window_attention=True, sliding_window_size=4096)
_GEMMA3 = dict(use_post_ffw_norm=True, use_post_attention_norm=True, use_query_key_norm=True,
               use_sliding_window_attention=True)
SIZES = {
    "gemma_2b": ("GemmaBackbone", dict(num_layers=18, num_query_heads=8, num_key_value_heads=1, hidden_dim=2048,
                                       intermediate_dim=32768, head_dim=256)),
    "gemma_7b": ("GemmaBackbone", dict(num_layers=28, num_query_heads=16, num_key_value_heads=16, hidden_dim=3072,
                                       intermediate_dim=49152, head_dim=256)),
    "gemma2_2b": ("GemmaBackbone", dict(num_layers=26, num_query_heads=8, num_key_value_heads=4, hidden_dim=2304,
                                        intermediate_dim=18432, head_dim=256, **_GEMMA2)),
    "gemma2_9b": ("GemmaBackbone", dict(num_layers=42, num_query_heads=16, num_key_value_heads=8, hidden_dim=3584,
                                        intermediate_dim=28672, head_dim=256, **_GEMMA2)),
    "gemma2_27b": ("GemmaBackbone", dict(num_layers=46, num_query_heads=32, num_key_value_heads=16, hidden_dim=4608,
                                         intermediate_dim=73728, head_dim=128, query_head_dim_normalize=False,
                                         **_GEMMA2)),
    "gemma3_270m": ("Gemma3Backbone", dict(num_layers=18, num_query_heads=4, num_key_value_heads=1, hidden_dim=640,
                                           intermediate_dim=2048, head_dim=256, sliding_window_size=512, **_GEMMA3)),
    "gemma3_1b": ("Gemma3Backbone", dict(num_layers=26, num_query_heads=4, num_key_value_heads=1, hidden_dim=1152,
                                         intermediate_dim=6912, head_dim=256, sliding_window_size=512, **_GEMMA3)),
    "gemma3_4b": ("Gemma3Backbone", dict(num_layers=34, num_query_heads=8, num_key_value_heads=4, hidden_dim=2560,
                                         intermediate_dim=10240, head_dim=256, sliding_window_size=1024,
                                         global_rope_scaling_factor=8.0, **_GEMMA3)),
    "gemma3_12b": ("Gemma3Backbone", dict(num_layers=48, num_query_heads=16, num_key_value_heads=8, hidden_dim=3840,
                                          intermediate_dim=15360, head_dim=256, sliding_window_size=1024,
                                          global_rope_scaling_factor=8.0, **_GEMMA3)),
    "gemma3_27b": ("Gemma3Backbone", dict(num_layers=62, num_query_heads=32, num_key_value_heads=16,
                                          hidden_dim=5376, intermediate_dim=21504, head_dim=128,
                                          query_head_dim_normalize=False, sliding_window_size=1024,
                                          global_rope_scaling_factor=8.0, **_GEMMA3)),
}
SIZE_ALIASES = {"2b": "gemma_2b", "7b": "gemma_7b"}

_REQUIRED = ("vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads", "hidden_dim",
             "intermediate_dim", "head_dim")
# The Keras backbones of text Gemmas our model runs.
_BACKBONES = ("GemmaBackbone", "Gemma3Backbone", "Gemma3nBackbone", "Gemma4Backbone")
# HF model_type -> the h5 name of its Keras decoder blocks.
_BLOCKS = {"gemma": "gemma_decoder_block", "gemma2": "gemma_decoder_block", "gemma3_text": "gemma3_decoder_block",
           "gemma4_text": "gemma4_text_decoder_block"}

# One decoder block: Keras object path + variable index -> (HF name under model.layers.{i}., layout).
_LAYER_TABLE = {
    "pre_attention_norm/0": ("input_layernorm.weight", "copy"),
    "post_attention_norm/0": ("post_attention_layernorm.weight", "copy"),
    "pre_ffw_norm/0": ("pre_feedforward_layernorm.weight", "copy"),  # Gemma 1: see _GEMMA1_NAMES
    "post_ffw_norm/0": ("post_feedforward_layernorm.weight", "copy"),
    "attention/query_dense/0": ("self_attn.q_proj.weight", "heads_in"),
    "attention/key_dense/0": ("self_attn.k_proj.weight", "heads_in"),
    "attention/value_dense/0": ("self_attn.v_proj.weight", "heads_in"),
    "attention/output_dense/0": ("self_attn.o_proj.weight", "heads_out"),
    "attention/query_norm/0": ("self_attn.q_norm.weight", "copy"),
    "attention/key_norm/0": ("self_attn.k_norm.weight", "copy"),
    "gating_ffw/0": ("mlp.gate_proj.weight", "transpose"),
    "gating_ffw_2/0": ("mlp.up_proj.weight", "transpose"),
    "ffw_linear/0": ("mlp.down_proj.weight", "transpose"),
    # Gemma 4
    "0": ("layer_scalar", "scalar"),  # the block's own variable
    "per_layer_input_gate/0": ("per_layer_input_gate.weight", "transpose"),
    "per_layer_up_proj/0": ("per_layer_projection.weight", "transpose"),
    "post_per_layer_input_norm/0": ("post_per_layer_input_norm.weight", "copy"),
    "pre_ffw_norm_moe/0": ("pre_feedforward_layernorm_2.weight", "copy"),
    "post_ffw_norm_dense/0": ("post_feedforward_layernorm_1.weight", "copy"),
    "post_ffw_norm_moe_path/0": ("post_feedforward_layernorm_2.weight", "copy"),
    "moe_router/0": ("router.scale", "copy"),
    "moe_router/proj/0": ("router.proj.weight", "transpose"),
    # gate and up are stacked into HF's experts.gate_up_proj once all are read (_stack_experts)
    "moe_expert_bank/0": ("experts.gate_proj", "experts"),
    "moe_expert_bank/1": ("experts.up_proj", "experts"),
    "moe_expert_bank/2": ("experts.down_proj", "experts"),
    "moe_expert_bank/3": ("router.per_expert_scale", "copy"),
}
# Multimodal presets carry image / audio encoders beside the text backbone; they are not read.
_TOWER_PREFIXES = ("gemma3_vision_encoder/", "gemma4_vision_encoder/", "gemma4_audio_encoder/")
# Gemma 3n: keras_hub names its text model's variables after HF's (Dense kernels (in, out)), under
# one root; decoder blocks are transformer_layers/gemma3n_text_decoder_block[_i], AltUp's projection
# lists altup[_unembed]_projections/dense[_j]. Keras suffix -> HF name (2-D kernels are transposed).
_GEMMA3N_ROOT = "gemma3n_multimodal_embedding_processor/language_model/"
_GEMMA3N_TOP = {
    "embed_tokens/embedding/0": "model.embed_tokens.weight",
    "embed_tokens_per_layer/embedding/0": "model.embed_tokens_per_layer.weight",
    "per_layer_model_projection/0": "model.per_layer_model_projection.weight",
    "per_layer_projection_norm/0": "model.per_layer_projection_norm.weight",
    "final_normalization/0": "model.norm.weight",
}
_GEMMA3N_LAYER = {f"attention/{n}/0": f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "q_norm", "k_norm")}
_GEMMA3N_LAYER.update({f"{n}/0": f"{n}.weight" for n in (
    "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj", "input_layernorm", "post_attention_layernorm",
    "pre_feedforward_layernorm", "post_feedforward_layernorm", "altup/correction_coefs", "altup/prediction_coefs",
    "altup/modality_router", "altup/router_norm", "laurel/linear_left", "laurel/linear_right",
    "laurel/post_laurel_norm", "per_layer_input_gate", "per_layer_projection", "post_per_layer_input_norm")})
_GEMMA3N_LAYER = {k: v.replace("/", ".") for k, v in _GEMMA3N_LAYER.items()}
_GEMMA3N_LAYER["altup/0"] = "altup.correct_output_scale"
_GEMMA3N_PATHS = re.compile(r"^(?:transformer_layers/gemma3n_text_decoder_block(?:_(\d+))?/(.+)"
                            r"|altup(_unembed)?_projections/dense(?:_(\d+))?/0)$")
# Gemma3nBackbone config fields that are transformers' Gemma3nTextConfig fields under the same name.
_GEMMA3N_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                   "layer_types", "sliding_window", "rope_theta", "rope_local_base_freq", "max_position_embeddings",
                   "vocab_size_per_layer_input", "hidden_size_per_layer_input", "altup_num_inputs", "laurel_rank",
                   "altup_coef_clip", "altup_active_idx", "altup_correct_scale", "num_kv_shared_layers",
                   "pad_token_id", "rms_norm_eps")
# Gemma 1 has one norm before the MLP, which HF calls post_attention_layernorm.
_GEMMA1_NAMES = {"pre_feedforward_layernorm.weight": "post_attention_layernorm.weight"}


# -- config -------------------------------------------------------------------------------------


def hf_config(class_name: str, keras: dict, source: str = "config.json") -> dict:
    """An HF config.json dict for a Keras Gemma backbone config (`config` of the Keras config.json).

    Raises UserError, naming the field, for a backbone or an option our model cannot represent.
    """
    if class_name not in _BACKBONES:
        raise UserError(f"{source}: Keras backbone {class_name!r} is not supported; mlx-gemma reads "
                        f"{', '.join(_BACKBONES)} (Gemma 1, 2, 3 and 4 text)")
    k = dict(keras)
    if class_name == "Gemma3nBackbone":
        return _gemma3n_config(k, source)
    missing = [f for f in _REQUIRED if k.get(f) is None]
    if missing:
        raise UserError(f"{source}: the Keras backbone config has no {', '.join(missing)}; give the config.json "
                        "of the preset the weights belong to")
    n = k["num_layers"]
    out = dict(
        vocab_size=k["vocabulary_size"], hidden_size=k["hidden_dim"], num_hidden_layers=n,
        num_attention_heads=k["num_query_heads"], num_key_value_heads=k["num_key_value_heads"],
        head_dim=k["head_dim"], rms_norm_eps=k.get("layer_norm_epsilon", 1e-6),
        attn_logit_softcapping=k.get("attention_logit_soft_cap"),
        final_logit_softcapping=k.get("final_logit_soft_cap"),
        query_pre_attn_scalar=(k["head_dim"] if k.get("query_head_dim_normalize", True)
                               else k["hidden_dim"] // k["num_query_heads"]),
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, torch_dtype=_dtype_name(k.get("dtype")),
    )
    sliding = bool(k.get("use_sliding_window_attention"))
    if class_name == "Gemma4Backbone":
        _gemma4_fields(k, out, source)
        return {key: v for key, v in out.items() if v is not None}
    if class_name == "Gemma3Backbone":
        _gemma3_fields(k, out, source)
        # keras_hub: five local layers, then one global (i % 6 < 5), bases 10k local / 1M global.
        pattern = ["sliding_attention" if sliding and i % 6 < 5 else "full_attention" for i in range(n)]
    else:
        _gemma12_fields(k, out, source)
        pattern = ["sliding_attention" if sliding and i % 2 == 0 else "full_attention" for i in range(n)]
    if out["model_type"] != "gemma":
        out["layer_types"] = pattern
        out["sliding_window"] = k.get("sliding_window_size") if sliding else None
    return {key: v for key, v in out.items() if v is not None}


def _gemma12_fields(k: dict, out: dict, source: str) -> None:
    post = (bool(k.get("use_post_attention_norm")), bool(k.get("use_post_ffw_norm")))
    gemma2 = any(post) or k.get("attention_logit_soft_cap") or k.get("final_logit_soft_cap") or \
        k.get("use_sliding_window_attention")
    if gemma2 and not all(post):
        raise UserError(f"{source}: use_post_attention_norm={post[0]} with use_post_ffw_norm={post[1]} is "
                        "neither Gemma 1 nor Gemma 2; mlx-gemma supports both set (Gemma 2) or neither (Gemma 1)")
    out["model_type"] = "gemma2" if gemma2 else "gemma"
    if k["intermediate_dim"] % 2:
        raise UserError(f"{source}: intermediate_dim {k['intermediate_dim']} is odd; Gemma splits it into "
                        "two equal gate and up projections")
    out["intermediate_size"] = k["intermediate_dim"] // 2
    out["max_position_embeddings"] = 8192


def _gemma3_fields(k: dict, out: dict, source: str) -> None:
    for flag in ("use_query_key_norm", "use_post_attention_norm", "use_post_ffw_norm"):
        if not k.get(flag, flag == "use_query_key_norm"):
            raise UserError(f"{source}: {flag} is false; mlx-gemma's Gemma 3 always has it (every released "
                            "Gemma 3 does)")
    _refuse_non_causal(k, source)
    factor = float(k.get("global_rope_scaling_factor", 1.0))
    out.update(model_type="gemma3_text", intermediate_size=k["intermediate_dim"], max_position_embeddings=131072,
               rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
               rope_scaling={"rope_type": "linear", "factor": factor} if factor != 1.0 else None)


def _refuse_non_causal(k: dict, source: str) -> None:
    """Gemma 3 / 4 options outside a causal text model with global-only RoPE scaling."""
    for flag, what in (("use_bidirectional_attention", "bidirectional attention (EmbeddingGemma)"),
                       ("is_embedding_model", "an embedding model (EmbeddingGemma)")):
        if k.get(flag):
            raise UserError(f"{source}: {flag} is true: {what} is not a causal language model, which "
                            "is what mlx-gemma runs")
    if float(k.get("local_rope_scaling_factor", 1.0)) != 1.0:
        raise UserError(f"{source}: local_rope_scaling_factor {k['local_rope_scaling_factor']} is not "
                        "supported; mlx-gemma scales RoPE on global layers only")


def _gemma4_fields(k: dict, out: dict, source: str) -> None:
    """Gemma4Backbone's options as transformers' Gemma4TextConfig fields."""
    _refuse_non_causal(k, source)
    if k.get("attention_logit_soft_cap") is not None:
        raise UserError(f"{source}: attention_logit_soft_cap is {k['attention_logit_soft_cap']}; Gemma 4 "
                        "(transformers, mlx-gemma, every released preset) has no attention soft cap: set it to null")
    if not k.get("use_sliding_window_attention", True):
        raise UserError(f"{source}: use_sliding_window_attention is false; mlx-gemma's Gemma 4 limits its "
                        "sliding_attention layers to sliding_window_size, as every released Gemma 4 does")
    n, pattern = k["num_layers"], int(k.get("sliding_window_pattern") or 6)
    # keras_hub: the given layer_types, else every `pattern`-th layer global (not forcing the last).
    kinds = list(k.get("layer_types") or [FULL if i % pattern == pattern - 1 else SLIDING for i in range(n)])
    if len(kinds) != n or kinds[-1] != FULL:
        raise UserError(f"{source}: layer_types makes the last layer {kinds[-1]!r}; Gemma 4 (transformers, "
                        f"mlx-gemma) always makes it {FULL!r}: give layer_types ending in it")
    rotary = float(k.get("global_rope_partial_rotary_factor") or 1.0)
    factor = float(k.get("global_rope_scaling_factor", 1.0))
    if rotary != 1.0:  # keras_hub's partial RoPE keeps exponents over the full head: HF's proportional
        rope = {"rope_type": "proportional", "partial_rotary_factor": rotary, "factor": factor}
    else:
        rope = {"rope_type": "linear", "factor": factor} if factor != 1.0 else None
    kv_global = k.get("num_global_key_value_heads")  # keras_hub: set means k == v on global layers
    per_layer = k.get("hidden_size_per_layer_input") or 0
    out.update(
        model_type="gemma4_text", intermediate_size=k["intermediate_dim"], max_position_embeddings=131072,
        layer_types=kinds, sliding_window=k.get("sliding_window_size", 512),
        rope_theta=float(k.get("global_rope_wavelength") or 1_000_000.0),
        rope_local_base_freq=float(k.get("local_rope_wavelength") or 10_000.0), rope_scaling=rope,
        global_head_dim=k.get("global_head_dim") or k["head_dim"], attention_k_eq_v=kv_global is not None,
        num_global_key_value_heads=kv_global, num_kv_shared_layers=k.get("num_kv_shared_layers") or 0,
        hidden_size_per_layer_input=per_layer,
        vocab_size_per_layer_input=(k.get("vocab_size_per_layer_input") or k["vocabulary_size"]) if per_layer else None,
        use_double_wide_mlp=bool(k.get("use_double_wide_mlp")), enable_moe_block=bool(k.get("enable_moe_block")))
    if out["enable_moe_block"]:
        out.update(num_experts=k.get("num_experts"), top_k_experts=k.get("num_experts_per_token"),
                   moe_intermediate_size=k.get("expert_intermediate_dim"))


def _gemma3n_config(k: dict, source: str) -> dict:
    """Gemma3nBackbone's config (HF's Gemma3nTextConfig names, mostly) as a gemma3n_text config dict."""
    scaling = k.get("rope_scaling")  # keras_hub's is one number (a factor), not HF's dict
    for flag, bad, fix in (("attention_bias", bool(k.get("attention_bias")), "false"),
                           ("rope_scaling", scaling is not None and scaling != 1.0, "null (no RoPE scaling)")):
        if bad:
            raise UserError(f"{source}: {flag} is {k[flag]!r}; mlx-gemma's Gemma 3n supports {fix}, as every "
                            "released Gemma 3n has")
    if k.get("hidden_activation", "gelu_approximate") not in ("gelu_approximate", "gelu_pytorch_tanh"):
        raise UserError(f"{source}: hidden_activation {k['hidden_activation']!r} is not supported; Gemma 3n "
                        "uses the tanh GELU (gelu_approximate)")
    if k.get("final_logit_soft_cap") is None:  # transformers' Gemma 3n fills a missing cap with 30
        raise UserError(f"{source}: final_logit_soft_cap is null; mlx-gemma's Gemma 3n (as transformers') always "
                        "soft-caps its logits: give the cap (30.0 in every released Gemma 3n)")
    out = {name: k.get(name) for name in _GEMMA3N_FIELDS}
    missing = [n for n in ("text_vocab_size", "text_hidden_size", *_GEMMA3N_FIELDS[:9]) if k.get(n) is None]
    if missing:
        raise UserError(f"{source}: the Keras backbone config has no {', '.join(missing)}; give the config.json "
                        "of the preset the weights belong to")
    out.update(model_type="gemma3n_text", vocab_size=k["text_vocab_size"], hidden_size=k["text_hidden_size"],
               final_logit_softcapping=k["final_logit_soft_cap"], hidden_activation="gelu_pytorch_tanh",
               tie_word_embeddings=True, torch_dtype=_dtype_name(k.get("dtype")),
               activation_sparsity_pattern=k.get("activation_sparsity_pattern") or [0.0] * k["num_hidden_layers"])
    return {key: v for key, v in out.items() if v is not None}


def _dtype_name(policy) -> str | None:
    """The variables' dtype of a Keras dtype policy ("bfloat16", {"config": {"name": ...}}, "mixed_bfloat16")."""
    if isinstance(policy, dict):
        policy = (policy.get("config") or {}).get("name")
    if not isinstance(policy, str):
        return None
    return "float32" if policy.startswith("mixed_") else policy


# -- weights ------------------------------------------------------------------------------------


def hf_weights(variables: dict, config: dict, source: str = "weights") -> dict:
    """Keras variables {"gemma_decoder_block_1/attention/query_dense/0": array, ...} -> HF weights.

    Every variable must be in the layout table with the shape `config` (an `hf_config` dict)
    implies, and every table entry the model needs must be present; the first offending
    variable is named in a UserError.
    """
    if config["model_type"] == "gemma3n_text":
        return _gemma3n_weights(variables, source)
    expected = _expected(config)
    unknown = sorted(set(variables) - set(expected))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise UserError(f"{source}: unknown Keras variable {unknown[0]}{more}; it is not part of a "
                        f"{config['model_type']} backbone mlx-gemma can map")
    # Shapes before absences: a wrong size shows first as a mismatched shape, the clearer message.
    for key, (_, _, shape) in expected.items():
        if key in variables and tuple(variables[key].shape) != shape:
            raise UserError(f"{source}: Keras variable {key} has shape {tuple(variables[key].shape)}, expected "
                            f"{shape} from the config; the checkpoint does not match its config (or the size given)")
    missing = sorted(set(expected) - set(variables))
    if missing:
        raise UserError(f"{source}: Keras variable {missing[0]} is missing; the checkpoint does not match "
                        "its config (or the size given)")
    return _stack_experts({name: _LAYOUTS[layout](variables[key]) for key, (name, layout, _) in expected.items()})


def _expected(config: dict) -> dict:
    """{keras key: (HF name, layout, Keras shape)} for every variable of the backbone `config` describes."""
    c = GemmaConfig.from_dict(config)
    block = _BLOCKS[c.model_type]
    out = {}
    for i in range(c.num_hidden_layers):
        prefix = block if i == 0 else f"{block}_{i}"
        shapes = _layer_shapes(c, i)
        for suffix, (name, layout) in _LAYER_TABLE.items():
            if name in shapes:
                hf = _GEMMA1_NAMES.get(name, name) if c.model_type == "gemma" else name
                out[f"{prefix}/{suffix}"] = (f"model.layers.{i}.{hf}", layout, shapes[name])
    d, p = c.hidden_size, c.per_layer_input_size
    out["reversible_embedding/0"] = ("model.embed_tokens.weight", "copy", (c.vocab_size, d))
    norms = ["model.norm.weight"]
    if p:  # Gemma 4's per-layer embeddings, created before the final norm: it becomes rms_normalization_1
        n = c.num_hidden_layers
        out["embedding/0"] = ("model.embed_tokens_per_layer.weight", "copy", (c.vocab_size_per_layer_input, n * p))
        out["dense/0"] = ("model.per_layer_model_projection.weight", "transpose", (d, n * p))
        norms.insert(0, "model.per_layer_projection_norm.weight")
    for j, name in enumerate(norms):
        out["rms_normalization" + (f"_{j}" if j else "") + "/0"] = (name, "copy", (p if j < len(norms) - 1 else d,))
    return out


def _layer_shapes(c: GemmaConfig, i: int) -> dict:
    """{HF name under model.layers.{i}.: Keras shape} of the variables decoder block i holds."""
    d, heads, ff = c.hidden_size, c.num_attention_heads, c.mlp_width(i)
    hd, kv = c.layer_head_dim(i), c.layer_kv_heads(i)
    shapes = {
        "input_layernorm.weight": (d,), "pre_feedforward_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (heads, d, hd), "self_attn.o_proj.weight": (heads, hd, d),
        "mlp.gate_proj.weight": (d, ff), "mlp.up_proj.weight": (d, ff), "mlp.down_proj.weight": (ff, d),
    }
    own_kv = c.kv_source(i) == i  # KV-shared blocks hold no key / value variables
    if own_kv:
        shapes["self_attn.k_proj.weight"] = (kv, d, hd)
        if not c.k_eq_v(i):
            shapes["self_attn.v_proj.weight"] = (kv, d, hd)
    if c.has_ffw_norms:
        shapes.update({"post_attention_layernorm.weight": (d,), "post_feedforward_layernorm.weight": (d,)})
    if c.has_qk_norm:
        shapes.update({"self_attn.q_norm.weight": (hd,), **({"self_attn.k_norm.weight": (hd,)} if own_kv else {})})
    if c.has_layer_scalar:
        shapes["layer_scalar"] = ()
    if c.per_layer_input_size:
        p = c.per_layer_input_size
        shapes.update({"per_layer_input_gate.weight": (d, p), "per_layer_projection.weight": (p, d),
                       "post_per_layer_input_norm.weight": (d,)})
    if c.enable_moe_block:
        e, m = c.num_experts, c.moe_intermediate_size
        shapes.update({"router.scale": (d,), "router.proj.weight": (d, e), "router.per_expert_scale": (e,),
                       "experts.gate_proj": (e, d, m), "experts.up_proj": (e, d, m), "experts.down_proj": (e, m, d),
                       "pre_feedforward_layernorm_2.weight": (d,), "post_feedforward_layernorm_1.weight": (d,),
                       "post_feedforward_layernorm_2.weight": (d,)})
    return shapes


def _gemma3n_weights(variables: dict, source: str) -> dict:
    """Gemma 3n's Keras variables -> HF weights by _GEMMA3N_TOP / _GEMMA3N_LAYER; shapes are checked
    against the model when it is built (every tensor named)."""
    out = {}
    for key, value in variables.items():
        rest = key[len(_GEMMA3N_ROOT):] if key.startswith(_GEMMA3N_ROOT) else None
        match = _GEMMA3N_PATHS.match(rest or "")
        if rest in _GEMMA3N_TOP:
            name = _GEMMA3N_TOP[rest]
        elif match and match.group(2) in _GEMMA3N_LAYER:
            name = f"model.layers.{match.group(1) or 0}.{_GEMMA3N_LAYER[match.group(2)]}"
        elif match and match.group(2) is None:
            name = f"model.altup{match.group(3) or ''}_projections.{match.group(4) or 0}.weight"
        else:
            raise UserError(f"{source}: unknown Keras variable {key}; it is not part of a gemma3n_text backbone "
                            "mlx-gemma can map")
        out[name] = value if value.ndim != 2 or "embed_tokens" in name else value.T
    return out


def _stack_experts(weights: dict) -> dict:
    """Keras' separate expert gate / up kernels -> HF's experts.gate_up_proj (experts, 2 * inner, hidden)."""
    for name in [n for n in weights if n.endswith(".experts.gate_proj")]:
        stem = name[: -len("gate_proj")]
        weights[stem + "gate_up_proj"] = mx.concatenate([weights.pop(name), weights.pop(stem + "up_proj")], axis=1)
    return weights


def _heads_in(w):
    """(heads, hidden, head_dim) -> HF (heads * head_dim, hidden), head-major."""
    n, d, h = w.shape
    return mx.transpose(w, (0, 2, 1)).reshape(n * h, d)


def _heads_out(w):
    """(heads, head_dim, hidden) -> HF (hidden, heads * head_dim)."""
    n, h, d = w.shape
    return w.reshape(n * h, d).T


_LAYOUTS = {"copy": lambda w: w, "transpose": lambda w: w.T, "heads_in": _heads_in, "heads_out": _heads_out,
            "scalar": lambda w: w.reshape(1),  # Gemma 4's layer_scalar: 0-d in Keras, (1,) in HF
            "experts": lambda w: mx.transpose(w, (0, 2, 1))}  # (experts, in, out) -> HF (experts, out, in)


# -- files --------------------------------------------------------------------------------------


@dataclass
class KerasCheckpoint:
    config: dict  # HF config.json dict
    weights: dict  # HF name -> mx.array, in the stored dtype
    tokenizer_model: bytes  # the SentencePiece vocabulary.spm


def is_preset_dir(path: Path) -> bool:
    """A Keras preset dir: its config.json is a Keras object config (class_name + config), not HF's."""
    raw = _read_json(path / "config.json") if (path / "config.json").is_file() else None
    return isinstance(raw, dict) and "class_name" in raw and "config" in raw and "model_type" not in raw


def preset_hf_config(path) -> dict:
    """The HF config.json dict of a Keras preset dir (or of its config.json)."""
    class_name, keras = _backbone_config(path)
    return hf_config(class_name, keras, str(path))


def read_checkpoint(path, vocab=None, size: str | None = None, config=None) -> KerasCheckpoint:
    """Read a Keras Gemma preset dir, or a `.weights.h5` file with `vocab` and `size` or `config`.

    vocab: the SentencePiece vocabulary (vocabulary.spm); a preset dir has its own.
    size: a key of SIZES (or "2b" / "7b", Gemma 1); config: a Keras preset's config.json.
    """
    path = Path(path)
    if path.is_dir():
        if size is not None:
            raise UserError(f"{path} is a Keras preset dir, whose config.json gives the architecture; drop the size")
        weights_file = next((path / n for n in ("model.weights.json", "model.weights.h5") if (path / n).exists()), None)
        if weights_file is None:
            raise UserError(f"{path} has no model.weights.h5; a Keras preset dir holds config.json, "
                            "model.weights.h5 and assets/tokenizer/vocabulary.spm")
        class_name, keras = _backbone_config(config or path / "config.json")
        vocab = vocab or path / "assets" / "tokenizer" / "vocabulary.spm"
    else:
        weights_file = path
        if vocab is None:
            raise UserError(f"{path}: a Keras weights file has no tokenizer; give its vocabulary.spm "
                            "(--vocab), e.g. from the preset it was fine-tuned from")
        if (size is None) == (config is None):
            raise UserError(f"{path}: give the architecture of a Keras weights file, as a size ({', '.join(SIZES)}) "
                            "or as the preset's config.json (--config), one of them")
        class_name, keras = _size_config(size) if size is not None else _backbone_config(config)
    variables = read_variables(weights_file)
    if keras.get("vision_encoder") or keras.get("audio_encoder"):  # multimodal: we run its language model only
        variables = {k: v for k, v in variables.items() if not k.startswith(_TOWER_PREFIXES)}
    if class_name == "Gemma3nBackbone" and (keras.get("vision_encoder_config") or keras.get("audio_encoder_config")):
        variables = {k: v for k, v in variables.items() if k.startswith(_GEMMA3N_ROOT)}
    if "vocabulary_size" not in keras:  # a size: the file's embedding says
        keras["vocabulary_size"] = int(variables.get("reversible_embedding/0", np.zeros((0,))).shape[0])
    source = str(config or (path / "config.json" if path.is_dir() else size))
    hf = hf_config(class_name, keras, source)
    return KerasCheckpoint(hf, hf_weights(variables, hf, str(weights_file)), _read_vocab(Path(vocab)))


def _size_config(size: str):
    name = SIZE_ALIASES.get(size.lower(), size.lower())
    if name not in SIZES:
        raise UserError(f"unknown Keras Gemma size {size!r}; use one of {', '.join(list(SIZE_ALIASES) + list(SIZES))}")
    class_name, keras = SIZES[name]
    return class_name, dict(keras)


def _backbone_config(file):
    file = Path(file)
    if file.is_dir():
        file = file / "config.json"
    raw = _read_json(file)
    if not (isinstance(raw, dict) and isinstance(raw.get("config"), dict) and "class_name" in raw):
        raise UserError(f"{file} is not a Keras backbone config (no class_name / config); give the config.json "
                        "of a Keras preset")
    return raw["class_name"], dict(raw["config"])


def _read_json(file: Path):
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{file} not found") from None
    except ValueError as exc:
        raise UserError(f"{file}: invalid JSON ({exc})") from None


def _read_vocab(file: Path) -> bytes:
    if not file.is_file():
        raise UserError(f"{file} not found; a Keras Gemma checkpoint needs its SentencePiece vocabulary.spm")
    return file.read_bytes()


def read_variables(file) -> dict:
    """{keras key: mx.array} from a Keras .weights.h5 (or a sharded model.weights.json and its shards).

    Keys are the backbone's object paths with "/vars/" dropped ("gemma_decoder_block_1/ffw_linear/0");
    a CausalLM task file's "gemma_backbone" level, optimizer state and empty groups are skipped.
    """
    import h5py

    file = Path(file)
    if file.suffix == ".json":
        weight_map = (_read_json(file).get("weight_map") or {}).values()
        names = sorted({n for entry in weight_map for n in ([entry] if isinstance(entry, str) else entry)})
        shards = [file.with_name(n) for n in names]
    else:
        shards = [file]
    found = {}
    for shard in shards:
        try:
            with h5py.File(shard, "r") as h5:
                h5.visititems(lambda name, obj: _collect(name, obj, found, shard))
        except OSError as exc:
            raise UserError(f"{shard}: cannot read it as a Keras weights file ({exc}); is it a .weights.h5?") from None
    return _strip_task_level(found, file)


def _collect(name: str, obj, found: dict, shard: Path) -> None:
    import h5py

    if not isinstance(obj, h5py.Dataset) or not name.startswith("layers/"):
        return  # optimizer state, top-level vars
    parts = name.split("/")
    if len(parts) < 3 or parts[-2] != "vars":
        raise UserError(f"{shard}: unexpected dataset {name}; not a Keras 3 weights file")
    # "layers" levels only say "sub-layers of a functional model" (the backbone, and a task around it).
    found["/".join([p for p in parts[:-2] if p != "layers"] + parts[-1:])] = _to_mx(obj, name, shard)


def _to_mx(dataset, name: str, shard: Path) -> mx.array:
    """The stored values in their dtype; h5py has no bfloat16, Keras stores it as 2-byte opaque + attribute."""
    dtype = dataset.attrs.get("dtype")
    dtype = dtype.decode() if isinstance(dtype, bytes) else dtype
    if dtype == "bfloat16":
        return mx.array(np.frombuffer(dataset[()].tobytes(), np.uint16).reshape(dataset.shape)).view(mx.bfloat16)
    if dataset.dtype.kind != "f":
        raise UserError(f"{shard}: {name} is stored as {dtype or dataset.dtype}; quantized Keras checkpoints are "
                        "not supported, save the float weights (before model.quantize)")
    return mx.array(dataset[()])


def _strip_task_level(found: dict, file: Path) -> dict:
    """A CausalLM's weights nest the backbone one level down ("gemma_backbone/..."); the inputs have no weights."""
    backbone = re.compile(r"^(gemma(?:3n|3|4)?_backbone)/")
    nested = {k for k in found if backbone.match(k)}
    if not nested:
        return found
    others = sorted(set(found) - nested)
    if others:
        raise UserError(f"{file}: unknown Keras variable {others[0]} next to the backbone's; not a Gemma "
                        "CausalLM weights file mlx-gemma can map")
    return {backbone.sub("", k): v for k, v in found.items()}
