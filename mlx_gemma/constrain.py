"""Constrained decoding: JSON Schema and regex constraints as a logits mask, one per batch row.

    processor = grammar_mask(tokenizer, json_schema={"type": "object", ...})
    generate(model, tokenizer, prompt, logits_processors=[processor])   # or json_schema=...

A `Constraint` is a compiled grammar (pure data, shareable); `GrammarMask` is one row's matcher
state and the `(history, logits) -> logits` processor the BatchGenerator calls once per token of
that row. Each call first feeds the matcher the tokens sampled since the previous call, then sets
every token the grammar does not allow next to -inf. The stop ids (`<eos>`, `<end_of_turn>`) are
allowed exactly when the grammar accepts what was generated, so a row ends only on a complete
value (or at max_tokens, like any row: then the text is cut short and finish_reason is "length").
Free rows of the same batch carry no processor and are untouched.

The grammar engine is llguidance (the one llama.cpp, vLLM and SGLang use), driven by OUR
tokenizer's token bytes: `GemmaTokenizer.token_bytes` per id, special pieces marked with the
0xFF prefix llguidance reads as "special" (only the stop ids among them are ever allowed).

Why llguidance and not xgrammar, measured here (2026-11-29, 2 shared x86 cores, Gemma 3's
262,144-token vocabulary, a 3-property schema with a bounded string, a bounded integer and an
enum array, compact separators, one valid 14-token answer):

    engine           vocab setup   schema compile   mask per token (median / max)   runtime deps
    llguidance 1.9   3.5 s (once)  0.8 ms (lazy)    0.04 ms / 4.5 ms                none
    xgrammar 0.2.9   0.3 s (once)  46-110 ms        0.01 ms / 0.09 ms               torch, transformers, triton

Both masks are far below a decode step of the 270M on this CPU (tens of ms). xgrammar's masks are
cheaper, but it costs a schema compile per request on the request path and pulls torch,
transformers and triton as runtime dependencies (gigabytes on Linux; mlx-gemma keeps torch a
test-only dependency), while llguidance is a self-contained wheel whose lexer is built lazily.
The one-time vocabulary setup of llguidance runs once per tokenizer and is cached
(`grammar_tokenizer`); the server warms it off the engine thread.

Hostile schemas. llguidance is native code: a `$ref` chain a few thousand links long overflows its
stack (the process dies with SIGSEGV), and grammars past its limits (an anyOf of 3,000 objects,
`(x{1000}){1000}`, a `$ref` cycle that never produces a value) fail only once tokens flow. So
every schema and regex is measured here, in Python, before native code sees it (`check_schema`,
`check_regex`: the limits below, each refusal one UserError naming the place and the limit); the
grammar is then compiled with bounded error messages, and a fresh GrammarMask computes its first
mask at once, so a grammar that cannot start is refused before its row joins a batch. A grammar
that still fails while generating sets `GrammarMask.error` (one log line, bounded) and ends its
row: callers report that as an error, never as a complete answer.

Shapes: history (1, T) token ids of the row so far; logits (1, V).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import urllib.parse
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Union

import mlx.core as mx
import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)

# Compact JSON (no free whitespace): a small model left free to emit whitespace can loop on it.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}

# Limits on what reaches the grammar engine (see the module docstring). A schema beyond them is
# refused with a UserError; none is near what a real answer format needs.
MAX_SCHEMA_NODES = 20_000  # JSON values in the schema document
MAX_SCHEMA_DEPTH = 64  # nesting of the schema, each $ref followed counting as one level
MAX_BRANCHES = 1_000  # entries of one anyOf / oneOf / allOf (llguidance's row limit is 2,000 items)
MAX_REPEAT = 10_000  # a counted repetition in a regex, times the counted repetitions around it
MAX_PATTERN_CHARS = 4_096  # one regex / `pattern`
MAX_ERROR_CHARS = 300  # of a grammar engine message we pass on or log
# Keywords whose subschemas describe part of a value: a $ref cycle must pass one of them
# (`{"$ref": "#"}` alone, or inside anyOf / allOf, recurses without producing anything).
_VALUE_KEYWORDS = {"properties", "items", "prefixItems", "additionalProperties", "patternProperties",
                   "additionalItems", "contains", "propertyNames", "unevaluatedProperties", "unevaluatedItems"}
_DATA_KEYWORDS = {"enum", "const", "examples", "default", "description", "title", "$comment"}
_LIMITS = dict(verbose_errors=False)  # no grammar dump inside error messages

_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


# ---- limits: every schema and regex is measured before native code sees it ---------------------


def _short(text: str) -> str:
    """A grammar engine message cut to one bounded line (some carry the whole grammar)."""
    line = " ".join(str(text).split())
    return line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS] + "..."


def check_regex(pattern: str, what: str = "regex") -> None:
    """UserError for a regex longer than MAX_PATTERN_CHARS, or whose counted repetitions (x{n},
    x{m,n}) multiply past MAX_REPEAT through the groups they nest in: `(x{1000}){1000}` asks the
    lexer for a million states. `*` and `+` cost nothing and are not counted."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise UserError(f"{what} is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS} are supported")
    inside = [1]  # per open group: the largest repetition product met inside it so far
    last = 1  # the product of the atom just read (what a following {n} multiplies)
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2 + _braced(pattern, i + 2) if pattern[i + 1:i + 2] in ("p", "P", "x", "u") else 2
            last = 1
            continue
        if c == "[":
            i = _class_end(pattern, i)
            last = 1
        elif c == "(":
            inside.append(1)
            i += 1
            continue
        elif c == ")" and len(inside) > 1:
            last = inside.pop()
        elif c == "{" and re.match(r"\{(\d+)(,(\d*))?\}", pattern[i:]):
            m = re.match(r"\{(\d+)(,(\d*))?\}", pattern[i:])
            count = int(m.group(3) or m.group(1))
            if last * count > MAX_REPEAT:
                raise UserError(f"{what} repeats {last * count:,} times through nested counted repetitions "
                                f"(at {m.group(0)!r}, character {i + 1}); at most {MAX_REPEAT:,} are supported")
            last *= count
            i += len(m.group(0))
        else:
            last = 1
        inside[-1] = max(inside[-1], last)
        i += 1


