"""Which rows run: the queue of prompts waiting for their prefill, the decode batch and its cache,
and how much prefill work one engine step may do.

Every step does a bounded amount of prefill (`budget` prompt tokens) whether or not rows are
decoding, so a step never takes longer than one chunk plus one decode, and whatever the caller
does between steps (the server takes new requests and cancellations there) happens at least that
often. The budget goes to the waiting prompts in turn (least recently served first), so a short
prompt that arrives while a long one prefills starts decoding after at most one chunk of the long
one, instead of after all of it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx

from .finisher import Finisher
from .prefix import PrefixCache
from .request import Request, context_length
from .sampler import RowSampling
from .step import prefill


class Row:
    """One request inside the engine: its prompt, where it stands, how it samples and ends."""

    def __init__(self, rid: int, req: Request, model, tokenizer, stop_ids: Sequence[int]):
        self.rid, self.req = rid, req
        self.ids = list(req.ids)
        self.cache = req.cache if req.cache is not None else model.make_cache()  # until it joins
        self.fed = 0  # prompt tokens prefilled into self.cache (all but the last are)
        self.turn = 0  # the scheduler step of its last prefill turn (or before its arrival)
        self.pos = req.start  # position of the next token to feed
        self.next_input = self.ids[-1]
        self.sampling = RowSampling(req.params, list(req.history) + self.ids, req.processors)
        max_tokens = min(req.params.max_tokens, context_length(model) - req.start - len(self.ids))
        self.finisher = Finisher(tokenizer, req.params, max_tokens, stop_ids)
        self.prompt_cached = 0  # prompt tokens a PrefixCache supplied (the cache came from it)

    def sequence(self, n: int) -> Optional[list]:
        """The ids at positions 0 .. n - 1 of the row, or None when the request did not give the
        whole history of its cache (a PrefixCache then cannot key what the cache holds)."""
        if len(self.req.history) != self.req.start:
            return None
        return (list(self.req.history) + self.ids + self.tokens)[:n]

    @property
    def tokens(self) -> list:
        return self.finisher.tokens

    @property
    def prompt_left(self) -> int:
        """Prompt tokens still to prefill (the last one is fed by the first decode step)."""
        return len(self.ids) - 1 - self.fed

    @property
    def adapter_rows(self) -> Optional[mx.array]:
        return adapter_rows([self])


def adapter_rows(rows: Sequence[Row]) -> Optional[mx.array]:
    """Each row's adapter index for a forward over these rows (None: the base for all)."""
    if not any(r.req.adapter for r in rows):
        return None
    return mx.array([r.req.adapter for r in rows], mx.int32)


class Scheduler:
    """The waiting prompts, the decode batch (`active`, row i of `cache` is active[i]) and the
    per-step prefill budget."""

    def __init__(self, model, budget: int, prefix_cache: Optional[PrefixCache] = None):
        self.model, self.budget = model, budget
        self.prefix_cache = prefix_cache
        self.waiting: list[Row] = []
        self.active: list[Row] = []
        self.cache = model.make_cache()
        self.steps = 0  # admit() calls so far: the clock of the prefill turns

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def add(self, row: Row) -> None:
        """Queue a row for prefill; it has its first turn before rows that already had one."""
        row.turn = self.steps - 1
        self.waiting.append(row)

    def admit(self) -> None:
        """One step's prefill: up to `budget` prompt tokens over the waiting prompts, the one
        served least recently first (one not yet started before one that was, on a tie); the
        prompts whose prefill is complete join the decode batch (a burst of short prompts joins
        in one step)."""
        budget = self.budget
        for row in sorted(self.waiting, key=lambda r: (r.turn, r.fed > 0)):
            if row.prompt_left > 0 and budget > 0:
                budget -= self._prefill_chunk(row, budget)
                row.turn = self.steps
            if row.prompt_left <= 0:
                self.waiting.remove(row)
                self._join(row)
        self.steps += 1

    def _prefill_chunk(self, row: Row, most: int) -> int:
        n = min(row.prompt_left, most)
        every = self.prefix_cache.checkpoint_every(row.cache) if self.prefix_cache is not None else None
        if every:
            n = min(n, every - (row.pos + row.fed) % every)  # a chunk ends on each checkpoint
        chunk = mx.array([row.ids[row.fed:row.fed + n]], mx.int32)
        prefill(self.model, chunk, row.cache, row.pos + row.fed, n, row.adapter_rows)
        row.fed += n
        if every and (row.pos + row.fed) % every == 0 and row.prompt_left > 0:
            self.remember(row, row.cache, 0, row.pos + row.fed)  # a checkpoint inside a long prompt
        return n

    def _join(self, row: Row) -> None:
        if row.fed:
            # now, while every ring ends at the prompt: later a prefix past the window no longer fits
            self.remember(row, row.cache, 0, row.pos + row.fed)
        row.pos += row.fed
        self.cache.concat(row.cache)
        row.cache = None
        self.active.append(row)

    def remember(self, row: Row, cache, index: int, n: int) -> None:
        """Offer the prefix cache row `index` of `cache`, holding the row's positions 0 .. n - 1."""
        tokens = row.sequence(n) if self.prefix_cache is not None else None
        if tokens:
            self.prefix_cache.remember(self.model, row.req.adapter, tokens, cache, index)

    def leave(self, indices: Sequence[int]) -> None:
        """Drop these rows of the decode batch; the others keep their rows of the cache."""
        gone = set(indices)
        keep = [i for i in range(len(self.active)) if i not in gone]
        if len(keep) == len(self.active):
            return
        self.cache.take(keep)
        self.active = [self.active[i] for i in keep]

    def find(self, rid: int) -> tuple[Optional[Row], Optional[int]]:
        """(row, index in the decode batch or None while it waits), or (None, None)."""
        for i, row in enumerate(self.active):
            if row.rid == rid:
                return row, i
        for row in self.waiting:
            if row.rid == rid:
                return row, None
        return None, None
