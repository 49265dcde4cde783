"""GGUF import and export for Gemma 1 / 2 / 3-text, Gemma 4 and Gemma 3n text.

Import: `read_gguf(path)` parses the file (our own parser: gguf-py's GGUFReader spends ~25 s
building Python objects for a 262K-token vocabulary), dequantises every tensor to float32 with
`gguf_quants`, renames it to its Hugging Face name through an explicit per-architecture table,
checks every shape against the config it derives from the metadata, and undoes llama.cpp's
norm convention.

Export: `write_gguf(tensors, config, tokenizer_model, path, out_type)` is the inverse, writing
the metadata llama.cpp reads for `gemma` / `gemma2` / `gemma3`. Gemma 4 (`gemma4`) and Gemma 3n
(`gemma3n`) files go through the same parser and writer; their names, keys and conventions live
in `gguf_gemma4` (they keep norm weights as they are: those families scale by w, not 1 + w).

The norm rule: Gemma's RMSNorm multiplies by (1 + w) and HF checkpoints store w; llama.cpp's
converter stores (1 + w) so its generic RMSNorm can multiply by the stored tensor. Every
RMSNorm weight (input/post-attention/pre- and post-feed-forward norms, q_norm/k_norm and the
final norm) is therefore stored +1 in GGUF; we subtract 1 on import and add 1 on export.

Dtype choice: every tensor comes out float32, F16/BF16 ones included. The MLX CPU backend
computes in float32 anyway, the norm -1 must be done in float32 to be exact, and the loader
casts to the device dtype (or re-quantises) in one place.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlx_gemma.config import ARCHITECTURES
from mlx_gemma.errors import UserError
from mlx_gemma.files import write_atomic

from . import gguf_gemma4
from .gguf_quants import BLOCK_LAYOUT, GGMLType, dequantize, nbytes_for, quantize_q8_0

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# --------------------------------------------------------------------------------------------
# Name tables. GGUF name (with {i} for the block) -> (HF name, shape key, is an RMSNorm weight).
# Shape keys are resolved against the config by `_expected_shape` (HF layout: (out, in)).
# --------------------------------------------------------------------------------------------

_GLOBAL_TENSORS = {
    "token_embd.weight": ("model.embed_tokens.weight", "embed", False),
    "output_norm.weight": ("model.norm.weight", "hidden", True),
}
_LM_HEAD = {"output.weight": ("lm_head.weight", "embed", False)}  # only when not tied

_ATTN_MLP = {
    "attn_q.weight": ("self_attn.q_proj.weight", "q", False),
    "attn_k.weight": ("self_attn.k_proj.weight", "kv", False),
    "attn_v.weight": ("self_attn.v_proj.weight", "kv", False),
    "attn_output.weight": ("self_attn.o_proj.weight", "o", False),
    "ffn_gate.weight": ("mlp.gate_proj.weight", "up", False),
    "ffn_up.weight": ("mlp.up_proj.weight", "up", False),
    "ffn_down.weight": ("mlp.down_proj.weight", "down", False),
    "attn_norm.weight": ("input_layernorm.weight", "hidden", True),
}
# Gemma 1 has one norm before the MLP, which HF calls post_attention_layernorm.
_GEMMA1_NORMS = {"ffn_norm.weight": ("post_attention_layernorm.weight", "hidden", True)}
# Gemma 2/3 sandwich both blocks: GGUF's ffn_norm is the *pre*-feed-forward norm there.
_SANDWICH_NORMS = {
    "post_attention_norm.weight": ("post_attention_layernorm.weight", "hidden", True),
    "ffn_norm.weight": ("pre_feedforward_layernorm.weight", "hidden", True),
    "post_ffw_norm.weight": ("post_feedforward_layernorm.weight", "hidden", True),
}
_QK_NORMS = {
    "attn_q_norm.weight": ("self_attn.q_norm.weight", "head", True),
    "attn_k_norm.weight": ("self_attn.k_norm.weight", "head", True),
}

LAYER_TENSORS: dict[str, dict[str, tuple[str, str, bool]]] = {
    "gemma": {**_ATTN_MLP, **_GEMMA1_NORMS},
    "gemma2": {**_ATTN_MLP, **_SANDWICH_NORMS},
    "gemma3": {**_ATTN_MLP, **_SANDWICH_NORMS, **_QK_NORMS},
}

# GGUF architecture <-> HF model_type (whose HF class is config.ARCHITECTURES[model_type]).
MODEL_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
GGUF_ARCHS = {v: k for k, v in MODEL_TYPES.items()} | {"gemma3": "gemma3"}

# llama.cpp hard-codes these (llama-model.cpp, load_hparams), so GGUF files do not carry them.
GEMMA2_DEFAULT_SLIDING_WINDOW = 4096
GEMMA2_DEFAULT_SOFTCAPS = (50.0, 30.0)  # attention, final logits
GEMMA3_SLIDING_WINDOW_PATTERN = 6  # 5 local : 1 global
GEMMA3_LOCAL_ROPE_BASE = 10000.0
# llama.cpp's "27B" configs (by layer count) scale queries by hidden/heads instead of head_dim.
_QUERY_SCALE_FROM_HIDDEN_LAYERS = {"gemma2": 46, "gemma3": 62}


@dataclass
class GGUFCheckpoint:
    """A Gemma GGUF file read into HF form.

    tensors: HF name -> float32 array in HF shape (out, in); norm weights already minus 1.
    config: an HF config.json dict (model_type gemma / gemma2 / gemma3_text).
    tokenizer: raw SentencePiece-style vocabulary: tokens (list[str]), scores (float32 array),
      token_types (int32 array; 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
      6 byte), bos_id, eos_id, unk_id, pad_id (int or None), add_bos_token, add_eos_token,
      add_space_prefix (bool or None).
    metadata: every other key/value of the file, as plain Python values.
    tensor_types: HF name -> the ggml type it was stored as ("Q4_K", "F32", ...).
    """

    tensors: dict[str, np.ndarray]
    config: dict[str, Any]
    tokenizer: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    tensor_types: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Low-level GGUF parsing
# --------------------------------------------------------------------------------------------

# GGUF value type id -> struct format (little-endian) for scalars.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass
class _TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: GGUF dims reversed (ne0, the row, last)
    qtype: int
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reads over the file buffer; running off the end is truncation."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise self.truncated()
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise self.truncated()
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # llama.cpp vocabularies may hold byte pieces that are not valid UTF-8 on their own.
            return raw.decode("utf-8", errors="surrogateescape")

    def strings(self, count: int) -> list[str]:
        """`count` length-prefixed strings; a tight loop because vocabularies hold 256K of them."""
        buf, pos, out = self.buf, self.pos, []
        unpack_len = struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                (n,) = unpack_len(buf, pos)
                out.append(buf[pos + 8 : pos + 8 + n])
                pos += 8 + n
        except struct.error:
            raise self.truncated() from None
        if pos > len(buf):
            raise self.truncated()
        self.pos = pos
        try:
            return [b.decode("utf-8") for b in out]
        except UnicodeDecodeError:
            return [b.decode("utf-8", errors="surrogateescape") for b in out]

    def value(self, vtype: int):
        if vtype == 6:
            return _f32(self.take("<f"))
        if vtype in _SCALAR_FORMATS:
            return self.take(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _ARRAY_DTYPES:
                dtype = np.dtype(_ARRAY_DTYPES[etype])
                end = self.pos + count * dtype.itemsize
                if end > len(self.buf):
                    raise self.truncated()
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos = end
                return arr.astype(bool) if etype == 7 else arr
            if etype == _STRING:
                return self.strings(count)
            return [self.value(etype) for _ in range(count)]
        raise UserError(f"{self.path}: corrupt GGUF metadata (unknown value type {vtype} at byte {self.pos}); re-download or re-export the file")

    def truncated(self) -> UserError:
        return UserError(f"{self.path}: truncated or corrupt GGUF header (ends before byte {self.pos}, file has {len(self.buf)} bytes); re-download or re-export the file")


def _parse(buf, path: str) -> tuple[dict[str, Any], list[_TensorInfo]]:
    """Parse a GGUF v2/v3 header from a bytes-like buffer -> (key/values, tensor infos)."""
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF'); pass a .gguf model file")
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise UserError(f"{path}: GGUF version {version} is not supported (only 2 and 3); re-convert with a recent llama.cpp")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    # Each record takes at least 8+4 bytes (kv) / 8+4+4+8 bytes (tensor): reject absurd counts early.
    if n_kv * 12 + n_tensors * 24 > len(buf):
        raise cur.truncated()
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        kv[key] = cur.value(cur.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        if n_dims > 4:
            raise UserError(f"{path}: tensor {name} has {n_dims} dimensions (GGUF allows 4); the file is corrupt")
        dims = [cur.take("<Q") for _ in range(n_dims)]
        qtype, offset = cur.take("<I"), cur.take("<Q")
        infos.append(_TensorInfo(name, tuple(reversed(dims)), qtype, offset, 0))
    alignment = int(kv.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    for info in infos:
        info.offset += data_start
        try:
            qtype = GGMLType(info.qtype)
        except ValueError:
            continue  # reported by the caller with the tensor's name
        try:
            info.nbytes = nbytes_for(qtype, math.prod(info.shape))
        except ValueError:
            raise UserError(f"{path}: tensor {info.name} of shape {info.shape} does not fill whole {qtype.name} blocks; the file is corrupt") from None
        if info.offset + info.nbytes > len(buf):
            raise UserError(
                f"{path}: truncated: tensor {info.name} needs bytes {info.offset}..{info.offset + info.nbytes} "
                f"but the file has {len(buf)}; re-download or re-export the file"
            )
    return kv, infos


def _plain(value):
    """Metadata value as plain Python (numpy arrays -> lists)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal that was written (9.99999997e-07 -> 1e-06)."""
    return float(str(np.float32(x)))


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def config_from_metadata(kv: dict[str, Any], vocab_size: int, tied: bool, path: str = "<gguf>") -> dict[str, Any]:
    """Build an HF config.json dict from GGUF key/values of a gemma / gemma2 / gemma3 file.

    vocab_size: rows of token_embd; tied: False when the file has an `output.weight`.
    Values llama.cpp does not store are derived as llama.cpp does (see module constants).
    """
    arch = kv.get("general.architecture")
    if arch not in LAYER_TENSORS:
        raise UserError(f"{path}: architecture {arch!r} is not supported (expected one of gemma, gemma2, gemma3)")

    def get(key: str, default=None, required: bool = False):
        full = f"{arch}.{key}"
        if full in kv:
            return _plain(kv[full])
        if required:
            raise UserError(f"{path}: GGUF metadata lacks {full}; the file is incomplete, re-convert it with llama.cpp")
        return default

    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    layers = int(get("block_count", required=True))
    head_dim = int(get("attention.key_length", hidden // heads))
    config: dict[str, Any] = {
        "model_type": MODEL_TYPES[arch],
        "architectures": [ARCHITECTURES[MODEL_TYPES[arch]]],
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", required=True)),
        "max_position_embeddings": int(get("context_length", 8192)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "tie_word_embeddings": tied,
    }
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in kv:
            config[hf_key] = int(kv[f"tokenizer.ggml.{gguf_key}"])

    if arch in _QUERY_SCALE_FROM_HIDDEN_LAYERS:
        big = layers == _QUERY_SCALE_FROM_HIDDEN_LAYERS[arch]
        config["query_pre_attn_scalar"] = hidden // heads if big else head_dim
    if arch == "gemma2":
        _gemma2_fields(config, get, layers)
    if arch == "gemma3":
        _gemma3_fields(config, get, layers, path)
    return config


def _gemma2_fields(config: dict[str, Any], get, layers: int) -> None:
    attn_cap, final_cap = GEMMA2_DEFAULT_SOFTCAPS
    config["attn_logit_softcapping"] = float(get("attn_logit_softcapping", attn_cap))
    config["final_logit_softcapping"] = float(get("final_logit_softcapping", final_cap))
    config["sliding_window"] = int(get("attention.sliding_window", GEMMA2_DEFAULT_SLIDING_WINDOW))
    # Even layers are local (llama.cpp set_swa_pattern(2); HF Gemma2Config).
    config["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]


def _gemma3_fields(config: dict[str, Any], get, layers: int, path: str) -> None:
    config["sliding_window"] = int(get("attention.sliding_window", required=True))
    config["rope_local_base_freq"] = float(get("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE))
    pattern = get("attention.sliding_window_pattern", GEMMA3_SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, list):  # per-layer booleans, True = sliding
        if len(pattern) != layers:
            raise UserError(f"{path}: gemma3.attention.sliding_window_pattern has {len(pattern)} entries for {layers} layers")
        config["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        pattern = int(pattern)
        config["sliding_window_pattern"] = pattern
        config["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        config["rope_scaling"] = {"rope_type": scaling, "factor": float(get("rope.scaling.factor", 1.0))}
    else:
        config["rope_scaling"] = None
    config["attn_logit_softcapping"] = get("attn_logit_softcapping")
    config["final_logit_softcapping"] = get("final_logit_softcapping")


def _expected_shape(key: str, c: dict[str, Any]) -> tuple[int, ...]:
    """HF shape of a tensor kind under config c."""
    h, d = c["hidden_size"], c["head_dim"]
    return {
        "embed": (c["vocab_size"], h),
        "hidden": (h,),
        "head": (d,),
        "q": (c["num_attention_heads"] * d, h),
        "kv": (c["num_key_value_heads"] * d, h),
        "o": (h, c["num_attention_heads"] * d),
        "up": (c["intermediate_size"], h),
        "down": (h, c["intermediate_size"]),
    }[key]


def name_table(arch: str, num_layers: int, tied: bool = True) -> dict[str, tuple[str, str, bool]]:
    """Every GGUF tensor name of a `arch` model -> (HF name, shape key, is a norm weight)."""
    table = dict(_GLOBAL_TENSORS)
    if not tied:
        table.update(_LM_HEAD)
    for i in range(num_layers):
        for gguf_name, (hf_name, shape, is_norm) in LAYER_TENSORS[arch].items():
            table[f"blk.{i}.{gguf_name}"] = (f"model.layers.{i}.{hf_name}", shape, is_norm)
    return table


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------

_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


def _tokenizer_from_metadata(kv: dict[str, Any], path: str) -> dict[str, Any]:
    model = kv.get("tokenizer.ggml.model")
    if model is None or any(k not in kv for k in _TOKENIZER_ARRAYS):
        missing = [k for k in ("tokenizer.ggml.model", *_TOKENIZER_ARRAYS) if k not in kv]
        raise UserError(f"{path}: GGUF file lacks tokenizer metadata ({', '.join(missing)}); use a GGUF converted with its tokenizer")
    if model not in ("llama", "gemma4"):
        raise UserError(f"{path}: tokenizer.ggml.model is {model!r}; Gemma GGUFs use the SentencePiece ('llama') "
                        "or Gemma 4 ('gemma4') tokenizer")
    tokens, scores, types = (kv[k] for k in _TOKENIZER_ARRAYS)
    if model == "gemma4":
        types = gguf_gemma4.visible_types(tokens, types, gguf_gemma4.CONTROL, gguf_gemma4.USER_DEFINED)
        if "tokenizer.ggml.merges" in kv:
            scores = _scores_from_merges(tokens, scores, types, kv["tokenizer.ggml.merges"])
    if not (len(tokens) == len(scores) == len(types)):
        raise UserError(f"{path}: tokenizer arrays disagree ({len(tokens)} tokens, {len(scores)} scores, {len(types)} types); the file is corrupt")

    def opt(key):
        return _plain(kv[key]) if key in kv else None

    return {
        "tokens": tokens,
        "scores": np.asarray(scores, dtype=np.float32),
        "token_types": np.asarray(types, dtype=np.int32),
        "bos_id": opt("tokenizer.ggml.bos_token_id"),
        "eos_id": opt("tokenizer.ggml.eos_token_id"),
        "unk_id": opt("tokenizer.ggml.unknown_token_id"),
        "pad_id": opt("tokenizer.ggml.padding_token_id"),
        "add_bos_token": opt("tokenizer.ggml.add_bos_token"),
        "add_eos_token": opt("tokenizer.ggml.add_eos_token"),
        "add_space_prefix": opt("tokenizer.ggml.add_space_prefix"),
    }


def _scores_from_merges(tokens: list, scores, types, merges: list) -> np.ndarray:
    """SentencePiece BPE scores for a `gemma4` vocabulary whose scores are placeholders.

    llama.cpp's converter writes one score for every piece and ranks merges by their order;
    SentencePiece ranks by piece score. A merged piece's score is minus its merge's rank (the
    first merge wins); when the file's own scores already differ (ours keep them), they stay.
    """
    scores = np.asarray(scores, dtype=np.float32)
    normal = np.asarray(types) == 1
    if not normal.any() or len(np.unique(scores[normal])) > 1:
        return scores
    index = {t: i for i, t in enumerate(tokens)}
    out = np.full(len(tokens), -1e9, dtype=np.float32)
    out[~normal] = 0.0
    for rank, merge in enumerate(merges):
        i = index.get(merge.replace(" ", "", 1))
        if i is not None and out[i] == -1e9:
            out[i] = -float(rank)
    return out


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read a Gemma 1/2/3-text GGUF file into HF-named float32 tensors, an HF config and the vocab.

    Strict: every tensor in the file must map to an HF name, every expected tensor must be
    present with the shape the config implies. Raises UserError (naming the file and tensor)
    for a missing, truncated or corrupt file, an unsupported architecture or tensor type, and
    missing tokenizer metadata.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; pass the path of a .gguf model file") from None
    except ValueError:  # mmap of an empty file
        raise UserError(f"{path}: empty file, not a GGUF model; re-download or re-export it") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); pass the path of a readable .gguf file") from None
    try:
        return _read(buf, path)
    finally:
        try:
            buf.close()
        except BufferError:
            pass  # an exception's traceback still holds a view of it; GC closes the map


def _vocab_size(by_name: dict[str, _TensorInfo], tokenizer: dict[str, Any], path: str) -> int:
    """Rows of token_embd, which must be one per vocabulary piece."""
    if "token_embd.weight" not in by_name:
        raise UserError(f"{path}: missing tensor token_embd.weight; the file is incomplete")
    vocab_size = by_name["token_embd.weight"].shape[0]
    if len(tokenizer["tokens"]) != vocab_size:
        raise UserError(f"{path}: tokenizer has {len(tokenizer['tokens'])} tokens but token_embd.weight has {vocab_size} rows; the file is inconsistent")
    return vocab_size


def _read(buf, path: str) -> GGUFCheckpoint:
    kv, infos = _parse(buf, path)
    arch = kv.get("general.architecture")
    if arch in gguf_gemma4.MODEL_TYPES:
        return _read_gemma4(buf, kv, infos, path)
    if arch not in LAYER_TENSORS:
        raise UserError(f"{path}: architecture {arch!r} is not supported (mlx-gemma reads gemma, gemma2, gemma3, "
                        "gemma3n and gemma4 GGUF files)")
    tokenizer = _tokenizer_from_metadata(kv, path)
    by_name = {info.name: info for info in infos}
    vocab_size = _vocab_size(by_name, tokenizer, path)
    config = config_from_metadata(kv, vocab_size, tied="output.weight" not in by_name, path=path)

    table = name_table(arch, config["num_hidden_layers"], config["tie_word_embeddings"])
    unexpected = sorted(set(by_name) - set(table))
    if unexpected:
        raise UserError(f"{path}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all) for a {arch} model with {config['num_hidden_layers']} layers; the file is not a plain Gemma text model")
    missing = [name for name in table if name not in by_name]
    if missing:
        raise UserError(f"{path}: missing tensor {missing[0]} ({len(missing)} in all); the file is incomplete")

    tensors, types = {}, {}
    for gguf_name, (hf_name, shape_key, is_norm) in table.items():
        info = by_name[gguf_name]
        expected = _expected_shape(shape_key, config)
        if info.shape != expected:
            raise UserError(f"{path}: tensor {gguf_name} has shape {info.shape}, expected {expected} from the metadata; the file is inconsistent")
        w = _tensor(buf, info, path)
        if is_norm:
            w -= 1.0  # llama.cpp stores Gemma norm weights as (1 + w)
        tensors[hf_name] = w
        types[hf_name] = GGMLType(info.qtype).name
    metadata = {k: _plain(v) for k, v in kv.items() if k not in _TOKENIZER_ARRAYS}
    return GGUFCheckpoint(tensors=tensors, config=config, tokenizer=tokenizer, metadata=metadata, tensor_types=types)


def _tensor(buf, info: _TensorInfo, path: str) -> np.ndarray:
    """One tensor of the file, dequantised to float32 in its numpy shape."""
    if info.qtype not in BLOCK_LAYOUT:
        name = _ggml_type_name(info.qtype)
        supported = ", ".join(t.name for t in BLOCK_LAYOUT)
        raise UserError(f"{path}: tensor {info.name} has type {name}, which mlx-gemma cannot dequantize (supported: {supported}); re-quantize the model to one of those")
    raw = np.frombuffer(buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    return dequantize(raw, info.qtype, math.prod(info.shape)).reshape(info.shape)


def _read_gemma4(buf, kv: dict[str, Any], infos: list[_TensorInfo], path: str) -> GGUFCheckpoint:
    """A gemma4 / gemma3n file: the config from its keys and tensor shapes, tensors renamed to HF.
    Shapes are checked when the model is built from them (loading.build_model, strict)."""
    tokenizer = _tokenizer_from_metadata(kv, path)
    by_name = {info.name: info for info in infos}
    vocab_size = _vocab_size(by_name, tokenizer, path)
    shapes = {name: info.shape for name, info in by_name.items()}
    freqs = _tensor(buf, by_name["rope_freqs.weight"], path) if "rope_freqs.weight" in by_name else None
    config = gguf_gemma4.config_from_metadata(kv, shapes, freqs, vocab_size, path)
    raw = {name: _tensor(buf, info, path) for name, info in by_name.items()}
    parts = config.get("altup_num_inputs", 1) - 1
    try:
        tensors = gguf_gemma4.hf_tensors(raw)
        types = gguf_gemma4.hf_types({n: GGMLType(i.qtype).name for n, i in by_name.items()}, parts)
    except UserError as e:
        raise UserError(f"{path}: {e}; the file is not a plain Gemma text model") from None
    metadata = {k: _plain(v) for k, v in kv.items() if k not in _TOKENIZER_ARRAYS}
    return GGUFCheckpoint(tensors=tensors, config=config, tokenizer=tokenizer, metadata=metadata,
                         tensor_types=types)


def _ggml_type_name(qtype: int) -> str:
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(qtype).name
    except (ImportError, ValueError):
        return f"type id {qtype}"


def tokenizer_model_bytes(ckpt: GGUFCheckpoint) -> bytes:
    """A SentencePiece tokenizer.model (serialised ModelProto) rebuilt from the GGUF vocabulary.

    Delegates to `convert.spm.tokenizer_model_from_gguf_fields`.
    """
    try:
        from .spm import tokenizer_model_from_gguf_fields
    except ImportError as e:  # written by another module owner; absent in early checkouts
        raise NotImplementedError("mlx_gemma.convert.spm.tokenizer_model_from_gguf_fields is not available yet") from e
    t = ckpt.tokenizer
    return tokenizer_model_from_gguf_fields(t["tokens"], t["scores"], t["token_types"], t["bos_id"], t["eos_id"], t["unk_id"], t["pad_id"])


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

OUT_TYPES = {"f32": GGMLType.F32, "f16": GGMLType.F16, "bf16": GGMLType.BF16, "q8_0": GGMLType.Q8_0}
# llama.cpp's general.file_type (enum llama_ftype) for each out_type.
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
# SentencePiece ModelProto.SentencePiece.Type -> GGUF token type: the same numbering.
_USER_DEFINED = 4


# Small matrices llama.cpp's quantizer never rounds (llama-quant.cpp, tensor_allows_quantization):
# the MoE router, Gemma 3n's AltUp and LAuReL matrices, the per-layer input projection.
_KEEP_F32 = ("ffn_gate_inp.", "altup", "laurel", "per_layer_model_proj.")


def _encode_tensor(name: str, w: np.ndarray, out_type: str) -> tuple[np.ndarray, GGMLType]:
    """Float tensor -> (raw bytes as uint8 array of shape (..., row_bytes), ggml type)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    qtype = OUT_TYPES[out_type]
    if w.ndim == 1 or any(part in name for part in _KEEP_F32):
        qtype = GGMLType.F32  # llama.cpp keeps 1-D tensors (norms) in F32, and those above
    elif qtype == GGMLType.Q8_0 and w.shape[-1] % 32:
        qtype = GGMLType.F16  # rows that do not fill Q8_0 blocks: llama.cpp falls back too
    if qtype == GGMLType.F32:
        raw = w.view(np.uint8)
    elif qtype == GGMLType.F16:
        raw = w.astype(np.float16).view(np.uint8)
    elif qtype == GGMLType.BF16:
        bits = w.view(np.uint32)
        # Round to nearest even on the dropped 16 bits; keep NaNs NaN.
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        rounded = np.where(np.isnan(w), np.uint16(0x7FC0), rounded)
        raw = rounded.view(np.uint8)
    else:
        raw = quantize_q8_0(w)
    return raw.reshape(*w.shape[:-1], -1), qtype


