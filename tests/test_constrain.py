"""Constrained decoding on the embedded Gemma 3 270M tokenizer and model.

References: a brute-force check of the mask over all 262,144 tokens with the `regex` module's
partial matching (independent of the grammar engine), llguidance's own matcher token by token,
`jsonschema` validation of what the model generates, and greedy `generate` for free rows that
share a batch with constrained ones.
"""

import json

import mlx.core as mx
import numpy as np
import pytest

import jsonschema
import regex as regex_mod
import llguidance  # noqa: F401  (a required test dependency: imported, never skipped)

from mlx_gemma.constrain import (GrammarMask, apply_bitmask, json_schema_constraint, make_constraint,
                                 regex_constraint)
from mlx_gemma.errors import UserError

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["name", "age"], "additionalProperties": False}


BYTE_PIECE = regex_mod.compile(r"<0x[0-9A-F]{2}>")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from mlx_gemma.loading import load, resolve

    return load(str(resolve("gemma-3-270m")))


@pytest.fixture(scope="module")
def tokenizer():
    """The 270M's tokenizer without its weights (the mask tests need no model: not `slow`)."""
    from mlx_gemma.loading import resolve
    from mlx_gemma.tokenizer import GemmaTokenizer

    return GemmaTokenizer(resolve("gemma-3-270m"))


def allowed_ids(mask: GrammarMask) -> np.ndarray:
    bits = np.unpackbits(mask.allowed().view(np.uint8), bitorder="little")
    return bits[:mask.vocab].astype(bool)


def shadowed_byte_tokens(tokenizer) -> set:
    """Byte-fallback pieces (`<0x2C>`) whose byte is also a piece of its own (`,`): SentencePiece
    never emits them, and the grammar engine keeps one token per byte string (the piece)."""
    plain = {tokenizer.token_bytes(t) for t in range(tokenizer.vocab_size)
             if not tokenizer.is_special(t) and not BYTE_PIECE.fullmatch(tokenizer.id_to_piece(t))}
    return {t for t in range(tokenizer.vocab_size)
            if BYTE_PIECE.fullmatch(tokenizer.id_to_piece(t)) and tokenizer.token_bytes(t) in plain}


def brute_force(tokenizer, pattern: str, prefix: bytes) -> np.ndarray:
    """Tokens t such that prefix + bytes(t) can still grow into a full match of pattern; the stop
    ids exactly when prefix itself is a full match. Special pieces never; bytes that are not
    UTF-8 text never (the pattern is ASCII)."""
    compiled = regex_mod.compile(pattern)
    out = np.zeros(tokenizer.vocab_size, bool)
    shadowed = shadowed_byte_tokens(tokenizer)
    for t in range(tokenizer.vocab_size):
        if tokenizer.is_special(t) or t in shadowed:
            continue
        try:
            text = (prefix + tokenizer.token_bytes(t)).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if len(text) > len(prefix) and compiled.fullmatch(text, partial=True):
            out[t] = True
    if compiled.fullmatch(prefix.decode("utf-8")):
        out[list(tokenizer.stop_ids)] = True
    return out


