"""The model's forward passes as the engine runs them: `prefill` (prompt chunks, caches only),
`DecodeStep` (one token per row at explicit positions, compiled once per buffer shape) and its
multi-token `verify` (speculative drafts) and `extend` (catching a cache up) forwards.

Shapes: B batch rows, T tokens, V vocabulary, E hidden size.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx

from ..adapters import set_row_adapters
from ..cpu.hostdecode import host_paths
from ..masks import as_positions

DEFAULT_PREFILL_STEP = 512
HOST_EXTEND_MOST = 8  # catch-up tokens fed one by one on the host; more go through one MLX forward


def activation_dtype(model):
    """The dtype of the model's activations, which its cache buffers hold."""
    return model.model.embed_tokens(mx.array([0])).dtype  # lazy: only the dtype is read


def prefill(model, tokens: mx.array, cache, start=0, step: int = DEFAULT_PREFILL_STEP,
            adapter_rows: Optional[mx.array] = None) -> None:
    """Run tokens (B, T) through the model in chunks of `step`, writing positions
    start .. start + T - 1 of each row into `cache` (start: int, or one int per row). When every
    row starts at 0, the first chunk is `fresh` (its sliding layers skip the empty ring)."""
    B, T = tokens.shape
    pos = as_positions(start, B)
    end = int(mx.max(pos).item()) + T
    fresh = end == T  # every row starts at position 0
    cache.reserve(B, activation_dtype(model), end)
    set_row_adapters(model, adapter_rows)
    for i in range(0, T, step):
        model.model(tokens[:, i:i + step], cache=cache, pos=pos + i, fresh=fresh and i == 0)
        mx.eval(cache.state)


class DecodeStep:
    """One decode step: tokens (B, 1) at positions pos (B,) -> logits (B, V), writing the new keys.

    Compiled with mx.compile over a scratch copy of the cache structure: the buffers go in and
    come out as arrays, the positions are an input, so one trace serves every position of a
    buffer shape (retraced when the batch or the buffers grow) and MLX fuses the elementwise
    work between the matmuls. The LM head runs outside (its weight is not copied into a trace).
    The weights are constants of the trace: a step belongs to one set of weights (see
    `engine.registry`, which keeps one per model and rebuilds it when the weights change).

    On the CPU, one row of a float32 model decodes on the host instead (`host_paths`: every
    weight product a cblas_sgemv, ~2x MLX's one-row sgemm, or a native kernel for 4/8-bit
    weights); batches, per-row adapters and models it declines take the compiled path, with the
    one-row head for a dense head.
    """

    def __init__(self, model, compile: bool = True):
        self.model = model
        self.scratch = model.make_cache()
        self.compiled = mx.compile(self._traced) if compile else None
        self.host_body, self.host_head = host_paths(model)
        self.traces = 0  # times the compiled step was traced (one per buffer shape)

    def _traced(self, tokens, pos, adapter_rows: list, state):
        self.traces += 1  # Python runs only while tracing
        self.scratch.state = state
        set_row_adapters(self.model, adapter_rows[0] if adapter_rows else None)
        hidden = self.model.model(tokens, cache=self.scratch, pos=pos)
        return hidden[:, -1], self.scratch.state

    def reserve(self, cache, batch: int, end: int) -> None:
        """Room in `cache` for positions [0, end) of `batch` rows."""
        cache.reserve(batch, activation_dtype(self.model), end)

    def __call__(self, cache, tokens: mx.array, pos: mx.array, end: int,
                 adapter_rows: Optional[mx.array] = None) -> mx.array:
        """`end`: one past the largest position written (max(pos) + 1), to size the buffers."""
        self.reserve(cache, tokens.shape[0], end)
        if self.host_body is not None and tokens.shape[0] == 1 and adapter_rows is None:
            return self.host_body.logits(self.host_body(cache, tokens.item(), pos.item()))
        if self.compiled is None:
            set_row_adapters(self.model, adapter_rows)
            hidden = self.model.model(tokens, cache=cache, pos=pos)[:, -1]
        else:
            rows = [] if adapter_rows is None else [adapter_rows]
            hidden, cache.state = self.compiled(tokens, pos, rows, cache.state)
        if self.host_head is not None and hidden.shape[0] == 1:
            return self.host_head(hidden)
        return self.model.logits(hidden)

    def greedy_next(self, cache, token: int, pos: int) -> int:
        """Feed one token of one row at `pos`; the greedy token after it."""
        logits = self(cache, mx.array([[token]], mx.int32), mx.array([pos], mx.int32), pos + 1)
        return int(mx.argmax(logits, axis=-1).item())

    def verify(self, cache, ids: Sequence[int], pos: int, adapter_rows: Optional[mx.array] = None) -> list:
        """Feed ids (one row) at positions pos .. pos + len(ids) - 1 in one forward; the greedy
        token after each of them. The cache must have room (`reserve`)."""
        set_row_adapters(self.model, adapter_rows)
        hidden = self.model.model(mx.array([list(ids)], mx.int32), cache=cache, pos=mx.array([pos], mx.int32))[0]
        return self.greedy(hidden)

    def extend(self, cache, ids: Sequence[int], pos: int) -> None:
        """Write the keys of ids (one row) at positions pos .. without computing logits: the usual
        case, a token or two, takes host steps where there are any (a short MLX forward of a
        quantized model would take MLX's slow one-row kernel); more take one prefill."""
        if not ids:
            return
        if self.host_body is not None and len(ids) <= HOST_EXTEND_MOST:
            self.reserve(cache, 1, pos + len(ids))
            for i, token in enumerate(ids):
                self.host_body(cache, token, pos + i)
        else:
            prefill(self.model, mx.array([list(ids)], mx.int32), cache, pos)

    def greedy(self, hidden: mx.array) -> list:
        """Greedy ids for final hidden states (N, E): argmax of the LM head, soft-capped as plain
        decoding does (tanh can round two large logits to one value: the tie must break the same
        way)."""
        return mx.argmax(self.model.logits(hidden), axis=-1).tolist()
