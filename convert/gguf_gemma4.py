"""GGUF layout of Gemma 4 (`gemma4`) and Gemma 3n (`gemma3n`) text models, as llama.cpp reads it.

`convert.gguf` owns the file format (parsing, writing, tokenizer arrays); this module owns what
differs for these two families: the tensor names (gguf-py's GEMMA4 / GEMMA3N tables), the
metadata keys, the weight conventions and the configs llama.cpp cannot run.

Conventions (learned from llama.cpp's own converter and src/models/gemma4.cpp, gemma3n.cpp):
- Norm weights are stored as they are: these families scale by w, not (1 + w), and llama.cpp's
  RMSNorm multiplies by the stored tensor.
- Global layers of Gemma 4 use proportional partial RoPE. ggml's NeoX RoPE rotates pairs
  (i, i + D/2) with exponents over `rope.dimension_count`; a `rope_freqs` tensor of D/2 frequency
  divisors (1 for the rotated pairs, 1e30 for the rest) sets the unrotated pairs' frequency to
  ~0, which is exactly HF's proportional RoPE (exponents over the full head size).
- The MoE router's scale and the per-expert scale are stored as `ffn_gate_inp.scale` and
  `ffn_down_exps.scale`; the experts' gate/up stay stacked (`ffn_gate_up_exps`, gate first).
- Gemma 3n's three AltUp projections (and unembedding projections) are stacked into one 3-D tensor.
- The per-layer embedding table needs one row per token: a smaller per-layer vocabulary is padded
  with copies of row 0, which is the row HF reads for those ids (llama.cpp's converter pads with
  zeros, which changes those tokens' outputs).
"""

from __future__ import annotations

import math
import re
from statistics import NormalDist
from typing import Any

import numpy as np

from mlx_gemma.config import FULL, SLIDING, GemmaConfig
from mlx_gemma.errors import UserError

GGUF_ARCHS = {"gemma4_text": "gemma4", "gemma3n_text": "gemma3n"}
MODEL_TYPES = {v: k for k, v in GGUF_ARCHS.items()}
_HF_CLASSES = {"gemma4": "Gemma4ForCausalLM", "gemma3n": "Gemma3nForCausalLM"}

# llama.cpp's Gemma 3n graph hard-codes these (llama-hparams.h defaults it never overrides from
# the file, and models.h / gemma3n.cpp constants); configs that differ are refused on export.
GEMMA3N_FIXED = {"altup_num_inputs": 4, "altup_active_idx": 0, "laurel_rank": 64, "hidden_size_per_layer_input": 256,
                 "final_logit_softcapping": 30.0}
GEMMA3N_KV_LAYERS = 20  # llama.cpp: n_layer_kv_from_start = 20
GEMMA3N_SPARSE_LAYERS, GEMMA3N_SPARSITY = 10, 0.95  # the first 10 layers, Gaussian top-k at 0.95
UNROTATED = 1e30  # rope_freqs divisor of the pairs proportional RoPE leaves unrotated
# Gemma 4 markers llama.cpp must print, not hide, so its chat parser (common/parsers/gemma4.cpp) sees
# the thinking channel and tool calls: its converter stores them as user-defined (type 4) pieces;
# SentencePiece and transformers treat them as control (type 3) pieces, as the import restores.
GEMMA4_VISIBLE = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
                  '<|"|>')
CONTROL, USER_DEFINED = 3, 4

_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
    "model.per_layer_model_projection.weight": "per_layer_model_proj.weight",
    "model.per_layer_projection_norm.weight": "per_layer_proj_norm.weight",
}
# HF suffix after "model.layers.{i}." -> GGUF suffix after "blk.{i}.".
_LAYER = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "per_layer_input_gate.weight": "inp_gate.weight",
    "per_layer_projection.weight": "proj.weight",
    "post_per_layer_input_norm.weight": "post_norm.weight",
    # Gemma 4
    "layer_scalar": "layer_output_scale.weight",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
    "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight",
    "experts.down_proj": "ffn_down_exps.weight",
    # Gemma 3n
    "altup.correct_output_scale": "altup_correct_scale.weight",
    "altup.correction_coefs.weight": "altup_correct_coef.weight",
    "altup.prediction_coefs.weight": "altup_predict_coef.weight",
    "altup.modality_router.weight": "altup_router.weight",
    "altup.router_norm.weight": "altup_router_norm.weight",
    "laurel.linear_left.weight": "laurel_l.weight",
    "laurel.linear_right.weight": "laurel_r.weight",
    "laurel.post_laurel_norm.weight": "laurel_post_norm.weight",
}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_GLOBAL_BACK = {v: k for k, v in _GLOBAL.items()}
# Gemma 3n's AltUp projections: HF keeps altup_num_inputs - 1 matrices, GGUF one stacked tensor.
_STACKED = {"model.altup_projections": "altup_proj.weight", "model.altup_unembed_projections": "altup_unembd_proj.weight"}
_STACKED_BACK = {v: k for k, v in _STACKED.items()}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_BLK_RE = re.compile(r"blk\.(\d+)\.(.+)")


