"""Quantized layers: built in one place, dequantized by one function, run on the right path.

Format: mlx-lm's. Each quantized layer stores `weight` (uint32, 32/bits values per word),
`scales` and `biases` (one per `group_size` consecutive inputs: w ≈ scale * q + bias).

Speed: MLX's `quantized_matmul` is fast on Metal/CUDA, but its CPU kernel is a naive loop
(≈ 20x slower than an OpenBLAS fp32 matmul once there are more than a few rows). On the CPU our
layers therefore dequantize their weight on the fly and run an fp32 matmul when the input has
`backend.DEQUANTIZE_MIN_ROWS` rows or more (prefill, training batches, perplexity), and use the kernel
for fewer rows (decode), where it is faster (benchmarks/quantize.py measures both). One-row
decoding on the CPU usually bypasses both: cpu.hostdecode runs 4/8-bit products in a native kernel
(with quantized_path "auto"; forcing "kernel" or "dequantize" keeps these layers in charge).
`quantized_path(model)` reports which path ran.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..backend import policy
from ..errors import UserError
from ..moe import EXPERT_MATRICES, Experts
from .affine import quantize_weight

# Rows of the (V, E) embedding dequantized at once by the tied LM head: 16384 x 640 fp32 = 42 MB,
# instead of the 671 MB of a full 262,144-row Gemma 3 vocabulary.
VOCAB_CHUNK = 16384

KERNEL, DEQUANTIZE = "quantized_matmul", "dequantize+matmul"


def dequantize_weight(layer: nn.Module, rows=None) -> mx.array:
    """The dense (out, in) weight of a quantized linear / embedding layer (ours or MLX's), in
    its scales' dtype; `rows` (a slice or an index array) dequantizes only those rows."""
    weight, scales, biases = layer["weight"], layer["scales"], layer.get("biases")
    if rows is not None:
        weight, scales = weight[rows], scales[rows]
        biases = None if biases is None else biases[rows]
    return mx.dequantize(weight, scales, biases, group_size=layer.group_size, bits=layer.bits,
                         mode=getattr(layer, "mode", "affine"))


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear (same parameters and attributes, so LoRA can wrap it) whose matmul
    dequantizes on the fly on the CPU for many-row inputs; see the module docstring."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool = False, group_size: int = 64,
                 bits: int = 4, mode: str = "affine"):
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = group_size, bits, mode
        # Placeholders with the packed shapes (lazy zeros, never computed: loading replaces
        # them); nn.QuantizedLinear.__init__ would quantize a random matrix instead.
        self.weight, self.scales, self.biases = _packed_placeholders(output_dims, input_dims, group_size, bits, mode)
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.paths_used = set()
        self.freeze()

    @classmethod
    def from_linear(cls, linear: nn.Module, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        """nn.QuantizedLinear's constructor from a dense layer, on our grid (`quantize_layer`)."""
        return quantize_layer(linear, group_size, bits, mode)

    def dequantized_weight(self) -> mx.array:
        """The (output_dims, input_dims) weight in the scales' dtype."""
        return dequantize_weight(self)

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if policy().dequantize_rows(rows):
            self.paths_used.add(DEQUANTIZE)
            y = x @ dequantize_weight(self).astype(x.dtype).T  # (..., in) @ (in, out)
            return y + self["bias"] if "bias" in self else y
        self.paths_used.add(KERNEL)
        return super().__call__(x)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose tied-LM-head matmul (`as_linear`) dequantizes the (V, E) table
    in VOCAB_CHUNK-row slices on the CPU for many-row inputs."""

    def __init__(self, num_embeddings: int, dims: int, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.num_embeddings, self.dims = num_embeddings, dims
        self.weight, self.scales, self.biases = _packed_placeholders(num_embeddings, dims, group_size, bits, mode)
        self.paths_used = set()
        self.freeze()

    @classmethod
    def from_embedding(cls, embedding: nn.Module, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        """nn.QuantizedEmbedding's constructor from a dense table, on our grid (`quantize_layer`)."""
        return quantize_layer(embedding, group_size, bits, mode)

    def dequantized_rows(self, start: int = 0, stop: Optional[int] = None) -> mx.array:
        """Rows start:stop of the (V, E) table, dequantized (scales' dtype)."""
        return dequantize_weight(self, slice(start, stop))

    def as_linear(self, x: mx.array) -> mx.array:
        """x (..., E) -> (..., V) against the embedding table (Gemma's tied LM head)."""
        rows = x.size // x.shape[-1]
        if not policy().dequantize_rows(rows):
            self.paths_used.add(KERNEL)
            return super().as_linear(x)
        self.paths_used.add(DEQUANTIZE)
        parts = [x @ dequantize_weight(self, slice(s, s + VOCAB_CHUNK)).astype(x.dtype).T
                 for s in range(0, self.num_embeddings, VOCAB_CHUNK)]
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def _packed_placeholders(rows: int, cols: int, group_size: int, bits: int, mode: str):
    """Lazy zero arrays shaped like mx.quantize's output for a (rows, cols) matrix."""
    if cols % group_size or (cols * bits) % 32:
        raise UserError(f"a ({rows}, {cols}) weight cannot be quantized with group size {group_size} "
                        f"and {bits} bits: {cols} is not a multiple of {group_size}")
    weight = mx.zeros((rows, cols * bits // 32), dtype=mx.uint32)
    scales = mx.zeros((rows, cols // group_size))
    return weight, scales, (mx.zeros((rows, cols // group_size)) if mode == "affine" else None)


def _quantized_experts(dense: Experts, group_size: int, bits: int, mode: str, tensors=None) -> Experts:
    """Gemma 4's experts with each 3-D matrix (experts, out, in) quantized along `in`, as
    `<name>`, `<name>_scales`, `<name>_biases` (gather_qmm's operands); tensors: {name:
    (packed, scales, biases)} or None for lazy placeholders of the right shapes."""
    out = Experts(1, 1, 1)
    out.group_size, out.bits, out.mode = group_size, bits, mode
    for name in EXPERT_MATRICES:
        X, rows, cols = dense[name].shape
        if tensors is None:
            packed = _packed_placeholders(X * rows, cols, group_size, bits, mode)
        else:
            packed = tensors[name]
        packed = [None if a is None else a.reshape(X, rows, -1) for a in packed]
        out[name], out[name + "_scales"] = packed[0], packed[1]
        if packed[2] is not None:
            out[name + "_biases"] = packed[2]
    out.freeze()
    return out


def quantized_like(dense: nn.Module, group_size: int, bits: int, mode: str = "affine", tensors=None) -> nn.Module:
    """The frozen quantized layer that replaces `dense` (nn.Linear -> QuantizedLinear, keeping its
    bias; nn.Embedding -> QuantizedEmbedding): the one place quantized layers are built.

    tensors: (packed weight, scales, biases) to hold; None leaves lazy placeholders of the right
    shapes (for loading a checkpoint into, without quantizing anything). MoE experts: see
    `_quantized_experts`."""
    if isinstance(dense, Experts):
        return _quantized_experts(dense, group_size, bits, mode, tensors)
    rows, cols = dense.weight.shape
    if isinstance(dense, nn.Embedding):
        layer = QuantizedEmbedding(rows, cols, group_size, bits, mode)
    else:
        layer = QuantizedLinear(cols, rows, "bias" in dense, group_size, bits, mode)
        if "bias" in dense:
            layer.bias = dense.bias
    if tensors is not None:
        layer.weight, layer.scales, layer.biases = tensors
    layer.freeze()
    return layer


def quantize_layer(dense: nn.Module, group_size: int, bits: int, mode: str = "affine") -> nn.Module:
    """`dense` (nn.Linear / nn.Embedding / MoE experts) quantized on the error-minimising grid (`quantize_affine`)."""
    if isinstance(dense, Experts):  # each expert's (out, in) rows, stacked, quantized as one matrix
        tensors = {name: quantize_weight(dense[name].reshape(-1, dense[name].shape[-1]), group_size, bits, mode)
                   for name in EXPERT_MATRICES}
        return _quantized_experts(dense, group_size, bits, mode, tensors)
    return quantized_like(dense, group_size, bits, mode, quantize_weight(dense.weight, group_size, bits, mode))


def dense_like(layer: nn.Module, dtype=None) -> nn.Module:
    """The nn.Linear / nn.Embedding a quantized layer stands for (weight dequantized, cast to
    `dtype` when given, bias kept); for quantized MoE experts, the dense Experts."""
    if isinstance(layer, Experts):
        dense = Experts(1, 1, 1)
        for name in EXPERT_MATRICES:
            w = mx.dequantize(layer[name], layer[name + "_scales"], layer.get(name + "_biases"),
                              group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
            dense[name] = w.astype(dtype) if dtype is not None else w
        return dense
    weight = dequantize_weight(layer)
    if isinstance(layer, nn.QuantizedEmbedding):
        dense = nn.Embedding(*weight.shape)
    else:
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in layer)
        if "bias" in layer:
            dense.bias = layer.bias
    dense.weight = weight.astype(dtype) if dtype is not None else weight
    return dense


def replace_layers(model: nn.Module, layers: dict) -> None:
    """model.<path> = module for each {path: module} of `layers` (dotted paths whose list parts are
    indices, as `named_modules` gives them), through MLX's own `update_modules`."""
    if layers:
        model.update_modules(tree_unflatten(list(layers.items())))


def is_quantized_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or (
        isinstance(module, Experts) and "gate_up_proj_scales" in module)


def quantized_layers(model: nn.Module) -> list:
    """[(path, module)] of every quantized linear / embedding layer in the model."""
    return [(path, m) for path, m in model.named_modules() if is_quantized_layer(m)]


def quantized_path(model: nn.Module, reset: bool = False) -> str:
    """Which matmul path the model's quantized layers took since loading (or the last reset):
    "quantized_matmul", "dequantize+matmul", both joined by " + ", or "not quantized".
    Before any call, the path a one-token decode step would take on this device."""
    layers = [m for _, m in quantized_layers(model)]
    if not layers:
        return "not quantized"
    used = set().union(*(getattr(m, "paths_used", {KERNEL}) for m in layers))
    if reset:
        for m in layers:
            if hasattr(m, "paths_used"):
                m.paths_used.clear()
    if not used:
        used = {DEQUANTIZE if policy().dequantize_rows(1) else KERNEL}
    return " + ".join(sorted(used, key=[DEQUANTIZE, KERNEL].index))
