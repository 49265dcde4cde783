"""MLX affine quantization of Gemma models: quantize, dequantize, rebuild quantized layers on load.

Format: mlx-lm's. Each quantized layer stores `weight` (uint32, 32/bits values per word),
`scales` and `biases` (one per `group_size` consecutive inputs: w ≈ scale * q + bias), and
config.json records `"quantization": {"group_size": G, "bits": B, "mode": "affine"}`, with
per-layer entries (`"model.embed_tokens": false` or a dict of its own params) where a layer
differs. So mlx-lm loads our dirs and we load its dirs.

Speed: MLX's `quantized_matmul` is fast on Metal/CUDA, but its CPU kernel is a naive loop
(≈ 20x slower than an OpenBLAS fp32 matmul once there are more than a few rows). On the CPU our
layers therefore dequantize their weight on the fly and run an fp32 matmul when the input has
`backend.DEQUANTIZE_MIN_ROWS` rows or more (prefill, training batches, perplexity), and use the kernel
for fewer rows (decode), where it is faster (benchmarks/quantize.py measures both).
`quantized_path(model)` reports which path ran.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from .backend import policy
from .errors import UserError

SUPPORTED_BITS = (4, 8)  # what `quantize_model` writes; loading accepts whatever MLX supports
SUPPORTED_GROUP_SIZES = (32, 64, 128)

# Rows of the (V, E) embedding dequantized at once by the tied LM head: 16384 x 640 fp32 = 42 MB,
# instead of the 671 MB of a full 262,144-row Gemma 3 vocabulary.
VOCAB_CHUNK = 16384

KERNEL, DEQUANTIZE = "quantized_matmul", "dequantize+matmul"


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
        output_dims, input_dims = linear.weight.shape
        layer = cls(input_dims, output_dims, "bias" in linear, group_size, bits, mode)
        layer.weight, layer.scales, layer.biases = _quantize(linear.weight, group_size, bits, mode)
        if "bias" in linear:
            layer.bias = linear.bias
        layer.freeze()
        return layer

    def dequantized_weight(self) -> mx.array:
        """The (output_dims, input_dims) weight in the scales' dtype."""
        return mx.dequantize(self["weight"], self["scales"], self.get("biases"), group_size=self.group_size,
                             bits=self.bits, mode=self.mode)

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if policy().dequantize_rows(rows):
            self.paths_used.add(DEQUANTIZE)
            y = x @ self.dequantized_weight().astype(x.dtype).T  # (..., in) @ (in, out)
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
        num_embeddings, dims = embedding.weight.shape
        layer = cls(num_embeddings, dims, group_size, bits, mode)
        layer.weight, layer.scales, layer.biases = _quantize(embedding.weight, group_size, bits, mode)
        layer.freeze()
        return layer

    def dequantized_rows(self, start: int = 0, stop: int | None = None) -> mx.array:
        """Rows start:stop of the (V, E) table, dequantized (scales' dtype)."""
        biases = self.get("biases")
        return mx.dequantize(self["weight"][start:stop], self["scales"][start:stop],
                             biases[start:stop] if biases is not None else None,
                             group_size=self.group_size, bits=self.bits, mode=self.mode)

    def as_linear(self, x: mx.array) -> mx.array:
        """x (..., E) -> (..., V) against the embedding table (Gemma's tied LM head)."""
        rows = x.size // x.shape[-1]
        if not policy().dequantize_rows(rows):
            self.paths_used.add(KERNEL)
            return super().as_linear(x)
        self.paths_used.add(DEQUANTIZE)
        parts = [x @ self.dequantized_rows(s, s + VOCAB_CHUNK).astype(x.dtype).T
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


def _quantize(weight: mx.array, group_size: int, bits: int, mode: str):
    if mode == "affine":
        return quantize_affine(weight, group_size, bits)
    weight, scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
    return weight, scales, (biases[0] if biases else None)


# Candidate clipping of each group's [min, max] range: a slightly narrower range trades an error
# on the extreme weights for a finer grid everywhere else, which usually wins at 4 bits.
_RANGE_SHRINK = (1.0, 0.96, 0.92, 0.88, 0.84, 0.8)
_REFITS = 2
_ROWS_AT_ONCE = 8192  # bounds the float32 temporaries for a 262k-row embedding


def quantize_affine(weight: mx.array, group_size: int, bits: int):
    """Error-minimising affine quantization in MLX's format: (packed uint32 weight, scales, biases).

    `mx.quantize` maps each group's [min, max] onto the 2^bits levels (round to nearest). Here,
    per group of `group_size` inputs, several starting grids are tried (mx.quantize's own and
    clipped ranges); from each, (scale, bias) is refitted by least squares to
    min ||scale * q + bias - w||^2 for the current codes q and the codes re-rounded, twice (each
    move can only lower the error); the candidate with the smallest squared error wins, so no
    group is worse than with mx.quantize. Dequantizes with mx.dequantize.
    """
    rows, cols = weight.shape
    parts = [_fit_rows(weight[a:a + _ROWS_AT_ONCE], group_size, bits) for a in range(0, rows, _ROWS_AT_ONCE)]
    packed, scales, biases = (mx.concatenate([p[i] for p in parts]) if len(parts) > 1 else parts[0][i]
                              for i in range(3))
    dtype = weight.dtype if weight.dtype in (mx.float16, mx.bfloat16, mx.float32) else mx.float32
    return packed, scales.astype(dtype), biases.astype(dtype)


def _fit_rows(weight: mx.array, group_size: int, bits: int):
    rows, cols = weight.shape
    top = float(2 ** bits - 1)
    w = weight.astype(mx.float32).reshape(rows, cols // group_size, group_size)  # (R, G, gs)
    lo, hi = w.min(-1, keepdims=True), w.max(-1, keepdims=True)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    # starting grids: mx.quantize's own (so the result is never worse than it), then clipped ranges
    packed, scales, biases = mx.quantize(weight, group_size, bits)
    starts = [(_unpack(packed, bits).reshape(w.shape).astype(mx.float32), scales[..., None].astype(mx.float32),
               biases[..., None].astype(mx.float32))]
    starts += [(None, 2 * half * shrink / top, mid - half * shrink) for shrink in _RANGE_SHRINK]
    starts.append((None, _lattice_step(w, hi - lo), lo))
    best = None
    for q, scale, bias in starts:
        for _ in range(_REFITS):
            q = _codes(w, scale, bias, top) if q is None else q
            scale, bias = _least_squares(w, q, scale, bias)
            q = None
        q = _codes(w, scale, bias, top)
        err = mx.square(scale * q + bias - w).sum(-1, keepdims=True)  # (R, G, 1)
        if best is None:
            best = (err, q, scale, bias)
        else:
            better = err < best[0]
            best = tuple(mx.where(better, new, old) for new, old in zip((err, q, scale, bias), best))
        mx.eval(best)
    _, q, scale, bias = best
    return _pack(q.reshape(rows, cols).astype(mx.uint32), bits), scale.reshape(rows, -1), bias.reshape(rows, -1)


def _lattice_step(w, span):
    """Per group, the smallest gap between distinct sorted values (the span where there is none).

    Weights dequantized from a coarser format (a Q4_0 / Q4_1 / Q4_K GGUF, whose 32-wide blocks
    are each an affine grid) sit on a lattice min + k * step: with this step as the scale, the
    codes reproduce them exactly, which the min/max grid misses whenever a block does not use
    its extreme codes. For weights on no lattice it is one more candidate the error check drops.
    """
    ordered = mx.sort(w, axis=-1)
    gaps = ordered[..., 1:] - ordered[..., :-1]
    tiny = 1e-5 * span  # float rounding of dequantized values: not a gap
    step = mx.where(gaps > tiny, gaps, mx.inf).min(-1, keepdims=True)
    return mx.where(mx.isinf(step), span, step)


def _codes(w, scale, bias, top):
    safe = mx.where(scale == 0, 1.0, scale)
    return mx.clip(mx.round((w - bias) / safe), 0.0, top)


def _least_squares(w, q, scale, bias):
    """(scale, bias) minimising ||scale * q + bias - w||^2 per group; unchanged where q is constant."""
    n = w.shape[-1]
    sq, sw = q.sum(-1, keepdims=True), w.sum(-1, keepdims=True)
    sqq, sqw = (q * q).sum(-1, keepdims=True), (q * w).sum(-1, keepdims=True)
    det = n * sqq - sq * sq
    ok = det > 0
    safe = mx.where(ok, det, 1.0)
    new_scale = (n * sqw - sq * sw) / safe
    new_bias = (sw - new_scale * sq) / n
    return mx.where(ok, new_scale, scale), mx.where(ok, new_bias, bias)


def _unpack(packed: mx.array, bits: int) -> mx.array:
    """(R, W) uint32 -> (R, W * 32 / bits) codes, inverse of _pack."""
    per = 32 // bits
    shifts = mx.arange(per, dtype=mx.uint32) * bits
    codes = (packed[..., None] >> shifts) & (2 ** bits - 1)
    return codes.reshape(packed.shape[0], -1)


def _pack(q: mx.array, bits: int) -> mx.array:
    """(R, C) integer codes -> (R, C * bits / 32) uint32, the first code in the lowest bits (MLX's layout)."""
    per = 32 // bits
    rows, cols = q.shape
    shifts = (mx.arange(per, dtype=mx.uint32) * bits)
    return (q.reshape(rows, cols // per, per) << shifts).sum(-1).astype(mx.uint32)


def is_quantized_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))


def quantized_layers(model: nn.Module) -> list:
    """[(path, module)] of every quantized linear / embedding layer in the model."""
    return [(path, m) for path, m in model.named_modules() if is_quantized_layer(m)]


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

    def swap(path, module):
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return module
        params = _layer_params(path, module, quantization, weights)
        if params is None:
            return module
        rows, cols = module.weight.shape
        if isinstance(module, nn.Embedding):
            return QuantizedEmbedding(rows, cols, **params)
        return QuantizedLinear(cols, rows, "bias" in module, **params)

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))