def visible_types(tokens: list, types: np.ndarray, visible: int, hidden: int) -> np.ndarray:
    """Token types with Gemma 4's visible markers (GEMMA4_VISIBLE) switched from `hidden` to `visible`."""
    types = np.array(types, dtype=np.int32)
    for i, piece in enumerate(tokens):
        if types[i] == hidden and piece in GEMMA4_VISIBLE:
            types[i] = visible
    return types


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def check_exportable(c: GemmaConfig) -> None:
    """Refuse, in one line, configs llama.cpp would run differently from HF."""
    arch = GGUF_ARCHS[c.model_type]
    hint = "; export to an HF directory instead"
    if c.hidden_activation != "gelu_pytorch_tanh":
        raise UserError(f"config hidden_activation={c.hidden_activation!r}: llama.cpp's {arch} uses the tanh GELU{hint}")
    shared = c.num_kv_shared_layers or 0
    first = c.num_hidden_layers - shared
    if shared and (first < 2 or c.layer_types[first - 1] != FULL or c.layer_types[first - 2] != SLIDING):
        # llama.cpp (llama-model.cpp, layer_reuse_cb) maps a shared sliding layer to layer first-2
        # and a shared full layer to first-1; HF maps each to the last unshared layer of its kind.
        raise UserError(f"config layer_types: llama.cpp's {arch} needs the last two layers before the "
                        f"{shared} KV-shared ones to be sliding then full (layers {first - 2}, {first - 1} are "
                        f"{c.layer_types[max(first - 2, 0)]}, {c.layer_types[max(first - 1, 0)]}){hint}")
    if arch == "gemma4":
        _check_gemma4_rope(c, hint)
    else:
        _check_gemma3n(c, hint)


def _check_gemma4_rope(c: GemmaConfig, hint: str) -> None:
    full = [i for i, t in enumerate(c.layer_types) if t == FULL]
    scaling = c.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "proportional"):
        raise UserError(f"config full-attention rope_type {kind!r}: llama.cpp's gemma4 runs default or proportional RoPE{hint}")
    if full and c.rope_factor(full[0]) != 1.0:
        raise UserError(f"config proportional RoPE factor {c.rope_factor(full[0])}: llama.cpp's gemma4 has no such factor{hint}")


def _check_gemma3n(c: GemmaConfig, hint: str) -> None:
    got = {"altup_num_inputs": c.altup_num_inputs, "altup_active_idx": c.altup_active_idx, "laurel_rank": c.laurel_rank,
           "hidden_size_per_layer_input": c.per_layer_input_size, "final_logit_softcapping": c.final_logit_softcapping}
    for key, want in GEMMA3N_FIXED.items():
        if got[key] != want:
            raise UserError(f"config {key}={got[key]}: llama.cpp fixes it at {want} for gemma3n{hint}")
    if not c.altup_correct_scale:
        raise UserError(f"config altup_correct_scale=false: llama.cpp's gemma3n always applies it{hint}")
    n, shared = c.num_hidden_layers, c.num_kv_shared_layers or 0
    if n - shared != GEMMA3N_KV_LAYERS and not (shared == 0 and n <= GEMMA3N_KV_LAYERS):
        raise UserError(f"config num_kv_shared_layers={shared} with {n} layers: llama.cpp's gemma3n computes keys/values "
                        f"in exactly the first {GEMMA3N_KV_LAYERS} layers{hint}")
    want = [GEMMA3N_SPARSITY if i < GEMMA3N_SPARSE_LAYERS else 0.0 for i in range(n)]
    if [c.activation_sparsity(i) for i in range(n)] != want:
        raise UserError(f"config activation_sparsity_pattern: llama.cpp's gemma3n fixes 0.95 on the first "
                        f"{GEMMA3N_SPARSE_LAYERS} layers and 0 after{hint}")
    widths = {c.mlp_width(i) for i in range(n)}
    if len(widths) != 1:
        raise UserError(f"config intermediate_size {sorted(widths)}: llama.cpp's gemma3n reads one MLP width for every layer{hint}")
    if (c.rope_scaling or {}).get("rope_type", "default") != "default":
        raise UserError(f"config rope scaling {c.rope_scaling}: llama.cpp's gemma3n runs default RoPE{hint}")


