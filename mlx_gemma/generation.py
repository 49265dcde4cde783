"""Text generation: prefill, the compiled decode step, a batch engine with rows at their own
positions, and the text-level entry points on top of it.

Layers, bottom up:
- `prefill(model, tokens, cache, start)`: the prompt through the model in chunks; only the KV
  caches are evaluated (the LM head never runs for prompt positions);
- `DecodeStep`: tokens (B, 1) at positions pos (B,) -> logits (B, V), compiled once per
  buffer shape (the positions are an argument, see cache.py), so rows may sit anywhere;
- `generate_step`: raw token ids for rows that share their positions (tests, benchmarks); it
  dispatches step t+1 before step t's token reaches Python (`mx.async_eval`);
- `BatchGenerator`: the engine. Requests join a running decode batch after a chunked prefill
  of their own and leave it when done, each with its own SamplingParams, stop strings, length,
  adapter and logits processors. `batch_generate`, `stream_generate`, `ChatSession` and the
  server all run on it, so stopping and streaming have one implementation.

Shapes: B batch rows, T tokens, V vocabulary, E hidden size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .adapters import set_row_adapters
from .backend import policy
from .constrain import grammar_mask, make_constraint
from .errors import UserError
from .hostdecode import HostDecoder, OneRowHead
from .tokenizer import StreamingDetokenizer
from .tools import ToolSpec, call_mask, parse_answer, render_prompt
from .sampling import (DEFAULT_MAX_TOKENS, LogitsProcessor, Sampler, SamplingParams, StopStrings,
                       make_logits_processors, make_sampler, min_p_filter, repetition_penalty_processor,
                       top_k_filter, top_p_filter)

Prompt = Union[str, Sequence[dict], Sequence[int]]

DEFAULT_PREFILL_STEP = 512
SPECULATIVE = ("ngram",)  # draft sources for speculative decoding
DEFAULT_DRAFT_TOKENS = 4

__all__ = ["BatchGenerator", "BatchOutput", "ChatSession", "DecodeStep", "GenerationChunk", "GenerationStats",
           "Request", "SamplingParams", "batch_generate", "encode_prompt", "generate", "generate_step",
           "make_sampler", "min_p_filter", "ngram_draft", "prefill", "repetition_penalty_processor", "stream_generate",
           "top_k_filter", "top_p_filter"]


# ---- the token engine ----------------------------------------------------------------------


def _kv_spec(model, batch: int):
    """(batch, KV heads, head_dim, activation dtype) for cache buffers."""
    cfg = model.config
    dtype = model.model.embed_tokens(mx.array([0])).dtype  # lazy: only the dtype is read
    return batch, cfg.num_key_value_heads, cfg.head_dim, dtype


def _as_positions(start, batch: int) -> mx.array:
    if isinstance(start, mx.array):
        return start.astype(mx.int32)
    if isinstance(start, int):
        return mx.full((batch,), start, mx.int32)
    return mx.array(list(start), mx.int32)


def prefill(model, tokens: mx.array, cache: list, start=0, step: int = DEFAULT_PREFILL_STEP,
            adapter_rows: Optional[mx.array] = None) -> None:
    """Run tokens (B, T) through the model in chunks of `step`, writing positions
    start .. start + T - 1 of each row into `cache` (start: int, or one int per row). When every
    row starts at 0, the first chunk is `fresh` (its sliding layers skip the empty ring)."""
    B, T = tokens.shape
    spec = _kv_spec(model, B)
    pos = _as_positions(start, B)
    end = int(mx.max(pos).item()) + T
    fresh = end == T  # every row starts at position 0
    for c in cache:
        c.reserve(*spec, end)
    set_row_adapters(model, adapter_rows)
    for i in range(0, T, step):
        model.model(tokens[:, i:i + step], cache=cache, pos=pos + i, fresh=fresh and i == 0)
        mx.eval([c.state for c in cache])


class DecodeStep:
    """One decode step: tokens (B, 1) at positions pos (B,) -> logits (B, V), writing the new keys.

    Compiled with mx.compile over a scratch copy of the cache structure: the buffers go in and
    come out as arrays, the positions are an input, so one trace serves every position of a
    buffer shape (retraced when the batch or the buffers grow) and MLX fuses the elementwise
    work between the matmuls. The LM head runs outside (its weight is not copied into a trace).

    On the CPU, one row of a float32 model decodes on the host instead (`HostDecoder`: every
    weight product a cblas_sgemv, ~2x MLX's one-row sgemm, or a native kernel for 4/8-bit
    weights); batches, per-row adapters and models it declines take the compiled path, with
    `OneRowHead` for a dense head.
    """

    def __init__(self, model, compile: bool = True):
        self.model = model
        self.scratch = model.make_cache()
        self.compiled = mx.compile(self._traced) if compile else None
        self.host_head = OneRowHead.of(model) if policy().host_gemv else None
        self.host_body = HostDecoder.of(model) if policy().host_decode else None

    def _traced(self, tokens, pos, adapter_rows: list, state):
        for c, kv in zip(self.scratch, state):
            c.state = kv
        set_row_adapters(self.model, adapter_rows[0] if adapter_rows else None)
        hidden = self.model.model(tokens, cache=self.scratch, pos=pos)
        return hidden[:, -1], [c.state for c in self.scratch]

    def __call__(self, cache: list, tokens: mx.array, pos: mx.array, end: int,
                 adapter_rows: Optional[mx.array] = None) -> mx.array:
        """`end`: one past the largest position written (max(pos) + 1), to size the buffers."""
        for c in cache:
            c.reserve(*_kv_spec(self.model, tokens.shape[0]), end)
        if self.host_body is not None and tokens.shape[0] == 1 and adapter_rows is None:
            return self.host_body.logits(self.host_body(cache, tokens.item(), pos.item()))
        if self.compiled is None:
            set_row_adapters(self.model, adapter_rows)
            hidden = self.model.model(tokens, cache=cache, pos=pos)[:, -1]
        else:
            rows = [] if adapter_rows is None else [adapter_rows]
            hidden, state = self.compiled(tokens, pos, rows, [c.state for c in cache])
            for c, kv in zip(cache, state):
                c.state = kv
        if self.host_head is not None and hidden.shape[0] == 1:
            return self.host_head(hidden)
        return self.model.logits(hidden)

    def greedy(self, hidden: mx.array) -> list:
        """Greedy ids for final hidden states (N, E): argmax of the LM head, soft-capped as plain
        decoding does (tanh can round two large logits to one value: the tie must break the same
        way)."""
        return mx.argmax(self.model.logits(hidden), axis=-1).tolist()


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


def _restore_ring_slots(cache: list, saved: list, first: int, last: int) -> None:
    """Give the ring caches back the keys they held before positions first .. last were written
    (rejected draft positions): a ring slot holds the key `window` positions earlier, which the
    next queries still need. Full caches need nothing: the causal mask hides slots past a query
    and the next step overwrites them."""
    if last < first:
        return
    for c, old in zip(cache, saved):
        if old is None:
            continue
        stale = mx.arange(first, last + 1) % c.window
        hit = (mx.arange(c.capacity)[:, None] == stale[None]).any(axis=1)[None, None, :, None]
        c.keys, c.values = mx.where(hit, old[0], c.keys), mx.where(hit, old[1], c.values)


def generate_step(model, tokens: mx.array, *, cache: Optional[list] = None, start: int = 0,
                  max_tokens: int = DEFAULT_MAX_TOKENS, sampler: Optional[Callable] = None,
                  logits_processors: Sequence[LogitsProcessor] = (), history: Optional[mx.array] = None,
                  prefill_step: int = DEFAULT_PREFILL_STEP, compile: bool = True) -> Iterator[mx.array]:
    """Yield up to `max_tokens` sampled token arrays (B,) after feeding `tokens` (B, T), T >= 1.

    cache: per-layer caches from `model.make_cache()` whose positions [0, start) already hold
    earlier context (the new tokens continue it); made fresh when None. history (B, T0): earlier
    tokens the logits processors should see. Each yielded array is already scheduled; the next
    step is dispatched before it is yielded, so a consumer that stops after n < max_tokens tokens
    leaves start + T + n positions in the cache (the n-th token was fed too).
    """
    if tokens.ndim != 2 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be (B, T) with T >= 1, got shape {tuple(tokens.shape)}")
    B, T = tokens.shape
    cache = model.make_cache() if cache is None else cache
    sampler = sampler or make_sampler()
    prefill(model, tokens[:, :-1], cache, start, prefill_step)
    decode = DecodeStep(model, compile)
    track = bool(logits_processors)
    history = (tokens if history is None else mx.concatenate([history, tokens], axis=1)) if track else None
    position = start + T - 1

    def next_token(y: mx.array, history, position: int):
        logits = decode(cache, y, mx.full((B,), position, mx.int32), position + 1)
        for process in logits_processors:
            logits = process(history, logits)
        return sampler(logits)

    token = next_token(tokens[:, -1:], history, position)
    mx.async_eval(token)
    for n in range(1, max_tokens + 1):
        if n < max_tokens:
            if track:
                history = mx.concatenate([history, token[:, None].astype(history.dtype)], axis=1)
            following = next_token(token[:, None], history, position + n)
            mx.async_eval(following)
        yield token
        if n < max_tokens:
            token = following


# ---- prompts -------------------------------------------------------------------------------


def encode_prompt(tokenizer, prompt: Prompt, system: Optional[str] = None, tool_spec=None) -> list:
    """Token ids for a prompt: a str is raw text (`<bos>` added), a list of chat messages gets the
    chat template with the generation header, a list of ints is used as is. `system` (messages or
    str prompts treated as one user turn only) adds a system message. tool_spec (tools.ToolSpec):
    messages that declare tools (and may hold calls and results) go through `tools.render_prompt`."""
    if tool_spec is not None and isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError("the prompt is empty; give some text (or messages) to continue")
        if system is not None:
            prompt = [{"role": "user", "content": prompt}]
        else:
            return tokenizer.encode(prompt)
    prompt = list(prompt)
    if prompt and all(isinstance(t, int) for t in prompt):
        return prompt
    if not prompt:
        raise UserError("the prompt is empty; give some text (or messages) to continue")
    if system is not None:
        prompt = [{"role": "system", "content": system}] + prompt
    last = prompt[-1]
    if isinstance(last, dict) and isinstance(last.get("content"), str) and not last["content"].strip():
        raise UserError("the last message is empty; give the model something to answer")
    if tool_spec is not None or any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool")
                                    for m in prompt):
        return render_prompt(tokenizer, prompt, tool_spec)
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)


def context_length(model) -> int:
    return int(model.config.max_position_embeddings)


def check_prompt(model, ids: Sequence[int], used: int = 0) -> None:
    """UserError for an empty prompt, one past the context (on top of `used` cached positions),
    or ids outside the vocabulary (a tokenizer that does not belong to the model)."""
    if not ids:
        raise UserError("the prompt is empty; give some text (or messages) to continue")
    limit = context_length(model)
    if used + len(ids) >= limit:
        where = f" on top of {used} cached tokens" if used else ""
        raise UserError(f"the prompt is {len(ids)} tokens{where}, but the model's context is {limit} tokens; "
                        "shorten the prompt" + (" or reset the conversation" if used else ""))
    vocab = model.config.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise UserError(f"token id {bad} is outside the model's vocabulary ({vocab} tokens); "
                        "the tokenizer does not belong to this model")


# ---- the batch engine ----------------------------------------------------------------------


@dataclass
class Request:
    """One generation: prompt ids and how to sample them.

    cache / start: continue a one-row cache whose positions [0, start) hold `history` (a chat's
    earlier turns); `ids` are the new tokens. adapter: row index of a multi-adapter model
    (mlx_gemma.adapters; 0 = the base). keep_cache: hand the row's cache back when it ends.
    """

    ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    processors: Sequence[LogitsProcessor] = ()
    adapter: int = 0
    cache: Optional[list] = None
    start: int = 0
    history: Sequence[int] = ()
    keep_cache: bool = False


@dataclass
class Event:
    """What one engine step produced for one request."""

    rid: int
    token: Optional[int]  # the id sampled this step (None on an event that carries no new token)
    text: str  # text that became final with it ("" while a character or a possible stop is held)
    finish_reason: Optional[str] = None  # "stop" (stop token or string), "length", None while running
    stop_token: Optional[int] = None  # the stop id that ended the row, if one did
    logprob: Optional[float] = None  # log-probability of `token` under the model (params.logprobs)
    top_logprobs: Optional[list] = None  # [(id, logprob)] most likely alternatives (params.top_logprobs)
    tokens: Optional[list] = None  # every id the row generated (a stop token included), once it ended
    cache: Optional[list] = None  # the row's cache once it ended (Request.keep_cache)
    cached: int = 0  # positions that cache holds


class _Row:
    def __init__(self, rid: int, req: Request, model, tokenizer):
        self.rid, self.req, self.params = rid, req, req.params
        self.ids = list(req.ids)
        self.cache = req.cache if req.cache is not None else model.make_cache()
        self.fed = 0  # prompt tokens prefilled into self.cache (all but the last are)
        self.pos = req.start  # position of the next token to feed
        self.history = list(req.history) + self.ids  # what the processors see
        self.processors = make_logits_processors(self.params, len(self.history)) + list(req.processors)
        self.sampler = Sampler(self.params)
        self.max_tokens = min(self.params.max_tokens, context_length(model) - req.start - len(self.ids))
        self.tokens: list = []
        self.detok = StreamingDetokenizer(tokenizer, skip_special=True)
        self.stopper = StopStrings(self.params.stop)
        self.next_input = self.ids[-1]


class _DraftModel:
    """A smaller model proposing drafts for one greedy row: it keeps its own KV cache of the row's
    sequence, catches up on the tokens the target accepted, decodes k greedy tokens, and after
    verification keeps the positions that were accepted (rejected ones are overwritten next time;
    its ring caches get back the keys they displaced, as the target's do)."""

    def __init__(self, draft, target, compile: bool):
        if draft.config.vocab_size != target.config.vocab_size:
            raise UserError(f"the draft model's vocabulary has {draft.config.vocab_size} tokens and the model's "
                            f"{target.config.vocab_size}; a draft model must use the same tokenizer")
        self.model, self.step = draft, DecodeStep(draft, compile)
        self.rid, self.cache, self.fed, self.saved = None, None, 0, None

    def propose(self, row: "_Row", k: int) -> list:
        """k greedy draft tokens following the row's next input (at position row.pos)."""
        if self.rid != row.rid:
            self.rid, self.cache, self.fed = row.rid, self.model.make_cache(), 0
        missing = (row.ids + row.tokens)[self.fed:row.pos]  # inputs at positions fed .. row.pos - 1
        for c in self.cache:
            c.reserve(*_kv_spec(self.model, 1), row.pos + k)
        if self.step.host_body is not None and len(missing) <= 8:
            # the usual case, one or two accepted tokens: host steps without the LM head (a short
            # MLX forward of a quantized drafter would take MLX's slow one-row kernel)
            for i, token in enumerate(missing):
                self.step.host_body(self.cache, token, self.fed + i)
        elif missing:
            prefill(self.model, mx.array([missing], mx.int32), self.cache, self.fed)
        self.fed = row.pos
        # copies: the host decode path writes into the cache buffers in place
        self.saved = [(mx.array(np.array(c.keys)), mx.array(np.array(c.values))) if c.window else None
                      for c in self.cache]
        out, token = [], row.next_input
        for i in range(k):
            logits = self.step(self.cache, mx.array([[token]], mx.int32), mx.array([row.pos + i], mx.int32),
                               row.pos + i + 1)
            token = int(mx.argmax(logits, axis=-1).item())
            out.append(token)
        return out

    def settle(self, start: int, k: int, pos: int) -> None:
        """After verification: the row moved from `start` to `pos`; the draft fed positions
        start .. start + k - 1, of which those before `pos` hold accepted inputs."""
        self.fed = min(pos, start + k)
        _restore_ring_slots(self.cache, self.saved, self.fed, start + k - 1)
        self.saved = None


class BatchGenerator:
    """Continuous batching: `submit` requests, call `step()` until `busy` is False.

    Each step prefills one chunk of the oldest waiting prompt (several while nothing decodes),
    moves prompts whose prefill is complete into the decode batch, and runs one decode step for
    every row in it. A row leaves the batch as soon as it stops (its stop token, a stop string,
    its max_tokens or the context), or when `cancel`led; the other rows go on untouched.
    """

    def __init__(self, model, tokenizer, prefill_step: int = DEFAULT_PREFILL_STEP, compile: bool = True,
                 speculative: Optional[str] = None, draft_tokens: int = DEFAULT_DRAFT_TOKENS, draft_model=None):
        self.model, self.tokenizer = model, tokenizer
        self.prefill_step = prefill_step
        self.decode = DecodeStep(model, compile)
        if speculative not in (None,) + SPECULATIVE:
            raise UserError(f"unknown speculative {speculative!r}; use one of {', '.join(SPECULATIVE)} (or None)")
        if draft_tokens < 1:
            raise UserError(f"draft_tokens must be >= 1, got {draft_tokens}")
        self.draft = None
        if draft_model is not None:
            if speculative is not None:
                raise UserError(f"speculative={speculative!r} and a draft model both propose drafts; use one")
            self.draft = _DraftModel(draft_model, model, compile)
            speculative = "model"
        self.speculative, self.draft_tokens = speculative, draft_tokens
        self.drafted = self.accepted = 0  # speculative statistics: draft tokens proposed / accepted
        self.stop_ids = set(tokenizer.stop_ids)
        self.waiting: list[_Row] = []
        self.active: list[_Row] = []
        self.cache = model.make_cache()  # the decode batch: row i of every layer is self.active[i]
        self._next_rid = 0

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def submit(self, req: Request) -> int:
        """Queue a request (checked first: UserError for a bad prompt or options); returns its id."""
        req.params.check()
        check_prompt(self.model, list(req.ids), req.start)
        rid = self._next_rid
        self._next_rid += 1
        self.waiting.append(_Row(rid, req, self.model, self.tokenizer))
        return rid

    def cancel(self, rid: int) -> Optional[Event]:
        """Drop a request wherever it is; for a keep_cache request, an Event with its cache."""
        for row in self.waiting:
            if row.rid == rid:
                self.waiting.remove(row)
                return Event(rid, None, "", "cancelled", cache=row.cache, cached=row.pos + row.fed)
        for i, row in enumerate(self.active):
            if row.rid == rid:
                event = Event(rid, None, "", "cancelled")
                if row.req.keep_cache:
                    event.cache, event.cached = self._row_cache(i), row.pos
                self._drop([i])
                return event
        return None

    def step(self) -> list[Event]:
        """Advance every request by one step; the events of this step, in row order.

        While rows decode, a step prefills at most `prefill_step` prompt tokens (so the running
        streams keep flowing), shared by the waiting prompts in order: a burst of short prompts
        all joins in one step. With nothing decoding, prompts are prefilled until one can join.
        """
        budget = self.prefill_step
        while self.waiting and (budget > 0 or not self.active):
            row = self.waiting[0]
            budget -= self._prefill_chunk(row, max(budget, 1))
            if len(row.ids) - 1 - row.fed <= 0:
                self.waiting.pop(0)
                self._join(row)
        return self._decode() if self.active else []

    # -- internals --

    def _prefill_chunk(self, row: _Row, most: int) -> int:
        """Prefill up to `most` more tokens of the row's prompt (all but its last token, which the
        first decode step feeds); returns how many."""
        n = min(len(row.ids) - 1 - row.fed, most, self.prefill_step)
        if n > 0:
            chunk = mx.array([row.ids[row.fed:row.fed + n]], mx.int32)
            prefill(self.model, chunk, row.cache, row.pos + row.fed, n, self._adapters([row]))
            row.fed += n
        return max(n, 0)

    def _join(self, row: _Row) -> None:
        row.pos += row.fed
        for batch_cache, row_cache in zip(self.cache, row.cache):
            batch_cache.concat(row_cache)
        row.cache = None
        self.active.append(row)

    def _adapters(self, rows) -> Optional[mx.array]:
        if not any(r.req.adapter for r in rows):
            return None
        return mx.array([r.req.adapter for r in rows], mx.int32)

    def _row_cache(self, i: int) -> list:
        out = self.model.make_cache()
        for mine, theirs in zip(out, self.cache):
            mine.state = (theirs.keys[i:i + 1], theirs.values[i:i + 1])
        return out

    def _drop(self, rows: Sequence[int]) -> None:
        keep = [i for i in range(len(self.active)) if i not in set(rows)]
        if len(keep) == len(self.active):
            return
        if keep:
            for c in self.cache:
                c.take(keep)
        else:
            self.cache = self.model.make_cache()
        self.active = [self.active[i] for i in keep]

    def _decode(self) -> list[Event]:
        rows = self.active
        if self._can_speculate(rows):
            row, k = rows[0], min(self.draft_tokens, rows[0].max_tokens - len(rows[0].tokens) - 1)
            if self.draft is None:
                draft = ngram_draft(row.history, k)
                if draft:
                    return self._speculate(row, draft)
            elif k >= 1:
                start = row.pos
                draft = self.draft.propose(row, k)
                events = self._speculate(row, draft)
                self.draft.settle(start, len(draft), row.pos)
                return events
        tokens = mx.array([[r.next_input] for r in rows], mx.int32)
        pos = mx.array([r.pos for r in rows], mx.int32)
        logits = self.decode(self.cache, tokens, pos, max(r.pos for r in rows) + 1, self._adapters(rows))
        sampled, scores = self._sample(logits, rows)
        events, finished = [], []
        for i, (row, token) in enumerate(zip(rows, sampled)):
            row.pos += 1
            row.next_input = token
            event = self._advance(row, token)
            if scores[i] is not None:
                event.logprob, event.top_logprobs = scores[i]
            if event.finish_reason:
                finished.append(i)
                event.tokens = list(row.tokens)
                if row.req.keep_cache:
                    event.cache, event.cached = self._row_cache(i), row.pos
            events.append(event)
        self._drop(finished)
        return events

    # -- speculative decoding (one greedy row, drafts verified in one forward) --

    def _can_speculate(self, rows) -> bool:
        """Drafts pay only for one greedy row whose tokens need no per-step logits."""
        if self.speculative is None or len(rows) != 1:
            return False
        p = rows[0].params
        if self.draft is not None and rows[0].req.start != 0:
            return False  # a draft model needs the whole sequence; a cached prefix is not in `ids`
        return p.greedy and not rows[0].processors and not p.logprobs

    def _speculate(self, row: _Row, draft: list) -> list[Event]:
        """Feed the row's next input and `draft` (k tokens) at once; emit the greedy tokens up to and
        including the first one that disagrees with the draft (1 .. k + 1 tokens, as plain greedy
        decoding would give them), then undo the ring-cache writes of the rejected positions."""
        start, k = row.pos, len(draft)
        for c in self.cache:
            c.reserve(*_kv_spec(self.model, 1), start + k + 1)
        saved = [(c.keys, c.values) if c.window else None for c in self.cache]
        set_row_adapters(self.model, self._adapters([row]))
        hidden = self.model.model(mx.array([[row.next_input] + draft], mx.int32), cache=self.cache,
                                  pos=mx.array([start], mx.int32))[0]  # (k + 1, E)
        picked = self.decode.greedy(hidden)
        self.drafted += k
        events = []
        for i, token in enumerate(picked):
            row.pos += 1
            row.next_input = token
            events.append(self._advance(row, token))
            if events[-1].finish_reason or i == k or token != draft[i]:
                break
        self.accepted += len(events) - 1
        _restore_ring_slots(self.cache, saved, row.pos, start + k)
        if events[-1].finish_reason:
            events[-1].tokens = list(row.tokens)
            if row.req.keep_cache:
                events[-1].cache, events[-1].cached = self._row_cache(0), row.pos
            self._drop([0])
        return events

    def _sample(self, logits: mx.array, rows: list) -> tuple[list, list]:
        """Per-row processors and samplers over logits (B, V); (token ids, logprob info per row)."""
        if all(r.params.greedy and not r.processors for r in rows):
            picked = mx.argmax(logits, axis=-1)
        else:
            parts = []
            for i, r in enumerate(rows):
                row_logits = logits[i:i + 1]
                if r.processors:
                    history = mx.array([r.history], mx.int32)
                    for process in r.processors:
                        row_logits = process(history, row_logits)
                parts.append(r.sampler(row_logits))
            picked = mx.concatenate(parts)
        scores = [None] * len(rows)
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs]
        if wanted:
            sub = logits[mx.array(wanted)].astype(mx.float32)
            logp = sub - mx.logsumexp(sub, axis=-1, keepdims=True)
            k = max(rows[i].params.top_logprobs for i in wanted)
            top = mx.argpartition(-logp, k - 1, axis=-1)[:, :k] if k else None  # the k best, unordered
            top_lp = mx.take_along_axis(logp, top, axis=-1) if k else None
            chosen = mx.take_along_axis(logp, picked[mx.array(wanted)][:, None], axis=-1)[:, 0]
            mx.eval(picked, chosen, *([top, top_lp] if k else []))
            for j, i in enumerate(wanted):
                n = rows[i].params.top_logprobs
                alts = sorted(zip(top[j].tolist(), top_lp[j].tolist()), key=lambda a: -a[1])[:n] if n else []
                scores[i] = (float(chosen[j].item()), alts)
        return picked.tolist(), scores

    def _advance(self, row: _Row, token: int) -> Event:
        """Record a sampled token: the text it completes, and whether the row ends."""
        row.tokens.append(token)
        row.history.append(token)
        if token in self.stop_ids:
            return Event(row.rid, token, self._flush(row), "stop", stop_token=token)
        text, hit = row.stopper.feed(row.detok.add_token(token))
        if hit:
            return Event(row.rid, token, text, "stop")
        if len(row.tokens) >= row.max_tokens:
            return Event(row.rid, token, text + self._flush(row), "length")
        return Event(row.rid, token, text)

    @staticmethod
    def _flush(row: _Row) -> str:
        """The detokenizer's and the stop-string holder's remaining text at the end of a row."""
        text, hit = row.stopper.feed(row.detok.finalize())
        return text if hit else text + row.stopper.flush()


