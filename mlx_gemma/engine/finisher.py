"""When a row ends and what text each of its tokens makes final: stop ids, stop strings, the
streaming detokenizer and the row's token budget, per row."""

from __future__ import annotations

from typing import Sequence

from ..sampling import SamplingParams, StopStrings
from ..tokenizer import StreamingDetokenizer
from .request import Event


class Finisher:
    """One row's ending rules. `advance(rid, token)` records a sampled token and returns its Event:
    the text it completes (held back while it could be part of a stop string or a character)
    and the finish reason once the row ends ("stop": a stop id or stop string, "length")."""

    def __init__(self, tokenizer, params: SamplingParams, max_tokens: int, stop_ids: Sequence[int]):
        self.tokens: list = []  # every id generated, a stop id included
        self.max_tokens = max_tokens
        self.stop_ids = stop_ids
        self.detok = StreamingDetokenizer(tokenizer, skip_special=True)
        self.stopper = StopStrings(params.stop)

    @property
    def remaining(self) -> int:
        """Tokens the row may still generate."""
        return self.max_tokens - len(self.tokens)

    def advance(self, rid: int, token: int) -> Event:
        self.tokens.append(token)
        if token in self.stop_ids:
            return Event(rid, token, self._flush(), "stop", stop_token=token)
        text, hit = self.stopper.feed(self.detok.add_token(token))
        if hit:
            return Event(rid, token, text, "stop")
        if len(self.tokens) >= self.max_tokens:
            return Event(rid, token, text + self._flush(), "length")
        return Event(rid, token, text)

    def _flush(self) -> str:
        """The detokenizer's and the stop-string holder's remaining text at the end of a row."""
        text, hit = self.stopper.feed(self.detok.finalize())
        return text if hit else text + self.stopper.flush()
