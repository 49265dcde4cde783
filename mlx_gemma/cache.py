"""Key/value caches for generation: full for global layers, a bounded window for sliding ones.

Each cache knows the absolute positions of the keys it returns, so it builds its own
attention mask (`mask(L, pad)`); the model asks one cache per attention kind.
Arrays are (B, K, S, D): batch, KV heads, cached positions, head_dim.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx


def _mask(q_pos, k_pos, window, pad):
    from .model import causal_mask

    return causal_mask(q_pos, k_pos, window, pad)


class FullCache:
    """Keeps every key; grows its buffers in steps so decoding does not copy the whole cache per token."""

    step = 256
    window = None

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0  # tokens stored so far (= absolute position of the next token)

    def update_and_fetch(self, k: mx.array, v: mx.array):
        B, K, L, D = k.shape
        start = self.offset
        if self.keys is None or start + L > self.keys.shape[2]:
            grow = ((L + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, K, grow, D), k.dtype)
            new_v = mx.zeros((B, K, grow, v.shape[-1]), v.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[:, :, :start], new_k], axis=2)
                self.values = mx.concatenate([self.values[:, :, :start], new_v], axis=2)
        self.keys[:, :, start:start + L] = k
        self.values[:, :, start:start + L] = v
        self.offset += L
        return self.keys[:, :, : self.offset], self.values[:, :, : self.offset]

    def mask(self, L: int, pad: Optional[mx.array]):
        """Mask for the next call with L new tokens: keys at positions [0, offset + L)."""
        if L == 1 and pad is None:
            return None
        if pad is None and self.offset == 0:
            return "causal"
        q_pos = mx.arange(self.offset, self.offset + L)
        return _mask(q_pos, mx.arange(self.offset + L), None, pad)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self):
        return self.keys, self.values


class SlidingCache:
    """Keeps only the last window - 1 keys: with the new token they make one full window.

    Memory stays bounded however long the generation runs. Chunks longer than the
    window are returned whole for their own attention and then trimmed.
    """

    def __init__(self, window: int):
        self.window = window
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0

    def _kept(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update_and_fetch(self, k: mx.array, v: mx.array):
        if self.keys is not None:
            k = mx.concatenate([self.keys, k], axis=2)
            v = mx.concatenate([self.values, v], axis=2)
        self.offset += k.shape[2] - self._kept()
        keep = self.window - 1
        if keep <= 0:
            self.keys = self.values = None
        else:
            self.keys, self.values = k[:, :, -keep:], v[:, :, -keep:]
        return k, v

    def mask(self, L: int, pad: Optional[mx.array]):
        kept = self._kept()
        if L == 1 and pad is None:
            return None  # kept (< window) old keys plus the new one: all visible
        q_pos = mx.arange(self.offset, self.offset + L)
        k_pos = mx.arange(self.offset - kept, self.offset + L)
        return _mask(q_pos, k_pos, self.window, pad)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
