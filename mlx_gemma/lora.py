"""LoRA and QLoRA: a wrapper layer, injection by module name, fusing, adapters in PEFT's format.

A LoRA layer adds a low-rank update to a frozen linear layer (dense, or quantized: QLoRA):

    y = base(x) + scale * (dropout(x) @ A^T) @ B^T,   A: (r, in), B: (out, r), scale = alpha / r

with PEFT's conventions (names, shapes, init, scale), so an adapter saved here is a PEFT
adapter (`PeftModel.from_pretrained` loads it onto transformers' Gemma) and PEFT's adapters
load here. The tensor-name and config mapping lives in mlx_gemma/convert/peft.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .convert import peft as peft_format
from .convert.peft import ALL_LINEAR, CONFIG_FILE, WEIGHTS_FILE, LoraSpec
from .errors import UserError
from .files import write_atomic, write_json_atomic
from .quant.layers import dequantize_weight, replace_layers
from .quant.quantize import dequantize_model


def _is_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, nn.QuantizedLinear)


def _dims(base: nn.Module) -> tuple:
    """(out, in) of a dense or quantized linear layer; a quantized weight packs 32/bits values per uint32."""
    out_dims, packed = base.weight.shape
    return out_dims, (packed * 32 // base.bits if _is_quantized(base) else packed)


def dense_weight(base: nn.Module) -> mx.array:
    """The (out, in) weight of a linear layer, dequantized when it is quantized."""
    return dequantize_weight(base) if _is_quantized(base) else base.weight


class LoRALinear(nn.Module):
    """A frozen linear layer (`nn.Linear` or `nn.QuantizedLinear`) plus a trainable low-rank update.

    Attributes: `base` (frozen), `lora_A` (r, in), `lora_B` (out, r), `scale` = alpha / r,
    `dropout` (applied to the LoRA path's input only, in training mode).
    """

    def __init__(self, input_dims: int, output_dims: int, rank: int = 16, alpha: float = 32.0,
                 dropout: float = 0.0, scale: Optional[float] = None):
        super().__init__()
        if rank <= 0:
            raise UserError(f"LoRA rank {rank} must be a positive integer")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"LoRA dropout {dropout} must be in [0, 1)")
        self.base = nn.Linear(input_dims, output_dims, bias=False)
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = float(scale) if scale is not None else self.alpha / self.rank
        self.dropout = nn.Dropout(dropout)
        # PEFT's init: A ~ kaiming_uniform_(a=sqrt(5)), whose bound is 1/sqrt(fan_in); B = 0, so the
        # wrapped layer starts out computing exactly what the base layer computes.
        bound = 1.0 / math.sqrt(input_dims)
        self.lora_A = mx.random.uniform(-bound, bound, (rank, input_dims))
        self.lora_B = mx.zeros((output_dims, rank))

    @classmethod
    def from_base(cls, base: nn.Module, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                  scale: Optional[float] = None) -> "LoRALinear":
        """Wrap `base` (dense or quantized linear; frozen here). `scale` overrides alpha / rank (rsLoRA)."""
        if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            raise TypeError(f"LoRA wraps nn.Linear / nn.QuantizedLinear, not {type(base).__name__}")
        out_dims, in_dims = _dims(base)
        layer = cls(in_dims, out_dims, rank, alpha, dropout, scale)
        layer.base = base
        layer.base.freeze()
        return layer

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)  # (..., out)
        z = (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T  # (..., r) -> (..., out)
        return y + (self.scale * z).astype(x.dtype)

    def delta(self) -> mx.array:
        """scale * B @ A: the (out, in) update this layer adds to the base weight, in float32."""
        return self.scale * (self.lora_B.astype(mx.float32) @ self.lora_A.astype(mx.float32))

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """The merged layer W + scale * B @ A.

        Dense base: an nn.Linear in the base's dtype. Quantized base: dequantize, add, and
        requantize with the same bits / group size / mode (same class), or return the dense
        nn.Linear if `dequantize`.
        """
        base = self.base
        weight = dense_weight(base)
        dtype = weight.dtype
        out_dims, in_dims = weight.shape
        has_bias = "bias" in base
        fused = nn.Linear(in_dims, out_dims, bias=has_bias)
        fused.weight = (weight.astype(mx.float32) + self.delta()).astype(dtype)
        if has_bias:
            fused.bias = base.bias
        if _is_quantized(base) and not dequantize:
            fused = _requantize(fused, base)
        fused.freeze()
        fused.train(self.training)
        return fused


def _requantize(dense: nn.Linear, like: nn.QuantizedLinear) -> nn.Module:
    """Quantize `dense` as `like` is quantized (its class, bits, group size and mode)."""
    try:
        return type(like).from_linear(dense, like.group_size, like.bits, mode=like.mode)
    except TypeError:  # a subclass whose from_linear takes other arguments
        return nn.QuantizedLinear.from_linear(dense, like.group_size, like.bits, mode=like.mode)


# -- injecting ------------------------------------------------------------------------------


def _targets(model, spec: LoraSpec, source: str) -> list:
    """[(full name, linear)] for the decoder's linear layers that `spec` selects (PEFT's matching)."""
    if lora_layers(model):
        raise UserError("the model already has LoRA layers; fuse them first (fuse_lora) or load a fresh model")
    n_layers = len(model.model.layers)
    if spec.layers is not None:
        bad = [i for i in spec.layers if not 0 <= i < n_layers]
        if bad:
            raise UserError(f"{source}: layer {bad[0]} does not exist, this model has {n_layers} layers "
                            f"(0..{n_layers - 1}); the adapter was made for another model")
    found = []
    for i, layer in enumerate(model.model.layers):
        for rel, module in layer.named_modules():
            name = f"model.layers.{i}.{rel}"
            if isinstance(module, (nn.Linear, nn.QuantizedLinear)) and spec.matches(name, i):
                found.append((name, module))
    if not found:
        raise UserError(f"{source}: target_modules {spec.targets!r} match no linear layer of this model; "
                        f"valid names: {', '.join(ALL_LINEAR)}")
    return found


def _inject(model, spec: LoraSpec, targets: list) -> None:
    """Wrap each (name, linear) of `targets` in LoRA; freeze everything but the LoRA A/B matrices."""
    model.freeze()
    for name, linear in targets:
        lora = LoRALinear.from_base(linear, spec.rank, spec.alpha, spec.dropout, scale=spec.scale)
        lora.train(model.training)  # a new module starts in training mode; dropout must follow the model
        replace_layers(model, {name: lora})


def apply_lora(model, targets: Union[str, Sequence[str]] = ("q_proj", "k_proj", "v_proj", "o_proj"),
               rank: int = 16, alpha: float = 32.0, dropout: float = 0.05,
               num_layers: Optional[int] = None, base_model: Optional[str] = None) -> dict:
    """Wrap the `targets` linear layers of the last `num_layers` decoder layers (all if None) in LoRA.

    targets: module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or
    "all-linear". Freezes the whole model; only the LoRA A/B matrices stay trainable.
    Returns the adapter config (PEFT adapter_config.json fields) to pass to save_adapter.
    """
    if isinstance(targets, str):
        targets = list(ALL_LINEAR) if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(dict.fromkeys(targets))
    unknown = [t for t in targets if t not in ALL_LINEAR]
    if unknown or not targets:
        raise UserError(f"unknown LoRA target {unknown[0] if unknown else '(none)'!r}; valid: "
                        f"{', '.join(ALL_LINEAR)} or all-linear")
    n_layers = len(model.model.layers)
    layers = None
    if num_layers is not None:
        if not 0 < num_layers <= n_layers:
            raise UserError(f"num_layers = {num_layers}: must be between 1 and {n_layers} (this model's layers)")
        layers = list(range(n_layers - num_layers, n_layers)) if num_layers < n_layers else None
    if rank <= 0:
        raise UserError(f"LoRA rank {rank} must be a positive integer")
    spec = LoraSpec(rank, alpha, dropout, alpha / rank, targets, layers, base_model)
    _inject(model, spec, _targets(model, spec, "apply_lora"))
    return peft_format.adapter_config(targets, rank, alpha, dropout, layers, base_model)


def lora_layers(model) -> list:
    """(name, LoRALinear) for every LoRA layer in the model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model) -> dict:
    """{"model.layers.N....q_proj.lora_A": array, ...}: every LoRA matrix, flat names."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_A", ".lora_B"))}


def count_parameters(model) -> dict:
    """{"trainable": n, "total": n, "percent": p} counting weights, quantized ones unpacked to values."""
    total = 0
    for _, module in model.named_modules():
        local = {k: v for k, v in module.items() if isinstance(v, mx.array)}
        if hasattr(module, "bits") and any(k == "scales" or k.endswith("_scales") for k in local):
            # packed uint32 weights (`weight`, or MoE experts' `<name>`): 32 / bits values each;
            # scales / biases are overhead, not parameters
            for name, v in local.items():
                if f"{name}_scales" in local or (name == "weight" and "scales" in local):
                    total += v.size * 32 // module.bits
                elif name == "bias":
                    total += v.size
        else:
            total += sum(v.size for v in local.values())
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


# -- fusing ---------------------------------------------------------------------------------


def fuse_lora(model, dequantize: bool = False):
    """Replace every LoRALinear by its merged layer (a no-op without LoRA layers); returns the model.

    dequantize: return a dense model (fused layers and every other quantized layer are
    dequantized, and the config loses its `quantization` entry).
    """
    for name, layer in lora_layers(model):  # one at a time: each merged weight replaces its LoRA layer at once
        replace_layers(model, {name: layer.fuse(dequantize)})
    if dequantize:
        dequantize_model(model)  # the layers LoRA did not wrap; also clears config.quantization
    return model


# -- adapter files --------------------------------------------------------------------------


def save_adapter(model, out_dir, adapter_config: dict, extra_files: Optional[dict] = None) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` (PEFT format) into out_dir.

    Each file is written to a temp name and renamed, so an existing dir (a training run's
    checkpoints, logs) keeps its other files and never holds a half-written adapter.
    extra_files: {name: str | bytes | dict/list (written as JSON)} written the same way.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory; choose another adapter path")
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = lora_parameters(model)
    if not weights:
        raise UserError("the model has no LoRA layers to save; call apply_lora (or load_adapter) first")
    tensors = peft_format.to_peft(weights)
    mx.eval(tensors)
    write_atomic(out_dir / WEIGHTS_FILE,
                 lambda tmp: mx.save_safetensors(tmp, tensors, metadata={"format": "pt"}))
    files = {CONFIG_FILE: adapter_config, **(extra_files or {})}
    for name, content in files.items():
        if isinstance(content, (dict, list)):
            write_json_atomic(out_dir / name, content)
        else:
            write_atomic(out_dir / name, content)
    return out_dir


def read_adapter_config(adapter_dir) -> dict:
    """The adapter dir's adapter_config.json as a dict (UserError if missing or not JSON)."""
    adapter_dir = Path(adapter_dir).expanduser()
    if adapter_dir.exists() and not adapter_dir.is_dir():
        raise UserError(f"adapter {adapter_dir} is a file, not an adapter dir; pass the dir that holds "
                        f"{CONFIG_FILE} and {WEIGHTS_FILE} ({adapter_dir.parent}, if this file is one of them)")
    if not adapter_dir.is_dir():
        raise UserError(f"adapter dir {adapter_dir} not found; pass the dir that holds {CONFIG_FILE} "
                        f"and {WEIGHTS_FILE}")
    path = adapter_dir / CONFIG_FILE
    if not path.exists():
        raise UserError(f"{path} not found; an adapter dir needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: invalid JSON ({exc})")


