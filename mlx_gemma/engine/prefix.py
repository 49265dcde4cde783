"""A bounded store of served prompts' KV caches, so a new prompt prefills only what is new.

A chat client resends the whole conversation every turn and an agent the same long system
prompt; with this store a request reuses the longest cached prefix of its token ids and prefills
only the rest. The engine calls three methods (it never needs more):

    store = PrefixCache(max_bytes=512 << 20)
    hit = store.lookup(model, adapter, ids)         # (one-row cache holding ids[:n], n) or None
    store.remember(model, adapter, tokens, cache)   # after a prefill, and when a row finishes

Entries are keyed by token ids *and* by model + adapter: a lookup only sees entries made by the
same model object with the same adapter row, so another adapter's or model's keys are never
served (call `clear()` after changing a model's weights in place). The arrays are `CachePrefix`
copies made by cache.py (`ModelCache.copy_out` / `copy_in`; no other module touches cache
arrays), so the rows that go on decoding never change what is stored.

Sliding-window layers keep only their last `window` keys, so an entry of `length` positions can
serve a shorter prefix n only when its rings still hold every key position n needs
(`ModelCache.prefix_fits(n, length)`: length <= window, or n == length). The engine therefore
stores each prompt right after its prefill (every ring exactly at the prompt's end) and each
finished row (prompt + answer): the next turn of a chat then matches one of the two whole. A
prompt longer than the smallest window is also stored at every multiple of that window on the way
(`checkpoint_every`): prompts that share only its beginning (a long system prompt, then different
questions) reuse the last checkpoint before they part.

Least recently used entries go first once the bytes held would pass `max_bytes`; an entry
larger than the whole bound is not stored.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..cache import CachePrefix, ModelCache
from ..errors import UserError


@dataclass
class _Entry:
    tokens: np.ndarray  # int32 ids at positions 0 .. length - 1
    prefix: CachePrefix
    layout: ModelCache  # an empty cache of the prefix's layout: answers prefix_fits

    def usable(self, ids: np.ndarray) -> int:
        """How many leading positions of this entry a prompt `ids` can reuse (0: none). At least
        one prompt token is always left to feed: its logits give the first new token."""
        m = min(len(self.tokens), len(ids) - 1)
        if m <= 0:
            return 0
        same = self.tokens[:m] == ids[:m]
        n = m if same.all() else int(np.argmin(same))
        return n if n > 0 and self.layout.prefix_fits(n, len(self.tokens)) else 0


class PrefixCache:
    """LRU store of prompt-prefix KV caches, bounded by `max_bytes` (see the module docstring)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise UserError(f"the prompt cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.entries: OrderedDict = OrderedDict()  # (namespace, token bytes) -> _Entry; oldest first
        self.models: dict = {}  # id(model) -> weakref to it: an id reused by a new object is not it
        self.nbytes = 0
        self.lookups = self.hits = 0

    def __len__(self) -> int:
        return len(self.entries)

    def _namespace(self, model, adapter: int) -> tuple:
        ref = self.models.get(id(model))
        if ref is None or ref() is not model:
            self._forget(id(model))  # an earlier model that had this id is gone
            self.models[id(model)] = weakref.ref(model)
        return id(model), int(adapter)

    def _forget(self, model_id: int) -> None:
        for key in [k for k in self.entries if k[0][0] == model_id]:
            self.nbytes -= self.entries.pop(key).prefix.nbytes

    def lookup(self, model, adapter: int, ids: Sequence[int]) -> Optional[tuple]:
        """The longest usable cached prefix of `ids` for this model and adapter, copied into a fresh
        one-row cache: (cache, n) with the cache holding positions 0 .. n - 1; None on a miss."""
        self.lookups += 1
        space = self._namespace(model, adapter)
        arr = np.asarray(ids, np.int32)
        best, best_n = None, 0
        for key, entry in self.entries.items():
            if key[0] == space:
                n = entry.usable(arr)
                if n > best_n:
                    best, best_n = key, n
        if best is None:
            return None
        self.hits += 1
        self.entries.move_to_end(best)
        cache = model.make_cache()
        cache.copy_in(self.entries[best].prefix)
        return cache, best_n

    def remember(self, model, adapter: int, tokens: Sequence[int], cache: ModelCache, row: int = 0) -> bool:
        """Store row `row` of `cache`, which holds exactly the positions of `tokens`; False when it
        is not stored (empty, larger than the bound, or already held)."""
        n = len(tokens)
        if n == 0 or self.max_bytes == 0:
            return False
        space = self._namespace(model, adapter)
        key = (space, np.asarray(tokens, np.int32).tobytes())
        if key in self.entries:
            self.entries.move_to_end(key)
            return False
        prefix = cache.copy_out(row, n, n)
        if prefix.nbytes > self.max_bytes:
            return False
        while self.entries and self.nbytes + prefix.nbytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.prefix.nbytes
        self.entries[key] = _Entry(np.asarray(tokens, np.int32), prefix, ModelCache(prefix.specs))
        self.nbytes += prefix.nbytes
        return True

    @staticmethod
    def checkpoint_every(cache: ModelCache) -> Optional[int]:
        """Positions between the checkpoints of a long prompt's prefill: the smallest sliding
        window of the cache's layers (None without one: any prefix of an entry is usable)."""
        windows = [s.window for s in cache.specs if s.window]
        return min(windows) if windows else None

    def clear(self) -> None:
        """Drop every entry (after a model's weights changed in place)."""
        self.entries.clear()
        self.models.clear()
        self.nbytes = 0
