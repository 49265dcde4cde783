"""Perplexity of a model on a text: sliding windows, LM head in vocabulary chunks.

A Gemma 3 vocabulary has 262,144 entries, so one 1024-token window's logits would be 1 GiB
in float32; the head is applied one vocabulary chunk at a time (train/loss.token_losses),
so at most (positions x chunk) logits exist at once.
"""

from __future__ import annotations

import math

import mlx.core as mx

from .errors import UserError
from .files import read_text
from .training.loss import DEFAULT_CHUNK, token_losses


def read_eval_text(path) -> str:
    """The text of a file to score, checked before any model is loaded: readable, UTF-8 (a leading
    BOM dropped) and not blank; otherwise a UserError naming the file."""
    text = read_text(path)
    if not text.strip():
        raise UserError(f"{path}: the file has no text to score; pass a file with some text")
    return text


def _window_bounds(n: int, max_seq_len: int, stride: int):
    """[(begin, scored_from, end)]: each window scores ids[scored_from:end] with context from begin.

    The model input is <bos> + ids[begin:end - 1] (at most max_seq_len tokens): position p
    predicts ids[begin + p], so every scored token sees up to max_seq_len - stride tokens of
    context from before its own stride.
    """
    bounds, done = [], 0
    while done < n:
        end = min(done + stride, n)
        begin = max(0, end - max_seq_len)
        bounds.append((begin, done, end))
        done = end
    return bounds


def perplexity(model, tokenizer, text: str, max_seq_len: int = 1024, stride: int | None = None,
               chunk: int = DEFAULT_CHUNK) -> dict:
    """Perplexity of `model` on `text` (deterministic: no sampling, fixed windows).

    The text is tokenized without <bos>; it is scored in windows of at most max_seq_len tokens,
    each starting with <bos> (Gemma is trained with it), advancing by `stride` tokens
    (default max_seq_len: disjoint windows, as mlx-lm's evaluation; a smaller stride gives each
    scored token more context at more compute). Every token
    of the text is scored exactly once, the first one given <bos> alone.
    Returns {"loss": mean nats per token, "perplexity": exp(loss), "tokens": scored count}.
    """
    if max_seq_len < 2:
        raise UserError(f"max_seq_len must be at least 2, got {max_seq_len}")
    stride = max_seq_len if stride is None else stride
    if not 1 <= stride <= max_seq_len:
        raise UserError(f"stride must be between 1 and max_seq_len ({max_seq_len}), got {stride}")
    ids = tokenizer.encode(text, add_bos=False)
    if not ids:
        raise UserError("the evaluation text is empty; pass a file with some text")
    total = 0.0
    for begin, scored_from, end in _window_bounds(len(ids), max_seq_len, stride):
        inputs = mx.array([tokenizer.bos_id] + ids[begin:end - 1])[None]  # (1, L): <bos> shifts targets by one
        targets = mx.array(ids[scored_from:end])
        hidden = model.model(inputs)[0, scored_from - begin:]  # (scored, E): positions predicting targets
        losses = token_losses(model, hidden, targets, chunk, eval_each=True)
        total += float(losses.astype(mx.float32).sum().item())
    loss = total / len(ids)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": len(ids)}
