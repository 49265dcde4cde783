"""Hugging Face `tokenizer.json` <-> SentencePiece `tokenizer.model`, for Gemma's BPE vocabularies.

transformers 5 saves a Gemma tokenizer as tokenizer.json only, so model dirs made by today's
TRL / PEFT flows have no tokenizer.model. We read such a file by rebuilding the SentencePiece
model it was made from, rather than tokenizing with the `tokenizers` library, because
everything downstream wants the SentencePiece model anyway: GGUF export writes its pieces,
scores and types; every dir we write carries tokenizer.model; and GemmaTokenizer (special-token
splitting, byte-level streaming) stays one implementation over one engine. The parity of the
rebuilt model with transformers' tokenizer for the same file is what the tests check, on the
real 262k Gemma 3 vocabulary.

What a Gemma tokenizer.json says, and the SentencePiece equivalent we write:
- normalizer Replace(" " -> "▁"): SentencePiece's `escape_whitespaces`, no dummy prefix;
- BPE with merges ranked best-first: SentencePiece BPE merges the adjacent pair whose result has
  the highest score, so each piece gets score -(rank of the best merge that makes it). A piece
  that no merge makes can never appear in HF's output, so it is typed UNUSED (SentencePiece
  then never forms it either);
- added tokens: special ones are CONTROL pieces (matched whole in text by GemmaTokenizer, as HF
  does), the others USER_DEFINED (SentencePiece matches those whole, leftmost-longest, as HF
  matches added tokens);
- `<0xNN>` pieces with byte_fallback: BYTE pieces.

The writer goes the other way for every dir we save, so readers that only know tokenizer.json
(transformers 5, tokenizers, TGI, vLLM) open it: vocab by id, merges from every split of a
piece into two pieces, best score first (the order SentencePiece would merge them in), and
CONTROL / USER_DEFINED pieces as added tokens.
"""

from __future__ import annotations

import re

from sentencepiece import sentencepiece_model_pb2 as _pb

from ..errors import UserError
from .spm import SPACE_SYMBOL, serialize_gemma_model

_Piece = _pb.ModelProto.SentencePiece
_BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")
# Pre-tokenizers that change nothing once the normalizer has turned every " " into "▁".
_NOOP_SPLIT = {"type": "Split", "pattern": {"String": " "}}


# -- reading ----------------------------------------------------------------------------------


def tokenizer_model_from_tokenizer_json(data: dict, special_tokens: dict | None = None,
                                        source: str = "tokenizer.json") -> bytes:
    """Serialize the SentencePiece BPE model (bytes of a tokenizer.model) equivalent to a Gemma tokenizer.json.

    data: the parsed tokenizer.json. special_tokens: {"bos_token": "<bos>", "eos_token": ...,
    "pad_token": ...} as tokenizer_config.json names them (a name or an {"content": name} dict);
    Gemma's names are the default. Raises UserError, naming `source` and the field, for a
    tokenizer.json that is not a SentencePiece-style BPE (another normalizer or pre-tokenizer,
    a non-BPE model, ids with gaps).
    """
    _check_shapes(data, special_tokens, source)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{source}: model.type is {model.get('type')!r}; mlx-gemma reads Gemma's BPE tokenizer.json")
    if model.get("ignore_merges"):
        raise UserError(f"{source}: model.ignore_merges is true, which SentencePiece cannot express")
    _check_pipeline(data, source)
    pieces = _pieces_by_id(model.get("vocab") or {}, data.get("added_tokens") or [], source)
    ranks = _best_merge_ranks(model.get("merges") or [], source)
    unk = model.get("unk_token")
    byte_fallback = bool(model.get("byte_fallback"))
    special = {a["id"] for a in data.get("added_tokens") or [] if a.get("special")}
    user_defined = {a["id"] for a in data.get("added_tokens") or [] if not a.get("special")}

    proto = _pb.ModelProto()
    for i, piece in enumerate(pieces):
        score = 0.0
        if piece == unk:
            kind = _Piece.UNKNOWN
        elif i in special:
            kind = _Piece.CONTROL
        elif i in user_defined:
            kind = _Piece.USER_DEFINED
            piece = piece.replace(" ", SPACE_SYMBOL)  # matched against escaped text
        elif byte_fallback and _BYTE_PIECE.match(piece):
            kind = _Piece.BYTE
        elif piece in ranks:
            kind, score = _Piece.NORMAL, -float(ranks[piece] + 1)
        elif len(piece) == 1:
            kind = _Piece.NORMAL  # a starting symbol; no merge makes it, so its score is unused
        else:
            kind = _Piece.UNUSED  # no merge makes it: HF never outputs it (see module doc)
        proto.pieces.add(piece=piece, score=score, type=kind)
    if unk is None or unk not in pieces:
        raise UserError(f"{source}: model.unk_token {unk!r} is not in the vocabulary")
    ids = {name: _special_id(pieces, special_tokens, name, default, source)
           for name, default in (("bos_token", "<bos>"), ("eos_token", "<eos>"), ("pad_token", "<pad>"))}
    return serialize_gemma_model(proto, ids["bos_token"], ids["eos_token"], pieces.index(unk), ids["pad_token"])


