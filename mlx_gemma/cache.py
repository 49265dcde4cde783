"""Key/value caches for generation: full for global layers, a bounded ring for sliding-window ones.

Each cache knows the absolute positions of the keys it returns, so it builds its own
attention mask (`mask(L, pad)`); the model asks one cache per attention kind.
Arrays are (B, K, S, D): batch, KV heads, cached positions, head_dim.

`offset` (tokens stored so far = absolute position of the next token) is a Python int in
ordinary (eager) use. Inside the compiled decode step (mlx_gemma.generation) it is a scalar
mx.array instead, so that one trace serves every position: then shapes must not depend on
the position, so `FullCache` returns its whole pre-reserved buffer (unwritten slots masked)
and writes with `mx.slice_update`; the caller advances `offset` after the step.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

# Position given to empty ring slots: far enough back to be outside every window.
_EMPTY = -(1 << 30)


def _traced(offset) -> bool:
    return isinstance(offset, mx.array)


def _mask(q_pos, k_pos, window, pad):
    from .model import causal_mask

    return causal_mask(q_pos, k_pos, window, pad)


class _KVBuffer:
    """Key/value buffers (B, K, S, D) that grow by appending empty slots."""

    step = 256

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0  # tokens stored so far (= absolute position of the next token)

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _grow(self, batch: int, kv_heads: int, head_dim: int, dtype, slots: int) -> None:
        """Append `slots` empty (zero) positions, keeping what is stored."""
        new_k = mx.zeros((batch, kv_heads, slots, head_dim), dtype)
        new_v = mx.zeros((batch, kv_heads, slots, head_dim), dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys, new_k], axis=2)
            self.values = mx.concatenate([self.values, new_v], axis=2)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self):
        return self.keys, self.values


class FullCache(_KVBuffer):
    """Keeps every key; grows its buffers in steps so decoding does not copy the whole cache per token."""

    window = None

    def reserve(self, batch: int, kv_heads: int, head_dim: int, dtype, tokens: int) -> None:
        """Make room for `tokens` positions in total (rounded up to `step`), keeping what is stored."""
        if tokens > self.capacity:
            self._grow(batch, kv_heads, head_dim, dtype, -(-(tokens - self.capacity) // self.step) * self.step)

    def update_and_fetch(self, k: mx.array, v: mx.array):
        B, K, L, D = k.shape
        if _traced(self.offset):
            # Fixed shapes: write in place at `offset`, return the whole buffer (mask hides the rest).
            start = self.offset.reshape(1)
            self.keys = mx.slice_update(self.keys, k, start, axes=(2,))
            self.values = mx.slice_update(self.values, v, start, axes=(2,))
            return self.keys, self.values
        start = self.offset
        self.reserve(B, K, D, k.dtype, start + L)
        self.keys[:, :, start:start + L] = k
        self.values[:, :, start:start + L] = v
        self.offset += L
        return self.keys[:, :, : self.offset], self.values[:, :, : self.offset]

    def mask(self, L: int, pad: Optional[mx.array]):
        """Mask for the next call with L new tokens: keys at positions [0, offset + L)."""
        if _traced(self.offset):
            q_pos = self.offset + mx.arange(L)
            return _mask(q_pos, mx.arange(self.capacity), None, pad)
        if L == 1 and pad is None:
            return None
        if pad is None and self.offset == 0:
            return "causal"
        q_pos = mx.arange(self.offset, self.offset + L)
        return _mask(q_pos, mx.arange(self.offset + L), None, pad)



class SlidingCache(_KVBuffer):
    """A ring buffer of the last `window` keys: memory stays bounded however long the generation.

    Position p lives in slot p % window, so writing a token never shifts the others; attention
    does not care about key order (RoPE was applied before caching), and `mask` knows each
    slot's position. The buffer grows in steps of 256 slots up to `window`, so a short
    generation with a 512-token window attends over the positions it has, not 512.
    An eager call with L new tokens returns the ring followed by the new keys (the chunk may
    overwrite slots its own first queries still need); the compiled decode step (one token)
    writes its slot first and returns the ring alone.
    """

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def reserve(self, batch: int, kv_heads: int, head_dim: int, dtype, tokens: int = 0) -> None:
        """Make room for `tokens` positions in total, up to `window` slots (rounded up to `step`)."""
        want = self._capacity_for(tokens)
        if want > self.capacity:
            # Until the ring first wraps, position p sits in slot p < capacity: growing appends empty slots.
            self._grow(batch, kv_heads, head_dim, dtype, want - self.capacity)

    def _capacity_for(self, tokens: int) -> int:
        return max(self.capacity, min(self.window, -(-max(tokens, 1) // self.step) * self.step))

    def _slot_positions(self, last, capacity: int):
        """Absolute position held by each of `capacity` slots when `last` is the newest position
        stored (_EMPTY where none): (capacity,)."""
        pos = last - (last - mx.arange(capacity)) % self.window  # largest p <= last with p % window == slot
        return mx.where(pos >= 0, pos, _EMPTY)

    def update_and_fetch(self, k: mx.array, v: mx.array):
        B, K, L, D = k.shape
        if _traced(self.offset):  # compiled decode step, L == 1, capacity reserved by the caller
            start = (self.offset % self.window).reshape(1)
            self.keys = mx.slice_update(self.keys, k, start, axes=(2,))
            self.values = mx.slice_update(self.values, v, start, axes=(2,))
            return self.keys, self.values
        self.reserve(B, K, D, k.dtype, self.offset + L)
        out_k = mx.concatenate([self.keys, k], axis=2)
        out_v = mx.concatenate([self.values, v], axis=2)
        # The last min(L, window) new tokens go into their slots: a contiguous run of slots that may
        # wrap around the end of the ring, so at most two slice writes.
        m = min(L, self.window)
        first = (self.offset + L - m) % self.window
        head = min(m, self.window - first)
        self.keys[:, :, first:first + head] = k[:, :, L - m:L - m + head]
        self.values[:, :, first:first + head] = v[:, :, L - m:L - m + head]
        if head < m:
            self.keys[:, :, : m - head] = k[:, :, L - m + head:]
            self.values[:, :, : m - head] = v[:, :, L - m + head:]
        self.offset += L
        return out_k, out_v

    def mask(self, L: int, pad: Optional[mx.array]):
        """Mask for the next call with L new tokens (see update_and_fetch for the key layout)."""
        q_pos = self.offset + mx.arange(L)
        if _traced(self.offset):  # the new key is already in its slot
            return _mask(q_pos, self._slot_positions(self.offset, self.capacity), self.window, pad)
        # the keys update_and_fetch will return: the ring (grown first if needed), then the new ones
        k_pos = mx.concatenate([self._slot_positions(self.offset - 1, self._capacity_for(self.offset + L)), q_pos])
        return _mask(q_pos, k_pos, self.window, pad)