def _check_exportable(config: dict[str, Any], arch: str) -> None:
    """Refuse configs that llama.cpp would run differently from HF (it hard-codes these)."""
    layers = config["num_hidden_layers"]
    if arch in _QUERY_SCALE_FROM_HIDDEN_LAYERS:
        big = layers == _QUERY_SCALE_FROM_HIDDEN_LAYERS[arch]
        derived = config["hidden_size"] // config["num_attention_heads"] if big else config["head_dim"]
        if config.get("query_pre_attn_scalar", derived) != derived:
            raise UserError(
                f"config query_pre_attn_scalar={config['query_pre_attn_scalar']} cannot be stored in GGUF "
                f"(llama.cpp derives {derived} for a {layers}-layer {arch}); export to an HF directory instead"
            )
    got = config.get("layer_types")
    if got is not None:
        if arch == "gemma2":
            want = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        elif arch == "gemma3":
            p = config.get("sliding_window_pattern", GEMMA3_SLIDING_WINDOW_PATTERN)
            want = ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(layers)]
        else:
            want = got
        if list(got) != want:
            raise UserError(f"config layer_types {got} differ from the fixed pattern llama.cpp uses for {arch}; export to an HF directory instead")
    if arch == "gemma3" and config.get("sliding_window_pattern", GEMMA3_SLIDING_WINDOW_PATTERN) != GEMMA3_SLIDING_WINDOW_PATTERN:
        raise UserError(f"config sliding_window_pattern={config['sliding_window_pattern']}: llama.cpp fixes it at 6 for gemma3; export to an HF directory instead")