# -- quantize / dequantize a loaded model -------------------------------------------------------


def check_quantizable(model: nn.Module, bits: int, group_size: int, quantize_embedding: bool = True) -> list:
    """Raise UserError unless quantize_model(model, bits, group_size, ...) can run; returns the
    [(path, layer)] it would quantize. Lets the CLI refuse before any slow work."""
    if bits not in SUPPORTED_BITS:
        raise UserError(f"unsupported --bits {bits}; use one of {', '.join(map(str, SUPPORTED_BITS))}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise UserError(f"unsupported --group-size {group_size}; use one of "
                        f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}")
    config = getattr(model, "config", None)
    if quantized_layers(model) or getattr(config, "quantization", None):
        raise UserError("the model is already quantized; quantize the original full-precision model instead "
                        "(or dequantize it first)")
    targets = [(path, m) for path, m in model.named_modules()
               if isinstance(m, nn.Linear) or (quantize_embedding and isinstance(m, nn.Embedding))]
    for path, m in sorted(targets, key=lambda t: t[0]):
        dims = m.weight.shape[-1]
        if dims % group_size:
            fits = [g for g in SUPPORTED_GROUP_SIZES if dims % g == 0]
            hint = f"use --group-size {fits[-1]}" if fits else "this model cannot be quantized"
            raise UserError(f"{path}: input size {dims} is not divisible by group size {group_size}; {hint}")
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
    if recipe not in RECIPES:
        raise UserError(f"unknown quantization recipe {recipe!r}; use one of {', '.join(RECIPES)}")
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
    (`gptq.calibration_windows`) to minimise each layer's output error on them (GPTQ, see
    mlx_gemma/gptq.py). recipe: "uniform" (every layer at `bits`) or "mixed" (the embedding and
    the most sensitive v_proj / down_proj layers at 8 bits, as llama.cpp's Q4_K_M; config.json
    records them per layer). Every check runs before any layer changes, so a refused model is
    left untouched. Returns the model.
    """
    targets = check_quantizable(model, bits, group_size, quantize_embedding)
    plan = quantization_plan(model, targets, bits, group_size, recipe)
    if calibration is not None:
        from .gptq import quantize_calibrated

        quantize_calibrated(model, calibration, plan, progress=progress)
    else:
        for path, m in targets:
            params = plan[path]
            layer = (QuantizedEmbedding.from_embedding(m, **params) if isinstance(m, nn.Embedding)
                     else QuantizedLinear.from_linear(m, **params))
            mx.eval(layer.parameters())  # layer by layer: the full-precision weight is freed right away
            _set_module(model, path, layer)
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
        if isinstance(m, nn.QuantizedEmbedding):
            weight = _dequantize(m)
            dense = nn.Embedding(*weight.shape)
        else:
            weight = _dequantize(m)
            dense = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in m)
            if "bias" in m:
                dense.bias = m.bias
        dense.weight = weight.astype(dtype) if dtype is not None else weight
        mx.eval(dense.parameters())
        _set_module(model, path, dense)
    config = getattr(model, "config", None)
    if config is not None:
        config.quantization = None
    return model


def _dequantize(m: nn.Module) -> mx.array:
    return mx.dequantize(m["weight"], m["scales"], m.get("biases"), group_size=m.group_size, bits=m.bits,
                         mode=getattr(m, "mode", "affine"))


def _set_module(model: nn.Module, path: str, layer: nn.Module) -> None:
    """model.<path> = layer, where path is dotted with list indices (model.layers.3.mlp.up_proj)."""
    *parents, last = path.split(".")
    parent = model
    for key in parents:
        parent = parent[int(key)] if isinstance(parent, list) else parent[key]
    if isinstance(parent, list):
        parent[int(last)] = layer
    else:
        setattr(parent, last, layer)


# -- reporting ----------------------------------------------------------------------------------


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


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters (quantized weights, scales and biases included)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def disk_bytes(path) -> int:
    """Size of a model's weights on disk: a .gguf file, or the *.safetensors of a model dir."""
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors") if not f.name.startswith("adapter"))


