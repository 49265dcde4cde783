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

A model's cache is a `ModelCache`: one layer cache per layer, built from
`GemmaConfig.layer_cache_specs()` (each layer's KV heads, head size, window, and the layer whose
cache it reads). A layer whose spec names another layer as its source owns no arrays: it attends
over what the source layer wrote earlier in the same forward (`SharedKVCache`). Everything that
reads or writes a cache's arrays lives in this module; callers use the ModelCache methods:

- `snapshot(pos, n)` / `restore(snap, keep)`: undo the writes of positions pos + keep .. pos + n - 1
  (rejected speculative drafts). Full caches need nothing (the causal mask hides slots past a
  query and the next write overwrites them); a ring gets back the keys those writes displaced,
  which later queries still need. n may not exceed a ring's window (two of the positions would
  share a slot, and the older key would be lost).
- `copy_out(row, n, held)` / `copy_in(prefix, row)`: the keys and values of a row's first n
  positions as a detached `CachePrefix` (own buffers, `nbytes` counted), and back into a row.
  The ring rule: a ring holds positions max(0, n - window) .. n - 1 of the prefix only while the
  row holds no position that displaced one of them, i.e. while `held` (the positions the row
  holds) <= max(n, window). A prefix longer than the window is therefore copied out exactly
  when the row holds n positions (right after its prefill), never later; `prefix_fits` says so.