def _spm_vocab(tokenizer_model: bytes) -> dict[str, Any]:
    """tokens / scores / types / special ids from a serialised SentencePiece ModelProto."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    try:
        proto.ParseFromString(tokenizer_model)
    except Exception as e:  # protobuf's DecodeError
        raise UserError(f"tokenizer model is not a SentencePiece model ({e}); pass the bytes of tokenizer.model") from None
    if not proto.pieces:
        raise UserError("tokenizer model has no pieces; pass the bytes of a real tokenizer.model")
    tokens, scores, types = [], [], []
    for p in proto.pieces:
        piece = p.piece
        if p.type == _USER_DEFINED:
            # llama.cpp matches user-defined pieces against raw text, so it stores them with
            # spaces where SentencePiece has U+2581 (convert_hf_to_gguf.py does the same).
            piece = piece.replace("\u2581", " ")
        tokens.append(piece)
        scores.append(p.score)
        types.append(int(p.type))
    spec = proto.trainer_spec
    return {
        "tokens": tokens,
        "scores": np.asarray(scores, dtype=np.float32),
        "types": np.asarray(types, dtype=np.int32),
        "bos": spec.bos_id,
        "eos": spec.eos_id,
        "unk": spec.unk_id,
        "pad": spec.pad_id,
    }


def gguf_tensors_from_hf(tensors: dict[str, np.ndarray], config: dict[str, Any]) -> dict[str, np.ndarray]:
    """HF-named float tensors -> GGUF-named float32 tensors (norms +1), strictly checked.

    Every expected HF tensor must be present with its config shape and no other tensor may be
    given (`lm_head.weight` only when tie_word_embeddings is False).
    """
    arch = GGUF_ARCHS.get(config.get("model_type"))
    if arch is None:
        raise UserError(f"config model_type {config.get('model_type')!r} cannot be exported to GGUF (gemma, gemma2, gemma3_text)")
    c = {**config, "head_dim": config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]}
    c.setdefault("num_key_value_heads", c["num_attention_heads"])
    table = name_table(arch, c["num_hidden_layers"], c.get("tie_word_embeddings", True))
    wanted = {hf: gguf for gguf, (hf, _, _) in table.items()}
    unexpected = sorted(set(tensors) - set(wanted))
    if unexpected:
        raise UserError(f"tensor {unexpected[0]} ({len(unexpected)} in all) has no GGUF name for a {arch} model with {c['num_hidden_layers']} layers")
    out = {}
    for gguf_name, (hf_name, shape_key, is_norm) in table.items():
        if hf_name not in tensors:
            raise UserError(f"tensor {hf_name} is missing; a {arch} GGUF needs it")
        w = np.asarray(tensors[hf_name], dtype=np.float32)
        expected = _expected_shape(shape_key, c)
        if w.shape != expected:
            raise UserError(f"tensor {hf_name} has shape {w.shape}, expected {expected} from the config")
        out[gguf_name] = w + np.float32(1.0) if is_norm else w
    return out


def _gguf_layout(tensors: dict[str, np.ndarray], config: dict[str, Any]):
    """(GGUF architecture, GemmaConfig for gemma4 / gemma3n else None, GGUF-named tensors), after
    refusing configs llama.cpp would run differently."""
    model_type = config.get("model_type")
    if model_type in gguf_gemma4.GGUF_ARCHS:
        from mlx_gemma.config import GemmaConfig

        c = GemmaConfig.from_dict(config)
        gguf_gemma4.check_exportable(c)
        return gguf_gemma4.GGUF_ARCHS[model_type], c, gguf_gemma4.gguf_tensors(tensors, c)
    if model_type in GGUF_ARCHS:
        arch = GGUF_ARCHS[model_type]
        out = gguf_tensors_from_hf(tensors, config)
        _check_exportable(config, arch)
        return arch, None, out
    raise UserError(f"config model_type {model_type!r} cannot be exported to GGUF "
                    "(gemma, gemma2, gemma3_text, gemma4_text, gemma3n_text)")


def write_gguf(
    tensors: dict[str, np.ndarray],
    config: dict[str, Any],
    tokenizer_model: bytes,
    path: str | os.PathLike,
    out_type: str = "f16",
    chat_template: str | None = None,
) -> None:
    """Write a Gemma 1/2/3-text, Gemma 4 or Gemma 3n text model as a GGUF file llama.cpp can run.

    tensors: HF-named arrays (any float dtype numpy can cast to float32), HF shapes.
    config: HF config.json dict (model_type gemma / gemma2 / gemma3_text / gemma4_text / gemma3n_text).
    tokenizer_model: bytes of the SentencePiece tokenizer.model.
    out_type: 'f32' | 'f16' | 'bf16' | 'q8_0' for 2-D and 3-D tensors; 1-D tensors stay F32.
    chat_template: Jinja text stored as tokenizer.chat_template (None: none).
    The file is written to a temporary name in the same folder, then renamed over `path`.
    """
    import gguf  # gguf-py's writer; imported here so reading never needs it

    if out_type not in OUT_TYPES:
        raise UserError(f"unknown GGUF out_type {out_type!r}; use one of {', '.join(OUT_TYPES)}")
    arch, c, gguf_tensors = _gguf_layout(tensors, config)
    vocab = _spm_vocab(tokenizer_model)
    if len(vocab["tokens"]) != gguf_tensors["token_embd.weight"].shape[0]:
        raise UserError(f"tokenizer model has {len(vocab['tokens'])} pieces but model.embed_tokens.weight has {gguf_tensors['token_embd.weight'].shape[0]} rows; pass the model's own tokenizer.model")

    path = Path(path)
    # A folder that is missing, read-only or full is one line naming the cause: write_atomic
    # raises files.WriteError for it.

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        _add_general(w, config, arch, out_type)
        if c is not None:
            gguf_gemma4.add_metadata(w, c)
        else:
            _add_metadata(w, config, arch)
        _add_tokenizer(w, vocab, tokenizer_model if arch == "gemma4" else None, chat_template)
        for name, t in gguf_tensors.items():
            raw, qtype = _encode_tensor(name, t, out_type)
            w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType(int(qtype)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write_atomic(path, write)


def _rope(config: dict[str, Any]) -> tuple[float, float, dict | None]:
    """(global rope base, local rope base, global rope scaling) from either config.json style.

    Classic files have rope_theta / rope_local_base_freq / rope_scaling; transformers >= 5
    writes rope_parameters, per layer type for Gemma 3 ({"full_attention": {...}, ...}).
    """
    params = config.get("rope_parameters")
    if params:
        full = params.get("full_attention", params)
        local = params.get("sliding_attention", {})
        scaling = None if full.get("rope_type", "default") == "default" else full
        return (float(full.get("rope_theta", 10000.0)), float(local.get("rope_theta", GEMMA3_LOCAL_ROPE_BASE)), scaling)
    return (
        float(config.get("rope_theta", 10000.0)),
        float(config.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_BASE)),
        config.get("rope_scaling"),
    )


def _add_general(w, config: dict[str, Any], arch: str, out_type: str) -> None:
    import gguf

    w.add_name(config.get("_name_or_path") or f"{arch}")
    w.add_file_type(_FILE_TYPES[out_type])
    if out_type == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_metadata(w, config: dict[str, Any], arch: str) -> None:
    """Architecture keys of gemma / gemma2 / gemma3 as llama.cpp's convert_hf_to_gguf.py writes them."""
    import gguf

    c = config
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    w.add_context_length(int(c.get("max_position_embeddings", 8192)))
    w.add_embedding_length(int(c["hidden_size"]))
    w.add_block_count(int(c["num_hidden_layers"]))
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(int(heads))
    w.add_head_count_kv(int(c.get("num_key_value_heads", heads)))
    w.add_key_length(int(head_dim))
    w.add_value_length(int(head_dim))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    rope_theta, rope_local, scaling = _rope(c)
    w.add_rope_freq_base(rope_theta)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(float(c.get("attn_logit_softcapping") or GEMMA2_DEFAULT_SOFTCAPS[0]))
        w.add_final_logit_softcapping(float(c.get("final_logit_softcapping") or GEMMA2_DEFAULT_SOFTCAPS[1]))
        w.add_sliding_window(int(c.get("sliding_window", GEMMA2_DEFAULT_SLIDING_WINDOW)))
    if arch == "gemma3":
        w.add_sliding_window(int(c["sliding_window"]))
        if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(scaling["factor"]))
        elif scaling:
            raise UserError(f"config rope_scaling {scaling} is not supported in Gemma GGUF files (only linear)")
        if c.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(c["final_logit_softcapping"]))
        if rope_local != GEMMA3_LOCAL_ROPE_BASE:
            raise UserError(f"config local rope base {rope_local}: llama.cpp fixes it at 10000 for gemma3; export to an HF directory instead")


