"""Rebuild a SentencePiece `tokenizer.model` from the tokenizer fields a GGUF file carries.

A Gemma GGUF has no tokenizer.model, only `tokenizer.ggml.{tokens, scores, token_type}` and the
special ids. Those are enough to write an equivalent SentencePiece BPE `ModelProto`, provided we
undo one change llama.cpp makes: it stores user-defined pieces made of spaces ("  ", "   ", ...)
with literal spaces, while SentencePiece escapes every space in the input to U+2581 ("▁") before
matching pieces, so a piece spelt with a real space can never match and those ids would be lost.

The normalizer settings are Gemma's (the same for Gemma 1, 2 and 3): identity normalization, no
dummy-prefix space, whitespace kept as it is, spaces escaped to "▁", byte fallback for characters
outside the vocabulary.
"""

from __future__ import annotations

from sentencepiece import sentencepiece_model_pb2 as _pb

SPACE_SYMBOL = "\u2581"  # what SentencePiece writes for " " inside pieces

# llama.cpp's token types (gguf.TokenType) happen to use SentencePiece's numbering
# (NORMAL=1, UNKNOWN=2, CONTROL=3, USER_DEFINED=4, UNUSED=5, BYTE=6); spelt out so a reader
# does not have to trust that coincidence.
_Piece = _pb.ModelProto.SentencePiece
_GGUF_TO_SPM_TYPE = {
    1: _Piece.NORMAL,
    2: _Piece.UNKNOWN,
    3: _Piece.CONTROL,
    4: _Piece.USER_DEFINED,
    5: _Piece.UNUSED,
    6: _Piece.BYTE,
}


def _piece_text(token: str, spm_type: int) -> str:
    """The piece as SentencePiece must spell it to match escaped input text."""
    if spm_type in (_Piece.NORMAL, _Piece.USER_DEFINED, _Piece.UNUSED) and " " in token:
        # Matched against text whose spaces are already "▁" (see module docstring).
        return token.replace(" ", SPACE_SYMBOL)
    return token


def tokenizer_model_from_gguf_fields(
    tokens: list[str],
    scores: list[float],
    token_types: list[int],
    bos_id: int | None,
    eos_id: int | None,
    unk_id: int | None,
    pad_id: int | None,
) -> bytes:
    """Serialize a SentencePiece BPE `ModelProto` (the bytes of a `tokenizer.model`).

    Args:
        tokens: `tokenizer.ggml.tokens`, one string per id.
        scores: `tokenizer.ggml.scores` (BPE merge priority: higher merges first).
        token_types: `tokenizer.ggml.token_type` (llama.cpp numbering, see `_GGUF_TO_SPM_TYPE`).
        bos_id, eos_id, unk_id, pad_id: the special ids from the GGUF metadata; `None` = absent.
            `unk_id` is required: SentencePiece needs exactly one UNKNOWN piece, and it is typed
            UNKNOWN whatever type the GGUF gives it (llama.cpp marks Gemma 3's `<unk>` CONTROL).

    Returns the serialized proto. Raises ValueError on inconsistent fields (lengths differ, an
    unknown token type, an id out of range, two pieces that become the same after respelling).
    """
    n = len(tokens)
    if len(scores) != n or len(token_types) != n:
        raise ValueError(f"GGUF tokenizer fields disagree: {n} tokens, {len(scores)} scores, "
                         f"{len(token_types)} token types")
    if unk_id is None:
        raise ValueError("GGUF tokenizer has no unknown_token_id; SentencePiece needs an <unk> piece")
    for name, value in (("bos", bos_id), ("eos", eos_id), ("unk", unk_id), ("pad", pad_id)):
        if value is not None and not 0 <= value < n:
            raise ValueError(f"{name}_id {value} is outside the vocabulary of {n} tokens")

    model = _pb.ModelProto()
    seen: dict[str, int] = {}
    for index, (token, score, gguf_type) in enumerate(zip(tokens, scores, token_types)):
        if index == unk_id:
            spm_type = _Piece.UNKNOWN
        elif int(gguf_type) in _GGUF_TO_SPM_TYPE:
            spm_type = _GGUF_TO_SPM_TYPE[int(gguf_type)]
        else:
            raise ValueError(f"token {index} ({token!r}) has unknown GGUF token type {gguf_type}")
        if spm_type == _Piece.UNKNOWN and index != unk_id:
            # A second UNKNOWN piece would make SentencePiece refuse the model.
            spm_type = _Piece.CONTROL
        piece = _piece_text(token, spm_type)
        if piece in seen:
            raise ValueError(f"tokens {seen[piece]} and {index} are both {piece!r} in SentencePiece spelling")
        seen[piece] = index
        model.pieces.add(piece=piece, score=float(score), type=spm_type)
    return serialize_gemma_model(model, bos_id, eos_id, unk_id, pad_id)


def serialize_gemma_model(model: "_pb.ModelProto", bos_id, eos_id, unk_id, pad_id) -> bytes:
    """Give `model` (its pieces filled in) Gemma's trainer and normalizer settings; return its bytes."""
    n = len(model.pieces)

    def piece_at(i):
        return model.pieces[i].piece if i is not None else ""

    trainer = model.trainer_spec
    trainer.model_type = _pb.TrainerSpec.BPE
    trainer.vocab_size = n
    trainer.byte_fallback = True
    # Encoding ignores the next three; they record how Gemma's vocabulary was trained.
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    trainer.treat_whitespace_as_suffix = False
    # SentencePiece resolves bos_id()/eos_id()/... from these piece names, not from the ids.
    trainer.unk_id = unk_id
    trainer.bos_id = -1 if bos_id is None else bos_id
    trainer.eos_id = -1 if eos_id is None else eos_id
    trainer.pad_id = -1 if pad_id is None else pad_id
    trainer.unk_piece = piece_at(unk_id)
    trainer.bos_piece = piece_at(bos_id)
    trainer.eos_piece = piece_at(eos_id)
    trainer.pad_piece = piece_at(pad_id)

    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = False  # Gemma never prepends a space to the text
    normalizer.remove_extra_whitespaces = False  # runs of spaces are tokens of their own
    normalizer.escape_whitespaces = True
    return model.SerializeToString()
