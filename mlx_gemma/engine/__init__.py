"""The generation engine, built once per model (`engine_for`) and run by every text entry point
and the server: the scheduler (queue, prefill budget, join/leave), the decode step, the sampler,
the per-row finisher and speculation, each in its own module; `BatchGenerator` assembles them.

Modules, bottom up: request (Request, Event, prompt checks), step (prefill, DecodeStep),
finisher, sampler, registry (one engine per model), prefix (the prompt-prefix store),
speculation, scheduler, batch.
"""

from .batch import BatchGenerator
from .prefix import PrefixCache
from .registry import ModelEngine, engine_for
from .request import Event, Request, check_prompt, context_length
from .speculation import DEFAULT_DRAFT_TOKENS, SPECULATIVE, ngram_draft
from .step import DEFAULT_PREFILL_STEP, DecodeStep, activation_dtype, prefill

__all__ = ["BatchGenerator", "DEFAULT_DRAFT_TOKENS", "DEFAULT_PREFILL_STEP", "DecodeStep", "Event", "ModelEngine",
           "PrefixCache", "Request", "SPECULATIVE", "activation_dtype", "check_prompt", "context_length", "engine_for",
           "ngram_draft", "prefill"]