def load_adapter(model, adapter_dir) -> dict:
    """Apply the LoRA adapter in `adapter_dir` (ours or PEFT's) to `model` and load its weights strictly.

    Returns the adapter config dict. A missing file, an unsupported PEFT feature or an adapter
    made for another model (missing layer, wrong target, shape mismatch) is a UserError that
    names the file and tensor.
    """
    adapter_dir = Path(adapter_dir).expanduser()
    raw = read_adapter_config(adapter_dir)
    spec = peft_format.parse_adapter_config(raw, str(adapter_dir / CONFIG_FILE))
    weights_path = adapter_dir / WEIGHTS_FILE
    if not weights_path.exists():
        hint = " (adapter_model.bin is PyTorch's pickle format: re-save it with safetensors)" \
            if (adapter_dir / "adapter_model.bin").exists() else ""
        raise UserError(f"{weights_path} not found{hint}; an adapter dir needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        loaded = mx.load(str(weights_path))
    except Exception as exc:  # MLX raises RuntimeError/ValueError with varied texts
        raise UserError(f"{weights_path}: cannot read safetensors ({str(exc).splitlines()[0]}); "
                        "the file is corrupt or truncated")
    source = str(weights_path)
    weights = peft_format.from_peft(loaded, source)
    targets = _targets(model, spec, str(adapter_dir / CONFIG_FILE))
    expected = {}  # what the LoRA layers will hold: A (r, in), B (out, r)
    for name, linear in targets:
        out_dims, in_dims = _dims(linear)
        expected[f"{name}.lora_A"], expected[f"{name}.lora_B"] = (spec.rank, in_dims), (out_dims, spec.rank)
    _check_adapter_weights(expected, weights, source, spec, len(targets))
    _inject(model, spec, targets)
    params = lora_parameters(model)
    model.update(tree_unflatten([(k, v.astype(params[k].dtype)) for k, v in weights.items()]))
    return raw


def _check_adapter_weights(expected: dict, weights: dict, source: str, spec: LoraSpec, n_targets: int) -> None:
    """Strict: every LoRA matrix the config implies is present with its shape, and nothing else."""
    def peft_name(name):
        return next(iter(peft_format.to_peft({name: None})))

    fix = f"load it with the model it was trained on ({spec.base_model or 'see base_model_name_or_path'})"
    for name in sorted(set(expected) & set(weights)):
        if tuple(weights[name].shape) != expected[name]:
            raise UserError(f"{source}: tensor {peft_name(name)} has shape {tuple(weights[name].shape)}, this "
                            f"model needs {expected[name]}; the adapter was made for another model: {fix}")
    for name in sorted(set(expected) - set(weights)):
        raise UserError(f"{source}: tensor {peft_name(name)} is missing, but {CONFIG_FILE} targets "
                        f"{name.rsplit('.', 1)[0]}; the adapter is incomplete or was made for another model: {fix}")
    for name in sorted(set(weights) - set(expected)):
        raise UserError(f"{source}: tensor {peft_name(name)} has no LoRA layer in this model ({n_targets} "
                        f"layers wrapped per {CONFIG_FILE}); {fix}")
