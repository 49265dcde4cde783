"""Model-level quantization: quantize / dequantize a loaded Gemma, the per-layer plan and
recipes, and the structure a quantized checkpoint is loaded into.

Format: mlx-lm's (see `quant.layers`); config.json records
`"quantization": {"group_size": G, "bits": B, "mode": "affine"}`, with per-layer entries
(`"model.embed_tokens": false` or a dict of its own params) where a layer differs. So mlx-lm
loads our dirs and we load its dirs.
"""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import UserError
from ..moe import EXPERT_MATRICES, Experts
from .gptq import quantize_calibrated
from .layers import dense_like, quantize_layer, quantized_layers, quantized_like, replace_layers

SUPPORTED_BITS = (4, 8)  # what `quantize_model` writes; loading accepts whatever MLX supports
SUPPORTED_GROUP_SIZES = (32, 64, 128)


# -- loading: rebuild the structure a checkpoint was saved with ---------------------------------


def _layer_params(path: str, module: nn.Module, quantization: dict, weights: dict):
    """Quantization params {group_size, bits, mode} for one layer, or None to keep it dense.

    A per-layer entry in `quantization` wins (False: dense); otherwise a layer is quantized
    when the checkpoint holds `<path>.scales`, with group size and bits read off the shapes
    (so a checkpoint whose layers differ still loads) and checked against the config.
    """
    entry = quantization.get(path)
    if entry is False:
        return None
    if f"{path}.scales" not in weights:
        if isinstance(entry, dict):
            raise UserError(f"config.json quantizes {path} but the weights have no {path}.scales; "
                            "the checkpoint does not match its config")
        return None
    params = dict(entry) if isinstance(entry, dict) else {
        k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}
    params.setdefault("mode", "affine")
    in_dims = module.weight.shape[-1]
    packed, groups = weights[f"{path}.weight"].shape[-1], weights[f"{path}.scales"].shape[-1]
    params.setdefault("group_size", in_dims // groups)
    params.setdefault("bits", packed * 32 // in_dims)
    if in_dims // params["group_size"] != groups or in_dims * params["bits"] // 32 != packed:
        raise UserError(f"{path}: quantized tensors of shapes {tuple(weights[f'{path}.weight'].shape)} / "
                        f"{tuple(weights[f'{path}.scales'].shape)} do not match group_size {params['group_size']}"
                        f", bits {params['bits']} from config.json")
    return {k: params[k] for k in ("group_size", "bits", "mode")}


def quantize_structure(model: nn.Module, quantization: dict, weights: dict) -> None:
    """Swap in (empty) quantized layers wherever `weights` holds `<path>.scales`, so that strict
    loading of a quantized checkpoint works. `quantization` is config.json's entry (mlx-lm's
    convention, per-layer entries included). Called by `loading.build_model`; weights are not read."""
    if not isinstance(quantization, dict):
        raise UserError(f"config.json: quantization must be an object like {{\"group_size\": 64, \"bits\": 4}}, "
                        f"got {quantization!r}")

    swaps = {}
    for path, module in model.named_modules():
        if isinstance(module, Experts) and f"{path}.gate_up_proj_scales" in weights:
            swaps[path] = quantized_like(module, **_experts_params(path, module, quantization, weights))
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            params = _layer_params(path, module, quantization, weights)
            if params is not None:
                swaps[path] = quantized_like(module, **params)
    replace_layers(model, swaps)


def _experts_params(path: str, module: Experts, quantization: dict, weights: dict) -> dict:
    """group_size / bits of quantized MoE experts, read off the shapes of their gate_up_proj."""
    entry = quantization.get(path)
    params = dict(entry) if isinstance(entry, dict) else {
        k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}
    in_dims = module.gate_up_proj.shape[-1]
    params.setdefault("mode", "affine")
    params.setdefault("group_size", in_dims // weights[f"{path}.gate_up_proj_scales"].shape[-1])
    params.setdefault("bits", weights[f"{path}.gate_up_proj"].shape[-1] * 32 // in_dims)
    return {k: params[k] for k in ("group_size", "bits", "mode")}


# Routing matrices stay in full precision: they are a negligible share of the weights (E x 4..128),
# and a rounding error there changes which experts / streams a token takes, not just a value.
_KEPT_DENSE = re.compile(r"(\.router\.proj|\.altup\.(correction_coefs|prediction_coefs|modality_router))$")


def _quantizable(path: str, module: nn.Module, quantize_embedding: bool) -> bool:
    if _KEPT_DENSE.search(path):
        return False
    return isinstance(module, (nn.Linear, Experts)) or (quantize_embedding and isinstance(module, nn.Embedding))


def _input_widths(module: nn.Module) -> list:
    if isinstance(module, Experts):
        return [module[name].shape[-1] for name in EXPERT_MATRICES]
    return [module.weight.shape[-1]]


# -- quantize / dequantize a loaded model -------------------------------------------------------


def check_settings(bits: int, group_size: int, recipe: str = "uniform") -> None:
    """Raise UserError unless bits, group_size and recipe are values quantize_model takes (no
    model needed, so a command can refuse them before loading anything)."""
    if bits not in SUPPORTED_BITS:
        raise UserError(f"unsupported {{bits}}; use one of {', '.join(map(str, SUPPORTED_BITS))}", bits=bits)
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise UserError(f"unsupported {{group_size}}; use one of {', '.join(map(str, SUPPORTED_GROUP_SIZES))}",
                        group_size=group_size)
    if recipe not in RECIPES:
        raise UserError(f"unknown quantization {{recipe}}; use one of {', '.join(RECIPES)}", recipe=recipe)


def check_quantizable(model: nn.Module, bits: int, group_size: int, quantize_embedding: bool = True) -> list:
    """Raise UserError unless quantize_model(model, bits, group_size, ...) can run; returns the
    [(path, layer)] it would quantize. Lets a command refuse before any slow work."""
    check_settings(bits, group_size)
    config = getattr(model, "config", None)
    if quantized_layers(model) or getattr(config, "quantization", None):
        raise UserError("the model is already quantized; quantize the original full-precision model instead "
                        "(or dequantize it first)")
    targets = [(path, m) for path, m in model.named_modules() if _quantizable(path, m, quantize_embedding)]
    for path, m in sorted(targets, key=lambda t: t[0]):
        dims = next((d for d in _input_widths(m) if d % group_size), 0)
        if dims % group_size:
            fits = [g for g in SUPPORTED_GROUP_SIZES if dims % g == 0]
            hint = "use {group_size}" if fits else "this model cannot be quantized"
            raise UserError(f"{path}: input size {dims} is not divisible by group size {group_size}; " + hint,
                            **({"group_size": fits[-1]} if fits else {}))
    return targets


RECIPES = ("uniform", "mixed")


def mixed_recipe_upgrades(path: str, num_layers: int) -> bool:
    """True for the layers the "mixed" recipe keeps at 8 bits: the embedding / LM head, and
    v_proj and down_proj in the first and last eighth of the layers and every third layer
    between (the layers llama.cpp's Q4_K_M gives more bits, the most quantization-sensitive)."""
    if path in ("model.embed_tokens", "lm_head"):
        return True
    parts = path.split(".")
    if len(parts) < 5 or parts[1] != "layers" or parts[-1] not in ("v_proj", "down_proj"):
        return False
    i, eighth = int(parts[2]), num_layers // 8
    return i < eighth or i >= 7 * num_layers // 8 or (i - eighth) % 3 == 2


def quantization_plan(model: nn.Module, targets: list, bits: int, group_size: int, recipe: str = "uniform") -> dict:
    """{module path: {"group_size", "bits", "mode"}} for each target layer under `recipe`:
    "uniform" (every layer at `bits`) or "mixed" (see `mixed_recipe_upgrades`)."""
    check_settings(bits, group_size, recipe)
    num_layers = len(model.model.layers)
    plan = {}
    for path, _ in targets:
        layer_bits = 8 if recipe == "mixed" and mixed_recipe_upgrades(path, num_layers) else bits
        plan[path] = {"group_size": group_size, "bits": layer_bits, "mode": "affine"}
    return plan


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 64, quantize_embedding: bool = True,
                   calibration=None, progress=None, recipe: str = "uniform"):
    """Quantize the model's linear layers (and its embedding / tied LM head unless
    quantize_embedding=False) in place with MLX affine quantization; sets model.config.quantization.

    bits: 4 or 8; group_size: 32, 64 or 128 (inputs per scale/bias pair). calibration: None for
    the error-minimising grid per group (`quantize_affine`, no data needed), or (N, L) token ids
    (`calibration.calibration_windows`) to minimise each layer's output error on them (GPTQ, see
    mlx_gemma/quant/gptq.py). recipe: "uniform" (every layer at `bits`) or "mixed" (the embedding and
    the most sensitive v_proj / down_proj layers at 8 bits, as llama.cpp's Q4_K_M; config.json
    records them per layer). Every check runs before any layer changes, so a refused model is
    left untouched. Returns the model.
    """
    targets = check_quantizable(model, bits, group_size, quantize_embedding)
    if calibration is not None and getattr(getattr(model, "config", None), "unit_norms", False):
        # GPTQ replays decoder layers one by one; Gemma 4 / 3n layers also need per-layer
        # embeddings, shared keys/values and AltUp streams it does not carry.
        raise UserError("calibrated (GPTQ) quantization supports Gemma 1-3; quantize Gemma 4 / 3n without "
                        "calibration data")
    plan = quantization_plan(model, targets, bits, group_size, recipe)
    if calibration is not None:
        quantize_calibrated(model, calibration, plan, progress=progress)
    else:
        for path, m in targets:
            layer = quantize_layer(m, **plan[path])
            mx.eval(layer.parameters())  # layer by layer: the full-precision weight is freed right away
            replace_layers(model, {path: layer})
    quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}
    quantization.update({path: params for path, params in plan.items() if params["bits"] != bits})
    if not quantize_embedding:
        quantization.update({path: False for path, m in model.named_modules() if isinstance(m, nn.Embedding)})
    config = getattr(model, "config", None)
    if config is not None:
        config.quantization = quantization
    return model


def dequantize_model(model: nn.Module, dtype=None):
    """Replace every quantized layer by a dense nn.Linear / nn.Embedding in place (fuse, export).

    dtype: of the dense weights (default: the scales' dtype). Clears model.config.quantization."""
    for path, m in quantized_layers(model):
        dense = dense_like(m, dtype)
        mx.eval(dense.parameters())
        replace_layers(model, {path: dense})
    config = getattr(model, "config", None)
    if config is not None:
        config.quantization = None
    return model


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters (quantized weights, scales and biases included)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
