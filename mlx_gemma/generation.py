"""Text generation: sampling filters, logits processors, the decode loop, streaming and stats.

Layers, bottom up:
- filters and samplers on logits (B, V): `top_k_filter`, `top_p_filter`, `min_p_filter`,
  `make_sampler(temp, top_k, top_p, min_p, seed)`; logits processors are callables
  `(history (B, T) int, logits (B, V)) -> logits`, e.g. `repetition_penalty_processor`;
- `generate_step(model, tokens, ...)`: the token engine. Prefills the prompt in chunks
  (hidden states only: the LM head runs once, for the last prompt token), then decodes one
  token per step through a compiled step function, dispatching step t+1 before step t's
  token reaches Python (`mx.async_eval`), so graph building overlaps the computation;
- `stream_generate` / `generate` / `batch_generate` / `ChatSession`: text in, text out, with
  the tokenizer's streaming detokenizer, stop tokens and stop strings.

Shapes: B batch rows, T tokens, V vocabulary.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from .errors import UserError

Prompt = Union[str, Sequence[dict], Sequence[int]]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

DEFAULT_MAX_TOKENS = 256
DEFAULT_PREFILL_STEP = 512


# ---- sampling ------------------------------------------------------------------------------


def check_sampling(temp: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                   repetition_penalty: float = 1.0, repetition_window: int = 64,
                   max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
    """Raise UserError naming the first out-of-range sampling option."""
    if not temp >= 0 or math.isinf(temp):
        raise UserError(f"temp must be >= 0 (0 = greedy), got {temp}")
    if top_k < 0:
        raise UserError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if not 0 <= min_p < 1:
        raise UserError(f"min_p must be in [0, 1) (0 = off), got {min_p}")
    if not repetition_penalty > 0 or math.isinf(repetition_penalty):
        raise UserError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    if repetition_window < 1:
        raise UserError(f"repetition_window must be >= 1, got {repetition_window}")
    if max_tokens < 1:
        raise UserError(f"max_tokens must be >= 1, got {max_tokens}")


def top_k_filter(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits per row (ties with the k-th are kept too); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = mx.min(mx.topk(logits, k, axis=-1), axis=-1, keepdims=True)  # (B, 1)
    return mx.where(logits >= kth, logits, -mx.inf)


def top_p_filter(logits: mx.array, p: float) -> mx.array:
    """Nucleus filter: keep the most probable tokens whose mass first reaches p.

    A token is kept when the probability mass of the tokens ranked above it is < p (as
    transformers' TopPLogitsWarper), so the top token always survives.
    """
    if p >= 1.0:
        return logits
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    ranked = -mx.sort(-probs, axis=-1)  # (B, V), descending
    above = mx.cumsum(ranked, axis=-1) - ranked  # mass ranked strictly above each token
    n_keep = mx.maximum(mx.sum(above < p, axis=-1, keepdims=True), 1)  # (B, 1)
    threshold = mx.take_along_axis(ranked, n_keep - 1, axis=-1)
    return mx.where(probs >= threshold, logits, -mx.inf)


def min_p_filter(logits: mx.array, p: float) -> mx.array:
    """Keep tokens with probability >= p * (probability of the top token); 0 turns it off."""
    if p <= 0.0:
        return logits
    # p_i >= p * p_max  <=>  logit_i >= logit_max + log(p): no softmax needed.
    floor = mx.max(logits, axis=-1, keepdims=True) + math.log(p)
    return mx.where(logits >= floor, logits, -mx.inf)


def make_sampler(temp: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: Optional[int] = None) -> Callable[[mx.array], mx.array]:
    """A function logits (B, V) -> token ids (B,).

    temp 0 is greedy (argmax; the filters do not matter). Otherwise the logits are divided by
    temp, filtered by top-k, then top-p, then min-p (transformers' order), and sampled. With
    a seed the samples are reproducible: the sampler owns its PRNG key and splits it per step.
    """
    check_sampling(temp, top_k, top_p, min_p)
    if temp == 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    state = {"key": mx.random.key(seed) if seed is not None else None}

    def sample(logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32) / temp
        logits = min_p_filter(top_p_filter(top_k_filter(logits, top_k), top_p), min_p)
        key = None
        if state["key"] is not None:
            state["key"], key = mx.random.split(state["key"])
        return mx.random.categorical(logits, axis=-1, key=key)

    return sample


def repetition_penalty_processor(penalty: float, window: int = 64) -> LogitsProcessor:
    """CTRL-style penalty on tokens seen in the last `window` tokens (prompt included):
    a positive logit is divided by `penalty`, a negative one multiplied (as transformers does)."""

    def process(history: mx.array, logits: mx.array) -> mx.array:
        if history.shape[-1] == 0:
            return logits
        recent = history[:, -window:].astype(mx.int32)  # (B, W)
        seen = mx.take_along_axis(logits, recent, axis=-1)
        seen = mx.where(seen > 0, seen / penalty, seen * penalty)
        return mx.put_along_axis(logits, recent, seen, axis=-1)

    return process


def make_logits_processors(repetition_penalty: float = 1.0, repetition_window: int = 64) -> list:
    """The built-in processors for these options (empty when all are off)."""
    if repetition_penalty == 1.0:
        return []
    return [repetition_penalty_processor(repetition_penalty, repetition_window)]


# ---- the token engine ----------------------------------------------------------------------


def _kv_spec(model, batch: int):
    """(batch, KV heads, head_dim, activation dtype) for cache buffers."""
    cfg = model.config
    dtype = model.model.embed_tokens(mx.array([0])).dtype  # lazy: only the dtype is read
    return batch, cfg.num_key_value_heads, cfg.head_dim, dtype


class _DecodeStep:
    """One decode step, tokens (B, 1) -> logits (B, V), advancing the caches by one position.

    Compiled with mx.compile: the caches' offsets enter as an array and the full caches keep a
    fixed capacity (reserved ahead, grown by 256 positions, which retraces once per growth), so
    one trace serves every position and MLX fuses the elementwise work between the matmuls.
    """

    def __init__(self, model, cache: list, pad: Optional[mx.array], compile: bool = True):
        self.model, self.cache, self.pad = model, cache, pad
        self.spec = _kv_spec(model, 1 if pad is None else pad.shape[0])
        for c in cache:
            c.reserve(*self.spec, c.offset + 1)
        self.compiled = mx.compile(self._traced) if compile and all(c.keys is not None for c in cache) else None

    def _traced(self, tokens, offset, state):
        for c, (k, v) in zip(self.cache, state):
            c.keys, c.values, c.offset = k, v, offset
        hidden = self.model.model(tokens, cache=self.cache, pad=self.pad)
        return hidden[:, -1], [c.state for c in self.cache]

    def __call__(self, tokens: mx.array) -> mx.array:
        if self.compiled is None:
            return self.model.logits(self.model.model(tokens, cache=self.cache, pad=self.pad)[:, -1])
        offset = self.cache[0].offset
        for c in self.cache:
            c.reserve(*self.spec, offset + 1)
        hidden, state = self.compiled(tokens, mx.array(offset, mx.int32), [c.state for c in self.cache])
        for c, (k, v) in zip(self.cache, state):
            c.keys, c.values, c.offset = k, v, offset + 1
        return self.model.logits(hidden)


def prefill(model, tokens: mx.array, cache: list, pad: Optional[mx.array] = None,
            step: int = DEFAULT_PREFILL_STEP) -> None:
    """Run tokens (B, T) through the model in chunks of `step`, filling `cache`.

    Only the caches are evaluated: MLX never computes the unused LM head, final norm or the
    last layer's MLP for these positions.
    """
    for i in range(0, tokens.shape[1], step):
        model.model(tokens[:, i:i + step], cache=cache, pad=pad)
        mx.eval([c.state for c in cache])


def generate_step(model, tokens: mx.array, *, cache: Optional[list] = None, pad: Optional[mx.array] = None,
                  max_tokens: int = DEFAULT_MAX_TOKENS, sampler: Optional[Callable] = None,
                  logits_processors: Sequence[LogitsProcessor] = (), history: Optional[mx.array] = None,
                  prefill_step: int = DEFAULT_PREFILL_STEP, compile: bool = True) -> Iterator[mx.array]:
    """Yield up to `max_tokens` sampled token arrays (B,) after feeding `tokens` (B, T), T >= 1.

    cache: per-layer caches from `model.make_cache()` that may already hold earlier context
    (the new tokens continue it); made fresh when None. pad (B,): left-padding per row.
    history (B, T0): earlier tokens the logits processors should see (default: none besides
    `tokens`). Each yielded array is already scheduled; the next step is dispatched before
    it is yielded, so a consumer that stops early leaves one extra token fed into the cache
    (`cache[0].offset` always says how many positions the cache holds).
    """
    if tokens.ndim != 2 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be (B, T) with T >= 1, got shape {tuple(tokens.shape)}")
    cache = model.make_cache() if cache is None else cache
    sampler = sampler or make_sampler()
    prefill(model, tokens[:, :-1], cache, pad, prefill_step)
    decode = _DecodeStep(model, cache, pad, compile)
    track = bool(logits_processors)
    history = (tokens if history is None else mx.concatenate([history, tokens], axis=1)) if track else None

    def next_token(y: mx.array, history):
        logits = decode(y)
        for process in logits_processors:
            logits = process(history, logits)
        return sampler(logits)

    token = next_token(tokens[:, -1:], history)
    mx.async_eval(token)
    for n in range(1, max_tokens + 1):
        if n < max_tokens:
            if track:
                history = mx.concatenate([history, token[:, None].astype(history.dtype)], axis=1)
            following = next_token(token[:, None], history)
            mx.async_eval(following)
        yield token
        if n < max_tokens:
            token = following


# ---- text in, text out ---------------------------------------------------------------------


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens fed before the first new token (only the new ones in a chat)
    prompt_tps: float = 0.0  # prompt tokens / time to the first new token
    generation_tokens: int = 0
    generation_tps: float = 0.0  # new tokens after the first / time since the first
    peak_memory_gb: float = 0.0  # mx.get_peak_memory() since the call started

    def line(self) -> str:
        return (f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tok/s | "
                f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tok/s | "
                f"peak memory: {self.peak_memory_gb:.2f} GB")


@dataclass
class GenerationChunk:
    """One piece of a streamed generation: the text that became final with `token`."""

    text: str
    token: Optional[int]  # the id just generated (None on a closing chunk with no new token)
    stats: GenerationStats
    finish_reason: Optional[str] = None  # "stop" (stop token or string), "length", None while running
    tokens: list = field(default_factory=list)  # all ids generated so far


def encode_prompt(tokenizer, prompt: Prompt, system: Optional[str] = None) -> list:
    """Token ids for a prompt: a str is raw text (`<bos>` added), a list of chat messages gets the
    chat template with the generation header, a list of ints is used as is. `system` (messages or
    str prompts treated as one user turn only) adds a system message."""
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
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)


def context_length(model) -> int:
    return int(model.config.max_position_embeddings)


def _check_ids(model, ids: Sequence[int]) -> None:
    """Ids past the embedding table would be read out of bounds: a tokenizer/model mismatch."""
    vocab = model.config.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise UserError(f"token id {bad} is outside the model's vocabulary ({vocab} tokens); "
                        "the tokenizer does not belong to this model")


def _check_length(model, n_prompt: int, used: int = 0) -> None:
    limit = context_length(model)
    if used + n_prompt >= limit:
        where = f" on top of {used} cached tokens" if used else ""
        raise UserError(f"the prompt is {n_prompt} tokens{where}, but the model's context is {limit} tokens; "
                        "shorten the prompt" + (" or /reset the chat" if used else ""))


class _StopStrings:
    """Holds back text that may be the start of a stop string, so none is ever streamed."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found)."""
        text = self.pending + text
        self.pending = ""
        if not self.stops:
            return text, False
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            return text[:min(hits)], True
        hold = 0
        for s in self.stops:  # longest suffix of text that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False


def _stream_ids(model, tokenizer, new_ids: list, *, cache: list, history: Optional[list] = None,
                max_tokens: int = DEFAULT_MAX_TOKENS, temp: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                min_p: float = 0.0, repetition_penalty: float = 1.0, repetition_window: int = 64,
                seed: Optional[int] = None, stop: Sequence[str] = (), stop_ids: Optional[Sequence[int]] = None,
                logits_processors: Sequence[LogitsProcessor] = (), prefill_step: int = DEFAULT_PREFILL_STEP,
                compile: bool = True) -> Iterator[GenerationChunk]:
    """Continue `cache` (which holds `history`) with `new_ids`, streaming the generated text."""
    from .tokenizer import StreamingDetokenizer

    check_sampling(temp, top_k, top_p, min_p, repetition_penalty, repetition_window, max_tokens)
    if not new_ids:
        raise UserError("the prompt is empty; give some text (or messages) to continue")
    used = cache[0].offset
    _check_length(model, len(new_ids), used)
    _check_ids(model, new_ids)
    max_tokens = min(max_tokens, context_length(model) - used - len(new_ids))
    stop_ids = set(tokenizer.stop_ids if stop_ids is None else stop_ids)
    processors = make_logits_processors(repetition_penalty, repetition_window) + list(logits_processors)
    hist = mx.array([history], mx.int32) if (history and processors) else None
    sampler = make_sampler(temp, top_k, top_p, min_p, seed)
    detok = StreamingDetokenizer(tokenizer, skip_special=True)
    stopper = _StopStrings(stop)
    stats = GenerationStats(prompt_tokens=len(new_ids))
    mx.reset_peak_memory()
    tokens: list = []
    start = time.perf_counter()
    first = None
    steps = generate_step(model, mx.array([new_ids], mx.int32), cache=cache, max_tokens=max_tokens, sampler=sampler,
                          logits_processors=processors, history=hist, prefill_step=prefill_step, compile=compile)
    finish, text = None, ""
    for token in steps:
        token = token.item()
        now = time.perf_counter()
        if first is None:
            first = now
            stats.prompt_tps = len(new_ids) / max(now - start, 1e-9)
        tokens.append(token)
        stats.generation_tokens = len(tokens)
        if len(tokens) > 1:
            stats.generation_tps = (len(tokens) - 1) / max(now - first, 1e-9)
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        if token in stop_ids:
            finish, text = "stop", ""
            break
        text, hit = stopper.feed(detok.add_token(token))
        if hit:
            finish = "stop_string"
            break
        if len(tokens) == max_tokens:
            finish = "length"
            break
        yield GenerationChunk(text, token, stats, None, list(tokens))
    steps.close()
    if finish != "stop_string":  # flush the detokenizer and any text held back for stop strings
        more, hit = stopper.feed(detok.finalize())
        text += more + ("" if hit else stopper.pending)
    yield GenerationChunk(text, tokens[-1] if tokens else None, stats,
                          "length" if finish == "length" else "stop", list(tokens))


def stream_generate(model, tokenizer, prompt: Prompt, *, system: Optional[str] = None,
                    max_tokens: int = DEFAULT_MAX_TOKENS, temp: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    min_p: float = 0.0, repetition_penalty: float = 1.0, repetition_window: int = 64,
                    seed: Optional[int] = None, stop: Sequence[str] = (),
                    logits_processors: Sequence[LogitsProcessor] = (), cache: Optional[list] = None,
                    prefill_step: int = DEFAULT_PREFILL_STEP, compile: bool = True) -> Iterator[GenerationChunk]:
    """Generate from `prompt`, yielding GenerationChunk(text, token, stats, finish_reason, tokens).

    prompt: raw text (sent as is after `<bos>`: base-model continuation), a list of chat messages
    ({"role", "content"}; the chat template is applied) or a list of token ids. Generation ends
    at `<eos>` / `<end_of_turn>` (not part of the text), at a `stop` string (cut before it) or
    after `max_tokens`. The chunks' texts joined are the whole generated text; every chunk is
    whole characters (the detokenizer holds back partial UTF-8). Sampling options: see
    `make_sampler`; logits_processors: extra `(history, logits) -> logits` callables.
    """
    ids = encode_prompt(tokenizer, prompt, system)
    cache = model.make_cache() if cache is None else cache
    yield from _stream_ids(model, tokenizer, ids, cache=cache, max_tokens=max_tokens, temp=temp, top_k=top_k,
                           top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                           repetition_window=repetition_window, seed=seed, stop=stop,
                           logits_processors=logits_processors, prefill_step=prefill_step, compile=compile)


def generate(model, tokenizer, prompt: Prompt, **options) -> str:
    """The whole generated text for `prompt` (options as `stream_generate`)."""
    return "".join(chunk.text for chunk in stream_generate(model, tokenizer, prompt, **options))


def batch_generate(model, tokenizer, prompts: Sequence[Prompt], *, max_tokens: int = DEFAULT_MAX_TOKENS,
                   temp: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                   repetition_penalty: float = 1.0, repetition_window: int = 64, seed: Optional[int] = None,
                   stop: Sequence[str] = (), system: Optional[str] = None,
                   prefill_step: int = DEFAULT_PREFILL_STEP, compile: bool = True, details: bool = False) -> list:
    """Generate for several prompts at once (left-padded into one batch); returns one text each,
    or with details=True one BatchOutput each (text, token ids, why the row stopped).

    Each row stops on its own (stop token, stop string, max_tokens); the batch runs until all
    rows are done. Greedy results equal one-by-one `generate`.
    """
    check_sampling(temp, top_k, top_p, min_p, repetition_penalty, repetition_window, max_tokens)
    if not prompts:
        return []
    rows = [encode_prompt(tokenizer, p, system) for p in prompts]
    for ids in rows:
        _check_length(model, len(ids))
        _check_ids(model, ids)
    T = max(len(ids) for ids in rows)
    max_tokens = min(max_tokens, context_length(model) - T)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    batch = mx.array([[pad_id] * (T - len(ids)) + ids for ids in rows], mx.int32)
    pad = mx.array([T - len(ids) for ids in rows], mx.int32)
    processors = make_logits_processors(repetition_penalty, repetition_window)
    stop_ids = set(tokenizer.stop_ids)
    results = [BatchOutput("", [], "length") for _ in rows]
    done = [False] * len(rows)
    steps = generate_step(model, batch, pad=pad, max_tokens=max_tokens, logits_processors=processors,
                          sampler=make_sampler(temp, top_k, top_p, min_p, seed), prefill_step=prefill_step,
                          compile=compile)
    for tokens in steps:
        for i, t in enumerate(tokens.tolist()):
            if done[i]:
                continue
            row = results[i]
            if t in stop_ids:
                done[i] = True
                row.finish_reason, row.stop_token = "stop", t
            else:
                row.tokens.append(t)
                if stop and any(s in tokenizer.decode(row.tokens[-64:], skip_special=True) for s in stop if s):
                    done[i] = True
                    row.finish_reason = "stop"
        if all(done):
            break
    steps.close()
    for row in results:
        text = tokenizer.decode(row.tokens, skip_special=True)
        cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
        row.text = text[:min(cuts)] if cuts else text
    return results if details else [row.text for row in results]


@dataclass
class BatchOutput:
    """One row of `batch_generate(..., details=True)`."""

    text: str  # the decoded answer (special tokens skipped, cut before a stop string)
    tokens: list  # generated ids, without the stop token
    finish_reason: str  # "stop" (a stop token or stop string) or "length" (max_tokens)
    stop_token: Optional[int] = None  # the stop token id that ended the row, if one did


class ChatSession:
    """A multi-turn conversation that keeps its KV cache between turns.

    Each `send(text)` feeds only the tokens not yet in the cache: the previous answer's
    `<end_of_turn>` (when it was not fed yet), the turn separators and the new user text.
    `reset()` starts over. Sampling options given here apply to every turn.
    """

    def __init__(self, model, tokenizer, system: Optional[str] = None, **options):
        self.model, self.tokenizer, self.system, self.options = model, tokenizer, system, options
        self.reset()

    def reset(self) -> None:
        self.cache = self.model.make_cache()
        self.ids: list = []  # the whole conversation's ids; the cache holds a prefix of them
        self.last_stats: Optional[GenerationStats] = None

    def _turn_ids(self, text: str) -> list:
        tok = self.tokenizer
        if not self.ids:
            messages = [{"role": "user", "content": text}]
            if self.system is not None:
                messages.insert(0, {"role": "system", "content": self.system})
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # Continue the template: close the model turn, then a new user turn and the model header.
        close = [] if self.ids[-1] == tok.end_of_turn_id else [tok.end_of_turn_id]
        return close + tok.encode(f"\n<start_of_turn>user\n{text.strip()}<end_of_turn>\n<start_of_turn>model\n",
                                  add_bos=False)

    def send(self, text: str) -> Iterator[GenerationChunk]:
        """Stream the model's answer to the user message `text`."""
        if not text.strip():
            raise UserError("the message is empty; type something, /reset or /exit")
        self.ids += self._turn_ids(text)
        cached = self.cache[0].offset
        new_ids = self.ids[cached:]
        generated: list = []
        try:
            for chunk in _stream_ids(self.model, self.tokenizer, new_ids, cache=self.cache,
                                     history=self.ids[:cached], **self.options):
                self.last_stats, generated = chunk.stats, chunk.tokens
                yield chunk
        finally:
            # Also when the caller stops early: the cache then holds a prefix of these ids.
            self.ids += generated
