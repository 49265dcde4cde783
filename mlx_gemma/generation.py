"""Text generation: the public entry points (generate, stream_generate, batch_generate,
ChatSession, and generate_step for raw token ids), all on the model's one engine
(`mlx_gemma.engine`: the scheduler, decode step, sampler, finisher and speculation).

- `generate_step`: raw token ids for rows that share their positions (tests, benchmarks); it
  dispatches step t+1 before step t's token reaches Python (`mx.async_eval`);
- `stream_generate` / `generate`: one request on a `BatchGenerator`, as text chunks with stats;
- `batch_generate`: several prompts as rows of one continuous batch;
- `ChatSession`: a conversation whose cache is kept between turns.
`batch_generate`, `stream_generate`, `ChatSession` and the server all run on `BatchGenerator`, so
stopping and streaming have one implementation, and on the decode step `engine_for(model)` keeps,
so nothing is rebuilt or retraced between calls.

Shapes: B batch rows, T tokens, V vocabulary, E hidden size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx

from .constrain import grammar_mask, make_constraint
from .engine import (DEFAULT_PREFILL_STEP, BatchGenerator, DecodeStep, Event, PrefixCache, Request, check_prompt,
                     engine_for, ngram_draft, prefill)
from .errors import UserError
from .cpu.hostdecode import OneRowHead  # noqa: F401 (benchmarks import it from here)
from .tools import ToolSpec, call_mask, parse_answer, render_prompt
from .sampling import (DEFAULT_MAX_TOKENS, LogitsProcessor, SamplingParams, make_sampler, min_p_filter,
                       repetition_penalty_processor, top_k_filter, top_p_filter)

Prompt = Union[str, Sequence[dict], Sequence[int]]

__all__ = ["BatchGenerator", "BatchOutput", "ChatSession", "DecodeStep", "GenerationChunk", "GenerationStats",
           "Request", "SamplingParams", "batch_generate", "encode_prompt", "generate", "generate_step",
           "make_sampler", "min_p_filter", "ngram_draft", "prefill", "repetition_penalty_processor", "stream_generate",
           "top_k_filter", "top_p_filter"]


# ---- raw token ids -------------------------------------------------------------------------


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
    decode = engine_for(model).step(compile)
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
                    speculative: Optional[str] = None, draft_model=None,
                    prompt_cache: Optional[PrefixCache] = None) -> Iterator[GenerationChunk]:
    """Run one request alone on a BatchGenerator, as GenerationChunks with timing stats.
    on_end receives the last event (also when the consumer stops early: then a cancel event)."""
    engine = BatchGenerator(model, tokenizer, prefill_step, compile, speculative=speculative, draft_model=draft_model,
                            prefix_cache=prompt_cache)
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
                    parallel_tool_calls: bool = True, prompt_cache: Optional[PrefixCache] = None,
                    **options) -> Iterator[GenerationChunk]:
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
    prompt_cache: a `PrefixCache` shared by calls: the prompt reuses the longest prefix of its ids
    an earlier call with this model stored (its prompt, or prompt + answer) and prefills only the
    rest; this call's prompt and answer are stored for later ones. The text is the same.
    """
    params = SamplingParams.of(params, **options)
    spec = ToolSpec.of(tokenizer, tools, tool_choice, parallel_tool_calls) if tools is not None else None
    if spec is not None and (json_schema is not None or regex is not None):
        raise UserError("give tools or json_schema/regex, not both")
    mask = call_mask(tokenizer, spec) if spec is not None else grammar_mask(tokenizer, json_schema, regex)
    ids = encode_prompt(tokenizer, prompt, system, spec)
    req = Request(ids, params, processors=list(logits_processors) + ([mask] if mask else []))
    yield from _stream_request(model, tokenizer, req, prefill_step, compile, speculative=speculative,
                               draft_model=draft_model, prompt_cache=prompt_cache)


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
    rendered as `generate` and the server render a chat: by the model dir's own chat template
    when it has one (chat_template.py), else by ours. `reset()` starts over. Sampling options
    given here apply to every turn.
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
        chat template (the dir's own, or ours) renders the turn; the earlier answers keep the ids
        the model generated (their text re-encoded could tokenize differently from what the cache
        holds)."""
        tok = self.tokenizer
        segments = tok.conversation_segments(self.messages + [{"role": "user", "content": text}],
                                             add_generation_prompt=True)
        if not self.ids:
            return tok.encode("".join(piece for piece, _ in segments), add_bos=False)
        answers = [i for i, (_, is_answer) in enumerate(segments) if is_answer]
        if not answers:
            raise UserError("the model's chat template renders no assistant turn for the last answer, so the "
                            "conversation cannot continue on its cache; /reset to start over")
        last_answer = answers[-1]
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