def test_regex_mask_equals_brute_force_over_the_whole_vocabulary(tokenizer):
    pattern = r"(yes|no|maybe), [0-9]{1,3} (apples|pears)"
    answer = "maybe, 42 pears"
    ids = tokenizer.encode(answer, add_bos=False)
    mask = GrammarMask(regex_constraint(pattern), tokenizer)
    shadowed = shadowed_byte_tokens(tokenizer)
    history = [2]  # the prompt
    mask(mx.array([history]), mx.zeros((1, mask.vocab)))
    for n in [0, 1, len(ids) // 2, len(ids)]:  # tokens consumed before each check
        while len(history) - 1 < n:
            history.append(ids[len(history) - 1])
            mask(mx.array([history]), mx.zeros((1, mask.vocab)))
        prefix = tokenizer.decode(ids[:n]).encode()
        ours, reference = allowed_ids(mask), brute_force(tokenizer, pattern, prefix)
        # Shadowed byte pieces may go either way (the engine keeps duplicates as it likes);
        # every piece SentencePiece can emit must match the reference exactly.
        diff = np.array([t for t in np.nonzero(ours != reference)[0] if t not in shadowed], int)
        assert diff.size == 0, (prefix, [(int(t), tokenizer.token_bytes(t), bool(ours[t])) for t in diff[:10]])
        assert reference.sum() > 0
    # the complete answer: only the stop ids remain
    assert sorted(np.nonzero(allowed_ids(mask))[0].tolist()) == sorted(tokenizer.stop_ids)
    assert len(shadowed) > 50  # the case is real in Gemma 3's vocabulary


def test_json_mask_agrees_with_the_matcher_and_stop_ids_follow_acceptance(tokenizer):
    text = '{"name":"李雷","age":7,"tags":["a"]}'
    ids = tokenizer.encode(text, add_bos=False)
    mask = GrammarMask(json_schema_constraint(PERSON), tokenizer)
    mask(mx.array([[2]]), mx.zeros((1, mask.vocab)))  # the prompt
    reference = mask.matcher.deep_copy()
    stop = list(tokenizer.stop_ids)
    rng = np.random.default_rng(0)
    for k, t in enumerate(ids):
        allowed = allowed_ids(mask)
        assert allowed[t], f"token {t} {tokenizer.token_bytes(t)!r} of a valid answer is masked at step {k}"
        # the stop ids are allowed exactly when the text so far is a complete value
        assert allowed[stop].all() == reference.is_accepting() and allowed[stop].any() == reference.is_accepting()
        # a sample of other tokens: allowed exactly when the engine's own matcher would take them
        sample = rng.choice(tokenizer.vocab_size, 3000, replace=False)
        for s in sample:
            if int(s) in stop:
                continue
            assert bool(allowed[s]) == (reference.validate_tokens([int(s)]) == 1), (k, int(s))
        reference.consume_token(t)
        mask(mx.array([[2] + ids[:k + 1]]), mx.zeros((1, mask.vocab)))
    assert mask.accepting
    assert sorted(np.nonzero(allowed_ids(mask))[0].tolist()) == sorted(stop)
    jsonschema.validate(json.loads(text), PERSON)


def test_a_rejected_token_ends_the_row_instead_of_masking_everything(tokenizer):
    mask = GrammarMask(regex_constraint("[0-9]+"), tokenizer)
    mask(mx.array([[2]]), mx.zeros((1, mask.vocab)))
    out = mask(mx.array([[2, tokenizer.encode("x", add_bos=False)[0]]]), mx.zeros((1, mask.vocab)))  # not allowed
    assert mask.matcher.is_error()
    assert sorted(np.nonzero(np.isfinite(np.array(out[0])))[0].tolist()) == sorted(tokenizer.stop_ids)


def test_apply_bitmask_sets_exactly_the_cleared_bits_to_minus_inf():
    V = 100
    rng = np.random.default_rng(1)
    keep = rng.random((2, V)) < 0.3
    words = np.packbits(np.pad(keep, [(0, 0), (0, 128 - V)]), axis=1, bitorder="little").view(np.int32)
    logits = mx.array(rng.normal(size=(2, V)).astype(np.float32))
    out = np.array(apply_bitmask(logits, words))
    assert np.array_equal(np.isfinite(out), keep)
    assert np.array_equal(out[keep], np.array(logits)[keep])
    wide = np.array(apply_bitmask(mx.zeros((2, 130)), words))  # logits wider than the vocabulary
    assert np.isinf(wide[:, 128:]).all()


def test_unsupported_schema_and_bad_regex_name_the_problem():
    with pytest.raises(UserError, match=r'Unimplemented keys: \["if", "then"\]'):
        json_schema_constraint({"type": "object", "if": {}, "then": {}})
    with pytest.raises(UserError, match="Invalid type: strng"):
        json_schema_constraint({"type": "strng"})
    with pytest.raises(UserError, match="look-around"):
        regex_constraint("(?=a)b")
    with pytest.raises(UserError, match="not valid JSON"):
        json_schema_constraint("{nope")
    with pytest.raises(UserError, match="not both"):
        make_constraint({"type": "object"}, "a+")


@pytest.mark.slow  # the 270M model's weights
def test_constrained_and_free_rows_share_one_batch(model_and_tokenizer):
    from mlx_gemma.generation import BatchGenerator, Request, SamplingParams, encode_prompt, generate
    from mlx_gemma.constrain import grammar_mask

    model, tok = model_and_tokenizer
    free_q = ["What is the capital of France?", "Name a color."]
    json_q = ["Describe a person as JSON.", "给我一个人的信息，用JSON。"]
    params = SamplingParams(max_tokens=24)
    engine = BatchGenerator(model, tok)
    rids = {}
    for q in free_q:
        rids[engine.submit(Request(encode_prompt(tok, [{"role": "user", "content": q}]), params))] = ("free", q)
    for q in json_q:
        req = Request(encode_prompt(tok, [{"role": "user", "content": q}]), SamplingParams(max_tokens=60),
                      processors=[grammar_mask(tok, json_schema=PERSON)])
        rids[engine.submit(req)] = ("json", q)
    texts = {rid: "" for rid in rids}
    widest = 0
    while engine.busy:
        for event in engine.step():
            texts[event.rid] += event.text
        widest = max(widest, len(engine.active))
    assert widest == 4  # all four rows decoded together
    for rid, (kind, q) in rids.items():
        if kind == "json":
            jsonschema.validate(json.loads(texts[rid]), PERSON)
        else:  # the masks of the other rows do not leak into a free row
            assert texts[rid] == generate(model, tok, [{"role": "user", "content": q}], max_tokens=24)


@pytest.mark.slow  # the 270M model's weights
def test_python_keywords_generate_and_batch_generate(model_and_tokenizer):
    from mlx_gemma.generation import batch_generate, generate

    model, tok = model_and_tokenizer
    out = generate(model, tok, "The date of the moon landing:", regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
                   max_tokens=16, temp=1.0, seed=3)
    assert regex_mod.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", out), out
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    outs = batch_generate(model, tok, ["Is water wet?", "Is fire cold?"], json_schema=schema, max_tokens=12)
    for o in outs:
        jsonschema.validate(json.loads(o), schema)