def _braced(pattern: str, i: int) -> int:
    """Length of a `{...}` argument at i (as in \\p{Greek}, \\x{263a}), 0 if there is none."""
    if pattern[i:i + 1] != "{":
        return 0
    end = pattern.find("}", i)
    return end - i + 1 if end >= 0 else 0


def _class_end(pattern: str, i: int) -> int:
    """The index of the `]` closing the character class that opens at i (nested classes, as in
    `[a-z&&[^aeiou]]` or `[[:alpha:]]`, included; a `]` first in a class is a literal)."""
    depth, j = 0, i
    while j < len(pattern):
        c = pattern[j]
        if c == "\\":
            j += 2
            continue
        if c == "[":
            depth += 1
            j += 1 + (pattern[j + 1:j + 2] == "^")
            j += pattern[j:j + 1] == "]"
            continue
        if c == "]":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    return j


def check_schema(schema, what: str = "json_schema") -> None:
    """UserError for a schema beyond the limits above: more than MAX_SCHEMA_NODES values, nested
    deeper than MAX_SCHEMA_DEPTH ($ref hops included: a long $ref chain is deep), an anyOf /
    oneOf / allOf wider than MAX_BRANCHES, a regex `pattern` past `check_regex`, or a $ref cycle
    that never produces a value (`{"$ref": "#"}`). Pure Python, bounded recursion."""
    _SchemaWalk(schema, what).value(schema, "#", 0)


