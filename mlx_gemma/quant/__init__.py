"""Quantization in MLX's affine format, in layers that import only downward:

    affine.py       the grid fit (quantize_affine) and the uint32 packing       -> mlx only
    layers.py       QuantizedLinear / QuantizedEmbedding, built and dequantized
                    in one place each, the CPU dequantize path                  -> affine, backend
    gptq.py         calibrated quantization (GPTQ) of a model's layers          -> layers, affine, model
    calibration.py  calibration text files -> token-id windows                  -> data, training.data
    quantize.py     model-level API: quantize_model, dequantize_model, the
                    plan and recipes, the structure of a quantized checkpoint   -> gptq, layers
    checkpoint.py   the `mlx-gemma quantize` command (load, quantize, save,
                    report); above the library, not imported here               -> loading, evaluate

This package re-exports the library part (not checkpoint.py, which imports loading).
"""

from .affine import pack, quantize_affine, quantize_weight, unpack
from .layers import (DEQUANTIZE, KERNEL, QuantizedEmbedding, QuantizedLinear, dense_like, dequantize_weight,
                     is_quantized_layer, quantize_layer, quantized_layers, quantized_like, quantized_path,
                     replace_layers)
from .quantize import (RECIPES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, check_quantizable, check_settings, dequantize_model,
                       mixed_recipe_upgrades, parameter_bytes, quantization_plan, quantize_model, quantize_structure)

__all__ = [
    "pack", "quantize_affine", "quantize_weight", "unpack",
    "DEQUANTIZE", "KERNEL", "QuantizedEmbedding", "QuantizedLinear", "dense_like", "dequantize_weight",
    "is_quantized_layer", "quantize_layer", "quantized_layers", "quantized_like", "quantized_path", "replace_layers",
    "RECIPES", "SUPPORTED_BITS", "SUPPORTED_GROUP_SIZES", "check_quantizable", "check_settings", "dequantize_model",
    "mixed_recipe_upgrades", "parameter_bytes", "quantization_plan", "quantize_model", "quantize_structure",
]
