"""Adapter dirs <-> PEFT's LoRA format: tensor names and adapter_config.json fields.

PEFT saves a LoRA adapter as `adapter_model.safetensors` + `adapter_config.json`. Its tensor
names are the wrapped HF module's name under `base_model.model.`, then `lora_A.weight`
(r, in) / `lora_B.weight` (out, r). mlx-gemma's LoRALinear stores the same matrices as
`<module>.lora_A` / `<module>.lora_B` with HF module names, so the map is a prefix and a suffix:

    model.layers.3.self_attn.q_proj.lora_A  <->  base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight

Everything here is pure (dicts in, dicts out); mlx_gemma/lora.py does the file I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

from ..errors import UserError
from .hf import _TEXT_PREFIXES

PEFT_PREFIX = "base_model.model."
# The linear layers of a Gemma decoder layer, by their HF names ("all-linear" in PEFT's sense:
# every linear layer but the LM head).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"

_LORA_TENSOR = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.default)?\.weight$")


def to_peft(weights: dict) -> dict:
    """mlx-gemma LoRA parameters {"<module>.lora_A": a} -> PEFT tensor names."""
    out = {}
    for name, value in weights.items():
        if not name.endswith((".lora_A", ".lora_B")):
            raise ValueError(f"not a LoRA parameter: {name!r}")
        out[f"{PEFT_PREFIX}{name}.weight"] = value
    return out


def from_peft(weights: dict, source: str) -> dict:
    """PEFT tensor names -> mlx-gemma names ("<module>.lora_A"); unsupported tensors are UserErrors.

    Accepts the text-model prefixes of multimodal Gemma 3 checkpoints (`model.language_model.`)
    and the in-memory `.default` adapter name; `source` names the file in error messages.
    """
    out = {}
    for name, value in weights.items():
        m = _LORA_TENSOR.match(name)
        if m is None or not name.startswith(PEFT_PREFIX):
            raise UserError(f"{source}: tensor {name} is not a LoRA A/B matrix of a linear layer "
                            f"({_unsupported_hint(name)}); mlx-gemma loads plain LoRA adapters only")
        module = m.group("module")[len(PEFT_PREFIX):]
        for old, new in _TEXT_PREFIXES:
            if module.startswith(old):
                module = new + module[len(old):]
                break
        out[f"{module}.{m.group('which')}"] = value
    return out


def _unsupported_hint(name: str) -> str:
    if "lora_embedding" in name:
        return "a LoRA on the embedding"
    if "lora_magnitude_vector" in name:
        return "a DoRA magnitude vector"
    if "modules_to_save" in name:
        return "a fully trained module from modules_to_save"
    if name.endswith(".bias"):
        return "a trained bias"
    return "unknown tensor"


def adapter_config(targets, rank: int, alpha: float, dropout: float, layers: Optional[list],
                   base_model: Optional[str] = None) -> dict:
    """The adapter_config.json that PEFT's LoraConfig reads back for our LoRA layout."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": int(rank),
        "lora_alpha": float(alpha),
        "lora_dropout": float(dropout),
        "target_modules": sorted(targets),
        "layers_to_transform": sorted(layers) if layers is not None else None,
        "layers_pattern": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


@dataclass
class LoraSpec:
    """What an adapter_config.json asks for, in mlx-gemma's terms."""

    rank: int
    alpha: float
    dropout: float
    scale: float
    # A list of module-name suffixes (PEFT: exact name or ".<suffix>"), or a regex string
    # that must match the whole module name (PEFT ignores layers_to_transform then).
    targets: Union[list, str]
    layers: Optional[list]  # decoder layer indices, None = all
    base_model: Optional[str]

    def matches(self, module_name: str, layer: int) -> bool:
        """PEFT's rule for whether `module_name` (e.g. model.layers.3.self_attn.q_proj) gets LoRA."""
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, module_name) is not None
        hit = any(module_name == t or module_name.endswith("." + t) for t in self.targets)
        return hit and (self.layers is None or layer in self.layers)


def parse_adapter_config(raw: dict, source: str) -> LoraSpec:
    """Validate a PEFT adapter_config.json (as a dict); anything we cannot reproduce is a UserError."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a JSON object")
    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise UserError(f"{source}: peft_type is {peft_type!r}; mlx-gemma loads LoRA adapters only")
    refusals = [
        ("modules_to_save", bool(raw.get("modules_to_save")),
         "the adapter also trains whole modules (modules_to_save); merge it with PEFT instead"),
        ("use_dora", bool(raw.get("use_dora")), "DoRA adapters are not supported"),
        ("bias", raw.get("bias", "none") not in (None, "none"), "adapters that train biases are not supported"),
        ("rank_pattern", bool(raw.get("rank_pattern")), "per-module ranks (rank_pattern) are not supported"),
        ("alpha_pattern", bool(raw.get("alpha_pattern")), "per-module alphas (alpha_pattern) are not supported"),
        ("target_parameters", bool(raw.get("target_parameters")), "target_parameters is not supported"),
        ("layer_replication", bool(raw.get("layer_replication")), "layer_replication is not supported"),
        ("fan_in_fan_out", bool(raw.get("fan_in_fan_out")), "fan_in_fan_out (Conv1D layers) does not apply to Gemma"),
    ]
    for field, bad, why in refusals:
        if bad:
            raise UserError(f"{source}: {field} = {raw.get(field)!r}: {why}")
    try:
        rank = int(raw["r"])
        alpha = float(raw.get("lora_alpha", 8))
        dropout = float(raw.get("lora_dropout") or 0.0)
    except KeyError as exc:
        raise UserError(f"{source}: missing field {exc.args[0]!r}; is this a PEFT LoRA adapter_config.json?")
    except (TypeError, ValueError) as exc:
        raise UserError(f"{source}: bad r / lora_alpha / lora_dropout value ({exc})")
    if rank <= 0:
        raise UserError(f"{source}: r = {rank}; the LoRA rank must be a positive integer")
    # rsLoRA scales by alpha / sqrt(r) instead of alpha / r.
    scale = alpha / rank ** 0.5 if raw.get("use_rslora") else alpha / rank
    targets = raw.get("target_modules")
    if targets is None:
        raise UserError(f"{source}: target_modules is missing; it should list the LoRA-wrapped modules, e.g. "
                        '["q_proj", "v_proj"]')
    if targets == "all-linear":
        targets = list(ALL_LINEAR)
    elif not isinstance(targets, str):
        targets = list(targets)
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    elif layers is not None:
        layers = [int(i) for i in layers] or None
    pattern = raw.get("layers_pattern")
    if pattern and (pattern if isinstance(pattern, list) else [pattern]) != ["layers"]:
        raise UserError(f"{source}: layers_pattern = {pattern!r}; Gemma's decoder layers are named 'layers'")
    return LoraSpec(rank, alpha, dropout, scale, targets, layers, raw.get("base_model_name_or_path"))
