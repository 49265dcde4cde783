"""The Gemma tokenizer: SentencePiece plus the special-token handling, chat template and streaming
detokenizer that Hugging Face's Gemma tokenizers provide.

One class serves Gemma 1, 2 and 3: every id (`<bos>`, `<end_of_turn>`, ...) is read from the
vocabulary, never assumed (`<end_of_turn>` is 107 in Gemma 1/2 and 106 in Gemma 3).

Why not SentencePiece alone: SentencePiece never matches CONTROL pieces in text, so
`"<start_of_turn>user"` would come out as `<`, `start`, `_`, ... . Hugging Face tokenizers split
special-token text out first and map it to its id; `encode` does the same, so chat-formatted text
tokenizes to the ids the model was trained on.

A dir with only tokenizer.json (what transformers 5 saves) is read by rebuilding the equivalent
SentencePiece model from it (`convert.tokenizer_json`, where the choice is explained), so one
engine serves every source: tokenizer.model, tokenizer.json, a GGUF's vocabulary, a Keras
vocabulary.spm. `save` writes both tokenizer.model and tokenizer.json.
"""

from __future__ import annotations

import codecs
import os
import re
from dataclasses import dataclass
from typing import Iterable, Optional

from . import chat_template as jinja_template
from .errors import UserError
from .files import write_atomic, write_json_atomic

# The Gemma 3 chat template, written out as the Jinja text Hugging Face tools read from
# tokenizer_config.json. `GemmaTokenizer.apply_chat_template` renders the same thing in Python.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

# Our Gemma 4 chat format as Jinja (saved with a Gemma 4 tokenizer that has no template of its own).
# It renders text conversations exactly as Google's Gemma 4 templates do (tested against the ones
# TRL ships); tool declarations and calls are mlx_gemma.tools's, rendered in Python.
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] in ['system', 'developer'] -%}\n"
    "    {{ '<|turn>system\n' + messages[0]['content'] | trim + '<turn|>\n' }}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {{ '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- else -%}\n"
    "        {%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endfor -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<turn|>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\n' }}{%- endif -%}\n"
)


@dataclass(frozen=True)
class ChatMarkers:
    """The turn markers of one Gemma chat format, found in the vocabulary."""

    start: str  # opens a turn, followed by the role and "\n"
    end: str  # closes a turn
    native_system: bool  # a system turn of its own (Gemma 4) or folded into the first user turn
    stops: tuple  # the pieces that end a generation besides <eos>
    template: str  # our format as Jinja, saved with the tokenizer


GEMMA3_MARKERS = ChatMarkers("<start_of_turn>", "<end_of_turn>", False, ("<end_of_turn>",), GEMMA_CHAT_TEMPLATE)
# Gemma 4 ends a turn with <turn|>, and a tool call with <|tool_response>: the caller runs the tool.
GEMMA4_MARKERS = ChatMarkers("<|turn>", "<turn|>", True, ("<turn|>", "<|tool_response>"), GEMMA4_CHAT_TEMPLATE)

_MODEL_FILE = "tokenizer.model"
_JSON_FILE = "tokenizer.json"