# -- `mlx-gemma quantize` -----------------------------------------------------------------------


def quantize_checkpoint(src, out, bits: int = 4, group_size: int = 64, quantize_embedding: bool = True,
                        eval_text=None, max_seq_len: int = 1024, force: bool = False, progress=None,
                        calibration="auto", calibration_tokens: int = 4096, recipe: str = "uniform") -> dict:
    """Load SRC in float32, quantize it, save it to OUT (atomically) and measure both models.

    eval_text: a text file for the perplexity comparison, "default" for the project's held-out
    Chinese + English text (mlx_gemma/data/heldout_zh_en.txt), or None to skip it.
    calibration: "auto" (GPTQ on the bundled calibration text for 4-bit, none for 8-bit),
    "none", or a list of .txt / .jsonl files; calibration_tokens: how many tokens of them.
    recipe: "uniform" or "mixed" (see `quantize_model`).
    Returns {"original": {...}, "quantized": {...}, "bits", "group_size", "out"}, each side with
    disk_bytes, param_bytes and (when evaluated) loss / perplexity / tokens.
    """
    from pathlib import Path

    from .data import DATA_DIR
    from .evaluate import perplexity, read_eval_text
    from .gptq import calibration_windows, check_calibration, resolve_sources
    from .loading import load, resolve, save_model

    say = progress or (lambda msg: None)
    sources = resolve_sources(calibration, bits)
    text = None
    if eval_text is not None:
        text_path = DATA_DIR / "heldout_zh_en.txt" if eval_text == "default" else Path(eval_text)
        if not text_path.is_file():
            raise UserError(f"{text_path}: no such text file for the perplexity check; pass --text FILE or --no-eval")
        if max_seq_len < 2:  # checked with the text, before the slow load
            raise UserError(f"max_seq_len must be at least 2, got {max_seq_len}")
        text = read_eval_text(text_path)
    src_path = resolve(src)
    model, tokenizer = load(src, dtype="float32")
    if model.config.quantization or quantized_layers(model):
        raise UserError(f"{src} is already quantized; quantize the original full-precision model instead")
    quantization_plan(model, check_quantizable(model, bits, group_size, quantize_embedding), bits, group_size,
                      recipe)  # refuses a bad recipe before any slow work
    windows = None if sources is None else calibration_windows(tokenizer, sources, calibration_tokens)
    if windows is not None:
        check_calibration(model, windows)
    original = {"disk_bytes": disk_bytes(src_path), "param_bytes": parameter_bytes(model)}
    if text is not None:
        say(f"perplexity of the original model on {text_path.name} ...")
        original.update(perplexity(model, tokenizer, text, max_seq_len=max_seq_len))
    method = ("error-minimising grid, no calibration" if windows is None else
              f"GPTQ on {windows.size} calibration tokens of {', '.join(p.name for p in sources)}")
    say(f"quantizing to {bits} bits, group size {group_size} ({method}) ...")
    quantize_model(model, bits=bits, group_size=group_size, quantize_embedding=quantize_embedding,
                   calibration=windows, progress=say, recipe=recipe)
    save_model(model, tokenizer, out, force=force)
    quantized = {"disk_bytes": disk_bytes(out), "param_bytes": parameter_bytes(model)}
    if text is not None:
        say("perplexity of the quantized model ...")
        quantized.update(perplexity(model, tokenizer, text, max_seq_len=max_seq_len))
    return {"original": original, "quantized": quantized, "bits": bits, "group_size": group_size,
            "method": method, "recipe": recipe, "out": str(out), "text": text_path.name if text is not None else None}


def format_report(result: dict) -> str:
    """The table `mlx-gemma quantize` prints from quantize_checkpoint's result."""
    o, q = result["original"], result["quantized"]
    bits = "4/8-bit mixed" if result.get("recipe") == "mixed" and result["bits"] == 4 else f"{result['bits']}-bit"
    label = f"{bits}, group {result['group_size']}"
    lines = [f"wrote {result['out']} ({result.get('method', '')})",
             f"{'':18s}{'original':>14s}{label:>22s}{'change':>10s}"]
    if "perplexity" in o:
        change = q["perplexity"] / o["perplexity"] - 1
        lines.append(f"{'perplexity':18s}{o['perplexity']:14.3f}{q['perplexity']:22.3f}{change:+10.1%}"
                     f"   ({o['tokens']} tokens of {result['text']})")
    for key, name in (("disk_bytes", "size on disk"), ("param_bytes", "param memory")):
        lines.append(f"{name:18s}{o[key] / 1e6:11.1f} MB{q[key] / 1e6:19.1f} MB{q[key] / o[key] - 1:+10.1%}")
    return "\n".join(lines)