# ---- text in, text out ---------------------------------------------------------------------


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens fed before the first new token (only the new ones in a chat)
    prompt_tps: float = 0.0  # prompt tokens / time to the first new token
    generation_tokens: int = 0
    generation_tps: float = 0.0  # new tokens after the first / time since the first
    peak_memory_gb: float = 0.0  # mx.get_peak_memory() since the call started
    drafted: int = 0  # speculative decoding: draft tokens verified
    accepted: int = 0  # ... and how many of them the model agreed with

    def line(self) -> str:
        spec = f" | drafts: {self.accepted}/{self.drafted} accepted" if self.drafted else ""
        return (f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tok/s | "
                f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tok/s | "
                f"peak memory: {self.peak_memory_gb:.2f} GB{spec}")


@dataclass
class GenerationChunk:
    """One piece of a streamed generation: the text that became final with `token`."""

    text: str
    token: Optional[int]  # the id just generated (None on a closing chunk with no new token)
    stats: GenerationStats
    finish_reason: Optional[str] = None  # "stop" (stop token or string), "length", None while running
    tokens: list = field(default_factory=list)  # all ids generated so far (a stop token included)
    logprob: Optional[float] = None
    top_logprobs: Optional[list] = None


def _stream_request(model, tokenizer, req: Request, prefill_step: int, compile: bool,
                    on_end: Optional[Callable[[Event], None]] = None,
                    speculative: Optional[str] = None, draft_model=None) -> Iterator[GenerationChunk]:
    """Run one request alone on a BatchGenerator, as GenerationChunks with timing stats.
    on_end receives the last event (also when the consumer stops early: then a cancel event)."""
    engine = BatchGenerator(model, tokenizer, prefill_step, compile, speculative=speculative, draft_model=draft_model)
    rid = engine.submit(req)
    stats = GenerationStats(prompt_tokens=len(req.ids))
    mx.reset_peak_memory()
    tokens: list = []
    start = time.perf_counter()
    first = None
    last: Optional[Event] = None
    try:
        while engine.busy:
            for event in engine.step():
                last = event
                now = time.perf_counter()
                if first is None:
                    first = now
                    stats.prompt_tps = len(req.ids) / max(now - start, 1e-9)
                tokens.append(event.token)
                stats.generation_tokens = len(tokens)
                if len(tokens) > 1:
                    stats.generation_tps = (len(tokens) - 1) / max(now - first, 1e-9)
                stats.peak_memory_gb = mx.get_peak_memory() / 1e9
                stats.drafted, stats.accepted = engine.drafted, engine.accepted
                yield GenerationChunk(event.text, event.token, stats, event.finish_reason, list(tokens),
                                      event.logprob, event.top_logprobs)
    finally:
        if engine.busy:
            last = engine.cancel(rid)
        if on_end is not None and last is not None:
            on_end(last)


