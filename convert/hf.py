"""Hugging Face safetensors <-> mlx-gemma: tensor names, strict checks, sharded I/O.

mlx-gemma's modules carry HF's parameter names, so the name map is nearly the identity;
what remains is explicit here: prefixes of multimodal Gemma 3 checkpoints, buffers that
are not parameters, and the tied LM head. `from_hf` / `to_hf` are pure functions over
{name: array} dicts; the functions at the bottom do the file I/O.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx

from ..errors import UserError

# Multimodal Gemma 3 checkpoints nest the text model; transformers 4 and 5 differ in where.
_TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
# Parts of multimodal checkpoints that a text model does not use (Gemma 3's projector, Gemma 3n /
# 4's vision and audio towers and their embedders).
_IGNORED = re.compile(r"^(model\.)?(vision_tower|audio_tower|multi_modal_projector|embed_vision|embed_audio)\.")
# What a KV-shared layer (Gemma 4 / 3n) has no use for: Google's checkpoints still hold it.
_SHARED_KV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")
# Non-parameter buffers some exporters save.
_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|embed_scale)$")


def from_hf(weights: dict, tie_word_embeddings: bool = True, kv_shared_layers=()) -> dict:
    """HF checkpoint tensors -> mlx-gemma parameter names (same names, fewer extras).
    kv_shared_layers: indices of layers that reuse another layer's keys/values; their k/v
    projections and norms, if the checkpoint holds them, are dropped."""
    shared = {str(i) for i in kv_shared_layers}
    out = {}
    for name, value in weights.items():
        if _IGNORED.match(name) or _BUFFERS.search(name):
            continue
        for old, new in _TEXT_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if name == "lm_head.weight" and tie_word_embeddings:
            continue  # tied: the embedding is the head
        unused = _SHARED_KV.match(name)
        if unused and unused.group(1) in shared:
            continue
        out[name] = value
    return out


def to_hf(weights: dict) -> dict:
    """mlx-gemma parameter names -> official HF Gemma checkpoint names (identity, checked)."""
    for name in weights:
        if not (name.startswith("model.") or name == "lm_head.weight"):
            raise ValueError(f"unexpected parameter name {name!r}")
    return dict(weights)


def check_weights(expected: dict, weights: dict, source: str) -> None:
    """Every expected tensor present with its shape, nothing left over; errors name the tensor."""
    missing = sorted(set(expected) - set(weights))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{source}: tensor {missing[0]} is missing{more}; the checkpoint does not match its config.json")
    extra = sorted(set(weights) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UserError(f"{source}: unexpected tensor {extra[0]}{more}; the checkpoint does not match its config.json")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != tuple(shape):
            raise UserError(
                f"{source}: tensor {name} has shape {tuple(weights[name].shape)}, expected {tuple(shape)} "
                "from config.json; the checkpoint does not match its config"
            )


# -- files ------------------------------------------------------------------------------


def safetensors_files(model_dir: Path) -> list:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise UserError(f"{index}: not a valid safetensors index ({exc}); re-download or re-convert the model")
        files = sorted({model_dir / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise UserError(f"{f} is listed in {index.name} but missing; re-download or re-convert the model")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter")]
    if not files:
        raise UserError(f"no *.safetensors weights in {model_dir}; pass a model dir with config.json, "
                        "model.safetensors and tokenizer.model")
    return files


def load_safetensors(files: list) -> dict:
    """Lazily load tensors from safetensors files: arrays are read when first evaluated."""
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as exc:  # MLX raises RuntimeError/ValueError with varied texts
            raise UserError(f"{f}: cannot read safetensors ({str(exc).splitlines()[0]}); the file is corrupt "
                            "or truncated, re-download or re-convert it")
    return weights


def parse_size(size) -> int:
    """A shard size ("5GB", "500MB", "2GiB", 1000000) in bytes; at least one byte. 0 (or a
    fraction of a byte) would give every tensor a file of its own: refused, as any text that is
    not a size."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise UserError(f"bad shard size {size!r}; use e.g. 5GB, 500MB or a number of bytes")
        units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
        value = int(float(m.group(1)) * units[(m.group(2) or "").upper()])
    if value < 1:
        raise UserError(f"shard size {size!r} is below one byte; use e.g. 5GB or 500MB")
    return value


def save_safetensors(weights: dict, out_dir: Path, max_shard_size="5GB", metadata=None) -> list:
    """Write weights as model.safetensors, or as HF-style shards plus model.safetensors.index.json."""
    limit = parse_size(max_shard_size)
    shards, current, size = [], {}, 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = weights[name]
        size += nbytes
    if current or not shards:
        shards.append(current)
    metadata = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        mx.save_safetensors(str(out_dir / "model.safetensors"), shards[0], metadata=metadata)
        return ["model.safetensors"]
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out_dir / fname), shard, metadata=metadata)
        names.append(fname)
        for name, value in shard.items():
            weight_map[name] = fname
            total += value.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names