def gguf_tensors(tensors: dict[str, np.ndarray], c: GemmaConfig) -> dict[str, np.ndarray]:
    """HF-named float tensors of a Gemma 4 / 3n text model -> GGUF-named float32 tensors.

    Every tensor must have a GGUF name; shapes were checked by the model that produced them and
    are checked again by llama.cpp's loader. Adds gemma4's `rope_freqs`.
    """
    out: dict[str, np.ndarray] = {}
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for name, w in tensors.items():
        w = np.asarray(w, dtype=np.float32)
        if name in _GLOBAL:
            out[_GLOBAL[name]] = w
            continue
        m = _LAYER_RE.fullmatch(name)
        if m and m.group(2) in _LAYER:
            out[f"blk.{m.group(1)}.{_LAYER[m.group(2)]}"] = w
            continue
        prefix, _, rest = name.rpartition(".weight")[0].rpartition(".")
        if prefix in _STACKED and rest.isdigit():
            stacks.setdefault(prefix, {})[int(rest)] = w
            continue
        raise UserError(f"tensor {name} has no GGUF name for a {GGUF_ARCHS[c.model_type]} model")
    for prefix, parts in stacks.items():
        out[_STACKED[prefix]] = np.stack([parts[i] for i in sorted(parts)])
    table = out.get("per_layer_token_embd.weight")
    if table is not None:
        out["per_layer_token_embd.weight"] = _fit_rows(table, c.vocab_size)
    if c.model_type == "gemma4_text" and FULL in c.layer_types:
        out["rope_freqs.weight"] = _rope_freqs(c)
    if c.model_type == "gemma3n_text":
        out.update(_unused_shared_kv(c))
    return out


def _unused_shared_kv(c: GemmaConfig) -> dict[str, np.ndarray]:
    """llama.cpp's gemma3n loader requires k/v projections and k-norms on the KV-shared layers too,
    though its graph never reads them there (HF checkpoints keep such unused weights; our model
    drops them). Zeros and ones of the right shapes; the importer drops them again."""
    out = {}
    for i in range(c.num_hidden_layers - (c.num_kv_shared_layers or 0), c.num_hidden_layers):
        kv = (c.layer_kv_heads(i) * c.layer_head_dim(i), c.hidden_size)
        out[f"blk.{i}.attn_k.weight"] = np.zeros(kv, np.float32)
        out[f"blk.{i}.attn_v.weight"] = np.zeros(kv, np.float32)
        out[f"blk.{i}.attn_k_norm.weight"] = np.ones(c.layer_head_dim(i), np.float32)
    return out


def _fit_rows(table: np.ndarray, vocab: int) -> np.ndarray:
    """The per-layer table with exactly `vocab` rows: ids past its end read row 0 in HF."""
    if table.shape[0] >= vocab:
        return table[:vocab]
    return np.concatenate([table, np.repeat(table[:1], vocab - table.shape[0], axis=0)])


def _rope_freqs(c: GemmaConfig) -> np.ndarray:
    layer = c.layer_types.index(FULL)
    half = c.layer_head_dim(layer) // 2
    rotated = (c.rope_rotated_dims(layer) or 2 * half) // 2
    return np.array([1.0] * rotated + [UNROTATED] * (half - rotated), dtype=np.float32)