class GemmaTokenizer:
    """A Gemma `tokenizer.model` with Hugging Face-compatible encoding, decoding and chat format.

    Build it from a path: a model dir (its tokenizer.model, or else its tokenizer.json), or the
    path of a tokenizer.model / vocabulary.spm / tokenizer.json file; or from the SentencePiece
    model's bytes (`GemmaTokenizer.from_bytes(data)`).
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        file = path
        if os.path.isdir(path):
            file = os.path.join(path, _MODEL_FILE)
            if not os.path.isfile(file) and os.path.isfile(os.path.join(path, _JSON_FILE)):
                file = os.path.join(path, _JSON_FILE)
        if not os.path.isfile(file):
            raise UserError(f"tokenizer file not found: {file} (give a model directory that contains "
                            f"{_MODEL_FILE} or {_JSON_FILE}, or the path of the file itself)")
        if file.endswith(".json"):
            self._setup(_model_bytes_from_json(file), file)
        else:
            with open(file, "rb") as f:
                self._setup(f.read(), file)
        # The dir's own chat template, when it ships one, is the truth about its format.
        self.chat_template = jinja_template.read_chat_template(os.path.dirname(os.path.abspath(file)))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "GemmaTokenizer":
        """A tokenizer from the serialized SentencePiece model (the bytes of a tokenizer.model)."""
        self = cls.__new__(cls)
        self._setup(bytes(data), source)
        return self

    @property
    def model_bytes(self) -> bytes:
        """The serialized SentencePiece model (the bytes of tokenizer.model)."""
        return self._model_bytes

    def _setup(self, data: bytes, source: str) -> None:
        import sentencepiece

        self._model_bytes = data
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as exc:
            raise UserError(f"{source} is not a valid SentencePiece tokenizer.model ({exc}); "
                            "re-export the tokenizer or point at the right file") from None
        sp = self._sp
        self.vocab_size: int = sp.get_piece_size()
        self.bos_id: int | None = _none_if_negative(sp.bos_id())
        self.eos_id: int | None = _none_if_negative(sp.eos_id())
        self.pad_id: int | None = _none_if_negative(sp.pad_id())
        self.unk_id: int | None = _none_if_negative(sp.unk_id())
        # The chat format is the vocabulary's: Gemma 4's <|turn>/<turn|>, else <start_of_turn>/<end_of_turn>.
        self.chat_markers: Optional[ChatMarkers] = next(
            (m for m in (GEMMA4_MARKERS, GEMMA3_MARKERS) if self._special_id(m.start) is not None
             and self._special_id(m.end) is not None), None)
        markers = self.chat_markers or GEMMA3_MARKERS
        self.start_of_turn_id: int | None = self._special_id(markers.start)
        self.end_of_turn_id: int | None = self._special_id(markers.end)
        self._stop_ids = tuple(i for i in [self.eos_id, *(self._special_id(p) for p in markers.stops)]
                               if i is not None)
        self._chat_template: Optional[str] = None

        # Special pieces (control + unknown) as Hugging Face treats them: matched whole in text,
        # dropped by decode(skip_special=True). Indexed by first character for a fast scan.
        self._special_ids = frozenset(i for i in range(self.vocab_size)
                                      if sp.is_control(i) or sp.is_unknown(i))
        self._special_by_text = {sp.id_to_piece(i): i for i in self._special_ids}
        lengths: dict[str, set[int]] = {}
        for text in self._special_by_text:
            if text:
                lengths.setdefault(text[0], set()).add(len(text))
        self._special_lengths = {c: sorted(ls, reverse=True) for c, ls in lengths.items()}
        self._special_start = re.compile("[" + "".join(re.escape(c) for c in lengths) + "]") if lengths else None
        self._bytes_cache: dict[tuple[int, bool], bytes] = {}

    def _special_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    # ---- vocabulary ------------------------------------------------------------------------

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: `<eos>` and the format's end-of-generation pieces, read from the
        vocabulary: `<end_of_turn>` (Gemma 1-3), or `<turn|>` and `<|tool_response>` (Gemma 4)."""
        return self._stop_ids

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece for an id, as SentencePiece spells it (spaces as "▁")."""
        self._check_id(token_id)
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary piece, or None when the piece is not in the vocabulary."""
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def is_special(self, token_id: int) -> bool:
        """True for control and unknown pieces (`<bos>`, `<end_of_turn>`, `<unused0>`, `<unk>`, ...)."""
        return int(token_id) in self._special_ids

    def _check_id(self, token_id: int) -> None:
        if not 0 <= int(token_id) < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")

    # ---- encode / decode ---------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids for `text`, `<bos>` first unless `add_bos=False`.

        Special-token text in `text` (`<start_of_turn>`, `<eos>`, `<unused3>`, ...) becomes that
        token's id, as Hugging Face tokenizers do; the rest goes through SentencePiece.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        for chunk, special_id in self._split_special(text):
            if chunk:
                ids.extend(self._sp.encode(chunk))
            if special_id is not None:
                ids.append(special_id)
        return ids

    def _split_special(self, text: str) -> Iterable[tuple[str, int | None]]:
        """Yield (plain text, special id or None) pairs; leftmost-longest match of special pieces."""
        if self._special_start is None:
            yield text, None
            return
        start = pos = 0
        while True:
            m = self._special_start.search(text, pos)
            if m is None:
                break
            i = m.start()
            for length in self._special_lengths[text[i]]:
                special_id = self._special_by_text.get(text[i:i + length])
                if special_id is not None:
                    yield text[start:i], special_id
                    start = pos = i + length
                    break
            else:
                pos = i + 1
        yield text[start:], None

    def token_bytes(self, token_id: int, skip_special: bool = False) -> bytes:
        """The UTF-8 bytes one token contributes to decoded text.

        Byte-fallback pieces (`<0xE4>`) give a single raw byte, so one token may hold part of a
        character; special pieces give their own text, or nothing with `skip_special=True`.
        """
        key = (int(token_id), skip_special)
        cached = self._bytes_cache.get(key)
        if cached is None:
            self._check_id(key[0])
            i, sp = key[0], self._sp
            piece = sp.id_to_piece(i)
            if i in self._special_ids:
                cached = b"" if skip_special else piece.encode("utf-8")
            elif sp.is_byte(i):
                cached = bytes([int(piece[3:5], 16)])  # "<0xE4>" -> b"\xe4"
            else:
                cached = piece.replace("\u2581", " ").encode("utf-8")
            self._bytes_cache[key] = cached
        return cached

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text for token ids. Special tokens are written as their text (`<bos>`, `<end_of_turn>`)
        unless `skip_special=True`, like Hugging Face's `decode(skip_special_tokens=...)`.
        Invalid UTF-8 from stray byte-fallback tokens becomes U+FFFD."""
        if hasattr(ids, "tolist"):  # numpy / mlx arrays
            ids = ids.tolist()
        data = b"".join(self.token_bytes(i, skip_special) for i in ids)
        return data.decode("utf-8", errors="replace")

    # ---- chat format -------------------------------------------------------------------------

    @property
    def chat_template(self) -> Optional[str]:
        """The model dir's own chat template (Jinja text), or None: then ours renders the chat.
        Set it to render with another template (None goes back to ours)."""
        return self._chat_template

    @chat_template.setter
    def chat_template(self, source: Optional[str]) -> None:
        # A dir saved by mlx-gemma carries our own template: render it with ours (same text,
        # tested), which words its errors in terms of the messages.
        if source is not None and source.strip() in (GEMMA_CHAT_TEMPLATE.strip(), GEMMA4_CHAT_TEMPLATE.strip()):
            source = None
        if source is not None:
            jinja_template.compile_template(source)  # a syntax error surfaces now, not mid-request
        self._chat_template = source

    @property
    def special_tokens(self) -> dict:
        """The special-token template variables (bos_token, eos_token, ...), as transformers passes them."""
        names = (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id),
                 ("unk_token", self.unk_id))
        return {name: self.id_to_piece(i) for name, i in names if i is not None}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, tools: Optional[list] = None, tool_format=None,
                            **template_kwargs) -> str | list[int]:
        """Render a conversation in the model's chat format; the text, or with `tokenize=True` its ids.

        With a model dir's own template (`chat_template`), it renders as transformers'
        `apply_chat_template` does (`tools` and `template_kwargs` such as enable_thinking are
        passed to it) and the ids are those of `encode(text, add_bos=False)`: the template's
        `<bos>` is the only one. Otherwise ours, by the tokenizer's generation:

            Gemma 1-3: <bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n{answer}<end_of_turn>\\n
            Gemma 4:   <bos><|turn>system\\n{system}<turn|>\\n<|turn>user\\n{text}<turn|>\\n<|turn>model\\n{answer}<turn|>\\n

        `messages` is a list of {"role": "user" | "assistant" | "model" | "system", "content": ...}
        where content is a string or a list of {"type": "text", "text": ...} parts. "assistant" is
        written as "model"; every text is stripped of surrounding whitespace, as the templates do.
        Gemma 4 has a system turn of its own. For Gemma 1-3, a leading system message is folded
        into the first user turn as "{system}\\n\\n{user}"; this is what Gemma 3's official template
        does, and we do it for Gemma 1 and 2 as well, whose templates refuse a system role.
        `add_generation_prompt=True` appends the model's turn header for the model to answer.
        Two deliberate departures from Gemma 3's template, both where it would silently lose text:
        a system message given as a list of parts uses all its text parts (the template keeps only
        the first), and a system message with no user message after it is an error (the template
        drops it). Tool declarations, assistant `tool_calls` and `role: "tool"` messages are
        rendered by `tool_format` (mlx_gemma.tools chooses it; `tools.render_prompt` is the entry point).

        Raises UserError for an unknown role, roles that do not alternate user/model, a system
        message that is not first or not followed by a user message, or unusable content.
        """
        if self._chat_template is not None:
            text = jinja_template.render(self._chat_template, messages, self.special_tokens,
                                         add_generation_prompt, tools, **template_kwargs)
        else:
            text = "".join(piece for piece, _ in self.chat_segments(messages, add_generation_prompt, tools,
                                                                    tool_format))
        return self.encode(text, add_bos=False) if tokenize else text

    def chat_segments(self, messages: list[dict], add_generation_prompt: bool = False,
                      tools: Optional[list] = None, tool_format=None) -> list[tuple[str, bool]]:
        """Our chat text for `messages` cut into consecutive (text, is_answer) pieces.

        is_answer is True for each model answer together with its closing end-of-turn marker (the
        text a fine-tuned model must learn to produce, including when to stop), False for
        everything else: `<bos>`, user turns, each model turn header, tool results and the "\\n"
        after an answer's end marker. Joining the texts gives our apply_chat_template's string.
        """
        fmt = self.chat_markers
        if fmt is None:
            raise UserError("this tokenizer has no <start_of_turn>/<end_of_turn> (or <|turn>/<turn|>) tokens, so "
                            "it cannot use a Gemma chat format; use plain text or a Gemma tokenizer")
        segments = [(self.id_to_piece(self.bos_id) if self.bos_id is not None else "", False)]
        continuing = False  # the previous model turn was left open (tool results inside it)
        for turn in _chat_turns(messages, fmt.native_system, tools, tool_format):
            if turn.role != "model":
                segments.append((f"{fmt.start}{turn.role}\n{turn.pieces[0][0]}{fmt.end}\n", False))
                continue
            if not continuing:
                segments.append((f"{fmt.start}model\n", False))
            segments += turn.pieces
            if not turn.open:
                segments += [(fmt.end, True), ("\n", False)]
            continuing = turn.open
        if add_generation_prompt and not continuing:
            segments.append((f"{fmt.start}model\n", False))
        merged: list[tuple[str, bool]] = []
        for text, flag in segments:
            if merged and merged[-1][1] == flag:
                merged[-1] = (merged[-1][0] + text, flag)
            elif text:
                merged.append((text, flag))
        return merged

    def conversation_segments(self, messages: list[dict], add_generation_prompt: bool = False,
                              tools: Optional[list] = None, tool_format=None) -> list[tuple[str, bool]]:
        """The chat text of `messages` in (text, is_answer) pieces, rendered as `apply_chat_template`
        renders it: by the model dir's own template when there is one (its assistant turns, end
        marker included, found by `chat_template.answer_spans`), else by ours (`chat_segments`)."""
        if self._chat_template is None:
            return self.chat_segments(messages, add_generation_prompt, tools, tool_format)
        text, spans = jinja_template.answer_spans(self._chat_template, messages, self.special_tokens, tools,
                                                  add_generation_prompt)
        segments, at = [], 0
        for start, end in spans:
            segments += [(text[at:start], False), (text[start:end], True)]
            at = end
        segments.append((text[at:], False))
        return segments

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False, tools: Optional[list] = None,
                    tool_format=None) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) for a conversation: loss_mask[i] is 1 where ids[i] belongs to a model
        answer or its closing end-of-turn marker, else 0. The ids equal
        `apply_chat_template(messages, tokenize=True)`, with our template or the dir's own (its
        answers are found by `chat_template.answer_spans`). Every segment boundary sits next to a
        special token or after the "\\n" that ends a turn header, and the "\\n" piece never merges
        with a neighbour, so encoding piecewise cannot change the tokens (checked).
        """
        segments = self.conversation_segments(messages, add_generation_prompt, tools, tool_format)
        ids: list[int] = []
        mask: list[int] = []
        for text, is_answer in segments:
            piece_ids = self.encode(text, add_bos=False)
            ids += piece_ids
            mask += [int(is_answer)] * len(piece_ids)
        # Cheap next to training, and it guards the argument above against a vocabulary whose
        # user-defined pieces would merge across a boundary (none of Gemma 1/2/3's do).
        if ids != self.encode("".join(text for text, _ in segments), add_bos=False):
            raise UserError("the chat template's answers do not start and end at token boundaries, so the "
                            "loss mask cannot be cut at them; use a template whose turns end in special tokens")
        return ids, mask

    # ---- saving ------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.model, tokenizer.json, tokenizer_config.json (with the chat template) and
        special_tokens_map.json into `directory` (created if needed), so that Hugging Face's
        `AutoTokenizer.from_pretrained(directory)` opens it, whether it reads tokenizer.model
        (transformers 4) or tokenizer.json (transformers 5). Each file is written atomically."""
        from .convert.tokenizer_json import tokenizer_json_from_model

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        tokens = {name: self.id_to_piece(i) for name, i in
                  (("bos_token", self.bos_id), ("eos_token", self.eos_id),
                   ("pad_token", self.pad_id), ("unk_token", self.unk_id)) if i is not None}
        extra = [self.id_to_piece(i) for i in (self.start_of_turn_id, self.end_of_turn_id) if i is not None]
        markers = self.chat_markers or GEMMA3_MARKERS
        special_map = dict(tokens, additional_special_tokens=extra)
        config = dict(
            tokenizer_class="GemmaTokenizer",
            add_bos_token=True,
            add_eos_token=False,
            clean_up_tokenization_spaces=False,
            spaces_between_special_tokens=False,
            chat_template=self._chat_template or markers.template,
            **special_map,
            added_tokens_decoder=self._added_tokens(),
        )
        write_atomic(os.path.join(directory, _MODEL_FILE), self._model_bytes)
        write_json_atomic(os.path.join(directory, _JSON_FILE), tokenizer_json_from_model(self._model_bytes))
        write_json_atomic(os.path.join(directory, "tokenizer_config.json"), config)
        write_json_atomic(os.path.join(directory, "special_tokens_map.json"), special_map)


    def _added_tokens(self) -> dict[str, dict]:
        """Control/unknown pieces (special) and user-defined pieces (not special) in the form of
        tokenizer_config.json's `added_tokens_decoder`, the same entries as tokenizer.json's
        `added_tokens`. Hugging Face matches these whole in text; without them it would cut
        `<unused0>` or `<table>` into pieces."""
        from sentencepiece import sentencepiece_model_pb2

        from .convert.tokenizer_json import added_tokens

        # SentencePieceProcessor cannot tell user-defined pieces apart; the proto can.
        proto = sentencepiece_model_pb2.ModelProto.FromString(self._model_bytes)
        tokens = added_tokens([p.piece for p in proto.pieces], [p.type for p in proto.pieces])
        return {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tokens}


class StreamingDetokenizer:
    """Turns generated ids into text as they arrive, never splitting a UTF-8 character.

    `add_token(id)` returns the text that became final with this token (possibly ""), and
    `finalize()` the rest. The chunks joined equal `tokenizer.decode(ids, skip_special)`. Each
    step costs O(1): the token's bytes go through an incremental UTF-8 decoder, which holds back
    the bytes of a character still incomplete (byte-fallback tokens carry one byte each).
    """

    def __init__(self, tokenizer: GemmaTokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.reset()

    def reset(self) -> None:
        """Start a new sequence."""
        # errors="replace" matches decode(): the incremental decoder emits exactly what decoding
        # the whole byte string at once would, chunked.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add_token(self, token_id: int) -> str:
        """Feed one id; return the newly completed text."""
        return self._decoder.decode(self.tokenizer.token_bytes(token_id, self.skip_special), final=False)

    def finalize(self) -> str:
        """Return whatever is pending (an incomplete character becomes U+FFFD) and reset."""
        text = self._decoder.decode(b"", final=True)
        self.reset()
        return text


# ---- helpers -----------------------------------------------------------------------------------


def _model_bytes_from_json(file: str) -> bytes:
    """The SentencePiece model rebuilt from a tokenizer.json (+ the tokenizer_config.json beside it)."""
    import json

    from .convert.tokenizer_json import tokenizer_model_from_tokenizer_json

    def read(path):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except ValueError as exc:
            raise UserError(f"{path}: invalid JSON ({exc}); re-save the tokenizer") from None

    config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
    config = read(config_file) if os.path.isfile(config_file) else {}
    return tokenizer_model_from_tokenizer_json(read(file), config, source=file)


def _none_if_negative(i: int) -> int | None:
    return i if i >= 0 else None


def _content_text(content, where: str, keep_whitespace: bool = False) -> str:
    """The text of a message's content: a string, or a list of {"type": "text", "text": ...}."""
    clean = (lambda s: s) if keep_whitespace else str.strip
    if isinstance(content, str):
        return clean(content)
    if isinstance(content, (list, tuple)):
        parts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise UserError(f"{where}: content part {k} is {kind!r}; only "
                                '{"type": "text", "text": "..."} parts are supported (text-only model)')
            parts.append(clean(part["text"]))
        return "".join(parts)
    raise UserError(f"{where}: content must be a string or a list of text parts, not {type(content).__name__}")