def _add_tokenizer(w, vocab: dict[str, Any], bpe_model: bytes | None, chat_template: str | None) -> None:
    """The vocabulary: SentencePiece ("llama") for Gemma 1-3 / 3n; for Gemma 4, the BPE form
    llama.cpp's `gemma4` tokenizer reads, with merges ranked as SentencePiece ranks its pieces.
    The chat template (Jinja) lets llama.cpp's chat endpoints format turns as we do."""
    if bpe_model is None:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
    else:
        from .tokenizer_json import tokenizer_json_from_model

        w.add_tokenizer_model("gemma4")
        w.add_token_merges([f"{a} {b}" for a, b in tokenizer_json_from_model(bpe_model)["model"]["merges"]])
        vocab = {**vocab, "types": gguf_gemma4.visible_types(vocab["tokens"], vocab["types"], gguf_gemma4.USER_DEFINED,
                                                             gguf_gemma4.CONTROL)}
    w.add_token_list(vocab["tokens"])
    w.add_token_scores(vocab["scores"].tolist())
    w.add_token_types(vocab["types"].tolist())
    if chat_template:
        w.add_chat_template(chat_template)
    for setter, key in ((w.add_bos_token_id, "bos"), (w.add_eos_token_id, "eos"), (w.add_unk_token_id, "unk"), (w.add_pad_token_id, "pad")):
        if vocab[key] >= 0:  # SentencePiece uses -1 for "none"
            setter(int(vocab[key]))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