class _SchemaWalk:
    """One pass over a schema, following local $refs; each $ref target is walked once."""

    def __init__(self, root, what: str):
        self.root, self.what = root, what
        self.nodes = 0
        self.below: dict = {}  # id(target) -> levels under it (targets walked to the end)
        self.open: dict = {}  # id(target) -> (pointer, value keywords passed when it was entered)
        self.produced = 0  # value keywords passed on the current path

    def fail(self, message: str):
        raise UserError(f"{self.what} {message}")

    def value(self, node, where: str, depth: int) -> int:
        """Walk `node` at `depth`; return how many levels lie under it."""
        if depth > MAX_SCHEMA_DEPTH:
            self.fail(f"nests deeper than {MAX_SCHEMA_DEPTH} levels at {_tail(where)} ($ref hops count as "
                      "levels); flatten it")
        self.nodes += 1
        if self.nodes > MAX_SCHEMA_NODES:
            self.fail(f"has more than {MAX_SCHEMA_NODES:,} values; at most that many are supported")
        if isinstance(node, list):
            return max((self.value(v, f"{where}/{i}", depth + 1) for i, v in enumerate(node)), default=-1) + 1
        if not isinstance(node, dict):
            return 0
        for key in ("anyOf", "oneOf", "allOf"):
            if isinstance(node.get(key), list) and len(node[key]) > MAX_BRANCHES:
                self.fail(f"has an {key} of {len(node[key]):,} entries at {_tail(where)}; at most {MAX_BRANCHES:,} "
                          "are supported")
        if isinstance(node.get("pattern"), str):
            check_regex(node["pattern"], f"{self.what} pattern at {_tail(where)}")
        deepest = self.ref(node["$ref"], where, depth) if isinstance(node.get("$ref"), str) else 0
        for key, sub in node.items():
            if key in _DATA_KEYWORDS:  # values, not subschemas: only counted and measured
                deepest = max(deepest, self.data(sub, f"{where}/{key}", depth + 1) + 1)
                continue
            if key == "$ref":
                continue
            passes = key in _VALUE_KEYWORDS
            self.produced += passes
            deepest = max(deepest, self.value(sub, f"{where}/{key}", depth + 1) + 1)
            self.produced -= passes
        return deepest

    def data(self, node, where: str, depth: int) -> int:
        """Walk a JSON value that is not a schema (enum, const, default...): nodes and depth only."""
        if depth > MAX_SCHEMA_DEPTH:
            self.fail(f"nests deeper than {MAX_SCHEMA_DEPTH} levels at {_tail(where)}; flatten it")
        self.nodes += 1
        if self.nodes > MAX_SCHEMA_NODES:
            self.fail(f"has more than {MAX_SCHEMA_NODES:,} values; at most that many are supported")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        return max((self.data(v, where, depth + 1) + 1 for v in children), default=0)

    def ref(self, ref: str, where: str, depth: int) -> int:
        target = _resolve(self.root, ref)
        if target is None:
            return 0  # not a local pointer we can follow: the grammar engine words its own error
        key = id(target)
        if key in self.open:
            start, produced = self.open[key]
            if produced == self.produced:
                self.fail(f"has a $ref cycle that never produces a value (the $ref at {_tail(where)} leads back "
                          f"to {_tail(ref)} through no property or item)")
            return 0  # recursion through a property or item: fine, the engine expands it lazily
        if key not in self.below:
            self.open[key] = (where, self.produced)
            try:
                self.below[key] = self.value(target, ref, depth + 1)
            finally:
                del self.open[key]
        elif depth + 1 + self.below[key] > MAX_SCHEMA_DEPTH:
            self.fail(f"nests deeper than {MAX_SCHEMA_DEPTH} levels through the $ref at {_tail(where)} ($ref hops count "
                      "as levels); flatten it")
        return self.below[key] + 1


def _tail(pointer: str) -> str:
    """A JSON pointer short enough for one message line (its last part when it is long)."""
    return pointer if len(pointer) <= 80 else "..." + pointer[-77:]


def _resolve(root, ref: str):
    """The subschema a local JSON pointer ("#", "#/$defs/a") names, or None."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None
    node = root
    for part in ref[2:].split("/"):
        part = urllib.parse.unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node if isinstance(node, (dict, bool)) else None


# ---- the vocabulary as llguidance sees it ----------------------------------------------------


class _VocabView:
    """What llguidance's TokenizerWrapper reads: the bytes of every id, the special ids, and an
    encoder (used by llguidance only to re-tokenize forced text)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]
        special = set(self.special_token_ids)
        # 0xFF (never valid UTF-8) marks a special piece: llguidance matches it only as a whole token.
        self.tokens = [b"\xff" + tokenizer.id_to_piece(i).encode("utf-8") if i in special
                       else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]

    def __call__(self, text) -> list:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_bos=False)