@dataclass
class _Turn:
    role: str  # "system", "user" or "model"
    pieces: list  # [(text, is_answer)]; a non-model turn has one piece
    open: bool = False  # a model turn left open: tool results follow inside it (Gemma 4)


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError("a conversation must be a non-empty list of {'role': ..., 'content': ...} messages")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
            raise UserError(f"message {k} must be a dict with 'role' and 'content', got {m!r:.80}")


def _chat_turns(messages: list[dict], native_system: bool, tools=None, tool_format=None) -> list[_Turn]:
    """Validate a conversation; return its turns, the system text folded in or a turn of its own."""
    _check_messages(messages)
    uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if uses_tools and tool_format is None:
        raise UserError("this conversation has tools, tool calls or tool results; render it with "
                        "mlx_gemma.tools.render_prompt, which picks the model's tool format")
    system, offset = None, int(messages[0]["role"] == "system")
    if offset:
        system = _content_text(messages[0]["content"], "message 0 (system)", keep_whitespace=not native_system)
        messages = messages[1:]
    if tools:
        declared = tool_format.declarations(tools)
        system = declared if system is None else (system.strip() if native_system else system + "\n\n") + declared
    turns = [_Turn("system", [(system.strip(), False)])] if native_system and system is not None else []
    prefix = system + "\n\n" if system is not None and not native_system else ""
    if prefix and not messages:
        raise UserError("a system message must be followed by a user message")
    k = 0
    while k < len(messages):
        m, where = messages[k], f"message {k + offset}"
        role = m["role"]
        if role not in ("user", "assistant", "model", "tool"):
            hint = " (a system message may only come first)" if role == "system" else ""
            raise UserError(f"{where} has role {role!r}; use 'user', 'assistant' (or 'model'), 'tool' "
                            f"or a first 'system'{hint}")
        expected_user = sum(t.role != "system" for t in turns) % 2 == 0
        if (role == "user") != expected_user or role == "tool":
            if role == "tool":
                raise UserError(f"{where} is a tool result with no assistant tool call before it")
            raise UserError(f"{where} has role {role!r} but conversation roles must alternate "
                            "user/assistant/user/assistant/..., starting with user")
        if role == "user":
            turns.append(_Turn("user", [((prefix if not any(t.role == "user" for t in turns) else "")
                                         + _content_text(m["content"], where), False)]))
            k += 1
        else:
            k = _model_turn(messages, k, turns, tool_format, offset)
    return turns


