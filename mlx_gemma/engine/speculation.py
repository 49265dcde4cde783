"""Speculative decoding for one greedy row: a drafter proposes k tokens, the decode step verifies
them in one forward, the row keeps the greedy tokens up to the first disagreement (exactly what
plain greedy decoding gives, often several per step), and the cache forgets the rejected
positions (`ModelCache.snapshot` / `restore`).

Drafters: `NgramDrafter` copies what followed the latest earlier occurrence of the row's last
ids (prompt lookup); `ModelDrafter` runs a smaller model with the same tokenizer.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from ..errors import UserError
from .request import Event
from .step import DecodeStep

SPECULATIVE = ("ngram",)  # draft sources for speculative decoding by name
DEFAULT_DRAFT_TOKENS = 4


def ngram_draft(history: Sequence[int], k: int, max_n: int = 3) -> list:
    """Prompt-lookup drafting: the (up to) k tokens that followed the latest earlier occurrence of
    the last n ids of `history` (n = max_n down to 1); [] when none occurs or k < 1. Copying from
    the prompt and the answer so far pays on Q&A over a context, code edits, lists, repetitions."""
    if k < 1:
        return []
    for n in range(min(max_n, len(history) - 1), 0, -1):
        tail = list(history[-n:])
        for i in range(len(history) - n - 1, -1, -1):
            if history[i] == tail[0] and list(history[i:i + n]) == tail:
                return list(history[i + n:i + n + k])
    return []


class NgramDrafter:
    """Drafts copied from the row's own history."""

    def propose(self, row, k: int) -> list:
        return ngram_draft(row.sampling.history, k)

    def settle(self, start: int, k: int, pos: int) -> None:
        pass


class ModelDrafter:
    """A smaller model proposing drafts for one greedy row: it keeps its own KV cache of the row's
    sequence, catches up on the tokens the target accepted, decodes k greedy tokens, and after
    verification keeps the positions that were accepted (its rings get back what rejected ones
    displaced, as the target's do)."""

    def __init__(self, step: DecodeStep, target_vocab: int):
        vocab = step.model.config.vocab_size
        if vocab != target_vocab:
            raise UserError(f"the draft model's vocabulary has {vocab} tokens and the model's "
                            f"{target_vocab}; a draft model must use the same tokenizer")
        self.step = step
        self.rid, self.cache, self.fed, self.snap = None, None, 0, None

    def propose(self, row, k: int) -> list:
        """k greedy draft tokens following the row's next input (at position row.pos)."""
        if self.rid != row.rid:
            self.rid, self.cache, self.fed = row.rid, self.step.model.make_cache(), 0
        self.step.extend(self.cache, row.sequence(row.pos)[self.fed:], self.fed)
        self.fed = row.pos
        k = min(k, self.cache.max_snapshot)
        self.step.reserve(self.cache, 1, row.pos + k)
        self.snap = self.cache.snapshot(row.pos, k)
        out, token = [], row.next_input
        for i in range(k):
            token = self.step.greedy_next(self.cache, token, row.pos + i)
            out.append(token)
        return out

    def settle(self, start: int, k: int, pos: int) -> None:
        """After verification: the row moved from `start` to `pos`; the draft fed positions
        start .. start + k - 1, of which those before `pos` hold accepted inputs."""
        self.fed = min(pos, start + k)
        self.cache.restore(self.snap, self.fed - start)
        self.snap = None


class Speculator:
    """Drafts for one greedy row, verified through the decode step; counts drafted / accepted."""

    def __init__(self, drafter, draft_tokens: int = DEFAULT_DRAFT_TOKENS):
        if draft_tokens < 1:
            raise UserError(f"draft_tokens must be >= 1, got {draft_tokens}")
        self.drafter, self.draft_tokens = drafter, draft_tokens
        self.drafted = self.accepted = 0

    def applies(self, rows: Sequence) -> bool:
        """Drafts pay only for one greedy row whose tokens need no per-step logits."""
        if len(rows) != 1:
            return False
        if isinstance(self.drafter, ModelDrafter) and rows[0].sequence(0) is None:
            return False  # a draft model needs the whole sequence; a cache given without its history hides it
        return rows[0].sampling.plain_greedy

    def run(self, step: DecodeStep, cache, row, advance: Callable) -> Optional[list]:
        """One speculative step for `row` (row 0 of `cache`): its Events, or None when there is
        no draft (decode normally). advance(row, token) -> Event records each emitted token."""
        # k drafts + the row's input are rolled back together: at most one snapshot's span
        k = min(self.draft_tokens, row.finisher.remaining - 1, cache.max_snapshot - 1)
        if k < 1:
            return None
        start = row.pos
        draft = self.drafter.propose(row, k)
        if not draft:
            return None
        events = self._verify(step, cache, row, draft, advance)
        self.drafter.settle(start, len(draft), row.pos)
        return events

    def _verify(self, step: DecodeStep, cache, row, draft: list, advance: Callable) -> list:
        """Feed the row's next input and the k drafts at once; emit the greedy tokens up to and
        including the first one that disagrees with the draft (1 .. k + 1 tokens), then forget
        the positions after the last accepted input."""
        start, k = row.pos, len(draft)
        step.reserve(cache, 1, start + k + 1)
        snap = cache.snapshot(start, k + 1)
        picked = step.verify(cache, [row.next_input] + draft, start, row.adapter_rows)
        self.drafted += k
        events: list[Event] = []
        for i, token in enumerate(picked):
            events.append(advance(row, token))
            if events[-1].finish_reason or i == k or token != draft[i]:
                break
        self.accepted += len(events) - 1
        cache.restore(snap, row.pos - start)
        return events
