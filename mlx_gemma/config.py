"""One configuration for Gemma 1, 2, 3, 3n and 4 text, built from an HF `config.json`.

Field names are Hugging Face's, so a checkpoint's config.json maps onto this
dataclass directly. Version differences are fields, not version branches:
soft-capping (Gemma 2), q/k-norm (Gemma 3), the sliding-window layer pattern,
the local RoPE base and the post-attention / feed-forward norms; for Gemma 4 and 3n
per-layer head sizes and KV heads, KV sharing, per-layer embeddings, the MoE block,
AltUp / LAuReL and activation sparsity. Multimodal configs (`gemma3`, `gemma3n`,
`gemma4`, `gemma4_unified`) are read for their text model only.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import UserError

SLIDING, FULL = "sliding_attention", "full_attention"

# Each supported HF model_type and the HF class written into config.json `architectures` on
# export (the one table of architecture names: the GGUF converter maps onto it).
ARCHITECTURES = {
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3n_text": "Gemma3nForCausalLM",
    "gemma4_text": "Gemma4ForCausalLM",
}
# Multimodal configs: the text model's type, read from `text_config` (vision/audio towers skipped).
MULTIMODAL = {"gemma3": "gemma3_text", "gemma3n": "gemma3n_text", "gemma4": "gemma4_text",
              "gemma4_unified": "gemma4_text"}
# Families whose norms scale by w (weights start at 1) rather than (1 + w), with attention scale 1.
_UNIT_NORM_FAMILIES = ("gemma3n_text", "gemma4_text")
# GemmaConfig fields only Gemma 4 / 3n have (not written into a Gemma 1-3 config.json).
_GEMMA4_FIELDS = ("global_head_dim", "num_global_key_value_heads", "attention_k_eq_v", "num_kv_shared_layers",
                  "hidden_size_per_layer_input", "vocab_size_per_layer_input", "use_double_wide_mlp",
                  "enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size", "intermediate_sizes",
                  "activation_sparsity_pattern", "altup_num_inputs", "altup_active_idx", "altup_coef_clip",
                  "altup_correct_scale", "laurel_rank")
# transformers' defaults for Gemma 4 / 3n fields a config.json may leave out (its dataclass defaults).
_FAMILY_DEFAULTS = {
    "gemma4_text": dict(sliding_window=512, hidden_size_per_layer_input=256, vocab_size_per_layer_input=262_144,
                        global_head_dim=512, max_position_embeddings=131_072),
    "gemma3n_text": dict(sliding_window=512, hidden_size_per_layer_input=256, vocab_size_per_layer_input=262_144,
                         final_logit_softcapping=30.0, num_kv_shared_layers=15, laurel_rank=64,
                         altup_num_inputs=4, max_position_embeddings=32_768),
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)


@dataclass(frozen=True)
class LayerCacheSpec:
    """What one layer keeps in the KV cache; `GemmaConfig.layer_cache_specs` is the only source."""

    kv_heads: int  # key/value heads this layer's cache holds
    head_dim: int
    window: Optional[int]  # None: every position (full attention); else a ring of this many slots
    source: int  # the layer whose cache this layer reads; its own index when it owns one


@dataclass
class GemmaConfig:
    model_type: str  # "gemma" | "gemma2" | "gemma3_text"
    vocab_size: int  # 256,000 for Gemma 1/2, 262,144 for Gemma 3 text
    hidden_size: int  # residual stream width
    intermediate_size: int  # GeGLU inner width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # < num_attention_heads means GQA (1 = MQA)
    head_dim: int  # not always hidden_size / heads (Gemma 7B: 3072 / 16 = 192 but head_dim 256)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    rope_theta: float = 10_000.0  # RoPE base of global (full-attention) layers
    # RoPE base of sliding-window layers; Gemma 3 uses 10k locally and 1M globally.
    # None means "same as rope_theta" (Gemma 1/2).
    rope_local_base_freq: Optional[float] = None
    # Linear RoPE scaling ({"rope_type": "linear", "factor": 8.0} on Gemma 3 4B+), global layers only.
    rope_scaling: Optional[dict] = None
    # Attention scores are scaled by query_pre_attn_scalar ** -0.5, which differs from
    # head_dim on some sizes (Gemma 2 27B: 144). Default: head_dim.
    query_pre_attn_scalar: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None  # Gemma 2: 50.0 (tanh cap on scores)
    final_logit_softcapping: Optional[float] = None  # Gemma 2: 30.0 (tanh cap on logits)
    sliding_window: Optional[int] = None  # keys within this many positions (incl. self)
    # Per-layer attention kind; derived from sliding_window_pattern when absent.
    layer_types: Optional[list] = None
    sliding_window_pattern: Optional[int] = None  # Gemma 3: every 6th layer is global
    tie_word_embeddings: bool = True
    hidden_activation: str = "gelu_pytorch_tanh"
    bos_token_id: int = 2
    eos_token_id: Any = 1
    pad_token_id: int = 0
    torch_dtype: Optional[str] = None
    # MLX affine quantization of this checkpoint ({"group_size": 64, "bits": 4}), as mlx-lm writes it.
    quantization: Optional[dict] = None
    # -- Gemma 4 / 3n ------------------------------------------------------------------------
    # Global (full-attention) layers' head size and KV heads (Gemma 4; `per_layer_config` in configs
    # saved by transformers 5). None: the same as the sliding layers'.
    global_head_dim: Optional[int] = None
    num_global_key_value_heads: Optional[int] = None
    attention_k_eq_v: bool = False  # Gemma 4: global layers have no v_proj; v is k_proj's output
    # The last N layers compute no keys/values: each reuses those of the last earlier layer of its kind.
    num_kv_shared_layers: int = 0
    # Per-layer embeddings: a (vocab_size_per_layer_input, layers * this) table mixed with a
    # projection of the embedding, fed to every layer. None or 0: none (Gemma 1-3, Gemma 4 MoE / 12B).
    hidden_size_per_layer_input: Optional[int] = None
    vocab_size_per_layer_input: Optional[int] = None
    use_double_wide_mlp: bool = False  # Gemma 4: KV-shared layers have a 2x wide MLP
    # Gemma 4 MoE: experts beside the dense MLP on every layer (router, top-k, per-expert scale).
    enable_moe_block: bool = False
    num_experts: Optional[int] = None
    top_k_experts: Optional[int] = None
    moe_intermediate_size: Optional[int] = None
    # Gemma 3n: per-layer MLP widths (HF's intermediate_size may be a list; intermediate_size
    # then holds the first), Gaussian top-k sparsity per layer, AltUp streams and LAuReL rank.
    intermediate_sizes: Optional[list] = None
    activation_sparsity_pattern: Optional[list] = None
    altup_num_inputs: Optional[int] = None  # None: no AltUp (one hidden stream)
    altup_active_idx: int = 0
    altup_coef_clip: Optional[float] = None  # training-time clip of the coefficients (unused at inference)
    altup_correct_scale: bool = True
    laurel_rank: Optional[int] = None
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys, kept for round trips

    def __post_init__(self):
        check_field_types({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"unsupported model_type {self.model_type!r}; mlx-gemma supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.unit_norms:
            self.query_pre_attn_scalar = 1.0  # Gemma 4 / 3n: attention scale 1 (q and k are RMS-normed)
        elif self.query_pre_attn_scalar is None or self.model_type == "gemma":
            # Gemma 1 has no such field: transformers scales its scores by head_dim ** -0.5.
            self.query_pre_attn_scalar = self.head_dim
        if self.layer_types is None:
            self.layer_types = self._default_layer_types()
        if len(self.layer_types) != self.num_hidden_layers:
            raise UserError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        if SLIDING in self.layer_types and not self.sliding_window:
            raise UserError("layer_types names sliding_attention layers but sliding_window is not set")
        self._check_gemma4_fields()

    def _check_gemma4_fields(self) -> None:
        n = self.num_hidden_layers
        for name in ("intermediate_sizes", "activation_sparsity_pattern"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise UserError(f"{name} has {len(values)} entries but num_hidden_layers is {n}")
        if not 0 <= self.num_kv_shared_layers < n:
            raise UserError(f"num_kv_shared_layers must be in [0, {n - 1}], got {self.num_kv_shared_layers}")
        first = n - self.num_kv_shared_layers
        if self.num_kv_shared_layers and set(self.layer_types[first:]) - set(self.layer_types[:first]):
            raise UserError("num_kv_shared_layers: every attention kind among the shared layers needs an "
                            "unshared layer of that kind before them")
        if self.enable_moe_block and not (self.num_experts and self.top_k_experts and self.moe_intermediate_size):
            raise UserError("enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size")
        if self.altup_num_inputs is not None and not 0 <= self.altup_active_idx < self.altup_num_inputs:
            raise UserError(f"altup_active_idx must be below altup_num_inputs ({self.altup_num_inputs})")
        heads = self.num_global_key_value_heads or self.num_key_value_heads
        if self.num_attention_heads % heads:
            raise UserError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                            f"num_global_key_value_heads ({heads})")

    def _default_layer_types(self) -> list:
        n = self.num_hidden_layers
        if self.model_type in _UNIT_NORM_FAMILIES:
            return default_layer_types(self.model_type, n)
        if self.model_type == "gemma" or not self.sliding_window:
            return [FULL] * n
        if self.model_type == "gemma2":
            # Gemma 2 alternates, starting with a sliding-window layer.
            return [SLIDING if i % 2 == 0 else FULL for i in range(n)]
        pattern = self.sliding_window_pattern or 6
        return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]

    # -- derived values the network needs -------------------------------------------------

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def rope_base(self, layer: int) -> float:
        if self.is_sliding(layer) and self.rope_local_base_freq is not None:
            return float(self.rope_local_base_freq)
        return float(self.rope_theta)

    def _rope_kind(self, layer: int) -> str:
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if self.is_sliding(layer) or kind in (None, "default"):
            return "default"
        if kind not in ("linear", "proportional"):
            raise UserError(f"unsupported rope_scaling type {kind!r}; mlx-gemma supports linear and "
                            "proportional (Gemma 4) RoPE")
        return kind

    def rope_scale(self, layer: int) -> float:
        """Position multiplier for mx.fast.rope (1 / factor for linear scaling, global layers only)."""
        if self._rope_kind(layer) != "linear":
            return 1.0
        return 1.0 / float(self.rope_scaling["factor"])

    def rope_rotated_dims(self, layer: int) -> Optional[int]:
        """Gemma 4's proportional RoPE on global layers: how many of the head's dims rotate (the
        first half of them in each half of the head), with exponents over the full head size. None:
        ordinary RoPE over every dim."""
        if self._rope_kind(layer) != "proportional":
            return None
        fraction = float(self.rope_scaling.get("partial_rotary_factor", 1.0))
        return 2 * int(fraction * self.layer_head_dim(layer) // 2)

    def rope_factor(self, layer: int) -> float:
        """Proportional RoPE's period multiplier ("factor", default 1)."""
        return float((self.rope_scaling or {}).get("factor", 1.0)) if self.rope_rotated_dims(layer) else 1.0

    # -- per-layer shapes (Gemma 4 / 3n vary them by layer) ----------------------------------

    def layer_head_dim(self, layer: int) -> int:
        if not self.is_sliding(layer) and self.global_head_dim:
            return self.global_head_dim
        return self.head_dim

    def layer_kv_heads(self, layer: int) -> int:
        if not self.is_sliding(layer) and self.num_global_key_value_heads:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    def k_eq_v(self, layer: int) -> bool:
        """Gemma 4 with attention_k_eq_v: the global layers' values are their keys' projection."""
        return self.attention_k_eq_v and not self.is_sliding(layer)

    def kv_source(self, layer: int) -> int:
        """The layer whose keys/values this layer attends over: itself, or for one of the last
        num_kv_shared_layers, the last unshared layer of the same kind."""
        first = self.num_hidden_layers - self.num_kv_shared_layers
        if layer < first:
            return layer
        kind = self.layer_types[layer]
        return max(i for i in range(first) if self.layer_types[i] == kind)

    def mlp_width(self, layer: int) -> int:
        width = self.intermediate_sizes[layer] if self.intermediate_sizes else self.intermediate_size
        if self.use_double_wide_mlp and self.kv_source(layer) != layer:
            width *= 2
        return width

    def activation_sparsity(self, layer: int) -> float:
        return float(self.activation_sparsity_pattern[layer]) if self.activation_sparsity_pattern else 0.0

    @property
    def unit_norms(self) -> bool:
        """Gemma 4 / 3n: RMSNorm scales by w (weights start at 1), not (1 + w); a v-norm without scale."""
        return self.model_type in _UNIT_NORM_FAMILIES

    @property
    def has_layer_scalar(self) -> bool:
        return self.model_type == "gemma4_text"

    @property
    def per_layer_input_size(self) -> int:
        """Width of each layer's per-layer embedding (0: none)."""
        return self.hidden_size_per_layer_input or 0

    def layer_cache_specs(self) -> list:
        """One LayerCacheSpec per layer: the only place a cache layout comes from. Sliding layers
        keep a ring of `sliding_window` slots. Gemma 1-3 give every layer its own cache with the
        model's KV heads and head size; Gemma 4's global layers have their own head size and KV
        heads, and Gemma 4 / 3n's KV-shared layers read their source layer's cache (no arrays)."""
        return [LayerCacheSpec(self.layer_kv_heads(i), self.layer_head_dim(i),
                               self.sliding_window if self.is_sliding(i) else None, self.kv_source(i))
                for i in range(self.num_hidden_layers)]

    @property
    def has_ffw_norms(self) -> bool:
        """Gemma 2/3 normalise the attention output and the MLP input/output (four norms per layer)."""
        return self.model_type != "gemma"

    @property
    def has_qk_norm(self) -> bool:
        return self.model_type in ("gemma3_text", "gemma3n_text", "gemma4_text")

    @property
    def eos_token_ids(self) -> list:
        eos = self.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    # -- HF config.json ----------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict) -> "GemmaConfig":
        """Build from an HF config.json dict (transformers 4 or 5 layout). Unknown keys are kept aside."""
        data = _text_config(raw)
        if data.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"unsupported model_type {data.get('model_type')!r}; "
                f"mlx-gemma supports {', '.join(SUPPORTED_MODEL_TYPES)} (and the multimodal "
                f"{', '.join(MULTIMODAL)}, text only)"
            )
        if data["model_type"] in _UNIT_NORM_FAMILIES:
            _prepare_gemma4(data)
        _fold_rope_parameters(data)
        if "dtype" in data and "torch_dtype" not in data:
            data["torch_dtype"] = data["dtype"]
        check_field_types(data)  # before head_dim is derived from hidden_size below
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if data.get("head_dim") is None and "hidden_size" in data and "num_attention_heads" in data:
            data["head_dim"] = data["hidden_size"] // data["num_attention_heads"]
        if data.get("num_key_value_heads") is None and "num_attention_heads" in data:
            data["num_key_value_heads"] = data["num_attention_heads"]
        missing = [n for n in required if data.get(n) is None]
        if missing:
            raise UserError(f"config.json is missing required field(s): {', '.join(missing)}")
        known = {k: v for k, v in data.items() if k in names and v is not None}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict:
        """An HF config.json dict readable by transformers 4 and 5 and by mlx-lm."""
        out = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
        }
        skip = {"extra", "quantization", "rope_local_base_freq", "sliding_window_pattern", "intermediate_sizes"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                out[f.name] = getattr(self, f.name)
        if self.unit_norms:
            out.update(self._gemma4_hf_fields())
        else:  # Gemma 1-3 config.json files stay as they were
            for name in _GEMMA4_FIELDS:
                out.pop(name, None)
        if self.model_type == "gemma3_text":
            out["rope_local_base_freq"] = self.rope_local_base_freq or 10_000.0
            out["sliding_window_pattern"] = self._pattern()
        elif self.model_type == "gemma":
            # transformers 4 reads hidden_act for Gemma 1; both name the tanh GELU.
            out["hidden_act"] = self.hidden_activation
            out.pop("layer_types")
            out.pop("sliding_window", None)
            out.pop("query_pre_attn_scalar")  # Gemma 1 always scales by head_dim ** -0.5
        if self.quantization:
            out["quantization"] = dict(self.quantization)
        return {k: v for k, v in out.items() if v is not None}

    def _gemma4_hf_fields(self) -> dict:
        """Gemma 4 / 3n fields in transformers 5's layout (rope_parameters per layer kind,
        per_layer_config), plus global_head_dim / num_global_key_value_heads for readers of the
        older layout (mlx-lm)."""
        full = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        out = {
            "query_pre_attn_scalar": None,
            "rope_scaling": None,
            "rope_theta": None,
            "rope_parameters": {FULL: full, SLIDING: {"rope_type": "default",
                                                      "rope_theta": self.rope_local_base_freq or 10_000.0}},
        }
        if self.intermediate_sizes:
            out["intermediate_size"] = list(self.intermediate_sizes)
        if self.model_type == "gemma4_text":
            override = {"head_dim": self.global_head_dim or self.head_dim}
            if self.num_global_key_value_heads:
                override["num_key_value_heads"] = self.num_global_key_value_heads
            out["per_layer_config"] = {str(i): dict(override) for i, t in enumerate(self.layer_types) if t == FULL}
            out["hidden_size_per_layer_input"] = self.per_layer_input_size
            for name in ("altup_num_inputs", "altup_active_idx", "altup_coef_clip", "altup_correct_scale",
                         "laurel_rank", "activation_sparsity_pattern"):
                out[name] = None  # Gemma 3n's
        else:
            for name in ("global_head_dim", "num_global_key_value_heads", "attention_k_eq_v", "use_double_wide_mlp",
                         "enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size"):
                out[name] = None
        return out

    def _pattern(self) -> int:
        globals_ = [i for i, t in enumerate(self.layer_types) if t == FULL]
        if globals_:
            return globals_[0] + 1
        return self.num_hidden_layers + 1


# What each field annotation accepts, and how the error names it. JSON has one number type, so an
# int is a fine float; a bool is an int to Python but never a size. numpy scalars (GGUF metadata)
# register as numbers.Integral / numbers.Real.
_KINDS = {
    "int": (numbers.Integral, "an integer"),
    "float": (numbers.Real, "a number"),
    "bool": (bool, "true or false"),
    "str": (str, "a string"),
    "dict": (dict, "an object"),
    "list": (list, "a list"),
}
# Sizes the network divides by or allocates with: 0 or a negative value is never meant.
_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")


def check_field_types(values: dict) -> None:
    """Raise UserError for the first value in `values` (field name -> value, unknown names ignored)
    whose type does not match its GemmaConfig field: `hidden_size: "2048"` must not reach the
    network as a string. None is allowed where the field is Optional; floats must be finite and
    the sizes in _POSITIVE at least 1."""
    for f in dataclasses.fields(GemmaConfig):
        if f.name not in values or f.name == "extra":
            continue
        value, annotation = values[f.name], str(f.type)
        optional = annotation.startswith("Optional[")
        kind = _KINDS.get(annotation[len("Optional["):-1] if optional else annotation)
        if kind is None or (value is None and optional):
            continue
        accepted, words = kind
        if not isinstance(value, accepted) or (isinstance(value, bool) and accepted is not bool):
            raise UserError(f"{f.name} must be {words}, got {value!r} ({type(value).__name__})")
        if accepted is numbers.Real and not math.isfinite(value):
            raise UserError(f"{f.name} must be a finite number, got {value!r}")
        if f.name in _POSITIVE and value < 1:
            raise UserError(f"{f.name} must be at least 1, got {value!r}")


def _fold_rope_parameters(data: dict) -> None:
    """transformers 5 writes `rope_parameters` (per layer type for Gemma 3); fold it into the v4 fields."""
    params = data.pop("rope_parameters", None)
    if not params:
        return
    if SLIDING in params or FULL in params:
        full = params.get(FULL) or {}
        local = params.get(SLIDING) or {}
        data.setdefault("rope_theta", full.get("rope_theta"))
        if local.get("rope_theta") is not None:
            data.setdefault("rope_local_base_freq", local["rope_theta"])
        if full.get("rope_type", "default") != "default":
            data.setdefault("rope_scaling", {k: v for k, v in full.items() if k != "rope_theta"})
    else:
        data.setdefault("rope_theta", params.get("rope_theta"))
        if params.get("rope_type", "default") != "default":
            data.setdefault("rope_scaling", {k: v for k, v in params.items() if k != "rope_theta"})


def default_layer_types(model_type: str, n: int) -> list:
    """transformers' default layer kinds for Gemma 4 (5 local : 1 global, the last layer always
    global) and Gemma 3n (every 5th layer global)."""
    if model_type == "gemma3n_text":
        return [FULL if (i + 1) % 5 == 0 else SLIDING for i in range(n)]
    kinds = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)]
    kinds[-1] = FULL
    return kinds