def stream_generate(model, tokenizer, prompt: Prompt, params: Optional[SamplingParams] = None, *,
                    system: Optional[str] = None, logits_processors: Sequence[LogitsProcessor] = (),
                    prefill_step: int = DEFAULT_PREFILL_STEP, compile: bool = True,
                    json_schema=None, regex: Optional[str] = None, speculative: Optional[str] = None,
                    draft_model=None, tools: Optional[list] = None, tool_choice="auto",
                    parallel_tool_calls: bool = True, **options) -> Iterator[GenerationChunk]:
    """Generate from `prompt`, yielding GenerationChunk(text, token, stats, finish_reason, tokens).

    prompt: raw text (sent as is after `<bos>`: base-model continuation), a list of chat messages
    ({"role", "content"}; the chat template is applied) or a list of token ids. params (or
    SamplingParams fields as keywords: max_tokens, temp, top_p, stop, seed, ...) say how to
    sample. Generation ends at `<eos>` / `<end_of_turn>` (not part of the text), at a stop
    string (cut before it) or after max_tokens. The chunks' texts joined are the whole generated
    text; every chunk is whole characters (the detokenizer holds back partial UTF-8).
    logits_processors: extra `(history, logits) -> logits` callables.
    json_schema (a dict or its JSON text) / regex: constrain the answer to that grammar
    (mlx_gemma.constrain); it then parses unless max_tokens cut it short.
    speculative="ngram": greedy decoding (temp 0, no processors, no logprobs) verifies up to 4
    tokens copied from the prompt/answer (`ngram_draft`) in one forward; the tokens are exactly
    plain greedy's, several per step when the draft is right. Other settings decode normally.
    draft_model: a smaller model with the same tokenizer proposes the drafts instead (greedy,
    4 tokens a step); the text is again exactly plain greedy's. The stats count drafted /
    accepted tokens.
    tools / tool_choice / parallel_tool_calls: OpenAI's, for a list of messages (mlx_gemma.tools):
    the tools are declared in the prompt and calls are generated under their schemas; read the
    chunks' tokens with `tools.parse_answer` (or call `generate`, which returns a ToolAnswer).
    """
    params = SamplingParams.of(params, **options)
    spec = ToolSpec.of(tokenizer, tools, tool_choice, parallel_tool_calls) if tools is not None else None
    if spec is not None and (json_schema is not None or regex is not None):
        raise UserError("give tools or json_schema/regex, not both")
    mask = call_mask(tokenizer, spec) if spec is not None else grammar_mask(tokenizer, json_schema, regex)
    ids = encode_prompt(tokenizer, prompt, system, spec)
    req = Request(ids, params, processors=list(logits_processors) + ([mask] if mask else []))
    yield from _stream_request(model, tokenizer, req, prefill_step, compile, speculative=speculative,
                               draft_model=draft_model)


