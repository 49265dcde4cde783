"""The batch engine: continuous batching over one model, assembled from its parts.

`BatchGenerator` runs requests that join a running decode batch after a chunked prefill of
their own and leave it when done, each with its own SamplingParams, stop strings, length, adapter
and logits processors. The parts each do one job: the `Scheduler` (queue, prefill budget,
join/leave), the model's `DecodeStep` (kept by `engine_for(model)` across calls), `sample`,
each row's `Finisher`, and an optional `Speculator`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import mlx.core as mx

from ..errors import UserError
from .prefix import PrefixCache
from .request import Event, Request, check_prompt
from .registry import engine_for
from .sampler import sample
from .scheduler import Row, Scheduler, adapter_rows
from .speculation import DEFAULT_DRAFT_TOKENS, SPECULATIVE, ModelDrafter, NgramDrafter, Speculator
from .step import DEFAULT_PREFILL_STEP


def make_speculator(model, speculative: Optional[str], draft_tokens: int, draft_model, compile: bool):
    """The Speculator asked for (speculative="ngram" or a draft model), or None."""
    if speculative not in (None,) + SPECULATIVE:
        raise UserError(f"unknown speculative {speculative!r}; use one of {', '.join(SPECULATIVE)} (or None)")
    if draft_model is not None and speculative is not None:
        raise UserError(f"speculative={speculative!r} and a draft model both propose drafts; use one")
    if draft_model is not None:
        drafter = ModelDrafter(engine_for(draft_model).step(compile), model.config.vocab_size)
    elif speculative == "ngram":
        drafter = NgramDrafter()
    else:
        if draft_tokens < 1:
            raise UserError(f"draft_tokens must be >= 1, got {draft_tokens}")
        return None
    return Speculator(drafter, draft_tokens)


class BatchGenerator:
    """Continuous batching: `submit` requests, call `step()` until `busy` is False.

    Each step prefills at most `prefill_step` prompt tokens (see scheduler.py), moves prompts
    whose prefill is complete into the decode batch, and runs one decode step for every row in
    it. A row leaves the batch as soon as it stops (its stop token, a stop string, its max_tokens
    or the context), or when `cancel`led; the other rows go on untouched.
    """

    def __init__(self, model, tokenizer, prefill_step: int = DEFAULT_PREFILL_STEP, compile: bool = True,
                 speculative: Optional[str] = None, draft_tokens: int = DEFAULT_DRAFT_TOKENS, draft_model=None,
                 prefix_cache: Optional[PrefixCache] = None):
        self.model, self.tokenizer = model, tokenizer
        self.decode = engine_for(model).step(compile)
        self.speculator = make_speculator(model, speculative, draft_tokens, draft_model, compile)
        self.stop_ids = set(tokenizer.stop_ids)
        # ids the detokenizer can read (a stand-in tokenizer without a vocabulary reads any)
        self.vocab = getattr(tokenizer, "vocab_size", None)
        # prefix_cache: reused prompt prefixes, for requests that bring no cache of their own
        self.scheduler = Scheduler(model, prefill_step, prefix_cache)
        self._next_rid = 0

    @property
    def busy(self) -> bool:
        return self.scheduler.busy

    @property
    def active(self) -> list:
        return self.scheduler.active

    @property
    def waiting(self) -> list:
        return self.scheduler.waiting

    @property
    def drafted(self) -> int:
        return self.speculator.drafted if self.speculator else 0

    @property
    def accepted(self) -> int:
        return self.speculator.accepted if self.speculator else 0

    def submit(self, req: Request) -> int:
        """Queue a request (checked first: UserError for a bad prompt or options); returns its id."""
        req.params.check()
        check_prompt(self.model, list(req.ids), req.start)
        rid = self._next_rid
        self._next_rid += 1
        req, cached = self._reuse_prefix(req)
        row = Row(rid, req, self.model, self.tokenizer, self.stop_ids)
        row.prompt_cached = cached
        self.scheduler.add(row)
        return rid

    def _reuse_prefix(self, req: Request) -> tuple[Request, int]:
        """The request continuing the longest cached prefix of its ids, and that prefix's length
        (the request as it is, and 0, without a prefix cache or a hit)."""
        store = self.scheduler.prefix_cache
        if store is None or req.cache is not None or req.start != 0:
            return req, 0
        hit = store.lookup(self.model, req.adapter, req.ids)
        if hit is None:
            return req, 0
        cache, n = hit
        ids = list(req.ids)
        return replace(req, ids=ids[n:], cache=cache, start=n, history=ids[:n]), n

    def cancel(self, rid: int) -> Optional[Event]:
        """Drop a request wherever it is; for a keep_cache request, an Event with its cache."""
        row, index = self.scheduler.find(rid)
        if row is None:
            return None
        if index is None:
            self.scheduler.waiting.remove(row)
            return Event(rid, None, "", "cancelled", cache=row.cache, cached=row.pos + row.fed)
        event = Event(rid, None, "", "cancelled")
        if row.req.keep_cache:
            event.cache, event.cached = self.scheduler.cache.row(index), row.pos
        self.scheduler.leave([index])
        return event

    def step(self) -> list[Event]:
        """Advance every request by one step; the events of this step, in row order."""
        self.scheduler.admit()
        if not self.scheduler.active:
            return []
        rows = self.scheduler.active
        if self.speculator is not None and self.speculator.applies(rows):
            events = self.speculator.run(self.decode, self.scheduler.cache, rows[0], self._advance)
            if events is not None:
                return self._finish(events)
        return self._finish(self._decode(rows))

    def _decode(self, rows: list) -> list[Event]:
        """One token for every row of the decode batch."""
        tokens = mx.array([[r.next_input] for r in rows], mx.int32)
        pos = mx.array([r.pos for r in rows], mx.int32)
        logits = self.decode(self.scheduler.cache, tokens, pos, max(r.pos for r in rows) + 1, adapter_rows(rows))
        # An embedding with more rows than the tokenizer has pieces (padded or multimodal tables)
        # must never yield an id the detokenizer cannot read: sample among the tokenizer's ids.
        if self.vocab is not None:
            logits = logits[:, :self.vocab]
        sampled, scores = sample(logits, [r.sampling for r in rows])
        events = []
        for row, token, score in zip(rows, sampled, scores):
            event = self._advance(row, token)
            if score is not None:
                event.logprob, event.top_logprobs = score
            events.append(event)
        return events

    def _advance(self, row: Row, token: int) -> Event:
        """The row fed its input and got `token`: record it; the Event it makes."""
        row.pos += 1
        row.next_input = token
        row.sampling.record(token)
        return row.finisher.advance(row.rid, token)

    def _finish(self, events: list) -> list[Event]:
        """Rows whose event ends them leave the batch (handing their cache back when asked)."""
        index = {r.rid: i for i, r in enumerate(self.scheduler.active)}
        finished = []
        for event in events:
            if event.finish_reason:
                i = index[event.rid]
                row = self.scheduler.active[i]
                event.tokens, event.prompt_cached = list(row.tokens), row.prompt_cached
                self.scheduler.remember(row, self.scheduler.cache, i, row.pos)
                if row.req.keep_cache:
                    event.cache, event.cached = self.scheduler.cache.row(i), row.pos
                finished.append(i)
        self.scheduler.leave(finished)
        return events