def grammar_tokenizer(tokenizer):
    """The llguidance tokenizer for a GemmaTokenizer, built once (a few seconds) and cached.
    The stop ids are its end-of-sequence tokens."""
    import llguidance

    with _lock:
        built = _tokenizers.get(tokenizer)
        if built is None:
            wrapper = llguidance.TokenizerWrapper(_VocabView(tokenizer))
            built = llguidance.LLTokenizer(wrapper, eos_token=list(tokenizer.stop_ids))
            _tokenizers[tokenizer] = built
        return built


# ---- constraints: a grammar, checked ---------------------------------------------------------


@dataclass(frozen=True)
class Constraint:
    """A checked llguidance grammar; `kind` is "json_schema" or "regex", `source` what it came from."""

    kind: str
    source: str
    grammar: str


def _limits():
    import llguidance

    return llguidance.LLParserLimits(**_LIMITS)


def _checked(kind: str, source: str, grammar: str, what: str) -> Constraint:
    import llguidance

    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, limits=_limits())
    if failed:
        lines = [l.strip() for l in (messages[0] if messages else "").splitlines() if l.strip()]
        # llguidance's regex errors put the reason on an "error: ..." line below the position.
        reason = next((l[len("error:"):].strip() for l in lines if l.startswith("error:")), None)
        detail = reason or (lines[0] if lines else "rejected by the grammar engine")
        raise UserError(f"{what} is not supported: {_short(detail)}")
    return Constraint(kind, source, grammar)


def json_schema_constraint(schema: Union[dict, str, bool]) -> Constraint:
    """A Constraint from a JSON Schema (a dict, or its JSON text). UserError names what the
    grammar engine does not support (e.g. `Unimplemented keys: ["if", "then"]`), or the limit a
    schema exceeds (`check_schema`), before any native code sees it."""
    import llguidance

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except RecursionError:
            raise UserError(f"json_schema nests deeper than {MAX_SCHEMA_DEPTH} levels; flatten it") from None
        except ValueError as exc:
            raise UserError(f"json_schema is not valid JSON ({exc}); give a JSON Schema object") from None
    if not isinstance(schema, (dict, bool)):
        raise UserError(f"json_schema must be a JSON Schema object, got {type(schema).__name__}")
    check_schema(schema)
    text = json.dumps(schema, ensure_ascii=False)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text, overrides=_JSON_OPTIONS)
    except ValueError as exc:
        raise UserError(f"json_schema is not supported: {_short(exc)}") from None
    return _checked("json_schema", text, grammar, "json_schema")


def regex_constraint(pattern: str) -> Constraint:
    """A Constraint from a regular expression the whole answer must match (Rust regex syntax:
    no look-around, no backreferences); `check_regex` bounds it first."""
    import llguidance

    if not isinstance(pattern, str) or not pattern:
        raise UserError(f"regex must be a non-empty string, got {pattern!r}")
    check_regex(pattern)
    return _checked("regex", pattern, llguidance.LLMatcher.grammar_from_regex(pattern), f"regex {pattern!r:.80}")


def lark_constraint(grammar: str, what: str = "grammar") -> Constraint:
    """A Constraint from an llguidance Lark grammar (tool calls build theirs from the functions'
    schemas); UserError says what the grammar engine refused, as `what`."""
    return _checked("lark", grammar, grammar, what)