def generate(model, tokenizer, prompt: Prompt, params: Optional[SamplingParams] = None, **options):
    """The whole generated text for `prompt` (arguments as `stream_generate`). With `tools=`, a
    `tools.ToolAnswer`: the text outside calls (`content`), the calls as OpenAI `tool_calls`
    (arguments as JSON text that validates against the function's parameters) and the finish reason."""
    if options.get("tools") is None:
        return "".join(chunk.text for chunk in stream_generate(model, tokenizer, prompt, params, **options))
    tokens, finish = [], None
    for chunk in stream_generate(model, tokenizer, prompt, params, **options):
        tokens, finish = chunk.tokens, chunk.finish_reason or finish
    spec = ToolSpec.of(tokenizer, options["tools"], options.get("tool_choice", "auto"),
                       options.get("parallel_tool_calls", True))
    return parse_answer(tokenizer, spec, tokens, finish)


@dataclass
class BatchOutput:
    """One row of `batch_generate(..., details=True)`."""

    text: str  # the decoded answer (special tokens skipped, cut before a stop string)
    tokens: list  # generated ids, without the stop token
    finish_reason: str  # "stop" (a stop token or stop string) or "length" (max_tokens)
    stop_token: Optional[int] = None  # the stop token id that ended the row, if one did


def batch_generate(model, tokenizer, prompts: Sequence[Prompt], params: Optional[SamplingParams] = None, *,
                   system: Optional[str] = None, prefill_step: int = DEFAULT_PREFILL_STEP, compile: bool = True,
                   details: bool = False, json_schema=None, regex: Optional[str] = None,
                   on_step: Optional[Callable[[list], None]] = None, **options) -> list:
    """Generate for several prompts at once, one row each in a continuous batch; returns one text
    each, or with details=True one BatchOutput each (text, token ids, why the row stopped).

    Each row stops on its own (stop token, stop string, max_tokens) and leaves the batch.
    Greedy results equal one-by-one `generate`. json_schema / regex constrain every row (each
    with its own grammar state), as in `stream_generate`. on_step, when given, is called after
    every engine step with that step's Events (one per row that produced a token): a hook for
    progress display.
    """
    params = SamplingParams.of(params, **options)
    constraint = make_constraint(json_schema, regex)
    if not prompts:
        return []
    engine = BatchGenerator(model, tokenizer, prefill_step, compile)
    rids = [engine.submit(Request(encode_prompt(tokenizer, p, system), params,
                                  processors=[grammar_mask(tokenizer, constraint=constraint)] if constraint else ()))
            for p in prompts]
    texts = {rid: [] for rid in rids}
    results: dict = {}
    while engine.busy:
        events = engine.step()
        for event in events:
            texts[event.rid].append(event.text)
            if event.finish_reason:
                results[event.rid] = event
        if on_step is not None:
            on_step(events)
    outputs = []
    for rid in rids:
        event = results[rid]
        tokens = event.tokens[:-1] if event.stop_token is not None else event.tokens
        outputs.append(BatchOutput("".join(texts[rid]), tokens, event.finish_reason, event.stop_token))
    return outputs if details else [o.text for o in outputs]


