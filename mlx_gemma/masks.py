"""Attention masks from explicit positions, below both the model and the KV caches.

A mask says which key each query may attend to. Queries and keys carry absolute positions, per
row when rows of a batch sit at different positions (continuous batching):

    q_pos: (L,) or (B, L)     positions of the new tokens
    k_pos: (S,) or (B, S)     positions of the keys attended over; EMPTY marks a slot that
                              holds no key (an unwritten cache slot)

A query sees a key when k <= q (causal), and q - k < window on sliding-window layers (HF's
convention: the window counts the query itself). The result is (L, S) when nothing varies by
row, else (B, 1, L, S), broadcast over heads.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

# Position of an empty cache slot: far enough back to be outside every window and below 0.
EMPTY = -(1 << 30)


def as_positions(pos, batch: int) -> mx.array:
    """(B,) int32 positions from an int (the same for every row), a sequence or an array."""
    if isinstance(pos, mx.array):
        return pos.astype(mx.int32).reshape(-1) if pos.ndim else mx.full((batch,), pos.item(), mx.int32)
    if isinstance(pos, int):
        return mx.full((batch,), pos, mx.int32)
    return mx.array(list(pos), mx.int32)


def causal_mask(q_pos: mx.array, k_pos: mx.array, window: Optional[int] = None,
                pad: Optional[mx.array] = None, segment_ids: Optional[mx.array] = None) -> mx.array:
    """Boolean mask (L, S) or (B, 1, L, S).

    pad (B,): left-padding tokens per row of an uncached forward; keys at positions < pad are
    hidden. segment_ids (B, L): packed training rows, attention stays inside a segment (S == L).
    Every query may always see its own position, so padded rows never softmax over nothing.
    """
    per_row = q_pos.ndim == 2 or k_pos.ndim == 2 or pad is not None or segment_ids is not None
    if not per_row:
        diff = q_pos[:, None] - k_pos[None, :]  # (L, S)
        mask = diff >= 0
        return mask & (diff < window) if window is not None else mask
    q = q_pos[None] if q_pos.ndim == 1 else q_pos  # (B|1, L)
    k = k_pos[None] if k_pos.ndim == 1 else k_pos  # (B|1, S)
    diff = q[:, :, None] - k[:, None, :]  # (B|1, L, S)
    mask = (diff >= 0) & (k[:, None, :] > EMPTY)
    if window is not None:
        mask = mask & (diff < window)
    if pad is not None:
        mask = mask & (k[:, None, :] >= pad[:, None, None])
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if pad is not None or segment_ids is not None:
        mask = mask | (diff == 0)
    return mask[:, None]