def add_metadata(w, c: GemmaConfig) -> None:
    """The architecture keys llama.cpp's gemma4 / gemma3n loaders read (gguf-py writer `w`)."""
    n = c.num_hidden_layers
    w.add_context_length(int(c.max_position_embeddings))
    w.add_embedding_length(int(c.hidden_size))
    w.add_block_count(n)
    widths = [int(c.mlp_width(i)) for i in range(n)]
    w.add_feed_forward_length(widths if len(set(widths)) > 1 else widths[0])
    w.add_head_count(int(c.num_attention_heads))
    w.add_head_count_kv([int(c.layer_kv_heads(i)) for i in range(n)])
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_sliding_window(int(c.sliding_window))
    w.add_sliding_window_pattern([t == SLIDING for t in c.layer_types])
    w.add_shared_kv_layers(int(c.num_kv_shared_layers or 0))
    w.add_embedding_length_per_layer_input(int(c.per_layer_input_size))
    full = [i for i in range(n) if not c.is_sliding(i)]
    w.add_rope_freq_base(float(c.rope_base(full[0]) if full else c.rope_theta))
    w.add_rope_freq_base_swa(float(c.rope_local_base_freq or 10_000.0))
    if c.final_logit_softcapping:
        w.add_final_logit_softcapping(float(c.final_logit_softcapping))
    if c.model_type == "gemma4_text":
        global_dim = c.global_head_dim or c.head_dim
        w.add_key_length(int(global_dim))
        w.add_value_length(int(global_dim))
        w.add_key_length_swa(int(c.head_dim))
        w.add_value_length_swa(int(c.head_dim))
        w.add_rope_dimension_count(int(global_dim))  # the rotated part is set by rope_freqs
        w.add_rope_dimension_count_swa(int(c.head_dim))
        if c.enable_moe_block:
            w.add_expert_count(int(c.num_experts))
            w.add_expert_used_count(int(c.top_k_experts))
            w.add_expert_feed_forward_length(int(c.moe_intermediate_size))
    else:
        w.add_key_length(int(c.head_dim))
        w.add_value_length(int(c.head_dim))
        w.add_altup_active_idx(int(c.altup_active_idx))
        w.add_altup_num_inputs(int(c.altup_num_inputs))
        w.add_activation_sparsity_scale([_std_multiplier(c.activation_sparsity(i)) for i in range(n)])


def _std_multiplier(p: float) -> float:
    """Gaussian top-k cut-off in standard deviations (what llama.cpp's converter stores)."""
    return -math.inf if p <= 0 else NormalDist().inv_cdf(p)


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------


def config_from_metadata(kv: dict[str, Any], shapes: dict[str, tuple], freqs, vocab_size: int, path: str) -> dict:
    """An HF config.json dict from the keys and tensor shapes of a gemma4 / gemma3n GGUF file.

    shapes: GGUF tensor name -> numpy shape; freqs: the rope_freqs values (gemma4) or None.
    """
    arch = kv["general.architecture"]

    def get(key, default=None):
        full = f"{arch}.{key}"
        if full in kv:
            v = kv[full]
            return v.tolist() if isinstance(v, np.ndarray) else v
        if default is None:
            raise UserError(f"{path}: GGUF metadata lacks {full}; the file is incomplete, re-convert it")
        return default

    n = int(get("block_count"))
    pattern = get("attention.sliding_window_pattern")
    if not isinstance(pattern, list) or len(pattern) != n:
        raise UserError(f"{path}: {arch}.attention.sliding_window_pattern must hold one boolean per layer ({n})")
    types = [SLIDING if p else FULL for p in pattern]
    kv_heads = _per_layer(get("attention.head_count_kv"), n)
    widths = _per_layer(get("feed_forward_length"), n)
    shared = int(get("attention.shared_kv_layers", 0))
    config: dict[str, Any] = {
        "model_type": MODEL_TYPES[arch], "architectures": [_HF_CLASSES[arch]],
        "vocab_size": vocab_size, "hidden_size": int(get("embedding_length")), "num_hidden_layers": n,
        "num_attention_heads": int(get("attention.head_count")), "layer_types": types,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(get("context_length")), "sliding_window": int(get("attention.sliding_window")),
        "num_kv_shared_layers": shared, "tie_word_embeddings": "output.weight" not in shapes,
        # gemma3n: llama.cpp applies 30 whatever the file says (GEMMA3N_FIXED)
        "final_logit_softcapping": get("final_logit_softcapping", GEMMA3N_FIXED["final_logit_softcapping"]
                                       if arch == "gemma3n" else 0.0) or None,
        "hidden_activation": "gelu_pytorch_tanh",
    }
    sliding = [i for i in range(n) if types[i] == SLIDING] or [0]
    full = [i for i in range(n) if types[i] == FULL]
    config["num_key_value_heads"] = kv_heads[sliding[0]]
    first_shared = n - shared
    per_layer = shapes.get("per_layer_proj_norm.weight")
    config["hidden_size_per_layer_input"] = per_layer[0] if per_layer else 0
    if per_layer:
        config["vocab_size_per_layer_input"] = shapes["per_layer_token_embd.weight"][0]
    rope_full = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10_000.0))}
    if arch == "gemma4":
        _gemma4_fields(config, get, shapes, freqs, kv_heads, widths, full, first_shared, rope_full)
    else:
        config["intermediate_size"] = widths
        config["head_dim"] = int(get("attention.key_length"))
        config["altup_num_inputs"] = shapes["altup_proj.weight"][0] + 1
        config["altup_active_idx"] = int(get("altup.active_idx", 0))
        config["laurel_rank"] = shapes["blk.0.laurel_l.weight"][0]
        scales = get("activation_sparsity_scale", [-math.inf] * n)
        config["activation_sparsity_pattern"] = [round(NormalDist().cdf(s), 6) for s in scales]
    config["rope_parameters"] = {FULL: rope_full, SLIDING: {"rope_type": "default",
                                                           "rope_theta": float(get("rope.freq_base_swa", 10_000.0))}}
    return config


