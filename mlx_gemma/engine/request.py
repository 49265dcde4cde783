"""What goes into the engine and what comes out: a Request, the Events of each step, and the
checks a prompt passes before it is queued."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..errors import UserError
from ..sampling import LogitsProcessor, SamplingParams


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
    prompt_cached: int = 0  # prompt tokens a PrefixCache supplied (on the event that ends the row)


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