def _model_turn(messages: list, k: int, turns: list, tool_format, offset: int) -> int:
    """Append the model turn that starts at messages[k] (with the tool calls and results it holds,
    in the order Gemma 4's template writes them: calls, results, text); return the next index."""
    native = tool_format is not None and tool_format.results_in_model_turn
    pieces: list = []
    while True:
        m, where = messages[k], f"message {k + offset}"
        calls = m.get("tool_calls") or []
        text = _content_text(m.get("content") or "", where)
        k += 1
        results = []
        while k < len(messages) and messages[k]["role"] == "tool":
            results.append(messages[k])
            k += 1
        if results and not calls:
            raise UserError(f"message {k + offset - len(results)} is a tool result with no assistant "
                            "tool_calls before it")
        if text and not native:
            pieces.append((text, True))
        if calls:
            pieces.append((tool_format.calls(calls) + tool_format.call_end, True))
        if results:
            rendered = tool_format.results(calls, results)
            if not native:  # prompt formats: the results are the next user turn
                turns += [_Turn("model", pieces), _Turn("user", [(rendered, False)])]
                return k
            pieces.append((rendered[len(tool_format.call_end):], False))  # its first marker ended the call
        if text and native:
            pieces.append((text, True))
        more = k < len(messages) and messages[k]["role"] in ("assistant", "model")
        if native and results and not text and more:
            continue  # the next assistant message goes on in the same model turn
        turns.append(_Turn("model", pieces, open=native and bool(calls) and not text))
        return k
