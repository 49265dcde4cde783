"""One configuration for Gemma 1, Gemma 2 and Gemma 3 text, built from an HF `config.json`.

Field names are Hugging Face's, so a checkpoint's config.json maps onto this
dataclass directly. Version differences are fields, not version branches:
soft-capping (Gemma 2), q/k-norm (Gemma 3), the sliding-window layer pattern,
the local RoPE base and the post-attention / feed-forward norms.
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
        if self.query_pre_attn_scalar is None or self.model_type == "gemma":
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

    def _default_layer_types(self) -> list:
        n = self.num_hidden_layers
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

    def rope_scale(self, layer: int) -> float:
        """Position multiplier for mx.fast.rope (1 / factor for linear scaling, global layers only)."""
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if self.is_sliding(layer) or kind in (None, "default"):
            return 1.0
        if kind != "linear":
            raise UserError(f"unsupported rope_scaling type {kind!r}; mlx-gemma supports linear scaling")
        return 1.0 / float(scaling["factor"])

    def layer_cache_specs(self) -> list:
        """One LayerCacheSpec per layer: the only place a cache layout comes from. Gemma 1-3 give
        every layer its own cache with the model's KV heads and head size; sliding layers keep a
        ring of `sliding_window` slots."""
        return [LayerCacheSpec(self.num_key_value_heads, self.head_dim,
                               self.sliding_window if self.is_sliding(i) else None, i)
                for i in range(self.num_hidden_layers)]

    @property
    def has_ffw_norms(self) -> bool:
        """Gemma 2/3 normalise the attention output and the MLP input/output (four norms per layer)."""
        return self.model_type != "gemma"

    @property
    def has_qk_norm(self) -> bool:
        return self.model_type == "gemma3_text"

    @property
    def eos_token_ids(self) -> list:
        eos = self.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    # -- HF config.json ----------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict) -> "GemmaConfig":
        """Build from an HF config.json dict (transformers 4 or 5 layout). Unknown keys are kept aside."""
        data = dict(raw)
        model_type = data.get("model_type")
        if model_type == "gemma3":
            # A multimodal Gemma 3 config: the language model is in text_config.
            text = dict(data.get("text_config") or {})
            text["model_type"] = "gemma3_text"
            data = text
        if data.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"unsupported model_type {data.get('model_type')!r}; "
                f"mlx-gemma supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
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
        skip = {"extra", "quantization", "rope_local_base_freq", "sliding_window_pattern"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                out[f.name] = getattr(self, f.name)
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