class ChatSession:
    """A multi-turn conversation that keeps its KV cache between turns.

    Each `send(text)` feeds only the tokens not yet in the cache: the previous answer's
    `<end_of_turn>` (when it was not fed yet), the turn separators and the new user text, all
    rendered by the tokenizer's chat template. `reset()` starts over. Sampling options given
    here apply to every turn.
    """

    def __init__(self, model, tokenizer, system: Optional[str] = None, params: Optional[SamplingParams] = None,
                 prefill_step: int = DEFAULT_PREFILL_STEP, compile: bool = True, **options):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.params = SamplingParams.of(params, **options)
        self.prefill_step, self.compile = prefill_step, compile
        self.reset()

    def reset(self) -> None:
        self.cache = self.model.make_cache()
        self.cached = 0  # positions of self.ids held by the cache (a prefix of them)
        self.ids: list = []  # the whole conversation's ids
        self.messages: list = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.last_stats: Optional[GenerationStats] = None

    def _turn_ids(self, text: str) -> list:
        """The conversation's ids with the new user turn and the model header. The tokenizer's
        chat template renders the turn; the earlier answers keep the ids the model generated
        (their text re-encoded could tokenize differently from what the cache holds)."""
        tok = self.tokenizer
        segments = tok.chat_segments(self.messages + [{"role": "user", "content": text}], add_generation_prompt=True)
        if not self.ids:
            return tok.encode("".join(piece for piece, _ in segments), add_bos=False)
        last_answer = max(i for i, (_, is_answer) in enumerate(segments) if is_answer)
        tail = "".join(piece for piece, _ in segments[last_answer + 1:])
        close = [] if self.ids[-1] == tok.end_of_turn_id else [tok.end_of_turn_id]
        return self.ids + close + tok.encode(tail, add_bos=False)

    def send(self, text: str) -> Iterator[GenerationChunk]:
        """Stream the model's answer to the user message `text`."""
        if not text.strip():
            raise UserError("the message is empty; type something, /reset or /exit")
        ids = self._turn_ids(text)
        check_prompt(self.model, ids[self.cached:], self.cached)
        new_ids = ids[self.cached:]
        req = Request(new_ids, self.params, cache=self.cache, start=self.cached, history=ids[:self.cached],
                      keep_cache=True)
        answer: list = []

        def on_end(event: Event) -> None:
            self.cache, self.cached = event.cache, event.cached

        self.ids = ids
        self.messages.append({"role": "user", "content": text})
        try:
            for chunk in _stream_request(self.model, self.tokenizer, req, self.prefill_step, self.compile, on_end):
                self.last_stats, answer = chunk.stats, chunk.tokens
                yield chunk
        finally:
            # Also when the caller stops early: the cache then holds a prefix of these ids.
            self.ids += answer
            self.messages.append({"role": "assistant",
                                  "content": self.tokenizer.decode([t for t in answer if t not in self.tokenizer.stop_ids],
                                                                   skip_special=True)})
