"""Back to the ecosystem: any model mlx-gemma loads -> an official-layout HF dir, a PEFT adapter or a GGUF file.

    convert_to_hf(src, out)                  HF dir (transformers, mlx-lm, the Hub): safetensors with
                                             the tensor names / shapes / dtypes of Google's checkpoints
    convert_to_hf(src, out, adapter=a, adapter_only=True)
                                             the adapter alone, as a PEFT dir for the HF base model
    convert_to_gguf(src, out.gguf)           one GGUF file for llama.cpp / Ollama

`src` is anything `loading.load` accepts (HF or MLX dir, quantized dir, .gguf, alias, repo id).
Quantized weights are dequantized and an adapter is fused (W + alpha/r * B @ A, in float32)
before the cast to the output dtype. Every output is written atomically: into a temporary name
beside `out`, renamed on success, so a failed run leaves nothing (and an existing `out` is only
replaced with force=True).

Float16 rule (documented in the README): Gemma 3's activations exceed float16's range (65504),
so a float16 HF export of a Gemma 3 model would give inf/NaN in transformers; it is refused
unless force=True. Any weight outside float16's range is refused for every model. A float16
GGUF is fine for Gemma 3: llama.cpp keeps activations in float32.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .convert import hf as hf_convert
from .errors import NAME_ONLY, UserError
from .files import atomic_output_dir
from .tokenizer import GEMMA3_MARKERS

HF_DTYPES = ("bfloat16", "float16", "float32")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
FLOAT16_MAX = 65504.0

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_new_output(out: Path, force: bool) -> None:
    """Refuse an existing output before any slow work (atomic_output_dir checks again when writing)."""
    if out.exists() and not force:
        raise UserError(f"{out} already exists; choose another output path or pass " "{force} to overwrite it",
                        force=True)


def _check_hf_dtype(dtype: str) -> mx.Dtype:
    if dtype not in HF_DTYPES:
        raise UserError(f"unsupported dtype {dtype!r} for an HF export; use one of {', '.join(HF_DTYPES)}")
    return getattr(mx, dtype)


def dense_weights(model) -> dict:
    """{HF name: array} of a model after fusing its LoRA layers and dequantizing (in place).

    The model is left dense (config.quantization cleared), so `model.config` describes the result.
    """
    from .lora import fuse_lora

    fuse_lora(model, dequantize=True)  # merges LoRA layers (if any), then dequantizes every other layer
    return hf_convert.to_hf(dict(tree_flatten(model.parameters())))


# The wider types to suggest instead of float16, by the parameter that chose it.
_WIDER = {"dtype": ("bfloat16", "float32"), "out_type": ("bf16", "f32")}


def _check_float16(weights: dict, model_type: Optional[str], force: bool, target: str) -> None:
    """Weights outside float16's range cannot be held; Gemma 3's activations overflow it (see module doc).

    target: the parameter that asked for float16 ("dtype" for an HF dir, "out_type" for GGUF)."""
    wider, fallback = _WIDER[target]
    for name, w in weights.items():
        peak = float(mx.abs(w).max())
        if not peak <= FLOAT16_MAX:  # also catches NaN
            raise UserError(f"tensor {name} holds {peak:.4g}, beyond float16's range (±{FLOAT16_MAX:g}); "
                            f"export with {{{target}}} or {fallback}", **{target: wider})
    if model_type == "gemma3_text" and target == "dtype":
        if not force:
            raise UserError("Gemma 3's activations overflow float16 (inf/NaN logits in transformers); "
                            "export with {dtype} (or float32), or pass {force} to write float16 anyway",
                            dtype="bfloat16", force=True)
        _say("warning: writing Gemma 3 weights in float16 (force); run them in float32 or bfloat16, "
             "its activations overflow float16")


def _load_for_export(src, adapter, dtype: str):
    """load() in the dtype the fuse / dequantize should run in, without a float32 copy when not needed.

    A plain float checkpoint is loaded straight in a bfloat16 / float32 target dtype (a bf16 -> bf16 export is an
    exact copy, and a 7B model is not doubled in memory). A quantized or GGUF source is loaded in
    float32 so that dequantization rounds once, at the final cast. LoRA fusing always runs in
    float32 inside LoRALinear.fuse.
    """
    from .loading import load, read_config, resolve

    path = resolve(src)
    exact = dtype
    # float16: loaded wider, so that weights beyond its range are seen (and refused) before the cast.
    if dtype == "float16" or path.suffix.lower() == ".gguf" or read_config(path).quantization:
        exact = "float32"
    return load(str(path), dtype=exact, adapter=adapter), path


def base_model_name(src, path: Path, adapter_config: dict) -> str:
    """What an exported adapter names as its base: the HF repo it was made for when we know it."""
    from .loading import ALIASES

    src = str(src)
    if src in ALIASES:  # the HF repo the alias was made from, so PEFT's AutoPeftModel finds it on the Hub
        return ALIASES[src]["hf_repo"]
    if _REPO_ID.match(src) and not Path(src).expanduser().exists():
        return src
    return adapter_config.get("base_model_name_or_path") or str(path.resolve())


# -- HF dir ---------------------------------------------------------------------------------


def convert_to_hf(src, out, adapter=None, dtype: Optional[str] = None, max_shard_size="5GB", force: bool = False,
                  adapter_only: bool = False) -> Path:
    """Write `src` (+ `adapter`, fused) as a Hugging Face model dir that transformers and the Hub read.

    Output: model.safetensors (or model-0000N-of-0000M.safetensors shards + model.safetensors.index.json
    when larger than `max_shard_size`) with official Gemma tensor names, shapes and one dtype;
    config.json (architectures, model_type, torch_dtype); generation_config.json (eos ids:
    the format's end-of-generation pieces); tokenizer.model, tokenizer.json, tokenizer_config.json (chat template),
    special_tokens_map.json.

    dtype: "bfloat16" (default, as Google's checkpoints), "float16" or "float32". float16 is
    refused for Gemma 3 unless force (its activations overflow float16).
    adapter_only: write only the adapter (adapter_config.json + adapter_model.safetensors, PEFT
    format, float32 by default) for `PeftModel.from_pretrained(<HF base>, out)`; it is checked
    against `src` (every LoRA matrix must fit the model) and names the base model's HF repo.
    Atomic; an existing `out` is replaced only with force. Returns the output path.
    """
    out = Path(out).expanduser()
    if adapter_only:
        return _export_adapter(src, out, adapter, dtype or "float32", force)
    dtype = dtype or "bfloat16"
    target = _check_hf_dtype(dtype)
    hf_convert.parse_size(max_shard_size)  # a bad size fails before the load
    _check_new_output(out, force)
    (model, tokenizer), _ = _load_for_export(src, adapter, dtype)
    weights = dense_weights(model)
    if target == mx.float16:
        _check_float16(weights, model.config.model_type, force, "dtype")
    weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.config.torch_dtype = dtype
    from .loading import write_model_files

    with atomic_output_dir(out, force) as tmp:
        write_model_files(tmp, weights, model.config, tokenizer, max_shard_size, manifest=False)
    return out


def _export_adapter(src, out: Path, adapter, dtype: str, force: bool) -> Path:
    from .lora import lora_parameters, save_adapter

    if adapter is None:
        raise UserError("{adapter_only} needs {adapter} (the LoRA adapter dir to export)", adapter_only=True,
                        adapter=NAME_ONLY)
    target = _check_hf_dtype(dtype)
    _check_new_output(out, force)
    (model, _), path = _load_for_export(src, None, "float32")
    from .lora import load_adapter

    config = dict(load_adapter(model, adapter))  # strict: every matrix must fit this model
    params = lora_parameters(model)
    if target == mx.float16:
        _check_float16(params, None, True, "dtype")  # LoRA matrices: only the range matters
    params = {k: v.astype(target) for k, v in params.items()}
    model.update(tree_unflatten(list(params.items())))
    config["base_model_name_or_path"] = base_model_name(src, path, config)
    config["inference_mode"] = True
    with atomic_output_dir(out, force) as tmp:
        save_adapter(model, tmp, config)
    return out


# -- GGUF -----------------------------------------------------------------------------------


def convert_to_gguf(src, out, adapter=None, out_type: str = "f16", force: bool = False) -> Path:
    """Write `src` (+ `adapter`, fused) as one GGUF file for llama.cpp / Ollama, tokenizer included.

    out_type: "f32", "f16" (default), "bf16" or "q8_0" for the 2-D tensors (norms stay F32, and
    rows that do not fill Q8_0 blocks fall back to F16, as llama.cpp's converter does).
    Configs llama.cpp cannot represent (it hard-codes some Gemma hyper-parameters) are refused.
    Atomic; an existing `out` is replaced only with force. Returns the output path.
    """
    from .convert.gguf import write_gguf

    out = Path(out).expanduser()
    if out_type not in GGUF_TYPES:
        raise UserError(f"unsupported GGUF type {out_type!r}; use one of {', '.join(GGUF_TYPES)}")
    if out.is_dir():
        raise UserError(f"{out} is a directory; pass the path of the .gguf file to write")
    _check_new_output(out, force)
    (model, tokenizer), _ = _load_for_export(src, adapter, "float32")
    weights = dense_weights(model)
    if out_type == "f16":
        _check_float16(weights, model.config.model_type, force, "out_type")
    tensors = {k: np.array(v.astype(mx.float32)) for k, v in weights.items()}
    config = model.config.to_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    template = tokenizer.chat_template or (tokenizer.chat_markers or GEMMA3_MARKERS).template
    write_gguf(tensors, config, tokenizer.model_bytes, out, out_type=out_type, chat_template=template)
    return out


def output_summary(out: Path) -> str:
    """'N files, X MB' for a dir, 'X MB' for a file: the CLI's last line."""
    if out.is_dir():
        files = [f for f in out.iterdir() if f.is_file()]
        return f"{len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.1f} MB"
    return f"{out.stat().st_size / 1e6:.1f} MB"