def _text_config(raw: dict) -> dict:
    """The text model's config dict: a multimodal config's `text_config` (with its model_type
    and the outer tie_word_embeddings), or a copy of `raw` itself."""
    data = dict(raw)
    outer = data.get("model_type")
    if outer not in MULTIMODAL:
        return data
    text = dict(data.get("text_config") or {})
    text["model_type"] = MULTIMODAL[outer]
    if "tie_word_embeddings" in data:
        text.setdefault("tie_word_embeddings", data["tie_word_embeddings"])
    if outer == "gemma4_unified":
        # The unified model's text stack is Gemma 4 without per-layer embeddings and without MoE.
        text.setdefault("hidden_size_per_layer_input", 0)
        text["enable_moe_block"] = False
    return text


def skipped_towers(raw: dict) -> list:
    """Names of the non-text towers a multimodal config.json describes (vision_config, audio_config)."""
    return [name for name in ("vision_config", "audio_config") if raw.get(name)]


def _prepare_gemma4(data: dict) -> None:
    """Bring a Gemma 4 / 3n config dict (transformers 4 or 5 layout) onto GemmaConfig's fields:
    family defaults, default layer kinds, per-layer MLP widths, per_layer_config and RoPE."""
    model_type = data["model_type"]
    for key, value in _FAMILY_DEFAULTS[model_type].items():
        if data.get(key) is None:
            data[key] = value
    if data.get("use_bidirectional_attention") == "all":
        raise UserError("use_bidirectional_attention='all' (a bidirectional encoder) is not supported; "
                        "mlx-gemma runs causal text models")
    n = data.get("num_hidden_layers")
    if not isinstance(n, int):
        return  # the field check reports it
    if data.get("layer_types") is None:
        data["layer_types"] = default_layer_types(model_type, n)
    if isinstance(data.get("intermediate_size"), list):
        sizes = data["intermediate_size"]
        data["intermediate_sizes"] = list(sizes)
        data["intermediate_size"] = sizes[0] if sizes else None
    if model_type == "gemma3n_text":
        data.setdefault("altup_active_idx", 0)
        if data.get("activation_sparsity_pattern") is None:
            sparse = 10 if n > 10 else 0
            data["activation_sparsity_pattern"] = [0.95] * sparse + [0.0] * (n - sparse)
        return
    data["layer_types"] = list(data["layer_types"][:-1]) + [FULL]  # transformers forces the last one global
    _fold_per_layer_config(data)
    if data.get("rope_parameters") is None and data.get("rope_theta") is None:
        partial = data.pop("global_partial_rotary_factor", 0.25)
        data["rope_theta"] = 1_000_000.0
        data.setdefault("rope_local_base_freq", 10_000.0)
        data.setdefault("rope_scaling", {"rope_type": "proportional", "partial_rotary_factor": partial})