def _check_shapes(data, special_tokens, source: str) -> None:
    """UserError naming `source` and the field when the JSON is not shaped as a tokenizer.json
    (`[]`, `5`, `{"model": 5}`, a vocab that is a string, a merge of one piece...), so that the
    readers below only meet the types they expect."""
    def bad(what: str, value) -> UserError:
        return UserError(f"{source}: {what}, got {type(value).__name__} {value!r:.60}; the file is not a "
                         "tokenizer.json (re-save the tokenizer)")

    if not isinstance(data, dict):
        raise bad("the file must hold a JSON object", data)
    model = data.get("model")
    if model is not None and not isinstance(model, dict):
        raise bad("model must be an object", model)
    model = model or {}
    vocab = model.get("vocab")
    if vocab is not None and not (isinstance(vocab, dict) and all(
            isinstance(p, str) and isinstance(i, int) and not isinstance(i, bool) and i >= 0
            for p, i in vocab.items())):
        raise bad("model.vocab must map pieces to token ids (whole numbers >= 0)", vocab)
    merges = model.get("merges")
    if merges is not None and not (isinstance(merges, list) and all(
            isinstance(m, str) or (isinstance(m, list) and all(isinstance(x, str) for x in m)) for m in merges)):
        raise bad("model.merges must be a list of \"a b\" strings or [a, b] pairs", merges)
    for key in ("unk_token",):
        if model.get(key) is not None and not isinstance(model[key], str):
            raise bad(f"model.{key} must be a string", model[key])
    added = data.get("added_tokens")
    if added is not None and not (isinstance(added, list) and all(
            isinstance(a, dict) and isinstance(a.get("id"), int) and not isinstance(a.get("id"), bool)
            and a["id"] >= 0 and isinstance(a.get("content"), str) for a in added)):
        raise bad("added_tokens must be a list of {id, content} objects", added)
    for key in ("normalizer", "pre_tokenizer"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise bad(f"{key} must be an object", data[key])
    normalizer = data.get("normalizer") or {}
    if normalizer.get("type") == "Sequence" and not (
            isinstance(normalizer.get("normalizers"), list)
            and all(isinstance(n, dict) for n in normalizer["normalizers"])):
        raise bad("normalizer.normalizers must be a list of objects", normalizer.get("normalizers"))
    if special_tokens is not None and not isinstance(special_tokens, dict):
        raise UserError(f"{source}: the tokenizer_config.json beside it must hold a JSON object, got "
                        f"{type(special_tokens).__name__}; re-save the tokenizer")


def _check_pipeline(data: dict, source: str) -> None:
    """Only Gemma's normalizer (spaces -> "▁") and no-op pre-tokenizers have a SentencePiece equivalent."""
    normalizer = data.get("normalizer")
    steps = normalizer.get("normalizers", []) if normalizer and normalizer.get("type") == "Sequence" else [normalizer]
    if not (len(steps) == 1 and steps[0] and steps[0].get("type") == "Replace"
            and steps[0].get("pattern") == {"String": " "} and steps[0].get("content") == SPACE_SYMBOL):
        raise UserError(f"{source}: normalizer {normalizer!r:.120} is not Gemma's (replace ' ' with '▁'); "
                        "mlx-gemma reads Gemma tokenizer.json files")
    pre = data.get("pre_tokenizer")
    if pre is not None and {k: pre.get(k) for k in _NOOP_SPLIT} != _NOOP_SPLIT:
        raise UserError(f"{source}: pre_tokenizer {pre!r:.120} is not Gemma's (none); "
                        "mlx-gemma reads Gemma tokenizer.json files")


def _pieces_by_id(vocab: dict, added: list, source: str) -> list:
    by_id = {int(i): p for p, i in vocab.items()}
    for token in added:  # added tokens may sit past the BPE vocabulary
        by_id.setdefault(int(token["id"]), token["content"])
    n = len(by_id)
    if not by_id or sorted(by_id) != list(range(n)):
        gap = next((i for i in range(n) if i not in by_id), n)
        raise UserError(f"{source}: token ids are not 0..{n - 1} (id {gap} is missing); the file is damaged")
    return [by_id[i] for i in range(n)]


def _best_merge_ranks(merges: list, source: str) -> dict:
    """{merged piece: rank of the first merge that makes it}; merges are "a b" strings or [a, b] pairs."""
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        pair = merge.split(" ", 1) if isinstance(merge, str) else merge
        if len(pair) != 2:
            raise UserError(f"{source}: merge {rank} ({merge!r}) is not a pair of pieces")
        ranks.setdefault(pair[0] + pair[1], rank)
    return ranks


def _special_id(pieces: list, names: dict | None, key: str, default: str, source: str) -> int | None:
    name = (names or {}).get(key, default)
    if isinstance(name, dict):
        name = name.get("content")
    if name is None:
        return None
    try:
        return pieces.index(name)
    except ValueError:
        if key in (names or {}):
            raise UserError(f"{source}: {key} {name!r} is not in the vocabulary") from None
        return None  # Gemma's default name absent: the vocabulary has no such token


# -- writing ----------------------------------------------------------------------------------


def tokenizer_json_from_model(model_bytes: bytes) -> dict:
    """The tokenizer.json dict (tokenizers format 1.0) equivalent to a Gemma SentencePiece model."""
    proto = _pb.ModelProto.FromString(model_bytes)
    pieces = [p.piece for p in proto.pieces]
    kinds = [p.type for p in proto.pieces]
    trainer = proto.trainer_spec
    bos = pieces[trainer.bos_id] if 0 <= trainer.bos_id < len(pieces) else None
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens(pieces, kinds),
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_SYMBOL},
        "pre_tokenizer": None,
        "post_processor": _bos_template(bos, trainer.bos_id),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE_SYMBOL}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": pieces[trainer.unk_id],
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
            "byte_fallback": bool(trainer.byte_fallback), "ignore_merges": False,
            "vocab": {p: i for i, p in enumerate(pieces)},
            "merges": _merges(proto),
        },
    }