def json_object_constraint() -> Constraint:
    """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
    return json_schema_constraint({"type": "object"})


def make_constraint(json_schema: Any = None, regex: Optional[str] = None) -> Optional[Constraint]:
    """The Constraint for the `json_schema=` / `regex=` keywords (None when neither is given)."""
    if json_schema is not None and regex is not None:
        raise UserError("give json_schema or regex, not both")
    if json_schema is not None:
        return json_schema_constraint(json_schema)
    if regex is not None:
        return regex_constraint(regex)
    return None


# ---- the per-row mask ------------------------------------------------------------------------


class GrammarMask:
    """One row's grammar state as a logits processor (a fresh one per request: it is stateful).

    The first call takes `history` as the prompt; each later call feeds the matcher the tokens
    appended since. The mask is computed by llguidance into a (1, V/32) bit array (numpy, no
    per-token Python list) and expanded to (1, V) by MLX. The first mask is computed here, so a
    grammar the engine cannot start (a $ref cycle it cannot expand) is a UserError now rather
    than an empty answer later. `error` is set (bounded, logged once) when the grammar fails
    while generating; the row then ends, and its text must not be taken as a complete value.
    """

    def __init__(self, constraint: Constraint, tokenizer):
        import llguidance
        from llguidance.numpy import fill_next_token_bitmask

        self.constraint = constraint
        self.stop_ids = list(tokenizer.stop_ids)
        self.matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer), constraint.grammar, log_level=0,
                                            limits=_limits())
        self.vocab = tokenizer.vocab_size
        self.words = np.full((1, (self.vocab + 31) // 32), -1, dtype=np.int32)
        self.seen: Optional[int] = None  # history length already fed to the matcher
        self.error: Optional[str] = None
        if not self.matcher.is_error():
            fill_next_token_bitmask(self.matcher, self.words)
        if self.matcher.is_error():
            raise UserError(f"{constraint.kind} is not supported: {_short(self.matcher.get_error())}")
        self._fresh = True  # self.words holds the mask of the state the first call sees

    def _failed(self) -> None:
        if self.error is None:
            self.error = _short(self.matcher.get_error())
            log.warning("%s grammar failed while generating: %s", self.constraint.kind, self.error)

    def _feed(self, history: mx.array) -> None:
        n = history.shape[-1]
        if self.seen is None:
            self.seen = n  # the prompt: not part of the constrained answer
            return
        self._fresh = False
        for token in history[0, self.seen:n].tolist():
            if not self.matcher.consume_token(int(token)):
                self._failed()
                break
        self.seen = n

    def allowed(self) -> np.ndarray:
        """The current bit mask (1, ceil(V/32)) int32, bit i of word j = token 32 j + i."""
        from llguidance.numpy import fill_next_token_bitmask

        if self._fresh:
            self._fresh = False
            return self.words
        if not self.matcher.is_error():
            fill_next_token_bitmask(self.matcher, self.words)
        if self.matcher.is_error():
            # Never leave a row with nothing to sample: end it at once (callers read self.error).
            self._failed()
            self.words[:] = 0
            bits = self.words.view(np.uint32)
            for i in self.stop_ids:
                bits[0, i // 32] |= np.uint32(1 << (i % 32))
        return self.words

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        self._feed(history)  # reads history first: after async_eval it would wait for the forward pass
        mx.async_eval(logits)  # the forward pass runs while llguidance computes the mask
        return apply_bitmask(logits, self.allowed())

    @property
    def accepting(self) -> bool:
        """True when what was fed so far is a complete value of the grammar."""
        return self.matcher.is_accepting()


def grammar_error(processors) -> Optional[str]:
    """The error of the first GrammarMask among `processors` that failed while generating, or None."""
    return next((p.error for p in processors if isinstance(p, GrammarMask) and p.error), None)


def apply_bitmask(logits: mx.array, words: np.ndarray) -> mx.array:
    """logits (B, V) with the tokens whose bit is 0 in words (B, ceil(V/32)) set to -inf."""
    V = logits.shape[-1]
    packed = mx.array(words.view(np.uint32))
    # Made per call: an array built at import would belong to the importing thread's stream, and
    # the server's engine thread has a stream of its own.
    bits = ((packed[:, :, None] >> mx.arange(32, dtype=mx.uint32)) & 1).reshape(packed.shape[0], -1)
    if bits.shape[-1] < V:  # logits wider than the tokenizer: the extra ids are never allowed
        bits = mx.pad(bits, [(0, 0), (0, V - bits.shape[-1])])
    return mx.where(bits[:, :V].astype(mx.bool_), logits, mx.array(-mx.inf, logits.dtype))


def grammar_mask(tokenizer, json_schema: Any = None, regex: Optional[str] = None,
                 constraint: Optional[Constraint] = None) -> Optional[GrammarMask]:
    """A fresh GrammarMask for `json_schema` / `regex` / a ready `constraint` (None without one)."""
    constraint = constraint or make_constraint(json_schema, regex)
    return GrammarMask(constraint, tokenizer) if constraint is not None else None