def _fold_per_layer_config(data: dict) -> None:
    """transformers 5 saves Gemma 4's global head size / KV heads as `per_layer_config`
    ({"5": {"head_dim": 512, "num_key_value_heads": 2}, ...}); older configs as global_head_dim
    and num_global_key_value_heads (used only with attention_k_eq_v, as transformers does)."""
    per_layer = data.pop("per_layer_config", None)
    if not per_layer:
        if not data.get("attention_k_eq_v"):
            data.pop("num_global_key_value_heads", None)
        return
    kinds = data["layer_types"]
    overrides = []
    for key, value in per_layer.items():
        try:
            index = int(key)
        except ValueError:
            raise UserError(f"per_layer_config key {key!r} is not a layer index")
        if not 0 <= index < len(kinds) or kinds[index] != FULL:
            raise UserError(f"per_layer_config overrides layer {key}, which is not a full_attention layer; "
                            "mlx-gemma supports per-kind head sizes (global_head_dim) only")
        overrides.append(dict(value or {}))
    if any(o != overrides[0] for o in overrides):
        raise UserError("per_layer_config gives the global layers different head sizes / KV heads; mlx-gemma "
                        "supports one override for every global layer")
    data["global_head_dim"] = overrides[0].get("head_dim", data.get("head_dim"))
    data["num_global_key_value_heads"] = overrides[0].get("num_key_value_heads")