- `host_buffers()` (of a layer's cache): writable numpy views for the CPU host decoder, which
  writes each new key in place; they view private copies made here, and made again whenever
  anything else may hold the arrays, so no array a caller kept ever changes under it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from .config import LayerCacheSpec
from .masks import EMPTY, as_positions, causal_mask

STEP = 256


class KVCache:
    """Every key of every position; position p in slot p."""

    window: Optional[int] = None

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.shared = False  # another layer reads this cache: keep what update returned
        self.latest = None  # (keys, values) the last update returned, when shared
        self._host = None  # (keys, values, their writable numpy views): see host_buffers
        self._host_refs = (0, 0)  # Python references to those keys, values when they were made

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

    # ---- in-place writes on the host ------------------------------------------------------------

    def host_buffers(self) -> tuple:
        """Writable numpy views (B, K, S, D) of the keys and values, for a decoder that writes new
        keys in place on the host (cpu/hostdecode.py) instead of making new arrays.

        They view private copies this cache makes of its buffers, made again whenever another
        holder may exist: the arrays changed since the last call (an MLX op, a reserve that grew
        them, a restore), Python code other than this cache took a reference to them (a caller
        that kept a cache's arrays must never see them change), or `ModelCache.row` handed out
        slices of them. One copy per layer after each such event, none per step otherwise."""
        host = self._host
        if host is None or host[0] is not self.keys or host[1] is not self.values or any(
                now > then for now, then in zip(self._host_ref_counts(), self._host_refs)):
            self._host = self._private_copy()
            self._host_refs = self._host_ref_counts()
        return self._host[2], self._host[3]

    def _private_copy(self) -> tuple:
        keys, values = mx.array(np.array(self.keys)), mx.array(np.array(self.values))
        kv, vv = np.array(keys, copy=False), np.array(values, copy=False)
        if not all(v.flags.writeable and v.flags.c_contiguous for v in (kv, vv)):
            raise RuntimeError("MLX did not give a writable contiguous view of a cache buffer")
        self.keys, self.values = keys, values
        return keys, values, kv, vv

    def _host_ref_counts(self) -> tuple:
        """Python references to the private keys and values (this cache's and its views' alone
        while nobody else holds them); measured the same way each time, so only a change counts."""
        return sys.getrefcount(self._host[0]), sys.getrefcount(self._host[1])

    # ---- attention ----------------------------------------------------------------------------

    def update(self, k: mx.array, v: mx.array, pos: mx.array, fresh: bool = False):
        """Write k, v (B, K, L, D) at positions pos (B,) + [0, L); return all slots (B, K, S, D).
        fresh: the rows hold no earlier positions (a prompt's first chunk); a ring uses it."""
        slots = _positions(pos, k.shape[2])
        self.keys = _scatter(self.keys, k, slots)
        self.values = _scatter(self.values, v, slots)
        return self._returned(self.keys, self.values)

    def _returned(self, keys: mx.array, values: mx.array):
        if self.shared:
            self.latest = (keys, values)
        return keys, values

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
            return self._returned(self.keys, self.values)
        out_k = k if fresh else mx.concatenate([self.keys, k], axis=2)
        out_v = v if fresh else mx.concatenate([self.values, v], axis=2)
        m = min(L, self.window)  # only the last `window` new keys survive in the ring
        slots = _positions(pos + L - m, m) % self.window
        self.keys = _scatter(self.keys, k[:, :, L - m:], slots)
        self.values = _scatter(self.values, v[:, :, L - m:], slots)
        return self._returned(out_k, out_v)

    def mask(self, pos: mx.array, L: int, fresh: bool = False) -> mx.array:
        q_pos = _positions(pos, L)
        if fresh:
            return causal_mask(q_pos, q_pos, self.window)
        if L == 1:
            return causal_mask(q_pos, self.slot_positions(pos), self.window)
        k_pos = mx.concatenate([self.slot_positions(pos - 1), q_pos], axis=1)
        return causal_mask(q_pos, k_pos, self.window)


class SharedKVCache:
    """The cache of a layer that reads another layer's keys and values (KV sharing): it owns no
    arrays, and within a forward returns what its source layer's `update` returned."""

    def __init__(self, source: KVCache):
        self.source = source
        source.shared = True

    @property
    def window(self) -> Optional[int]:
        return self.source.window

    @property
    def capacity(self) -> int:
        return self.source.capacity

    def update(self, k=None, v=None, pos=None, fresh: bool = False):
        """The source layer's keys and values of this forward; k and v (if any) are ignored."""
        if self.source.latest is None:
            raise RuntimeError("a shared layer ran before the layer whose cache it reads")
        return self.source.latest

    def mask(self, pos: mx.array, L: int, fresh: bool = False) -> mx.array:
        return self.source.mask(pos, L, fresh)


@dataclass(frozen=True)
class CachePrefix:
    """The keys and values of one row's first `length` positions, detached from any cache.

    layers: (keys, values) (1, K, m, D) per layer that owns a cache, in layer order; m = length
    for full layers, min(length, window) ring slots for sliding ones. specs: the layout they fit."""

    specs: tuple
    length: int
    layers: tuple

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


@dataclass(frozen=True)
class CacheSnapshot:
    """What the writes of positions pos .. pos + n - 1 will displace in each ring (None: full)."""

    pos: mx.array  # (B,)
    n: int
    saved: tuple  # per owning layer: (keys, values) (B, K, n, D) of the slots, or None


class ModelCache(list):
    """One layer cache per layer (a list: `cache[i]` is layer i's), built from layer cache specs.

    Layers whose spec names another source own no arrays (`SharedKVCache`); the methods below
    act on the owning layers only."""

    def __init__(self, specs: Sequence[LayerCacheSpec]):
        self.specs = tuple(specs)
        layers: list = []
        for i, spec in enumerate(self.specs):
            if spec.source == i:
                layers.append(RotatingKVCache(spec.window) if spec.window else KVCache())
            elif 0 <= spec.source < i and self.specs[spec.source].source == spec.source:
                layers.append(SharedKVCache(layers[spec.source]))
            else:
                raise ValueError(f"layer {i} reads the cache of layer {spec.source}, "
                                 "which is not an earlier layer owning one")
        super().__init__(layers)

    def owners(self) -> list:
        """(spec, cache) of every layer that owns arrays, in layer order."""
        return [(s, c) for s, c in zip(self.specs, self) if not isinstance(c, SharedKVCache)]

    def empty(self) -> "ModelCache":
        """A new cache of the same layout holding nothing."""
        return ModelCache(self.specs)

    # ---- storage ------------------------------------------------------------------------------

    @property
    def batch(self) -> int:
        first = self.owners()[0][1]
        return 0 if first.keys is None else first.keys.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for _, c in self.owners())

    @property
    def state(self) -> list:
        """Every owning layer's (keys, values): what a compiled step takes in and gives back."""
        return [c.state for _, c in self.owners()]

    @state.setter
    def state(self, states) -> None:
        for (_, c), kv in zip(self.owners(), states):
            c.state = kv

    def reserve(self, batch: int, dtype, tokens: int) -> None:
        """Make room for positions [0, tokens) in every row of every owning layer, each with its
        own KV heads and head size; `batch` and `dtype` apply to a layer holding nothing yet."""
        for spec, c in self.owners():
            c.reserve(batch, spec.kv_heads, spec.head_dim, dtype, tokens)

    # ---- rows ---------------------------------------------------------------------------------

    def take(self, rows: Sequence[int]) -> None:
        """Keep only these rows, in this order (none: the cache holds nothing)."""
        for _, c in self.owners():
            if rows:
                c.take(rows)
            else:
                c.keys = c.values = None

    def concat(self, other: "ModelCache") -> None:
        """Append the rows of `other` (same layout) after this cache's rows."""
        self._check_layout(other.specs)
        for (_, mine), (_, theirs) in zip(self.owners(), other.owners()):
            mine.concat(theirs)

    def row(self, i: int) -> "ModelCache":
        """A one-row cache holding row i's arrays (a view: later writes to either make new arrays)."""
        out = self.empty()
        for (_, mine), (_, theirs) in zip(out.owners(), self.owners()):
            mine.state = (theirs.keys[i:i + 1], theirs.values[i:i + 1])
            theirs._host = None  # the slices share its buffers: no more in-place writes into them
        return out

    def _check_layout(self, specs: tuple) -> None:
        if tuple(specs) != self.specs:
            raise ValueError("the caches have different layer layouts (another model's cache)")

    # ---- rollback -----------------------------------------------------------------------------

    @property
    def max_snapshot(self) -> int:
        """The most positions one snapshot may cover: the smallest ring's window."""
        return min([c.window for _, c in self.owners() if c.window], default=1 << 30)

    def snapshot(self, pos, n: int) -> CacheSnapshot:
        """Remember what writing positions pos .. pos + n - 1 (pos: int or (B,)) will displace; run
        after `reserve` for them, before the forward. The saved keys are evaluated copies, so a
        step writing the buffers in place cannot change them."""
        pos = as_positions(pos, self.batch)
        saved = []
        for _, c in self.owners():
            if c.window is None:
                saved.append(None)
                continue
            if n > c.window:
                raise ValueError(f"cannot snapshot {n} positions of a {c.window}-slot ring")
            slots = _positions(pos, n) % c.window
            saved.append((_gather(c.keys, slots), _gather(c.values, slots)))
        mx.eval([s for s in saved if s is not None])
        return CacheSnapshot(pos, n, tuple(saved))

    def restore(self, snap: CacheSnapshot, keep) -> None:
        """Undo the writes of positions pos + keep .. pos + n - 1 of `snap` (keep: int or (B,)):
        afterwards the cache attends exactly as if only the first `keep` were ever written."""
        keep = as_positions(keep, snap.pos.shape[0])
        undo = (mx.arange(snap.n)[None] >= keep[:, None])[:, None, :, None]  # (B, 1, n, 1)
        slots = _positions(snap.pos, snap.n)
        for (_, c), old in zip(self.owners(), snap.saved):
            if old is None:
                continue
            ring = slots % c.window
            c.keys = _scatter(c.keys, mx.where(undo, old[0], _gather(c.keys, ring)), ring)
            c.values = _scatter(c.values, mx.where(undo, old[1], _gather(c.values, ring)), ring)

    # ---- prefixes -----------------------------------------------------------------------------

    def prefix_fits(self, n: int, held: int) -> bool:
        """Whether a row holding `held` positions still has all its first n positions' keys (the
        ring rule in the module docstring)."""
        windows = [c.window for _, c in self.owners() if c.window]
        return 0 < n <= held and all(held <= max(n, w) for w in windows)

    def copy_out(self, row: int, n: int, held: Optional[int] = None) -> CachePrefix:
        """Row `row`'s first n positions as a detached CachePrefix; `held` (default n): how many
        positions the row holds now. ValueError when a ring no longer holds the whole prefix."""
        held = n if held is None else held
        if not self.prefix_fits(n, held):
            raise ValueError(f"a row holding {held} positions cannot give its first {n}: "
                             "a sliding-window ring has overwritten some of them")
        layers = []
        for _, c in self.owners():
            m = n if c.window is None else min(n, c.window)
            layers.append((mx.array(c.keys[row:row + 1, :, :m]), mx.array(c.values[row:row + 1, :, :m])))
        mx.eval(layers)
        return CachePrefix(self.specs, n, tuple(layers))

    def copy_in(self, prefix: CachePrefix, row: int = 0) -> None:
        """Write a prefix into row `row` (positions 0 .. length - 1); the row's later positions are
        then free for the rest of its sequence. A cache holding nothing gets one row."""
        self._check_layout(prefix.specs)
        dtype = prefix.layers[0][0].dtype if prefix.layers else mx.float32
        self.reserve(max(self.batch, row + 1), dtype, prefix.length)
        for (_, c), (k, v) in zip(self.owners(), prefix.layers):
            c.keys, c.values = _write_row(c.keys, k, row), _write_row(c.values, v, row)


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


def _gather(buffer: mx.array, slots: mx.array) -> mx.array:
    """(B, K, L, D): the slots (B, L) of each row of buffer (B, K, S, D)."""
    return mx.take_along_axis(buffer, slots.astype(mx.int32)[:, None, :, None], axis=2)


def _write_row(buffer: mx.array, new: mx.array, row: int) -> mx.array:
    """buffer (B, K, S, D) with new (1, K, m, D) in slots [0, m) of one row (a new array: a step
    that writes buffers in place may own the old one)."""
    B, _, S, _ = buffer.shape
    m = new.shape[2]
    where = (mx.arange(B) == row)[:, None, None, None] & (mx.arange(S) < m)[None, None, :, None]
    return mx.where(where, _pad_slots(new.astype(buffer.dtype), S), buffer)


def make_cache(specs: Sequence[LayerCacheSpec]) -> ModelCache:
    """A fresh, empty cache per layer from the layer cache specs (`GemmaConfig.layer_cache_specs`)."""
    return ModelCache(specs)