def _gemma4_fields(config, get, shapes, freqs, kv_heads, widths, full, first_shared, rope_full) -> None:
    n = config["num_hidden_layers"]
    config["head_dim"] = int(get("attention.key_length_swa"))
    config["global_head_dim"] = int(get("attention.key_length"))
    if full:
        config["num_global_key_value_heads"] = kv_heads[full[0]]
        config["attention_k_eq_v"] = f"blk.{full[0]}.attn_v.weight" not in shapes
    base = widths[0]
    config["intermediate_size"] = base
    config["use_double_wide_mlp"] = any(widths[i] != base for i in range(first_shared, n))
    if "blk.0.ffn_gate_inp.weight" in shapes:
        config.update(enable_moe_block=True, num_experts=int(get("expert_count")),
                      top_k_experts=int(get("expert_used_count")),
                      moe_intermediate_size=int(get("expert_feed_forward_length")))
    if freqs is not None:
        rotated = int(np.sum(np.asarray(freqs) < UNROTATED / 2))
        rope_full.update(rope_type="proportional", partial_rotary_factor=2 * rotated / config["global_head_dim"])


def _per_layer(value, n: int) -> list:
    return [int(v) for v in value] if isinstance(value, list) else [int(value)] * n


def _hf_names(name: str, parts: int) -> list[str]:
    """The HF name(s) a GGUF tensor holds: one, or `parts` for a stacked AltUp tensor; [] for
    rope_freqs (folded into the config). An unknown name is an error."""
    if name == "rope_freqs.weight":
        return []
    if name in _GLOBAL_BACK:
        return [_GLOBAL_BACK[name]]
    m = _BLK_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_BACK:
        return [f"model.layers.{m.group(1)}.{_LAYER_BACK[m.group(2)]}"]
    stacked = _STACKED_BACK.get(name)
    if stacked is None:
        raise UserError(f"unexpected tensor {name} for a Gemma 4 / 3n text model")
    return [f"{stacked}.{i}.weight" for i in range(parts)]


def hf_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GGUF-named float32 tensors of a gemma4 / gemma3n file -> HF names (the inverse of
    `gguf_tensors`). Unknown names are an error."""
    out = {}
    for name, w in tensors.items():
        if name in _STACKED_BACK:
            out.update(zip(_hf_names(name, len(w)), w))
        else:
            out.update((hf, w) for hf in _hf_names(name, 1))
    return out


def hf_types(types: dict[str, str], parts: int) -> dict[str, str]:
    """GGUF name -> stored ggml type, as HF name -> type (each part of a stacked tensor has its type)."""
    return {hf: kind for name, kind in types.items() for hf in _hf_names(name, parts)}
