"""Key/value caches with explicit per-row positions: full for global layers, a ring for sliding ones.

One mode, eager or compiled alike: the caller says where the new tokens go. `update(k, v, pos)`
writes the keys of L new tokens of each row b at positions pos[b] .. pos[b] + L - 1 and returns
the keys and values to attend over; `mask(pos, L)` is the matching attention mask. The cache
holds no position state of its own, so rows of one batch may sit at different positions (the
server's continuous batching), and a compiled decode step traces once per buffer shape.

Arrays are (B, K, S, D): batch rows, KV heads, slots, head_dim.
- `KVCache` keeps every key: position p lives in slot p. Slots past a row's length hold zeros
  or keys of an earlier occupant of the row; the causal mask never lets a query see them.
- `RotatingKVCache` keeps the last `window` keys: position p lives in slot p % window, so a
  write never shifts the other keys (RoPE was applied before caching, and attention does not
  care about key order). Each slot's position follows from the row's newest position.

Buffers grow in steps of 256 slots (the ring up to its window) by `reserve`, which the caller
runs before a forward with the number of positions it will hold: inside a compiled step shapes
cannot depend on positions. The row methods (`take`, `concat`) let a scheduler drop finished
rows and add prefilled ones without touching the others.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx

from .masks import EMPTY, causal_mask

STEP = 256


class KVCache:
    """Every key of every position; position p in slot p."""

    window: Optional[int] = None

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None

    # ---- storage ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self):
        return self.keys, self.values

    @state.setter
    def state(self, kv):
        self.keys, self.values = kv

    def slots_for(self, tokens: int) -> int:
        """Slots needed to hold `tokens` positions (rounded up to the growth step)."""
        return -(-max(tokens, 1) // STEP) * STEP

    def reserve(self, batch: int, kv_heads: int, head_dim: int, dtype, tokens: int) -> None:
        """Make room for positions [0, tokens) in every row, keeping what is stored."""
        want = max(self.capacity, self.slots_for(tokens))
        if self.keys is None:
            self.keys = mx.zeros((batch, kv_heads, want, head_dim), dtype)
            self.values = mx.zeros((batch, kv_heads, want, head_dim), dtype)
        elif want > self.capacity:
            self.keys, self.values = (_pad_slots(a, want) for a in (self.keys, self.values))

    # ---- attention ----------------------------------------------------------------------------

    def update(self, k: mx.array, v: mx.array, pos: mx.array, fresh: bool = False):
        """Write k, v (B, K, L, D) at positions pos (B,) + [0, L); return all slots (B, K, S, D).
        fresh: the rows hold no earlier positions (a prompt's first chunk); a ring uses it."""
        slots = _positions(pos, k.shape[2])
        self.keys = _scatter(self.keys, k, slots)
        self.values = _scatter(self.values, v, slots)
        return self.keys, self.values

    def mask(self, pos: mx.array, L: int, fresh: bool = False) -> mx.array:
        """Mask (B, 1, L, S) for L new tokens at pos (B,): keys at slot <= query position."""
        return causal_mask(_positions(pos, L), mx.arange(self.capacity))

    # ---- rows ---------------------------------------------------------------------------------

    def take(self, rows: Sequence[int]) -> None:
        """Keep only these rows, in this order."""
        idx = mx.array(list(rows), mx.int32)
        self.keys, self.values = self.keys[idx], self.values[idx]

    def concat(self, other: "KVCache") -> None:
        """Append the rows of `other` (same kind and window) after this cache's rows."""
        if self.keys is None:
            self.keys, self.values = other.keys, other.values
            return
        size = max(self.capacity, other.capacity)
        self.keys = mx.concatenate([_pad_slots(self.keys, size), _pad_slots(other.keys, size)], axis=0)
        self.values = mx.concatenate([_pad_slots(self.values, size), _pad_slots(other.values, size)], axis=0)


class RotatingKVCache(KVCache):
    """The last `window` keys of each row; position p in slot p % window.

    One new token (decode) is written first, then attended over with the ring. With L > 1 new
    tokens (prefill) the chunk may overwrite slots its own first queries still need, so the ring
    as it was is returned followed by the new keys, and the last min(L, window) are written. A
    fresh chunk (rows with nothing before it: a prompt's first chunk) attends over its own keys
    only, which halves that chunk's attention work when it is a window long.
    """

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def slots_for(self, tokens: int) -> int:
        # Until the ring first wraps, position p sits in slot p < capacity: growing appends slots.
        return min(self.window, super().slots_for(tokens))

    def slot_positions(self, last: mx.array) -> mx.array:
        """(B, S) position held by each slot when `last` (B,) is each row's newest stored position
        (EMPTY where the slot holds none)."""
        s = mx.arange(self.capacity)[None]
        last = last[:, None]
        held = last - (last - s) % self.window  # largest p <= last with p % window == s
        return mx.where(held >= 0, held, EMPTY)

    def update(self, k: mx.array, v: mx.array, pos: mx.array, fresh: bool = False):
        L = k.shape[2]
        if L == 1 and not fresh:
            slots = (pos % self.window)[:, None]
            self.keys = _scatter(self.keys, k, slots)
            self.values = _scatter(self.values, v, slots)
            return self.keys, self.values
        out_k = k if fresh else mx.concatenate([self.keys, k], axis=2)
        out_v = v if fresh else mx.concatenate([self.values, v], axis=2)
        m = min(L, self.window)  # only the last `window` new keys survive in the ring
        slots = _positions(pos + L - m, m) % self.window
        self.keys = _scatter(self.keys, k[:, :, L - m:], slots)
        self.values = _scatter(self.values, v[:, :, L - m:], slots)
        return out_k, out_v

    def mask(self, pos: mx.array, L: int, fresh: bool = False) -> mx.array:
        q_pos = _positions(pos, L)
        if fresh:
            return causal_mask(q_pos, q_pos, self.window)
        if L == 1:
            return causal_mask(q_pos, self.slot_positions(pos), self.window)
        k_pos = mx.concatenate([self.slot_positions(pos - 1), q_pos], axis=1)
        return causal_mask(q_pos, k_pos, self.window)


def _positions(pos: mx.array, L: int) -> mx.array:
    """(B, L) positions of L consecutive tokens starting at pos (B,)."""
    return pos[:, None] + mx.arange(L)[None]


def _scatter(buffer: mx.array, new: mx.array, slots: mx.array) -> mx.array:
    """buffer (B, K, S, D) with new (B, K, L, D) written at slots (B, L) of each row."""
    idx = slots.astype(mx.int32)[:, None, :, None]  # broadcast over heads and head_dim
    return mx.put_along_axis(buffer, idx, new.astype(buffer.dtype), axis=2)


def _pad_slots(a: mx.array, size: int) -> mx.array:
    """a (B, K, S, D) with zero slots appended up to `size`."""
    if a.shape[2] >= size:
        return a
    B, K, S, D = a.shape
    return mx.concatenate([a, mx.zeros((B, K, size - S, D), a.dtype)], axis=2)


def make_cache(layer_windows: Sequence[Optional[int]]) -> list:
    """One cache per layer: a ring for a sliding-window layer (its window), full otherwise."""
    return [RotatingKVCache(w) if w else KVCache() for w in layer_windows]

