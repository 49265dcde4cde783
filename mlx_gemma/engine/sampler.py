"""Choosing each row's next token from the batch's logits: per-row logits processors and
samplers (argmax for a plain greedy batch), and the log-probabilities a row asked for."""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx

from ..sampling import LogitsProcessor, Sampler, SamplingParams, make_logits_processors


class RowSampling:
    """How one row's tokens are chosen: its params, its processors (those the params imply and
    the request's own) and the history they see (prompt, earlier context, generated ids)."""

    def __init__(self, params: SamplingParams, history: Sequence[int], processors: Sequence[LogitsProcessor] = ()):
        self.params = params
        self.history = list(history)
        self.processors = make_logits_processors(params, len(self.history)) + list(processors)
        self.sampler = Sampler(params)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no processors and no logprobs: the token is the argmax, nothing else is needed."""
        return self.params.greedy and not self.processors and not self.params.logprobs

    def record(self, token: int) -> None:
        self.history.append(token)


def sample(logits: mx.array, rows: Sequence[RowSampling]) -> tuple[list, list]:
    """Tokens for logits (B, V), one row each; and per row None or (logprob, [(id, logprob)])."""
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
    return picked.tolist(), _logprobs(logits, picked, rows)


def _logprobs(logits: mx.array, picked: mx.array, rows: Sequence[RowSampling]) -> list:
    """The chosen token's log-probability and the top alternatives, for the rows that want them
    (the model's distribution: before processors, as OpenAI reports it)."""
    scores: list[Optional[tuple]] = [None] * len(rows)
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs]
    if not wanted:
        return scores
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
    return scores
