"""Sampling settings as one value, samplers, logits processors and stop strings.

`SamplingParams` is what every entry point takes (generate, stream_generate, batch_generate,
ChatSession, the server): length, temperature and filters, penalties, seed and stop strings.
It checks itself (`check()`), so a bad value fails before any model work.

Shapes: logits (B, V) with B rows (often 1: each row of a batch samples on its own), V vocabulary;
history (B, T) earlier token ids.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import mlx.core as mx

from .errors import UserError

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
DEFAULT_MAX_TOKENS = 256


# Bounds that keep float32 sampling finite: logits / temp and logits / penalty stay far from
# float32's range (a temp of 1e-300 is 0 in float32, and 1/0 turns every logit into inf or NaN).
MIN_TEMP = 1e-5  # a temperature below this samples greedily
MAX_TEMP = 1e4  # above it, -inf (masked) logits / temp would turn NaN in float32
MIN_PENALTY = 1e-2  # repetition_penalty in [MIN_PENALTY, 1 / MIN_PENALTY]


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past float range (a 400-digit number)
        return False


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temp 0 (or below MIN_TEMP, where float32 logits / temp would overflow) is greedy. Otherwise logits are divided by temp, then filtered by top-k, top-p and
    min-p (transformers' order) and sampled; a seed makes the samples reproducible.
    repetition_penalty: CTRL-style, over the last `repetition_window` tokens (prompt included).
    frequency_penalty / presence_penalty: OpenAI-style, over the tokens generated so far:
    logit -= frequency_penalty * count + presence_penalty * (count > 0).
    stop: strings that end the generation (the text is cut before them).
    top_logprobs: with `logprobs`, how many alternatives to report per token.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temp: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_window: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: Optional[int] = None
    stop: tuple = ()
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))

    @classmethod
    def of(cls, params: Optional["SamplingParams"] = None, **options) -> "SamplingParams":
        """`params` (default: the defaults) with `options` (field names) replaced; checked."""
        unknown = set(options) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        out = dataclasses.replace(params or cls(), **options)
        out.check()
        return out

    @property
    def greedy(self) -> bool:
        return self.temp < MIN_TEMP

    def check(self) -> None:
        """Raise UserError naming the first out-of-range field."""
        def bad(name, rule):
            got = repr(getattr(self, name))
            got = got if len(got) <= 40 else f"a {len(got)}-digit number" if got.isdigit() else got[:40] + "..."
            raise UserError(f"{name} must be {rule}, got {got}")

        numbers = ("temp", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
        for name in numbers:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
                bad(name, "a finite number")
        for name in ("max_tokens", "top_k", "repetition_window", "top_logprobs"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                bad(name, "an integer")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2 ** 64):  # MLX's PRNG key is a uint64
            bad("seed", "an integer in [0, 2**64)")
        if self.temp < 0:
            bad("temp", ">= 0 (0 = greedy)")
        if self.temp > MAX_TEMP:
            bad("temp", f"at most {MAX_TEMP:g}")
        if self.top_k < 0:
            bad("top_k", ">= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1] (1 = off)")
        if not 0 <= self.min_p < 1:
            bad("min_p", "in [0, 1) (0 = off)")
        if not MIN_PENALTY <= self.repetition_penalty <= 1 / MIN_PENALTY:
            bad("repetition_penalty", f"in [{MIN_PENALTY:g}, {1 / MIN_PENALTY:g}] (1 = off)")
        if not 1 <= self.repetition_window < 2 ** 31:
            bad("repetition_window", "in [1, 2**31)")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "in [-2, 2] (0 = off)")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "in [-2, 2] (0 = off)")
        if self.max_tokens < 1:
            bad("max_tokens", ">= 1")
        if not 0 <= self.top_logprobs <= 20:
            bad("top_logprobs", "in [0, 20]")
        if any(not isinstance(s, str) for s in self.stop):
            raise UserError(f"stop must be strings, got {list(self.stop)!r}")


# ---- filters and samplers ------------------------------------------------------------------


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


class Sampler:
    """logits (B, V) -> token ids (B,) for one SamplingParams; owns its PRNG key when seeded."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.key = mx.random.key(params.seed) if params.seed is not None and not params.greedy else None

    def __call__(self, logits: mx.array) -> mx.array:
        p = self.params
        if p.greedy:
            return mx.argmax(logits, axis=-1)
        logits = logits.astype(mx.float32) / p.temp
        logits = min_p_filter(top_p_filter(top_k_filter(logits, p.top_k), p.top_p), p.min_p)
        key = None
        if self.key is not None:
            self.key, key = mx.random.split(self.key)
        return mx.random.categorical(logits, axis=-1, key=key)


def make_sampler(temp: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: Optional[int] = None) -> Sampler:
    """A Sampler for these options (a function logits (B, V) -> ids (B,))."""
    return Sampler(SamplingParams.of(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed))


# ---- logits processors: (history (B, T), logits (B, V)) -> logits --------------------------


def repetition_penalty_processor(penalty: float, window: int = 64) -> LogitsProcessor:
    """CTRL-style penalty on tokens seen in the last `window` tokens of history:
    a positive logit is divided by `penalty`, a negative one multiplied (as transformers does)."""

    def process(history: mx.array, logits: mx.array) -> mx.array:
        if history.shape[-1] == 0:
            return logits
        recent = history[:, -window:].astype(mx.int32)  # (B, W)
        seen = mx.take_along_axis(logits, recent, axis=-1)
        seen = mx.where(seen > 0, seen / penalty, seen * penalty)
        return mx.put_along_axis(logits, recent, seen, axis=-1)

    return process


def frequency_presence_processor(frequency: float, presence: float, prompt_length: int) -> LogitsProcessor:
    """OpenAI's penalties over the generated tokens (history after the first `prompt_length`)."""

    def process(history: mx.array, logits: mx.array) -> mx.array:
        generated = history[:, prompt_length:].astype(mx.int32)
        if generated.shape[-1] == 0:
            return logits
        B, V = logits.shape
        counts = mx.zeros((B, V), mx.float32)
        counts = counts.at[mx.arange(B)[:, None], generated].add(1.0)
        return logits - frequency * counts - presence * (counts > 0)

    return process


def make_logits_processors(params: SamplingParams, prompt_length: int = 0) -> list:
    """The built-in processors `params` asks for (empty when every penalty is off)."""
    out = []
    if params.repetition_penalty != 1.0:
        out.append(repetition_penalty_processor(params.repetition_penalty, params.repetition_window))
    if params.frequency_penalty or params.presence_penalty:
        out.append(frequency_presence_processor(params.frequency_penalty, params.presence_penalty, prompt_length))
    return out


# ---- stop strings --------------------------------------------------------------------------


class StopStrings:
    """Streams text while holding back any tail that may begin a stop string, so none is ever
    emitted; `feed` returns (text safe to emit, whether a stop string was reached)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
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

    def flush(self) -> str:
        """The held-back text, once generation ended without reaching a stop string."""
        text, self.pending = self.pending, ""
        return text