def added_tokens(pieces: list, kinds: list) -> list:
    """CONTROL / UNKNOWN pieces as special added tokens, USER_DEFINED ones as plain added tokens,
    in tokenizer.json's `added_tokens` form (tokenizer_config.json's `added_tokens_decoder` holds
    the same entries by id).

    HF matches added tokens whole, leftmost-longest, before BPE: what SentencePiece does with
    user-defined pieces. A piece spelt with "▁" (a run of spaces) is matched in the normalized
    text, where spaces are "▁" already (normalized=True); in the raw text it would never match.
    Its content must stay the vocabulary's spelling: tokenizers gives an added token whose content
    is not in the vocabulary a new id.
    """
    special = (_Piece.CONTROL, _Piece.UNKNOWN)
    out = []
    for i, (piece, kind) in enumerate(zip(pieces, kinds)):
        if kind in special or kind == _Piece.USER_DEFINED:
            out.append({"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": kind == _Piece.USER_DEFINED and SPACE_SYMBOL in piece,
                        "special": kind in special})
    return out


def _bos_template(bos: str | None, bos_id: int) -> dict | None:
    if bos is None:
        return None
    special = {"SpecialToken": {"id": bos, "type_id": 0}}
    return {"type": "TemplateProcessing",
            "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [special, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _merges(proto) -> list:
    """Every split of a NORMAL piece into two mergeable pieces, best (highest-score) piece first.

    SentencePiece may merge any two adjacent symbols whose concatenation is a piece, so HF needs
    each such pair as a merge; ranking them by the product's score reproduces SentencePiece's order.
    """
    # Plain lists: reading protobuf fields inside the loop costs seconds on a 262k vocabulary.
    pieces = [p.piece for p in proto.pieces]
    kinds = [p.type for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    mergeable = (_Piece.NORMAL, _Piece.USER_DEFINED, _Piece.UNUSED)
    index = {p: i for i, (p, kind) in enumerate(zip(pieces, kinds)) if kind in mergeable}
    found = []
    for i, text in enumerate(pieces):
        if kinds[i] != _Piece.NORMAL or len(text) < 2:
            continue
        for k in range(1, len(text)):
            left = index.get(text[:k])
            if left is not None:  # most prefixes are not pieces: skip the second lookup
                right = index.get(text[k:])
                if right is not None:
                    found.append((-scores[i], i, left, right))
    found.sort()
    return [(pieces[left], pieces[right]) for _, _, left, right in found]  # JSON writes pairs as lists
